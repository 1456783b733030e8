"""axolotl's YAML -> a tunelab config dict (axolotl-ai-cloud/axolotl, src/axolotl/utils/schemas/). Its defaults that
differ from tunelab's (sequence_len 512, micro_batch_size 1, one epoch, no LoRA dropout) are set explicitly, so the
run is the one axolotl would have done."""

from __future__ import annotations

from .common import (Locate, Mapping, as_given, convert_by_steps, copy_keys, dpo_label_smoothing, optimizer,
                     precision, scheduler, template, trainer_arguments)

# Recognised by these keys (base_model plus one of the rest).
MARKERS = ("datasets", "sequence_len", "micro_batch_size", "adapter", "lora_r", "num_epochs")

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
RL_METHODS = {"dpo": "dpo", "ipo": "dpo", "simpo": "dpo", "orpo": "orpo", "kto": "kto"}

# Keys that change speed, memory or bookkeeping only, or that tunelab does itself (why, for the note).
DROPPABLE = {
    "tf32": "matmul precision is the backend's default", "attn_implementation": "tunelab picks SDPA",
    "flash_attention": "tunelab picks SDPA", "sdp_attention": "tunelab picks SDPA",
    "dataset_prepared_path": "tunelab caches tokenized data itself", "strict": "axolotl's loader setting",
    "model_type": "the Auto class is chosen from the model's config", "tokenizer_type": "AutoTokenizer is used",
    "special_tokens": "tunelab sets pad from the tokenizer and the template adds its own end-of-turn tokens",
    "eval_sample_packing": "evaluation batches follow data.packing",
    "pad_to_sequence_len": "batches are padded to their longest row", "loss_watchdog_threshold": "train.max_bad_steps "
    "stops on non-finite steps", "loss_watchdog_patience": "train.max_bad_steps stops on non-finite steps",
    "gradient_checkpointing_kwargs": "tunelab uses non-reentrant checkpointing", "remove_unused_columns": "rows keep "
    "their columns", "wandb_watch": "gradients are not logged", "wandb_log_model": "models are not uploaded to W&B",
    "ddp_find_unused_parameters": "DDP is configured by tunelab", "torch_compile": "no compilation",
    "liger_rms_norm": "kernel choice", "liger_glu_activation": "kernel choice", "liger_layer_norm": "kernel choice",
    "liger_rope": "kernel choice", "liger_fused_linear_cross_entropy": "tunelab's loss is chunked already",
    "lora_mlp_kernel": "kernel choice", "lora_qkv_kernel": "kernel choice", "lora_o_kernel": "kernel choice",
    "plugins": "axolotl integrations (kernels such as cut cross-entropy)", "save_safetensors": "tunelab writes "
    "safetensors", "resume_from_checkpoint": "use `tunelab train --resume`", "auto_resume_from_checkpoints": "use "
    "`tunelab train --resume`", "tokenizer_use_fast": "fast tokenizers are used", "low_cpu_mem_usage": "loader "
    "setting", "save_strategy": "train.save_every counts steps", "eval_strategy": "train.eval_every counts steps",
    "evaluation_strategy": "train.eval_every counts steps", "shuffle_merged_datasets": "rows are shuffled per epoch",
    "eot_tokens": "the template's end-of-turn tokens are the stop tokens",
    "saves_per_epoch": "tunelab saves every train.save_every steps (set it to steps per epoch / saves)",
    "evals_per_epoch": "tunelab evaluates every train.eval_every steps", "lora_fan_in_fan_out": "peft reads it "
    "from the layer type", "use_tensorboard": "TensorBoard is on by default",
    "num_labels": "a reward model has one score",
}


def looks_like(data: dict) -> bool:
    return "base_model" in data and any(key in data for key in MARKERS)


def convert(source: dict, where: str, locate: Locate = as_given) -> Mapping:
    return convert_by_steps(source, "axolotl", where, (_model, _adapter, _method, _datasets, _training, _logging),
                            DROPPABLE, locate)


