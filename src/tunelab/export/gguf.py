"""GGUF through llama.cpp itself: its converter (llama_convert.py runs it), its quantizer
(llama_cpp.llama_model_quantize), and its table of the architectures it converts (read before any work).

The converter scripts come from llama-cpp-python's source distribution (`make llama-cpp` unpacks them to
LLAMA_CPP_DIR); the GGUF they write is checked in tests/test_export.py by loading it with llama-cpp-python."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import UserError

LLAMA_CPP_VERSION = "0.3.36"
DEFAULT_DIR = Path.home() / ".cache" / "tunelab" / f"llama.cpp-{LLAMA_CPP_VERSION}"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter directly
QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # written by llama.cpp's quantizer from an f32 file


def llama_dir() -> Path:
    """Where `make llama-cpp` unpacked convert_hf_to_gguf.py, conversion/ and gguf-py/ (LLAMA_CPP_DIR overrides)."""
    path = Path(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR))
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's converter is not in {path}: run `make llama-cpp` (builds and installs "
                        "tunelab[export]) or set LLAMA_CPP_DIR to a llama.cpp checkout's root")
    return path


def supported_architectures(root: Path) -> set[str]:
    """The converter's own table of text architectures (conversion/__init__.py: TEXT_MODEL_MAP), read as data."""
    tree = ast.parse((root / "conversion" / "__init__.py").read_text())
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise UserError(f"{root}/conversion/__init__.py has no TEXT_MODEL_MAP: not the llama.cpp version tunelab knows")


def check_architecture(config: dict, root: Path) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in supported_architectures(root):
        raise UserError(f"llama.cpp cannot convert architecture {arch} (model_type {config.get('model_type')}): "
                        "its converter has no {arch} in its table; nothing was exported".replace("{arch}", arch))
    return arch


def bpe_pre_tokenizer(model_dir: Path) -> str:
    """'gpt-2' for a tokenizer.json whose pre-tokenizer is a plain ByteLevel split (GPT-2's regex), which the
    converter may not know by hash; '-' (let the converter decide) otherwise."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return "-"
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    plain = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    return "gpt-2" if plain else "-"


def with_added_tokens_decoder(model_dir: Path, tmp: Path) -> Path:
    """model_dir as llama.cpp's converter expects it. transformers 5 writes the added tokens, and which of them are
    special, only to tokenizer.json; the converter's SentencePiece vocabularies (Gemma's, Llama's, ...) read them
    from tokenizer_config.json's added_tokens_decoder, where transformers 4 wrote them too. Without it a control
    token such as <start_of_turn> becomes plain text to llama.cpp. Returns model_dir when nothing is missing, else a
    same-named dir of links to its files with that key added (the converter names the model after the dir)."""
    config_path, tokenizer_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()):
        return model_dir
    config = json.loads(config_path.read_text())
    added = json.loads(tokenizer_path.read_text()).get("added_tokens") or []
    if "added_tokens_decoder" in config or not added:
        return model_dir
    view = tmp / model_dir.resolve().name
    view.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name != config_path.name:
            (view / path.name).symlink_to(path.resolve())
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    (view / config_path.name).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return view


def convert(model_dir: Path, outtype: str, outfile: Path, say=print, lora_base: Path | None = None) -> Path:
    """Run the converter in a child process (it parses argv, logs, and exits on errors). With lora_base, the
    adapter in model_dir alone, as a GGUF LoRA applied at load time on that base's GGUF."""
    root = llama_dir()
    script = "convert_lora_to_gguf.py" if lora_base else "convert_hf_to_gguf.py"
    pre = "-" if lora_base else bpe_pre_tokenizer(model_dir)
    say(f"converting with llama.cpp ({root.name}): {outtype}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        source = model_dir if lora_base else with_added_tokens_decoder(model_dir, Path(tmp))
        cmd = [sys.executable, "-m", "tunelab.export.llama_convert", str(root), script, pre, str(source),
               "--outtype", outtype, "--outfile", str(outfile), *(["--base", str(lora_base)] if lora_base else [])]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not outfile.is_file():
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"llama.cpp's converter failed on {model_dir}: {last[0]}")
    return outfile


def quantize(source: Path, target: Path, quant: str) -> Path:
    """llama.cpp's quantizer, called through llama-cpp-python (the wheel has no llama-quantize binary)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[quant])
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {source} to {quant} (code {rc})")
    return target
