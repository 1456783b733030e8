"""Models and tokenizers as they are on disk: load a finished one for inference (a model dir, a run dir's final/,
or a PEFT adapter dir over its base), and the basics that loading for training shares (device, dtype, the Auto
class of a model kind, the checks before loading, the tokenizer, unwrap).

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
from tunelab.config import Config, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def unwrap(model):
    """The transformers model under any PEFT / DDP wrapping."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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

def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers in their trainable layout in every forward. On a CPU with AVX512-BF16,
    bitsandbytes (0.50) repacks a Linear4bit weight for a CPU inference kernel, for good, at its first forward in
    eval mode without grad: an evaluation inside training, a rollout, a frozen reference, generation, serving. That
    layout fails outright unless every output dimension is a multiple of 32 (tiny models), computes in bf16 whatever
    the compute dtype (results would depend on the CPU), has no backward (later training steps get other gradients)
    and rounds the stored absmax to bf16 (tests/test_qlora.py measures each). Every 4-bit layer tunelab loads comes
    through here (load_model, _from_pretrained); copies of a model (DPO, KTO and RL references) keep the switch."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    model = _auto_class(kind).from_pretrained(path, dtype=dtype, **extra)
    keep_4bit_layout(model)  # a checkpoint saved 4-bit loads as bitsandbytes layers
    return model


def _set_pad_id(model, kind: str, tokenizer) -> None:
    if kind == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the scalar head reads the last non-pad token


def adapter_kind(adapter_dir: Path) -> str:
    """The Auto class an adapter was trained on: SEQ_CLS adapters (reward models) need the scalar-head model."""
    task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    return "sequence_classification" if task == "SEQ_CLS" else "causal_lm"


def _run_config(adapter_dir: Path) -> Config | None:
    from tunelab.config import load_config

    for candidate in (adapter_dir / run_files.CONFIG, adapter_dir.parent / run_files.CONFIG):
        if candidate.is_file():
            return load_config(candidate)
    return None
