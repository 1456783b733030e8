"""An OpenAI fine-tuning request -> the tunelab config of the job, with every "auto" hyperparameter chosen.

supervised -> method sft, dpo -> method dpo, reinforcement -> method grpo with the request's grader as its reward
(`grpo.graders`; a score_model / label_model grader's judge is a model of this server, judge.py), each a LoRA run
with tunelab's adapter defaults. The rules for "auto" (n rows in the training file):

- n_epochs: 3, raised to ceil(100 / n) (at most 25) when that gives under 100 examples seen, lowered to
  25000 // n (at least 1) when over 25000 (the rule of OpenAI's data-preparation cookbook).
- batch_size: ceil(0.2% of n), between 1 and 256 (OpenAI's documented default).
- learning_rate_multiplier: scales tunelab's LoRA learning rate 2e-4: 1.0 for supervised, 0.25 for dpo (preference
  losses want a smaller step), 0.5 for reinforcement.
- beta (dpo): 0.1, TRL's and OpenAI's default.
- compute_multiplier (reinforcement): 1.0, i.e. grpo.group_size 4 samples per prompt (group_size = round(4 x it)).
- eval_interval (reinforcement): one epoch's steps; eval_samples: 1 (reported; tunelab evaluates the whole
  validation file).
- reasoning_effort (reinforcement): the generation budget per sample, grpo.max_new_tokens: low 16, default and
  medium 64 (tunelab's default), high 256 (REASONING_TOKENS).
The rest of a reinforcement job is grpo's defaults (dapo loss, kl_coef 0.05 against the adapter-less base).

Checkpoints: one per epoch, the last three kept (openai_models.KEEP_EPOCHS), as OpenAI does.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tunelab import graders, run_files
from tunelab.config import Config, DataSource, UserError
from tunelab.data.readers import load_rows

from .errors import ApiError
from .jobspec import DEFAULT_LR, Resolver, _validate, code_keys, file_format
from .judge import check_models, with_judge
from .openai_models import CKPT, KEEP_EPOCHS, resolve_checkpoint

MIN_ROWS = 10  # OpenAI's minimum number of training examples
AUTO_LR_MULTIPLIER = {"supervised": 1.0, "dpo": 0.25, "reinforcement": 0.5}
REASONING_TOKENS = {"low": 16, "default": 64, "medium": 64, "high": 256}  # grpo.max_new_tokens
METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
FORMATS = {"supervised": "chat", "dpo": "preference", "reinforcement": "prompt"}
SHAPES = {"chat": "chat rows ({messages: [...]} with an assistant reply)",
          "preference": "preference rows ({input, preferred_output, non_preferred_output})",
          "prompt": "reinforcement rows ({messages: [...]} ending with a user message, plus fields for the grader)"}

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Union[Auto, int] = Field("auto", union_mode="left_to_right")
    batch_size: Union[Auto, int] = Field("auto", union_mode="left_to_right")
    learning_rate_multiplier: Union[Auto, float] = Field("auto", union_mode="left_to_right")
    beta: Union[Auto, float] = Field("auto", union_mode="left_to_right")  # dpo only
    compute_multiplier: Union[Auto, float] = Field("auto", union_mode="left_to_right")  # reinforcement only
    eval_interval: Union[Auto, int] = Field("auto", union_mode="left_to_right")
    eval_samples: Union[Auto, int] = Field("auto", union_mode="left_to_right")
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


ONLY = {"beta": "dpo", "compute_multiplier": "reinforcement", "eval_interval": "reinforcement",
        "eval_samples": "reinforcement", "reasoning_effort": "reinforcement"}


class MethodBody(_Strict):
    hyperparameters: Hyperparameters = Hyperparameters()
    grader: dict[str, Any] | None = None  # reinforcement only


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None
    reinforcement: MethodBody | None = None


class FineTuneRequest(_Strict):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # deprecated by OpenAI: supervised's, at the top level
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0)  # W&B forwarding: use tunelab configs


def auto_epochs(rows: int) -> int:
    if rows * 3 < 100:
        return min(25, math.ceil(100 / rows))
    if rows * 3 > 25000:
        return max(1, 25000 // rows)
    return 3


def auto_batch_size(rows: int) -> int:
    return max(1, min(256, math.ceil(rows * 0.002)))


def choose(kind: str, hp: Hyperparameters, rows: int, where: str) -> dict:
    """The hyperparameters the job runs with: the request's, each "auto" replaced by its rule's value. `where`: the
    request's path to them, for errors."""
    for name, method in ONLY.items():
        if name in hp.model_fields_set and method != kind:
            raise ApiError(400, f"hyperparameter {name} applies to {method} jobs only, not {kind}",
                           f"{where}.{name}", "invalid_hyperparameter")
    pick = lambda name, auto: auto if getattr(hp, name) == "auto" else getattr(hp, name)  # noqa: E731
    out = {"n_epochs": pick("n_epochs", auto_epochs(rows)), "batch_size": pick("batch_size", auto_batch_size(rows)),
           "learning_rate_multiplier": pick("learning_rate_multiplier", AUTO_LR_MULTIPLIER[kind])}
    if kind == "dpo":
        out["beta"] = pick("beta", 0.1)
    if kind == "reinforcement":
        steps = math.ceil(rows / out["batch_size"])
        out.update(compute_multiplier=pick("compute_multiplier", 1.0), eval_interval=pick("eval_interval", steps),
                   eval_samples=pick("eval_samples", 1), reasoning_effort=hp.reasoning_effort)
    for name, value in out.items():
        if isinstance(value, (int, float)) and value <= 0:
            raise ApiError(400, f"hyperparameter {name} must be positive, got {value}", f"{where}.{name}",
                           "invalid_hyperparameter")
    return out


