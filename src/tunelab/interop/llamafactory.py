"""LLaMA-Factory's YAML (its ModelArguments, DataArguments, FinetuningArguments and transformers'
Seq2SeqTrainingArguments; hiyouga/LLaMA-Factory, src/llamafactory/hparams/) -> a tunelab config dict. Defaults that
differ from tunelab's are set explicitly: transformers' batch size 8, lr 5e-5, linear schedule; LoRA rank 8 with
alpha 2 x rank and no dropout; gradient checkpointing on; cutoff_len 2048; packing on for stage pt only."""

from __future__ import annotations

from .common import (Locate, Mapping, as_given, convert_by_steps, copy_keys, dpo_label_smoothing, optimizer,
                     precision, scheduler, template, trainer_arguments)

MARKERS = ("stage", "finetuning_type", "cutoff_len", "lora_target", "dataset")
STAGES = {"sft": "sft", "pt": "pretrain", "rm": "reward", "dpo": "dpo", "kto": "kto"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}

DROPPABLE = {
"preprocessing_num_workers": "tokenizing runs in one process",
    "dataloader_num_workers": "batches are built in the training process", "ddp_timeout": "DDP is configured by "
    "tunelab", "overwrite_output_dir": "a finished output_dir is refused; pick a new one or remove it",
    "save_only_model": "checkpoints always hold the optimizer, for exact resume", "flash_attn": "tunelab picks SDPA",
    "enable_liger_kernel": "kernel choice", "use_unsloth": "kernel choice", "tokenized_path": "tunelab caches "
    "tokenized data itself", "resume_from_checkpoint": "use `tunelab train --resume`", "per_device_eval_batch_size":
    "eval batches use train.micro_batch_size", "eval_strategy": "train.eval_every counts steps", "save_strategy":
    "train.save_every counts steps", "max_samples": "tunelab trains on every row; cap the run with train.max_steps",
    "ray_num_workers": "use `tunelab train --nproc N` on one machine", "use_ray": "use `tunelab train --nproc N`",
    "ray_storage_path": "use `tunelab train --nproc N`", "include_num_input_tokens_seen": "tokens are always logged",
    "ddp_find_unused_parameters": "DDP is configured by tunelab", "logging_first_step": "every log_every steps",
}


def looks_like(data: dict) -> bool:
    return "model_name_or_path" in data and any(key in data for key in MARKERS)


def convert(source: dict, where: str, locate: Locate = as_given) -> Mapping:
    return convert_by_steps(source, "LLaMA-Factory", where, (_model, _method, _data, _training, _output), DROPPABLE,
                            locate)


def _model(m: Mapping) -> None:
    m.set("model.path", m.get("model_name_or_path"), "model_name_or_path")
    if m.get("trust_remote_code"):
        m.set("model.trust_remote_code", True, "trust_remote_code")
    for key in ("adapter_name_or_path", "pissa_init", "loraplus_lr_ratio", "use_galore", "use_badam", "use_apollo",
                "freeze_vision_tower", "image_max_pixels", "mask_history", "streaming", "use_llama_pro"):
        if m.has(key):
            raise m.refuse(key, {"adapter_name_or_path": "continuing an existing adapter is not supported; train a "
                                 "new one (or merge it first with `tunelab merge`)",
                                 "mask_history": "tunelab trains on every assistant turn",
                                 "streaming": "datasets are read from local files"}.get(key, "not implemented in tunelab"))
    kind = m.get("finetuning_type", "lora")
    if kind not in ("lora", "full"):
        raise m.refuse("finetuning_type", "tunelab trains lora adapters or the full model")
    m.read.add("finetuning_type")
    bits = m.get("quantization_bit")
    if bits is not None:
        if m.get("quantization_method", "bnb") != "bnb":
            raise m.refuse("quantization_method", "tunelab quantizes with bitsandbytes (bnb)")
        if bits == 4:
            m.set("model.quantize", m.get("quantization_type", "nf4"), "quantization_bit",
                  *[k for k in ("quantization_method", "quantization_type") if m.has(k)])
            if m.get("double_quantization") is False:
                m.set("model.double_quant", False, "double_quantization")
        elif bits == 8:
            m.note("quantization_bit", "8: tunelab has no 8-bit base; the base stays in its dtype (more memory)")
        else:
            raise m.refuse("quantization_bit", "tunelab quantizes to 4 bits (bitsandbytes NF4/FP4)")
    m.read.update(("quantization_method", "double_quantization"))
    if kind == "lora":
        rank = m.get("lora_rank", 8)
        m.set("adapter.r", rank, "lora_rank")
        m.set("adapter.alpha", m.get("lora_alpha", rank * 2), "lora_alpha")
        m.set("adapter.dropout", m.get("lora_dropout", 0.0), "lora_dropout")
        target = m.get("lora_target", "all")
        names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
        m.set("adapter.target_modules", "all-linear" if names == ["all"] else names, "lora_target")
        if m.has("additional_target"):
            extra = m.get("additional_target")
            m.set("adapter.modules_to_save", [t.strip() for t in extra.split(",")] if isinstance(extra, str) else extra,
                  "additional_target")
        for ours, theirs in (("rslora", "use_rslora"), ("dora", "use_dora")):
            if m.get(theirs):
                m.set(f"adapter.{ours}", True, theirs)


