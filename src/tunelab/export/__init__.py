"""`tunelab export RUN_OR_MODEL --format gguf|ollama [--quant ...] [--out DIR]`: a run's model (an adapter is merged
first) as GGUF for llama.cpp, with the run's chat template and stop tokens embedded; `ollama` adds a Modelfile; `gguf-lora` writes a LoRA run's adapter alone, to apply at load time
(`llama-cli -m BASE.gguf --lora ADAPTER.gguf`).
Every export dir gets a model card. The architecture is checked against llama.cpp's table before any work."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..config import UserError
from .gguf import CONVERTER_TYPES, QUANTIZED, check_architecture, convert, llama_dir, quantize

FORMATS = ("gguf", "ollama", "gguf-lora")
QUANTS = (*CONVERTER_TYPES, *QUANTIZED)


def export(path: str, fmt: str = "gguf", quant: str = "f16", out: str | None = None, say=print) -> Path:
    from ..modelcard import run_config, write_model_card
    from ..modeling.load import is_adapter_dir, load_tokenizer, resolve_model_dir

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: use one of {', '.join(QUANTS)}")
    root = llama_dir()
    src = resolve_model_dir(path)
    adapter = is_adapter_dir(src)
    check_architecture(_model_config(src, adapter), root)
    cfg = run_config(src)
    name = (src.parent if src.name == "final" else src).name
    out_dir = Path(out) if out else (src.parent / f"export-{fmt}" if src.name == "final" else src.parent / f"{name}-{fmt}")
    if fmt == "gguf-lora":
        return _export_lora(src, adapter, quant, out_dir, name, cfg, say)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{quant}.gguf"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model_dir = src
        if adapter:
            from ..modeling.merging import merge

            say(f"merging the adapter in {src} into its base")
            model_dir = merge(str(src), str(Path(tmp) / "merged"))
        tokenizer = load_tokenizer(str(model_dir))
        if quant in QUANTIZED:
            quantize(convert(model_dir, "f32", Path(tmp) / "f32.gguf", say), target, quant)
        else:
            convert(model_dir, quant, target, say)
    files = [target.name]
    if fmt == "ollama":
        from .ollama import write_modelfile

        template, stops = run_template(tokenizer)
        files.append(write_modelfile(out_dir, target.name, template, stops).name)
    write_model_card(out_dir, cfg, kind="gguf", files=files)
    say(f"written: {target}" + (f" and {out_dir / 'Modelfile'}" if fmt == "ollama" else ""))
    return target


def _export_lora(src: Path, adapter: bool, quant: str, out_dir: Path, name: str, cfg, say) -> Path:
    from ..modelcard import write_model_card

    if not adapter:
        raise UserError(f"--format gguf-lora: {src} holds no adapter (a full model exports with --format gguf)")
    if quant not in ("f32", "f16", "bf16", "q8_0"):
        raise UserError(f"--format gguf-lora writes f32, f16, bf16 or q8_0 (got --quant {quant})")
    adapter_config = json.loads((src / "adapter_config.json").read_text())
    base = Path(adapter_config["base_model_name_or_path"])
    if adapter_config.get("trainable_token_indices") or adapter_config.get("modules_to_save"):
        raise UserError(f"{src}: the run trained token rows or whole modules beside LoRA (added tokens, "
                        "modules_to_save), which a GGUF LoRA cannot carry: export the merged model with --format gguf")
    if not (base / "config.json").is_file():
        raise UserError(f"--format gguf-lora needs the base model as a local dir; {base} is not one")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = convert(src, quant, out_dir / f"{name}-lora-{quant}.gguf", say, lora_base=base)
    write_model_card(out_dir, cfg, kind="gguf", files=[target.name])
    say(f"written: {target} (apply it on a GGUF of {base}: tunelab export {base} --format gguf)")
    return target


def run_template(tokenizer) -> tuple[str, list[str]]:
    """The template the model was trained with (its tokenizer carries it: prepare_tokenizer installed it) and the
    texts of the tokens generation stops on."""
    from ..data.templates import resolve_template, stop_token_ids

    template = resolve_template("auto", tokenizer)
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(template, tokenizer))
    return template, list(dict.fromkeys(stops))


def _model_config(src: Path, adapter: bool) -> dict:
    """config.json of the model, or of an adapter's base (a local dir or the Hub cache)."""
    if not adapter:
        return json.loads((src / "config.json").read_text())
    base = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
    if (Path(base) / "config.json").is_file():
        return json.loads((Path(base) / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base).to_dict()
