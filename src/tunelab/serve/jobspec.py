"""A tuning request -> a validated tunelab Config, the way `tunelab validate` checks it, plus a read of the data.

Two request shapes: the managed service's fields (source_model, train_dataset, hyperparameters ...) mapped onto
a LoRA config with tunelab's defaults, or a whole `config`: tunelab's, or an axolotl / LLaMA-Factory one converted
by tunelab.interop as `tunelab train FILE` does (its notes go back with the job). Either way every path the client
names must resolve inside the server's roots, keys that would run code on the server (or send data off it) need
--allow-code, and the server chooses the run dir. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from tunelab.config import Config, Format, Method, UserError, load_config
from tunelab.data.readers import load_rows, read_rows
from tunelab.interop import convert as convert_peer
from tunelab.interop import summary as peer_summary

from .compute import ComputeRequest
from .security import resolve_inside
from .settings import ServeSettings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_LR = 2e-4  # tunelab's train.lr default: learning_rate_multiplier scales it


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epoch_count: float | None = Field(None, gt=0, le=1000)
    learning_rate_multiplier: float | None = Field(None, gt=0, le=100)
    adapter_size: int | None = Field(None, gt=0, le=1024)
    batch_size: int | None = Field(None, gt=0, le=4096)


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str | None = None
    train_dataset: str | None = None
    validation_dataset: str | None = None
    tuned_model_display_name: str | None = None
    method: Method = "sft"
    hyperparameters: Hyperparameters = Hyperparameters()
    config: dict[str, Any] | None = None
    compute: ComputeRequest | None = None  # what the job needs: GPUs, nodes ... (serve/compute.py)


# Config keys that import code or unpickle files on the server, or send data off it: refused from requests
# unless the operator started the server with --allow-code.
def code_keys(cfg: Config) -> list[str]:
    keys = []
    if cfg.model.trust_remote_code:
        keys.append("model.trust_remote_code")
    if cfg.model.allow_pickle:
        keys.append("model.allow_pickle")
    for section in ("ppo", "grpo"):
        if _imports_code(getattr(cfg, section).reward_function):
            keys.append(f"{section}.reward_function")
    for i, spec in enumerate(cfg.grpo.rewards):
        if _imports_code(spec.function):
            keys.append(f"grpo.rewards[{i}].function")
        if spec.grader is not None and _runs_python(spec.grader):
            keys.append(f"grpo.rewards[{i}].grader")
    keys += [f"grpo.graders[{i}]" for i, g in enumerate(cfg.grpo.graders) if _runs_python(g)]
    if cfg.grpo.environment is not None:
        keys.append("grpo.environment")
    if cfg.grpo.judge_endpoint is not None:  # would send a server environment variable to a URL of its choosing
        keys.append("grpo.judge_endpoint")
    if ":" in cfg.eval.scorer:
        keys.append("eval.scorer")
    if cfg.log.wandb is not None:
        keys.append("log.wandb")
    if cfg.log.mlflow is not None:
        keys.append("log.mlflow")
    if cfg.output.hub_model_id is not None:  # an upload with the server's HF_TOKEN
        keys.append("output.hub_model_id")
    return keys


def _imports_code(function: str | None) -> bool:
    """A function reward imports a module the request names, unless it is one of tunelab's verifiers that run
    nothing from the request (code_execution runs the model's code, so it is not one of them)."""
    from tunelab.verifiers import RUNS_NO_CODE

    return function is not None and function not in RUNS_NO_CODE


def _runs_python(grader) -> bool:
    """Whether an OpenAI grader is, or contains (multi), a python grader: code from the request."""
    if not isinstance(grader, dict):
        return False
    if grader.get("type") == "python":
        return True
    subs = grader.get("graders")
    return isinstance(subs, dict) and any(_runs_python(g) for g in subs.values())


def detect_format(row: dict) -> str:
    """The data format of a row, from its keys (the managed service's `contents` rows are format gemini)."""
    if "contents" in row:
        return "gemini"
    if ("chosen" in row and "rejected" in row) or "preferred_output" in row:  # the latter: OpenAI's dpo rows
        return "preference"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "messages" in row:
        msgs = row["messages"]
        has_reply = isinstance(msgs, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
        return "chat" if has_reply else "prompt"
    if "prompt" in row:
        return "prompt"
    if "text" in row:
        return "text"
    raise UserError(f"cannot tell the data format from the first row's keys ({', '.join(map(str, row)) or 'none'}); "
                    f"pass format (one of {', '.join(get_args(Format))})")


def file_format(path: Path) -> str:
    if path.suffix == ".txt":
        return "text"
    first = next(iter(read_rows(str(path))))
    return detect_format(first.data)


class Resolver:
    """Client-named models and datasets -> server paths."""

    def __init__(self, settings: ServeSettings, store):
        self.settings, self.store = settings, store

    def model(self, name: str, what: str) -> str:
        if name in self.settings.models:
            return str(self.settings.models[name])
        path = resolve_inside(name, self.settings.roots, what)
        if not (path / "config.json").is_file():
            raise UserError(f"{what}: {name} is not a model dir (no config.json); served base models: "
                            f"{', '.join(self.settings.models) or 'none (start the server with --model NAME=PATH)'}")
        return str(path)

    def dataset(self, name: str, what: str) -> tuple[str, str | None]:
        """(path, format of an uploaded file or None)."""
        if isinstance(name, str) and name.startswith("file-") and "/" not in name:
            record = self.store.get_file(name)
            if record is None:
                raise HTTPException(404, f"{what}: no uploaded file {name}")
            return record["path"], record["format"]
        return str(resolve_inside(name, self.settings.roots, what)), None


def build_config(req: JobRequest, settings: ServeSettings, store, run_dir: Path, registry) -> tuple[Config, dict]:
    """(the job's config with output_dir = run_dir, the job's summary fields; `converted_from` {tool, notes} for a
    peer config). `registry`: the server's models, a model grader's judge among them. Raises
    UserError/HTTPException."""
    resolver = Resolver(settings, store)
    converted = None
    if req.config is not None:
        managed = [k for k in ("source_model", "train_dataset", "validation_dataset") if getattr(req, k) is not None]
        if managed or req.hyperparameters != Hyperparameters() or "method" in req.model_fields_set:
            raise UserError(f"give either 'config' (a whole tunelab config) or the managed fields "
                            f"(source_model, train_dataset, ...), not both (got config and {(managed or ['method/hyperparameters'])[0]})")
        # a peer config's own paths (datasets, dataset_dir) are resolved inside the roots before they are read
        mapping = convert_peer(req.config, "config", lambda name, what: resolver.dataset(name, what)[0])
        if mapping is not None:
            converted = {"tool": mapping.tool, "notes": peer_summary(mapping, file=False)}
        raw = _from_config(mapping.config if mapping else req.config, resolver, settings)
    else:
        raw = _from_managed(req, resolver)
    raw["output_dir"] = str(run_dir)
    raw.setdefault("train", {})["progress"] = False  # a progress bar only clutters the job's log file
    cfg = _validate(raw)
    if not settings.allow_code and code_keys(cfg):
        raise HTTPException(403, f"config key {code_keys(cfg)[0]} would run code or load pickles on the server; "
                                 "the server accepts it only when started with --allow-code")
    from .judge import with_judge

    cfg = with_judge(cfg, settings, registry)  # model graders: this server is their judge
    rows = load_rows(cfg.data.train, skip_bad_rows=cfg.data.skip_bad_rows)  # bad rows: file:line, as in training
    for sources in (cfg.data.eval, cfg.eval.data):
        if sources:
            load_rows(sources, skip_bad_rows=cfg.data.skip_bad_rows)
    summary = {
        "method": cfg.method,
        "source_model": req.source_model or cfg.model.path or "(model.init)",
        "train_dataset": req.train_dataset or cfg.data.train[0].path,
        "validation_dataset": req.validation_dataset or (cfg.data.eval[0].path if cfg.data.eval else None),
        "total_steps": estimate_steps(cfg, len(rows)),
        "converted_from": converted,
    }
    return cfg, summary


def estimate_steps(cfg: Config, rows: int) -> int:
    """The trainer's step count from the row count (exact for sft/dpo/reward without packing; an estimate else)."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if cfg.data.eval_fraction and not cfg.data.eval:
        rows -= max(1, round(rows * cfg.data.eval_fraction))
    return max(1, math.ceil(t.epochs * max(1, math.ceil(max(rows, 1) / (t.micro_batch_size * t.grad_accum)))))


def _validate(raw: dict) -> Config:
    try:
        return load_config(data=copy.deepcopy(raw))
    except UserError as e:
        raise UserError(str(e).replace("invalid config (dict):", "invalid config:")) from None


def _from_managed(req: JobRequest, resolver: Resolver) -> dict:
    if not req.source_model:
        raise UserError("missing field 'source_model' (a served base model name or a model dir under the data roots)")
    if not req.train_dataset:
        raise UserError("missing field 'train_dataset' (an uploaded file id or a data file under the data roots)")
    h = req.hyperparameters
    data = {"train": [_source(req.train_dataset, "train_dataset", resolver)]}
    if req.validation_dataset:
        data["eval"] = [_source(req.validation_dataset, "validation_dataset", resolver)]
    train: dict[str, Any] = {}
    if h.epoch_count is not None:
        train["epochs"] = h.epoch_count
    if h.learning_rate_multiplier is not None:
        train["lr"] = DEFAULT_LR * h.learning_rate_multiplier
    if h.batch_size is not None:  # the batch per optimizer step: micro-batches of at most 8 rows, accumulated
        micro = max(d for d in range(1, min(8, h.batch_size) + 1) if h.batch_size % d == 0)
        train.update(micro_batch_size=micro, grad_accum=h.batch_size // micro)
    adapter = {"r": h.adapter_size, "alpha": 2 * h.adapter_size} if h.adapter_size else {}
    return {"model": {"path": resolver.model(req.source_model, "source_model")}, "adapter": adapter,
            "method": req.method, "data": data, "train": train,
            "log": {"tensorboard": False, "plot": False}}  # the service keeps and shows the metrics itself


def _source(name: str, what: str, resolver: Resolver) -> dict:
    path, fmt = resolver.dataset(name, what)
    return {"path": path, "format": fmt or file_format(Path(path))}


def _from_config(config: dict, resolver: Resolver, settings: ServeSettings) -> dict:
    raw = copy.deepcopy(config)
    _validate({**raw, "output_dir": "x"})  # key and value mistakes first, reported as `tunelab validate` does
    out = raw.pop("output_dir", None)
    if out is not None:
        target = Path(str(out))
        target = (target if target.is_absolute() else settings.home / target).resolve()
        if ".." in Path(str(out)).parts or not target.is_relative_to(settings.home):
            raise UserError(f"output_dir {out} points outside the server's home; leave it out: the server chooses "
                            "each job's run dir")
    model = raw.get("model") or {}
    if model.get("path") is not None:
        model["path"] = resolver.model(model["path"], "model.path")
    if (raw.get("tokenizer") or {}).get("path") is not None:
        raw["tokenizer"]["path"] = str(resolve_inside(raw["tokenizer"]["path"], settings.roots, "tokenizer.path"))
    if (raw.get("teacher") or {}).get("path") is not None:
        raw["teacher"]["path"] = resolver.model(raw["teacher"]["path"], "teacher.path")
    for section in ("ppo", "grpo"):
        s = raw.get(section) or {}
        if s.get("reward_model") is not None:
            s["reward_model"] = resolver.model(s["reward_model"], f"{section}.reward_model")
        if isinstance(s.get("judge"), dict) and s["judge"].get("path") is not None:
            s["judge"]["path"] = resolver.model(s["judge"]["path"], f"{section}.judge.path")
    ev = raw.get("eval") or {}
    if ev.get("reference") is not None:
        ev["reference"] = resolver.model(ev["reference"], "eval.reference")
    for key, sources in (("data.train", (raw.get("data") or {}).get("train")), ("data.eval", (raw.get("data") or {}).get("eval")),
                         ("eval.data", ev.get("data"))):
        for i, source in enumerate(sources or []):
            path, fmt = resolver.dataset(source["path"], f"{key}[{i}].path")
            source["path"] = path
            if fmt and "format" not in source:
                source["format"] = fmt
    return raw