def method_of(req: FineTuneRequest) -> tuple[str, MethodBody]:
    if req.method is None:
        return "supervised", MethodBody(hyperparameters=req.hyperparameters or Hyperparameters())
    if req.hyperparameters is not None:
        raise ApiError(400, "give hyperparameters inside method, not also at the top level (deprecated)",
                       "hyperparameters", "invalid_request")
    body = getattr(req.method, req.method.type) or MethodBody()
    if (body.grader is not None) != (req.method.type == "reinforcement"):
        raise ApiError(400, "method.reinforcement.grader is required for reinforcement jobs and allowed only there",
                       f"method.{req.method.type}.grader", "invalid_request")
    return req.method.type, body


def build_openai_config(req: FineTuneRequest, settings, store, run_dir: Path, job_id: str,
                        registry) -> tuple[Config, dict]:
    """(the job's validated config, its `openai` record). Raises ApiError naming the field at fault. A model
    grader's judge is a model of this server (`registry`), which the job reaches over HTTP (judge.with_judge)."""
    kind, body = method_of(req)
    model_path, base_name, merge_from = _model(req.model, settings, store, run_dir)
    train = _file(req.training_file, "training_file", kind, store)
    rows = len(load_rows([DataSource(path=train["path"], format=train["format"])]))
    if rows < MIN_ROWS:
        raise ApiError(400, f"training_file {req.training_file} has {rows} examples; at least {MIN_ROWS} are required",
                       "training_file", "invalid_training_file")
    where = f"method.{kind}.hyperparameters" if req.method is not None else "hyperparameters"
    hp = choose(kind, body.hyperparameters, rows, where)
    batch = hp["batch_size"]
    micro = max(d for d in range(1, min(8, batch) + 1) if batch % d == 0)  # micro-batches of <= 8 rows, accumulated
    steps_per_epoch = math.ceil(rows / batch)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    data: dict[str, Any] = {"train": [{"path": train["path"], "format": train["format"]}]}
    if req.validation_file:
        valid = _file(req.validation_file, "validation_file", kind, store)
        data["eval"] = [{"path": valid["path"], "format": valid["format"]}]
    raw: dict[str, Any] = {
        "model": {"path": model_path}, "adapter": {}, "method": METHODS[kind], "data": data,
        "train": {"epochs": hp["n_epochs"], "micro_batch_size": micro, "grad_accum": batch // micro,
                  "lr": DEFAULT_LR * hp["learning_rate_multiplier"], "seed": seed, "log_every": 1,
                  "save_every": steps_per_epoch, "keep_checkpoints": KEEP_EPOCHS, "progress": False,
                  "eval_every": (hp.get("eval_interval") or steps_per_epoch) if req.validation_file else None},
        "log": {"tensorboard": False, "plot": False}, "output_dir": str(run_dir),
    }
    if kind == "dpo":
        raw["dpo"] = {"beta": hp["beta"]}
    if kind == "reinforcement":
        check_grader(body.grader, settings.allow_code, "method.reinforcement.grader")
        check_models(body.grader, registry, "method.reinforcement.grader")
        raw["grpo"] = {"group_size": max(2, round(4 * hp["compute_multiplier"])), "graders": [body.grader],
                       "max_new_tokens": REASONING_TOKENS[hp["reasoning_effort"]]}
    cfg = _config(raw, merge_from)
    if not settings.allow_code and code_keys(cfg):
        raise ApiError(403, f"config key {code_keys(cfg)[0]} would run code on the server; start it with --allow-code")
    try:
        cfg = with_judge(cfg, settings, registry)
    except UserError as e:
        raise ApiError(400, str(e), "method.reinforcement.grader", "invalid_grader") from None
    suffix = req.suffix or ""
    method = {"type": kind, kind: {"hyperparameters": hp, **({"grader": body.grader} if body.grader else {})}}
    record = {"model": req.model, "training_file": req.training_file, "validation_file": req.validation_file,
              "suffix": req.suffix, "seed": seed, "metadata": req.metadata, "method": method, "hyperparameters": hp,
              "fine_tuned_model": f"ft:{base_name}:{suffix}:{job_id}", "merge_from": merge_from, "rows": rows,
              "base_name": base_name}
    return cfg, record