def _method(m: Mapping) -> None:
    stage = m.get("stage", "sft")
    if stage not in STAGES:
        raise m.refuse("stage", f"tunelab runs the stages {', '.join(STAGES)} from LLaMA-Factory configs "
                                "(ppo: use method: ppo with a reward model dir)")
    method = STAGES[stage]
    loss = m.get("pref_loss", "sigmoid")
    if stage == "dpo" and loss == "orpo":
        method = "orpo"
    m.set("method", method, "stage", *(["pref_loss"] if m.has("pref_loss") else []))
    if stage == "dpo" and method == "dpo":
        if loss not in ("sigmoid", "ipo", "simpo"):
            raise m.refuse("pref_loss", "tunelab's DPO losses are sigmoid, ipo and simpo (orpo is method orpo)")
        if loss != "sigmoid":
            m.set("dpo.loss", loss, "pref_loss")
        if m.has("simpo_gamma"):
            m.set("dpo.gamma", m.get("simpo_gamma"), "simpo_gamma")
        dpo_label_smoothing(m)
        if m.has("pref_ftx"):
            m.set("dpo.nll_alpha", m.get("pref_ftx"), "pref_ftx")
    if method in ("dpo", "orpo", "kto"):
        m.set(f"{method}.beta", m.get("pref_beta", 0.1), "pref_beta")
    copy_keys(m, "kto", (("desirable_weight", "kto_chosen_weight"), ("undesirable_weight", "kto_rejected_weight")))


def _data(m: Mapping) -> None:
    from .llamafactory_data import sources

    method = m.config["method"]
    if not m.has("dataset"):
        raise m.refuse("dataset", "a run needs training data")
    m.set("data.train", sources(m, "dataset", method), "dataset", *(["dataset_dir"] if m.has("dataset_dir") else []))
    if m.has("eval_dataset"):
        m.set("data.eval", sources(m, "eval_dataset", method), "eval_dataset")
    if method != "pretrain":
        template(m, "template")
    if m.has("val_size"):
        m.set("data.eval_fraction", float(m.get("val_size")), "val_size")
    m.set("data.max_length", m.get("cutoff_len", 2048), "cutoff_len")
    packing = m.get("packing", m.get("neat_packing", method == "pretrain"))
    if packing:
        m.set("data.packing", True, *[k for k in ("packing", "neat_packing") if k in m.source] or ["stage"])
    if m.get("train_on_prompt"):
        m.set("data.train_on_prompt", True, "train_on_prompt")


def _training(m: Mapping) -> None:
    m.set("train.micro_batch_size", m.get("per_device_train_batch_size", 8), "per_device_train_batch_size")
    m.set("train.grad_accum", m.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps")
    m.set("train.epochs", float(m.get("num_train_epochs", 3.0)), "num_train_epochs")
    if m.has("max_steps") and m.get("max_steps") > 0:
        m.set("train.max_steps", m.get("max_steps"), "max_steps")
    m.set("train.lr", float(m.get("learning_rate", 5e-5)), "learning_rate")
    if not m.has("lr_scheduler_type"):
        m.set("train.scheduler", "linear")
    scheduler(m, "lr_scheduler_type")
    optimizer(m, "optim", OPTIMIZERS)
    trainer_arguments(m)
    m.set("train.gradient_checkpointing", not m.get("disable_gradient_checkpointing", False),
          *(["disable_gradient_checkpointing"] if "disable_gradient_checkpointing" in m.source else []))
    precision(m)
    if m.has("deepspeed"):
        zero3 = "z3" in str(m.get("deepspeed"))
        if zero3:
            m.set("train.distributed", "fsdp", "deepspeed")
        m.note("deepspeed", "tunelab has no DeepSpeed: " + ("ZeRO-3 -> train.distributed: fsdp (parameters sharded)"
                                                           if zero3 else "runs use DDP (`tunelab train --nproc N`)"))
    if m.has("fsdp"):
        m.set("train.distributed", "fsdp", "fsdp", *(["fsdp_config"] if m.has("fsdp_config") else []))


def _output(m: Mapping) -> None:
    m.set("output_dir", m.get("output_dir", "saves/run"), "output_dir")
    if m.has("plot_loss"):
        m.set("log.plot", bool(m.get("plot_loss")), "plot_loss")
    report = m.get("report_to", "none")
    report = [r.strip() for r in report.split(",")] if isinstance(report, str) else list(report)
    unknown = [r for r in report if r not in ("none", "wandb", "tensorboard", "mlflow", "all")]
    if unknown:
        raise m.refuse("report_to", "tunelab reports to wandb, tensorboard and mlflow")
    m.set("log.tensorboard", "tensorboard" in report or "all" in report, "report_to")
    if "wandb" in report or "all" in report:
        m.set("log.wandb", {"name": m.get("run_name")} if m.has("run_name") else {}, "report_to",
              *(["run_name"] if m.has("run_name") else []))
    if "mlflow" in report or "all" in report:
        m.set("log.mlflow", {}, "report_to")
    if m.has("hub_model_id") or m.get("push_to_hub"):
        if not m.has("hub_model_id"):
            raise m.refuse("push_to_hub", "name the repo with hub_model_id")
        m.set("output.hub_model_id", m.get("hub_model_id"), "hub_model_id",
              *(["push_to_hub"] if m.has("push_to_hub") else []))
        if m.get("hub_private_repo"):
            m.set("output.hub_private", True, "hub_private_repo")
    m.read.update(("run_name", "do_train"))  # do_train: `tunelab train` trains