def _model(m: Mapping) -> None:
    m.set("model.path", m.get("base_model"), "base_model")
    for key in ("tokenizer_config", "base_model_config"):
        if m.has(key) and m.get(key) != m.get("base_model"):
            m.set("tokenizer.path" if key == "tokenizer_config" else "model.path", m.get(key), key)
    if m.get("trust_remote_code"):
        m.set("model.trust_remote_code", True, "trust_remote_code")
    for key in ("gptq", "qat", "relora", "unfrozen_parameters", "lisa_n_layers", "processor_type", "fp8",
                "pretraining_dataset", "reward_model" if m.get("rl") else "", "process_reward_model"):
        if key and m.has(key):
            raise m.refuse(key, {"processor_type": "multimodal models are not supported",
                                 "pretraining_dataset": "streamed pretraining sets are not read; download the data "
                                 "and list it under datasets with type: completion"}.get(
                key, "not implemented in tunelab"))


def _adapter(m: Mapping) -> None:
    kind = m.get("adapter")
    if m.has("lora_model_dir"):
        raise m.refuse("lora_model_dir", "continuing an existing adapter is not supported; train a new one")
    if kind not in (None, "lora", "qlora"):
        raise m.refuse("adapter", "tunelab trains lora and qlora adapters")
    if m.get("load_in_4bit") or kind == "qlora":
        m.set("model.quantize", "nf4", *[k for k in ("adapter", "load_in_4bit") if m.has(k)])
    if m.get("load_in_8bit"):
        m.note("load_in_8bit", "tunelab has no 8-bit base: the base stays in its dtype (more memory, same method)"
               if kind == "lora" else "ignored: the base stays in its dtype")
    if kind is None:
        return
    m.set("adapter.type", "lora", "adapter")
    target = "all-linear" if m.get("lora_target_linear") else m.get("lora_target_modules", "all-linear")
    m.set("adapter.target_modules", target, *[k for k in ("lora_target_linear", "lora_target_modules") if m.has(k)])
    m.set("adapter.r", m.get("lora_r", 8), "lora_r")
    m.set("adapter.alpha", m.get("lora_alpha", m.get("lora_r", 8)), "lora_alpha")
    m.set("adapter.dropout", m.get("lora_dropout", 0.0), "lora_dropout")
    if m.has("lora_modules_to_save"):
        m.set("adapter.modules_to_save", m.get("lora_modules_to_save"), "lora_modules_to_save")
    if m.get("peft_use_rslora"):
        m.set("adapter.rslora", True, "peft_use_rslora")
    if m.get("peft_use_dora"):
        m.set("adapter.dora", True, "peft_use_dora")


def _method(m: Mapping) -> None:
    rl = m.get("rl")
    if rl is None:
        if m.get("reward_model"):
            m.set("method", "reward", "reward_model")
        return
    if rl not in RL_METHODS:
        raise m.refuse("rl", f"tunelab's preference methods from axolotl are {', '.join(RL_METHODS)}")
    method = RL_METHODS[rl]
    m.set("method", method, "rl")
    if rl in ("ipo", "simpo"):
        m.set("dpo.loss", rl, "rl")
    if m.has("rl_beta"):
        m.set(f"{method}.beta", m.get("rl_beta"), "rl_beta")
    if m.has("orpo_alpha"):
        m.set("orpo.beta", m.get("orpo_alpha"), "orpo_alpha")
    dpo_label_smoothing(m)
    if m.has("simpo_gamma"):
        m.set("dpo.gamma", m.get("simpo_gamma"), "simpo_gamma")
    if m.has("rpo_alpha"):
        m.set("dpo.nll_alpha", m.get("rpo_alpha"), "rpo_alpha")
    copy_keys(m, "kto", (("desirable_weight", "kto_desirable_weight"),
                         ("undesirable_weight", "kto_undesirable_weight")))


