"""Fine-tuned models under OpenAI's names: `ft:BASE:SUFFIX:JOBID` is a job's final model (its endpoint), and
`ft:BASE:SUFFIX:JOBID:ckpt-step-N` each checkpoint the trainer kept.

A checkpoint holds the trainable weights under the training module's names; serving it needs a LoRA adapter dir.
`export_checkpoint` writes one beside the run's final adapter (same adapter_config, tokenizer and run config; the
checkpoint's weights under PEFT's names) the first time the checkpoint is asked for, so the engine's adapter
hot-swap serves it like any tuned model. Full fine-tuning checkpoints are listed but not served.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tunelab import run_files
from tunelab.config import UserError

CKPT = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>\d+)$")
STEP_DIR = re.compile(r"^step-(\d{8,})$")  # checkpoint.py's directory names (not imported: it imports torch)
EXPORTS = "models"  # run_dir/models/ckpt-step-N: checkpoints exported as adapter dirs
KEEP_EPOCHS = 3  # OpenAI-style jobs checkpoint at every epoch's end and keep the last three, as OpenAI does


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / run_files.CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for d in root.iterdir() if (m := STEP_DIR.match(d.name)) and d.is_dir())


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / run_files.CHECKPOINTS / run_files.step_dir(step)


def export_checkpoint(run_dir: Path, step: int) -> Path:
    out = run_dir / EXPORTS / f"ckpt-step-{step}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    final = run_dir / "final"
    if not (final / "adapter_config.json").is_file():
        raise UserError(f"checkpoint step {step} can be served once its job has succeeded with a LoRA adapter")
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint_dir(run_dir, step) / "trainable.safetensors")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in final.iterdir():
        if f.is_file() and f.name not in ("adapter_model.safetensors", "README.md"):
            shutil.copy2(f, tmp / f.name)
    save_file({_peft_key(k): v for k, v in weights.items()}, tmp / "adapter_model.safetensors")
    os.rename(tmp, out)  # whole or absent: a crash leaves only the .tmp dir, rewritten next time
    return out


def _peft_key(name: str) -> str:
    """The trainer's parameter name (objective.model.<peft name with the adapter name>) -> the adapter file's key."""
    return re.sub(r"\.default(?=\.|$)", "", name.removeprefix("model."))


def resolve_checkpoint(store, name: str) -> tuple[Path, dict] | None:
    """(the exported adapter dir, the final model's endpoint record) of a checkpoint name, or None."""
    m = CKPT.match(name)
    record = store.get_endpoint(m["model"]) if m else None
    job = store.get_job(record["job_id"]) if record else None
    if job is None or int(m["step"]) not in checkpoint_steps(Path(job["run_dir"])):
        return None
    return export_checkpoint(Path(job["run_dir"]), int(m["step"])), record


def listed_checkpoints(store) -> list[tuple[str, Path, dict]]:
    """(name, checkpoint dir, endpoint record) of every kept checkpoint of every `ft:` model."""
    out = []
    for record in store.list_endpoints():
        job = store.get_job(record["job_id"]) if record["name"].startswith("ft:") else None
        if job is not None:
            run_dir = Path(job["run_dir"])
            out += [(checkpoint_name(record["name"], s), checkpoint_dir(run_dir, s), record)
                    for s in checkpoint_steps(run_dir)]
    return out


def delete_model(store, name: str, unload) -> bool:
    """Delete a fine-tuned model or checkpoint and its files, calling `unload(dir)` first for each dir the engine
    may serve from; False when `name` is neither."""
    m = CKPT.match(name)
    if m and (record := store.get_endpoint(m["model"])) is not None:
        run_dir = Path(store.get_job(record["job_id"])["run_dir"])
        step = int(m["step"])
        if step not in checkpoint_steps(run_dir):
            return False
        unload(run_dir / EXPORTS / f"ckpt-step-{step}")
        shutil.rmtree(checkpoint_dir(run_dir, step))
        shutil.rmtree(run_dir / EXPORTS / f"ckpt-step-{step}", ignore_errors=True)
        return True
    record = store.get_endpoint(name.removeprefix("endpoints/"))
    if record is None:
        return False
    store.delete_endpoint(record["name"])
    job = store.get_job(record["job_id"])
    run_dir = Path(job["run_dir"]) if job else Path(record["path"]).parent
    exports = run_dir / EXPORTS
    for served in [Path(record["path"]), *(exports.iterdir() if exports.is_dir() else [])]:
        unload(served)
    for part in (run_files.FINAL, run_files.CHECKPOINTS, EXPORTS, run_files.START_MODEL):
        shutil.rmtree(run_dir / part, ignore_errors=True)
    return True
