"""The README.md model card of every model dir tunelab writes (final/, merged, exported): the Hub's YAML metadata
(base_model, library_name, tags, datasets, license, pipeline_tag) and a body with the method, the data, the
hyperparameters, the eval table (eval.json from `tunelab eval`, when there is one) and how to load the model.

Pure text from the run's Config: no torch, no network (huggingface_hub renders and parses the card)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import Config

PIPELINE = {"reward": "text-classification", "mlm": "fill-mask"}
KINDS = ("adapter", "full", "merged", "gguf")


def write_model_card(model_dir: Path, cfg: Config | None, kind: str | None = None, files: list[str] | None = None) -> Path:
    """Write model_dir/README.md. kind: adapter | full (a run's final/), merged (`tunelab merge`), gguf (an export;
    `files` names the .gguf files and a Modelfile if any). Without a config (a model from elsewhere) the card says
    only what the dir holds."""
    from huggingface_hub import ModelCard, ModelCardData

    model_dir = Path(model_dir)
    kind = kind or ("adapter" if (model_dir / "adapter_config.json").is_file() else "full")
    base = _hub_id(cfg.model.path) if cfg is not None and cfg.model.path else None
    datasets = [s.path for s in cfg.data.train if _hub_id(s.path)] if cfg is not None else []
    method = cfg.method if cfg is not None else None
    tags = ["tunelab", *([method] if method else []), *(_adapter_tags(cfg) if kind == "adapter" else []),
            *(["gguf"] if kind == "gguf" else [])]
    data = ModelCardData(
        base_model=base, library_name={"adapter": "peft", "gguf": None}.get(kind, "transformers"),
        tags=tags, datasets=datasets or None, license=_license(cfg) if cfg is not None else None,
        pipeline_tag=PIPELINE.get(method, "text-generation"))
    body = "\n".join(_body(model_dir, cfg, kind, base, files or []))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    path = model_dir / "README.md"
    card.save(path)
    return path


def run_config(model_dir: Path) -> Config | None:
    """The config.yaml a run wrote beside its model (final/ holds one; a merged dir's run is its parent)."""
    from .config import load_config

    for candidate in (Path(model_dir) / "config.yaml", Path(model_dir).parent / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    return None


def _hub_id(path: str) -> str | None:
    """`org/name` as the Hub spells repo ids; local paths (which the Hub would reject as metadata) are None."""
    if Path(path).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return None
    return path


def _adapter_tags(cfg: Config | None) -> list[str]:
    if cfg is None or cfg.adapter is None:
        return ["lora"]
    return ["qlora" if cfg.model.quantize else "lora"]


def _license(cfg: Config) -> str | None:
    """The base model's licence, when its local dir has a card that says (a Hub id's card would need the network)."""
    if not cfg.model.path or not (Path(cfg.model.path) / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(cfg.model.path) / "README.md").data.to_dict().get("license")


def _body(model_dir: Path, cfg: Config | None, kind: str, base: str | None, files: list[str]) -> list[str]:
    name = model_dir.parent.name if model_dir.name == "final" else model_dir.name
    lines = [f"# {name}", ""]
    if cfg is None:
        return lines + [f"A {kind} model dir written by [tunelab](https://github.com/tunelab/tunelab).", "",
                        *_usage(kind, files)]
    origin = base or (cfg.model.path if cfg.model.path else "a new model built from scratch (model.init)")
    what = {"adapter": f"A {'QLoRA' if cfg.model.quantize else 'LoRA'} adapter for `{origin}`",
            "full": f"`{origin}` fully fine-tuned", "merged": f"`{origin}` with its tuned adapter merged in",
            "gguf": f"A GGUF export of `{origin}` fine-tuned"}[kind]
    lines += [f"{what}, trained with tunelab (method `{cfg.method}`).", "", "## Method", ""]
    lines += _method(cfg)
    lines += ["", "## Data", "", "| source | format |", "|---|---|"]
    lines += [f"| `{s.path}` | {s.format} |" for s in cfg.data.train]
    lines += ["", f"Chat template: `{_template_name(cfg)}`; max length {cfg.data.max_length} tokens"
              f"{', packed' if cfg.data.packing else ''}; loss on {'prompt and response' if cfg.data.train_on_prompt else 'responses only'}"
              + (f"; {cfg.data.eval_fraction:.0%} held out for evaluation" if cfg.data.eval_fraction else "") + "."]
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _hyperparameters(cfg)]
    lines += _eval_table(model_dir)
    return lines + ["", *_usage(kind, files)]


def _template_name(cfg: Config) -> str:
    t = cfg.data.template
    return "a custom Jinja template" if "{%" in t or "{{" in t else t


def _method(cfg: Config) -> list[str]:
    a = cfg.adapter
    if a is None:
        return ["Full fine-tuning: every weight trained."]
    targets = a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules)
    return [f"LoRA r={a.r}, alpha={a.alpha:g}, dropout={a.dropout:g} on {targets}"
            + (f"; base quantized to 4-bit {cfg.model.quantize.upper()} (QLoRA)" if cfg.model.quantize else "")
            + ("; rsLoRA" if a.rslora else "") + ("; DoRA" if a.dora else "") + "."]


def _hyperparameters(cfg: Config) -> list[tuple[str, object]]:
    t = cfg.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    rows = [("learning rate", f"{t.lr:g}"), ("schedule", f"{t.scheduler}, warmup {t.warmup_steps or t.warmup_ratio:g}"),
            ("training length", length), ("batch", f"{t.micro_batch_size} x {t.grad_accum} accumulation per device"),
            ("optimizer", f"{t.optimizer}, weight decay {t.weight_decay:g}"), ("precision", t.precision),
            ("max grad norm", t.max_grad_norm), ("seed", t.seed)]
    section = getattr(cfg, cfg.method, None)
    if section is not None and hasattr(section, "beta"):
        rows.append((f"{cfg.method} beta", section.beta))
    return rows


def _eval_table(model_dir: Path) -> list[str]:
    """The scalar metrics of eval.json (`tunelab eval`), from the model dir or its run dir."""
    for candidate in (model_dir / "eval.json", model_dir.parent / "eval.json"):
        if candidate.is_file():
            report = json.loads(candidate.read_text())
            rows = [(f"{section} {metric}", value) for section, values in report.items() if isinstance(values, dict)
                    for metric, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
            if rows:
                return ["", "## Evaluation", "", f"`tunelab eval` on {report.get('rows', '?')} held-out rows:", "",
                        "| metric | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in rows]]
    return []


def _usage(kind: str, files: list[str]) -> list[str]:
    if kind == "gguf":
        gguf = next((f for f in files if f.endswith(".gguf")), "model.gguf")
        lines = ["## How to use", "", "```sh", f"llama-cli -m {gguf} -cnv   # llama.cpp: the chat template is embedded"]
        if "Modelfile" in files:
            lines += ["ollama create mymodel -f Modelfile && ollama run mymodel"]
        return lines + ["```"]
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(REPO)"
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(REPO)")
    return ["## How to use", "", "```python", "from transformers import AutoTokenizer", load,
            "tokenizer = AutoTokenizer.from_pretrained(REPO)  # carries the chat template used in training",
            "```", "", "Or with tunelab: `tunelab chat DIR`."]