def _datasets(m: Mapping) -> None:
    from .axolotl_data import dataset_source

    method = m.config.get("method", "sft")
    for key, section in (("datasets", "data.train"), ("test_datasets", "data.eval")):
        entries = m.get(key) or []
        if key == "datasets" and not entries:
            raise m.refuse(key, "a run needs training data")
        sources = [dataset_source(m, key, i, entry, method) for i, entry in enumerate(entries)]
        if sources:
            m.set(section, sources, key)
    template(m, "chat_template", "chat_template_jinja")
    kinds = {str(e.get("type", "")).partition(":")[0] for e in m.get("datasets") if isinstance(e, dict)}
    if kinds == {"alpaca"} and not m.has("chat_template"):  # axolotl's alpaca type renders Alpaca's prompt
        m.set("data.template", "alpaca", "datasets")
    if m.has("val_set_size"):
        m.set("data.eval_fraction", m.get("val_set_size"), "val_set_size")
    m.set("data.max_length", m.get("sequence_len", 512), "sequence_len")
    if m.get("sample_packing"):
        m.set("data.packing", True, "sample_packing")
    if m.has("train_on_inputs"):
        m.set("data.train_on_prompt", m.get("train_on_inputs"), "train_on_inputs")
    if m.has("excess_length_strategy"):
        strategy = m.get("excess_length_strategy")
        if strategy != "truncate":
            raise m.refuse("excess_length_strategy", "tunelab truncates long rows (data.truncation)")
        m.set("data.truncation", "right", "excess_length_strategy")


def _training(m: Mapping) -> None:
    m.set("train.micro_batch_size", m.get("micro_batch_size", 1), "micro_batch_size")
    m.set("train.grad_accum", m.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps")
    if m.has("max_steps"):
        m.set("train.max_steps", m.get("max_steps"), "max_steps")
    m.set("train.epochs", m.get("num_epochs", 1), "num_epochs")
    if m.has("learning_rate"):
        m.set("train.lr", float(m.get("learning_rate")), "learning_rate")
    scheduler(m, "lr_scheduler")
    optimizer(m, "optimizer", OPTIMIZERS)
    trainer_arguments(m, (("early_stopping_patience", "early_stopping_patience"),))
    if m.get("gradient_checkpointing"):
        m.set("train.gradient_checkpointing", True, "gradient_checkpointing")
    precision(m)
    if m.has("fsdp") or m.has("fsdp_config"):
        m.set("train.distributed", "fsdp", *[k for k in ("fsdp", "fsdp_config", "fsdp_version") if m.has(k)])
        m.note("fsdp_config", "-> train.distributed: fsdp (tunelab's FSDP2 wrapping; the settings are its own)")
    if m.has("deepspeed"):
        m.note("deepspeed", "tunelab has no DeepSpeed: runs use DDP (`tunelab train --nproc N`); "
                            "set train.distributed: fsdp to shard")


def _logging(m: Mapping) -> None:
    m.set("output_dir", m.get("output_dir", "./model-out"), "output_dir")
    if m.has("hub_model_id"):
        m.set("output.hub_model_id", m.get("hub_model_id"), "hub_model_id")
        if m.get("hub_private_repo"):
            m.set("output.hub_private", True, "hub_private_repo")
    wandb = {ours: m.get(theirs) for ours, theirs in (("project", "wandb_project"), ("entity", "wandb_entity"),
                                                      ("name", "wandb_name"), ("mode", "wandb_mode"),
                                                      ("id", "wandb_run_id")) if m.has(theirs)}
    if wandb:
        m.set("log.wandb", wandb, *[k for k in ("wandb_project", "wandb_entity", "wandb_name", "wandb_mode",
                                                "wandb_run_id") if m.has(k)])
    if m.has("use_wandb"):
        m.set("log.wandb", wandb or {}, "use_wandb")
