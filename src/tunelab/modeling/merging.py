"""`tunelab merge`: fold a LoRA/QLoRA adapter into its base, a standalone `save_pretrained` model dir."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.config import UserError
from tunelab.modelcard import write_model_card
from tunelab.modeling.build import save_model
from tunelab.modeling.load import (_from_pretrained, _run_config, _set_pad_id, adapter_kind, grow_to_tokenizer,
                                   is_adapter_dir, load_tokenizer, quiet_imports, resolve_dtype, resolve_model_dir)


def merge(path: str, out: str, dtype: str = "auto") -> Path:
    """Fold a LoRA/QLoRA adapter into its base: a standalone model dir.

    A QLoRA run's adapter was trained against the NF4-rounded base, so the merge goes into the
    dequantized NF4 weights (not the original full-precision ones) to reproduce the trained model.
    """
    from peft import PeftModel

    quiet_imports()

    p = resolve_model_dir(path)
    if not is_adapter_dir(p):
        raise UserError(f"{path}: holds no adapter to merge (it is already a full model dir)")
    run_cfg = _run_config(p)
    base_path = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    device = torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, device)
    kind = adapter_kind(p)
    base = _from_pretrained(base_path, kind, torch_dtype)
    if run_cfg is not None and run_cfg.model.quantize:
        _round_to_quantized(base, run_cfg.model.quantize, run_cfg.model.double_quant)
    tokenizer = load_tokenizer(str(p) if (p / "tokenizer_config.json").is_file() else base_path)
    model = PeftModel.from_pretrained(grow_to_tokenizer(base, tokenizer), p).merge_and_unload()
    _set_pad_id(model, kind, tokenizer)
    out_dir = Path(out)
    save_model(model, tokenizer, out_dir)
    write_model_card(out_dir, run_cfg, kind="merged")
    return out_dir


@torch.no_grad()
def _round_to_quantized(model, quant_type: str, double_quant: bool) -> None:
    """Replace each linear weight (except the head) by its 4-bit round trip, as QLoRA training saw it."""
    import bitsandbytes.functional as bnbf

    out = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not out:
            w = module.weight.data
            q, state = bnbf.quantize_4bit(w.float(), quant_type=quant_type, compress_statistics=double_quant)
            module.weight.data = bnbf.dequantize_4bit(q, state).to(w.dtype)
