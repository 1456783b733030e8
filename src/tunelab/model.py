"""Load or build a model and tokenizer, quantize, attach a LoRA adapter, save; load a finished one for inference.

Everything a run writes is in formats other tools read: `save_pretrained` model dirs (safetensors
only) and PEFT adapter dirs (`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from tunelab import run_files
from tunelab.config import AdapterConfig, Config, ModelConfig, UserError

log = logging.getLogger("tunelab")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_KINDS = ("causal_lm", "sequence_classification", "masked_lm")


def quiet_imports() -> None:
    """bitsandbytes logs a missing optional CPU kernel package on every import; it is harmless here."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.default.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown the run's own output


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` keeps full precision on CPU (no fast bf16 matmul there) and uses bf16 on GPUs that have it."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _auto_class(kind: str):
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
        "masked_lm": transformers.AutoModelForMaskedLM,
    }[kind]


def check_model_dir(path: str, allow_pickle: bool) -> None:
    p = Path(path)
    if not p.exists():
        if p.is_absolute() or path.startswith((".", "~")) or p.parent != Path(".") and not _looks_like_hub_id(path):
            raise UserError(f"model path not found: {path}")
        return  # a hub id: transformers resolves it (needs network or a warm cache)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model dir (no config.json)")
    has_safetensors = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UserError(
            f"{path}: holds only pickle weights (.bin/.pt), which can run code when loaded; "
            "convert them to safetensors, or set model.allow_pickle: true if you trust the source"
        )
    if not has_safetensors and has_pickle:
        import sys

        print(f"warning: {path}: loading pickle weights (.bin/.pt) because model.allow_pickle is true; pickle can "
              "run arbitrary code, so only do this for a source you trust", file=sys.stderr)


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        # Padding positions never carry loss or attention, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: Config, kind: str = "causal_lm", device: torch.device | None = None, tokenizer=None):
    """The base model named by `cfg.model`, quantized if asked, on `device`, not yet adapted."""
    quiet_imports()
    mc: ModelConfig = cfg.model
    device = device or pick_device()
    dtype = resolve_dtype(mc.dtype, device)
    if mc.init is not None:
        from tunelab.scratch import build_model  # pretraining from scratch

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
    if mc.quantize:
        keep_4bit_layout(model)
    else:
        model.to(device)
    if tokenizer is not None and kind == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the scalar head reads the last non-pad token
    return model


def keep_4bit_layout(model) -> None:
    """bitsandbytes repacks a Linear4bit weight for a CPU inference kernel at its first eval-mode forward, for
    good, and that layout has no backward: training after an evaluation or a rollout would backprop wrongly
    through the 4-bit layers. Keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
        from tunelab.moe import split_dropout

        split_dropout(peft_model, ac.dropout)
        print(f"adapter: LoRA on the fused expert weights ({', '.join(expert_params)}) runs without dropout (PEFT "
              f"cannot apply dropout there); the linear layers use adapter.dropout {ac.dropout}")
    from tunelab.lora_dropout import fuse_lora_dropout

    fuse_lora_dropout(peft_model)  # the same maths, a bool mask kept instead of two copies of each input
    return peft_model


def adapter_targets(model, ac: AdapterConfig) -> tuple:
    """(target_modules, target_parameters, lora_dropout) for PEFT. On a MoE model `all-linear` means every linear layer
    but the output head and the routers, plus the fused expert weights (tunelab.moe); elsewhere PEFT resolves it.
    LoRA on expert weights cannot take dropout, so the adapter is created with 0 and the rest gets it back."""
    from tunelab.moe import all_linear_targets, is_moe

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
    from tunelab.gated_mlp import keep_less_in_gated_mlps

    keep_less_in_gated_mlps(model, model.dtype)  # the same maths, act(gate) recomputed in backward, not kept
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.data.padding_free is True:  # before any objective copies it (DPO's frozen reference attends the same way)
        from tunelab.attention import use_padding_free_attention

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
        from tunelab.scratch import train_tokenizer

        return train_tokenizer(cfg, text_only)
    if cfg.teacher is not None:
        return teacher_tokenizer(cfg.teacher.path)
    raise UserError("model.init builds a model without a tokenizer: set tokenizer.train: true "
                    "(train one on the data) or tokenizer.path (use an existing one)")


def linear_module_names(model) -> set[str]:
    """Leaf names of linear layers (what `target_modules` matches), excluding the output head."""
    import torch.nn as nn

    names = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")
        if is_linear and module is not out:
            names.add(name.rsplit(".", 1)[-1])
    return names


def uses_conv1d(model) -> bool:
    """GPT-2 style models store their projections as transformers' Conv1D ([in, out] weights): LoRA must transpose."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def unwrap(model):
    """The transformers model under any PEFT / DDP wrapping."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


# ---------------------------------------------------------------- inference-side loading

def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def resolve_model_dir(path: str) -> Path:
    """Accept a run dir (uses its final/), an adapter dir, or a plain model dir."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model path not found: {path}")
    if (p / run_files.FINAL).is_dir():
        p = p / run_files.FINAL
    if not (is_adapter_dir(p) or (p / "config.json").is_file()):
        raise UserError(f"{path}: neither a run dir, an adapter dir nor a model dir")
    return p


def teacher_tokenizer(path: str):
    """The tokenizer of a teacher given as a model dir, a run dir (its final/) or an adapter dir (its base's)."""
    import json

    try:
        p = resolve_model_dir(path)
    except UserError as e:
        raise UserError(f"teacher.path: {e}") from None
    if not (p / "tokenizer_config.json").is_file() and (p / "adapter_config.json").is_file():
        p = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    return load_tokenizer(str(p))


def load_pretrained(path: str, *, dtype: str = "auto", device: torch.device | None = None, kind: str = "causal_lm",
                    allow_pickle: bool = False):
    """(model, tokenizer) for inference: base + adapter when `path` is an adapter dir."""
    quiet_imports()
    p = resolve_model_dir(path)
    device = device or pick_device()
    torch_dtype = resolve_dtype(dtype, device)
    if is_adapter_dir(p):
        from peft import PeftModel

        base_path = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        check_model_dir(base_path, allow_pickle)
        base = _from_pretrained(base_path, kind, torch_dtype)
        tokenizer = load_tokenizer(str(p) if (p / "tokenizer_config.json").is_file() else base_path)
        model = PeftModel.from_pretrained(grow_to_tokenizer(base, tokenizer), p)
    else:
        check_model_dir(str(p), allow_pickle)
        model = _from_pretrained(p, kind, torch_dtype)
        tokenizer = load_tokenizer(str(p))
    _set_pad_id(model, kind, tokenizer)
    return model.to(device).eval(), tokenizer


def grow_to_tokenizer(base, tokenizer):
    """A base model with embedding rows for every token of an adapter's saved tokenizer: tokens the run added
    (e.g. ChatML's) are in the adapter as trainable-token rows, which PEFT writes over these new rows."""
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return base


def _from_pretrained(path, kind: str, dtype):
    # A reward model's scalar head: num_labels=1, also when its base is a causal LM (adapter dirs)
    extra = {"num_labels": 1} if kind == "sequence_classification" else {}
    return _auto_class(kind).from_pretrained(path, dtype=dtype, **extra)


def _set_pad_id(model, kind: str, tokenizer) -> None:
    if kind == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the scalar head reads the last non-pad token


def adapter_kind(adapter_dir: Path) -> str:
    """The Auto class an adapter was trained on: SEQ_CLS adapters (reward models) need the scalar-head model."""
    task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    return "sequence_classification" if task == "SEQ_CLS" else "causal_lm"


def _run_config(adapter_dir: Path) -> Config | None:
    from tunelab.config import load_config

    for candidate in (adapter_dir / "config.yaml", adapter_dir.parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    return None
