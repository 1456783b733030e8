"""The Python API: what the CLI commands do, callable from a notebook or a script.

    from tunelab import train, load_config, evaluate, merge, generate, UserError

Every function takes what the matching command takes (a config path, dict or `Config`, plus `key=value`
overrides; an axolotl or LLaMA-Factory config too, path or dict), does the same thing, and returns its result
instead of printing it. A user mistake raises `tunelab.UserError` whose message is the line the CLI prints after
`error:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import Config, UserError

__all__ = ["load_config", "train", "evaluate", "merge", "generate", "UserError"]


def load_config(config: str | Path | dict | Config, overrides: list[str] | dict[str, Any] | None = None,
                quiet: bool = False) -> Config:
    """A validated `Config` from a YAML path, a dict of sections, or a `Config`, with dotted overrides applied
    (`["train.lr=1e-4"]` as on the command line, or `{"train.lr": 1e-4}`). An axolotl or LLaMA-Factory config (a
    path or a dict) is converted as `tunelab train FILE` does, printing the same lines (one per key that maps
    differently) unless `quiet`."""
    import copy

    from tunelab.interop import load

    if isinstance(overrides, dict):
        overrides = [f"{key}={_yaml_value(value)}" for key, value in overrides.items()]
    if isinstance(config, Config):
        if not overrides:
            return config
        config = config.model_dump(mode="json")
    if not isinstance(config, (str, Path, dict)):
        raise UserError(f"config: expected a YAML path, a dict or a tunelab Config, got {type(config).__name__}")
    return load(copy.deepcopy(config) if isinstance(config, dict) else config, overrides,
                say=(lambda line: None) if quiet else print)


def _yaml_value(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)  # JSON is YAML: lists, numbers, null, booleans


def train(config: str | Path | dict | Config, overrides: list[str] | dict[str, Any] | None = None,
          resume: bool = False, quiet: bool = False) -> Path:
    """`tunelab train` in this process (one process; use the CLI's `--nproc` for several). Returns the run dir:
    `config.yaml`, `metrics.jsonl`, `final/` (see the README's run directory)."""
    from tunelab.training.loop import train as run

    cfg = load_config(config, overrides, quiet)
    run(cfg, resume=resume, say=(lambda *a, **k: None) if quiet else print)
    return cfg.run_dir


def evaluate(config: str | Path | dict | Config, overrides: list[str] | dict[str, Any] | None = None,
             model: str | Path | None = None, out: str | Path | None = None, quiet: bool = False) -> dict:
    """`tunelab eval`: the report (the metrics per source and family) that the command prints and writes to
    eval.json."""
    from tunelab.evaluation import run_eval

    cfg = load_config(config, overrides, quiet)
    return run_eval(cfg, model_path=str(model) if model else None, out=str(out) if out else None,
                    say=(lambda *a, **k: None) if quiet else print)


def merge(run: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """`tunelab merge`: fold a run's LoRA/QLoRA adapter into its base; returns the standalone model dir."""
    from tunelab.modeling.merging import merge as fold

    return fold(str(run), str(out), dtype=dtype)


def generate(model: str | Path, prompts: str | list[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, system: str | None = None, template: str | None = None,
             dtype: str = "auto") -> str | list[str]:
    """`tunelab generate`: replies to one prompt (a str) or several (a list), from a run dir, adapter dir or model
    dir, rendered with the run's template unless `template` is given. Greedy unless `temperature` > 0."""
    from tunelab.modeling.infer import Sampling, run_template
    from tunelab.modeling.infer import generate as reply
    from tunelab.modeling.load import load_pretrained, resolve_model_dir

    loaded, tokenizer = load_pretrained(str(model), dtype=dtype)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        template=template or run_template(resolve_model_dir(str(model))))
    replies = [reply(loaded, tokenizer, p, sampling, system=system) for p in ([prompts] if isinstance(prompts, str)
                                                                              else prompts)]
    return replies[0] if isinstance(prompts, str) else replies
