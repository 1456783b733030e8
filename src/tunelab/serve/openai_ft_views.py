"""Jobs, events and checkpoints in OpenAI's fine-tuning shapes (fine_tuning.job, fine_tuning.job.event,
fine_tuning.job.checkpoint). Any job of the store has an OpenAI face: jobs submitted on /v1/tuningJobs show their
tunelab fields under OpenAI's names."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from tunelab import run_files

from .openai_models import checkpoint_dir, checkpoint_name, checkpoint_steps
from .scheduler import read_metrics

STATUS = {"PENDING": "queued", "RUNNING": "running", "PAUSING": "running", "PAUSED": "paused",
          "SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELLING": "cancelled", "CANCELLED": "cancelled"}
KIND = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}
RESULTS_NAME = "step_metrics.csv"


def fine_tuned_model(job: dict) -> str | None:
    if job["state"] != "SUCCEEDED" or not job.get("tuned_model"):
        return None
    return job["tuned_model"]["endpoint"]


def ft_job_json(job: dict) -> dict:
    o = job.get("openai") or {}
    kind = KIND.get(job["method"], job["method"])
    hp = o.get("hyperparameters") or _tunelab_hyperparameters(job["config"])
    eta = job["progress"].get("eta_seconds")
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": int(job["create_time"]),
        "finished_at": int(job["end_time"]) if job["end_time"] else None,
        "model": o.get("model", job["source_model"]), "fine_tuned_model": fine_tuned_model(job),
        "organization_id": "org-tunelab", "status": STATUS[job["state"]],
        "training_file": o.get("training_file", job["train_dataset"]),
        "validation_file": o.get("validation_file", job["validation_dataset"]),
        "result_files": [o["result_file"]] if o.get("result_file") else [],
        "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if k in hp},
        "method": o.get("method") or {"type": kind, kind: {"hyperparameters": hp}},
        "trained_tokens": o.get("trained_tokens"), "seed": o.get("seed", job["config"]["train"]["seed"]),
        "estimated_finish": int(time.time() + eta) if job["state"] == "RUNNING" and eta else None,
        "error": _error(job), "metadata": o.get("metadata"), "integrations": [],
        "user_provided_suffix": o.get("suffix"),
    }


def _tunelab_hyperparameters(config: dict) -> dict:
    t = config["train"]
    return {"n_epochs": t["epochs"], "batch_size": t["micro_batch_size"] * t["grad_accum"],
            "learning_rate_multiplier": t["lr"] / 2e-4}


def _error(job: dict) -> dict | None:
    if job["state"] != "FAILED":
        return None
    message = job["error"] or "the training process failed"
    bad_row = message.startswith("error:") and ".jsonl:" in message  # the trainer names a row: file:line
    return {"code": "invalid_training_file" if bad_row else "training_failed", "message": message,
            "param": "training_file" if bad_row else None}


def event_json(event_id: int, created: float, kind: str, data, total_steps: int | None) -> dict:
    head = {"id": f"ftevent-{event_id}", "object": "fine_tuning.job.event", "created_at": int(created)}
    if kind == "metrics":
        metrics = {"step": data["step"], "train_loss": data.get("loss"), "total_steps": total_steps,
                   "train_mean_token_accuracy": data.get("token_accuracy"), "valid_loss": data.get("eval_loss"),
                   "valid_mean_token_accuracy": data.get("eval_token_accuracy"), "learning_rate": data.get("lr"),
                   "tokens": data.get("tokens"),
                   "train_reward_mean": data.get("reward")}  # reinforcement jobs: the step's mean grader reward
        metrics = {k: v for k, v in metrics.items() if v is not None}
        loss = f"training loss={data['loss']:.4f}" if isinstance(data.get("loss"), (int, float)) else "metrics"
        return {**head, "level": "info", "type": "metrics", "data": metrics,
                "message": f"Step {data['step']}/{total_steps or '?'}: {loss}"}
    if kind == "state":
        status = STATUS[data["state"].removeprefix("JOB_STATE_")]
        failed = status == "failed"
        reason = f": {data['error']['message']}" if failed and data.get("error") else ""
        message = f"Fine-tuning job {status}{reason}"
        return {**head, "level": "error" if failed else "info", "type": "message", "data": {"status": status},
                "message": message}
    return {**head, "level": "warn" if str(data).startswith(("warning", "error")) else "info", "type": "message",
            "data": None, "message": str(data)}


def checkpoint_json(job: dict, step: int, rows_by_step: dict[int, dict]) -> dict:
    row = rows_by_step.get(step, {})
    evals = [r for s, r in rows_by_step.items() if s <= step and "eval_loss" in r]
    metrics = {"step": step, "train_loss": row.get("loss"), "train_mean_token_accuracy": row.get("token_accuracy"),
               "valid_loss": evals[-1]["eval_loss"] if evals else None,
               "valid_mean_token_accuracy": evals[-1].get("eval_token_accuracy") if evals else None}
    path = checkpoint_dir(Path(job["run_dir"]), step)
    model = (job.get("openai") or {}).get("fine_tuned_model") or job["id"]
    return {"id": f"ftckpt-{job['id']}-{step}", "object": "fine_tuning.job.checkpoint",
            "created_at": int(path.stat().st_mtime) if path.exists() else int(job["update_time"]),
            "fine_tuned_model_checkpoint": checkpoint_name(model, step), "fine_tuning_job_id": job["id"],
            "step_number": step, "metrics": metrics}


def checkpoints(job: dict) -> list[dict]:
    """Newest first."""
    run_dir = Path(job["run_dir"])
    rows = {r["step"]: r for r in read_metrics(run_dir / run_files.METRICS) if "step" in r}
    return [checkpoint_json(job, s, rows) for s in reversed(checkpoint_steps(run_dir))]


def results_csv(run_dir: Path) -> tuple[str, int]:
    """(the step metrics as OpenAI's result file CSV, the tokens trained on)."""
    rows = [r for r in read_metrics(run_dir / run_files.METRICS) if "step" in r]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "train_loss", "valid_loss", "learning_rate", "tokens"])
    for r in rows:
        if "loss" in r:
            writer.writerow([r["step"], r.get("loss"), r.get("eval_loss", ""), r.get("lr", ""), r.get("tokens", "")])
    return out.getvalue(), sum(int(r.get("tokens", 0)) for r in rows if "loss" in r)
