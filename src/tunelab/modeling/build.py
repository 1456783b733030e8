"""Build a model to train as the config says: the base loaded or built from scratch, quantized (bitsandbytes
NF4/FP4), a LoRA adapter attached (tokens a template added train as PEFT trainable tokens, only their rows),
gradient checkpointing; the run's tokenizer readied for its chat template; save_model writes the result.
Loading a finished model for inference is modeling/load.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.config import AdapterConfig, Config, ModelConfig, UserError
from tunelab.modeling.load import (_auto_class, check_model_dir, keep_4bit_layout, linear_module_names, load_tokenizer,
                                   pick_device,
                                   quiet_imports, resolve_dtype, teacher_tokenizer, uses_conv1d)


def load_model(cfg: Config, kind: str = "causal_lm", device: torch.device | None = None, tokenizer=None):
    """The base model named by `cfg.model`, quantized if asked, on `device`, not yet adapted."""
    quiet_imports()
    mc: ModelConfig = cfg.model
    device = device or pick_device()
    dtype = resolve_dtype(mc.dtype, device)
    if mc.init is not None:
        from tunelab.modeling.scratch import build_model  # pretraining from scratch

        model = build_model(mc.init, tokenizer, kind).to(device=device, dtype=dtype)
        return model
    check_model_dir(mc.path, mc.allow_pickle)
    kwargs = dict(dtype=dtype, trust_remote_code=mc.trust_remote_code, use_safetensors=not mc.allow_pickle or None)
    if kind == "sequence_classification":
        kwargs["num_labels"] = 1
    if mc.quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mc.quantize,
            bnb_4bit_use_double_quant=mc.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = _auto_class(kind).from_pretrained(mc.path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{mc.path}: could not load the model ({str(e).splitlines()[0]})") from None
    keep_4bit_layout(model)  # also a checkpoint saved 4-bit, without model.quantize
    if not mc.quantize:
        model.to(device)
    if tokenizer is not None and kind == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the scalar head reads the last non-pad token
    return model




def attach_adapter(model, ac: AdapterConfig, *, kind: str = "causal_lm", new_token_ids: list[int] = ()):
    """LoRA as `ac` says. `new_token_ids` (tokens the run added, e.g. ChatML's) get their embedding rows trained,
    and only those rows (PEFT's trainable tokens, also in a separate output head), so the model can learn them
    without training or saving whole embedding matrices.

    The same on a 4-bit (QLoRA) base, deliberately without PEFT's prepare_model_for_kbit_training: that upcasts
    every 16-bit parameter left (embeddings, head, norms: 4.2 GB of Llama-3-8B's 7.3 GiB of QLoRA weights) to
    fp32, and the fp32 norms then make the residual stream, the MLP activations and the logits fp32 too. They stay
    in the load dtype (model.dtype: bf16 on GPUs that have it). What PEFT's helper also does is done anyway:
    get_peft_model freezes the base, build_model turns on checkpointing (non-reentrant, inputs requiring grad).
    The adapter is fp32 (PEFT creates it so, and upcasts it on a 16-bit base): its master weights, gradients and
    AdamW state keep full precision while the matmuls run in the compute dtype."""
    from peft import LoraConfig, get_peft_model

    task_type = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "masked_lm": None}[kind]
    targets, expert_params, dropout = adapter_targets(model, ac)
    lora = LoraConfig(
        r=ac.r,
        lora_alpha=ac.alpha,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=expert_params or None,
        bias=ac.bias,
        modules_to_save=ac.modules_to_save or None,
        use_rslora=ac.rslora,
        use_dora=ac.dora,
        task_type=task_type,
        trainable_token_indices=_token_layers(model, new_token_ids) if new_token_ids else None,
        fan_in_fan_out=uses_conv1d(model),
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        names = ", ".join(sorted(linear_module_names(model))[:20])
        raise UserError(f"adapter.target_modules: {e} (linear layers in this model: {names})") from None
    if dropout != ac.dropout:
        from tunelab.modeling.moe import split_dropout

        split_dropout(peft_model, ac.dropout)
        print(f"adapter: LoRA on the fused expert weights ({', '.join(expert_params)}) runs without dropout (PEFT "
              f"cannot apply dropout there); the linear layers use adapter.dropout {ac.dropout}")
    from tunelab.modeling.lora_dropout import fuse_lora_dropout

    fuse_lora_dropout(peft_model)  # the same maths, a bool mask kept instead of two copies of each input
    return peft_model


def adapter_targets(model, ac: AdapterConfig) -> tuple:
    """(target_modules, target_parameters, lora_dropout) for PEFT. On a MoE model `all-linear` means every linear layer
    but the output head and the routers, plus the fused expert weights (modeling/moe.py); elsewhere PEFT resolves it.
    LoRA on expert weights cannot take dropout, so the adapter is created with 0 and the rest gets it back."""
    from tunelab.modeling.moe import all_linear_targets, is_moe

    if ac.target_modules != "all-linear" or not is_moe(model):
        return ac.target_modules, [], ac.dropout
    modules, params = all_linear_targets(model, linear_module_names(model))
    return modules, params, 0.0 if params else ac.dropout


def _token_layers(model, token_ids: list[int]) -> dict[str, list[int]]:
    """{module name: token ids} for PEFT's trainable_token_indices: the input embedding, and the output head too
    unless it is tied to the embedding (PEFT then ties the head's rows to the embedding's)."""
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    layers = {names[id(model.get_input_embeddings())]: list(token_ids)}
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        layers[names[id(out)]] = list(token_ids)
    return layers


def enable_gradient_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        # With a frozen embedding nothing before the first checkpointed block needs grad; checkpointing
        # then sees no input requiring grad and would drop the adapter's gradients.
        model.enable_input_require_grads()
    model.config.use_cache = False


def build(cfg: Config, kind: str = "causal_lm", device: torch.device | None = None, text_only: bool = False):
    """Tokenizer + trainable model as `cfg` describes: base, quantized, adapted, checkpointed."""
    tokenizer, added = build_tokenizer(cfg, kind, text_only)
    return build_model(cfg, kind, device, tokenizer, added), tokenizer


def build_tokenizer(cfg: Config, kind: str = "causal_lm", text_only: bool = False, say=None):
    """(the run's tokenizer readied for its chat template, ids of the tokens that added). Split from build_model
    so the trainer can read and check the data before it loads any weights. `kind` and `text_only` are the
    objective's traits (Objective.model_kind, Objective.text_only): a method that reads raw text uses no template
    and adds no tokens, whatever its sources' format says. (Other methods on completion/text rows get template none
    from choose_template, so a distillation student keeps the teacher's vocabulary.) `say` gets one line naming
    the template picked and why."""
    from tunelab.data import prepare_tokenizer

    tokenizer = load_run_tokenizer(cfg, text_only)
    if kind == "masked_lm" or text_only:
        return tokenizer, []
    formats = [s.format for s in cfg.data.train + cfg.data.eval]
    added, note = prepare_tokenizer(cfg.data.template, tokenizer, formats)
    if say is not None:
        say(note)
    return tokenizer, added


def import_peft_without_bitsandbytes_compile() -> None:
    """Import peft for a run that uses no bitsandbytes kernel (no 4-bit weights, no 8-bit optimizer). peft imports
    bitsandbytes whenever it is installed, and bitsandbytes wraps its kernels in torch.compile at import, which loads
    torch's compiler stack: most of peft's import time (bench/README.md, start-up). torch.compile is the identity
    while that import runs; should a 4-bit model follow in the same process, its kernels run uncompiled."""
    import sys

    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda fn: fn)
    try:
        import peft  # noqa: F401
    finally:
        torch.compile = compile_


def build_model(cfg: Config, kind: str, device: torch.device | None, tokenizer, added: list[int] = ()):
    """The trainable model for a tokenizer from build_tokenizer (`added`: ids of tokens it added, whose embedding
    rows are new: they start as the mean of the existing rows and are trained, alone with an adapter)."""
    model = load_model(cfg, kind, device, tokenizer)
    if added:
        add_embedding_rows(model, len(tokenizer), added)
    if cfg.adapter is not None:
        if not cfg.model.quantize and cfg.train.optimizer == "adamw":
            import_peft_without_bitsandbytes_compile()
        model = attach_adapter(model, cfg.adapter, kind=kind, new_token_ids=list(added))
    from tunelab.modeling.gated_mlp import keep_less_in_gated_mlps

    keep_less_in_gated_mlps(model, model.dtype)  # the same maths, act(gate) recomputed in backward, not kept
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.data.padding_free is True:  # before any objective copies it (DPO's frozen reference attends the same way)
        from tunelab.modeling.attention import use_padding_free_attention

        use_padding_free_attention(model)
    return model


@torch.no_grad()


def add_embedding_rows(model, vocab_size: int, token_ids: list[int]) -> None:
    """Grow the embeddings to `vocab_size` rows if they have fewer (a vocabulary padded beyond the tokenizer already
    has rows for new ids) and start the rows of `token_ids` at the mean of the original rows: a new token then
    reads like an average one and gets an average logit, instead of a random vector far from anything trained."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size > old:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    rows = torch.tensor(token_ids)
    out = model.get_output_embeddings()
    for weight in {id(w): w for w in (model.get_input_embeddings().weight, out.weight if out is not None else None)
                   if w is not None}.values():
        weight[rows] = weight[:old].float().mean(0).to(weight.dtype)


def load_run_tokenizer(cfg: Config, text_only: bool = False):
    """tokenizer.path if set; else the model's, or for a model built by model.init one trained on the data
    (tokenizer.train) or, for distillation, the teacher's (the student must share its vocabulary)."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init is None:
        return load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    if cfg.tokenizer.train:
        from tunelab.modeling.scratch import train_tokenizer

        return train_tokenizer(cfg, text_only)
    if cfg.teacher is not None:
        return teacher_tokenizer(cfg.teacher.path)
    raise UserError("model.init builds a model without a tokenizer: set tokenizer.train: true "
                    "(train one on the data) or tokenizer.path (use an existing one)")


def save_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> None:
    """Adapter dir for PEFT models, full `save_pretrained` dir otherwise; tokenizer beside it.
    `state_dict`: the full weights when the model's own are sharded (FSDP gathers them first)."""
    quiet_imports()
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"state_dict": state_dict} if state_dict else {}
    if hasattr(model, "peft_config"):
        # PEFT would save both whole embedding matrices when the vocabulary grew; the new rows are already in the
        # adapter (trainable tokens), and a loader grows the base to the saved tokenizer first (load_pretrained)
        extra["save_embedding_layers"] = False
    model.save_pretrained(out_dir, safe_serialization=True, **extra)
    tokenizer.save_pretrained(out_dir)