def check_grader(grader: dict, allow_code: bool, param: str) -> None:
    try:
        graders.validate(grader, allow_code=allow_code)
    except UserError as e:
        raise ApiError(400, str(e), param, "invalid_grader") from None


def _config(raw: dict, merge_from: str | None) -> Config:
    if merge_from is None:
        return _validate(raw)
    # the merged start model is written by the job's first child; validate against the adapter's base meanwhile
    real = raw["model"]["path"]
    raw["model"]["path"] = merge_from
    cfg = _validate(raw)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": real})})


def _model(name: str, settings, store, run_dir: Path) -> tuple[str, str, str | None]:
    """(the model path the run starts from, the base name in `ft:` names, the adapter dir to merge first or None)."""
    if name in settings.models:
        return str(settings.models[name]), name, None
    if name.startswith("ft:"):
        checkpoint = resolve_checkpoint(store, name) if CKPT.match(name) else None
        record = checkpoint[1] if checkpoint else store.get_endpoint(name)
        if record is None:
            raise ApiError(404, f"The model {name!r} does not exist or you do not have access to it", "model",
                           "model_not_found")
        path = checkpoint[0] if checkpoint else Path(record["path"])
        base = name.split(":")[1]
        if (path / "adapter_config.json").is_file():  # an adapter: merged into its base by the job's first child
            return str(run_dir / run_files.START_MODEL), base, str(path)
        return str(path), base, None
    try:
        return Resolver(settings, store).model(name, "model"), Path(name).name.replace(":", "-"), None
    except UserError as e:
        served = ", ".join(settings.models) or "none"
        raise ApiError(404, f"The model {name!r} does not exist or is not available for fine-tuning on this server "
                            f"(served base models: {served}): {e}", "model", "model_not_found") from None


def _file(file_id: str, param: str, kind: str, store) -> dict:
    record = store.get_file(file_id)
    if record is None:
        raise ApiError(400, f"{param}: no such file {file_id!r}; upload it with POST /v1/files", param,
                       "invalid_file")
    if (record.get("purpose") or "fine-tune") != "fine-tune":
        raise ApiError(400, f"{param}: file {file_id} has purpose {record['purpose']!r}; fine-tuning needs a file "
                            "uploaded with purpose 'fine-tune'", param, "invalid_file_purpose")
    fmt = record["format"] or file_format(Path(record["path"]))
    if fmt != FORMATS[kind]:
        raise ApiError(400, f"{param}: file {file_id} ({record['filename']}) holds {SHAPES.get(fmt, fmt + ' rows')}; "
                            f"{kind} fine-tuning needs {SHAPES[FORMATS[kind]]}", param, f"invalid_{param}")
    return record
