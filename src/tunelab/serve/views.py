"""Database records -> the JSON the API returns (the shapes are the service's public interface)."""

from __future__ import annotations

from datetime import datetime, timezone

PREFIX = "JOB_STATE_"
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED", "PAUSING", "PAUSED")
ENDED = ("SUCCEEDED", "FAILED", "CANCELLED")


def iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z") if t is not None else None


def job_json(job: dict) -> dict:
    endpoint = f"endpoints/{job['tuned_model']['endpoint']}" if job.get("tuned_model") else None
    tuned = {**job["tuned_model"], "endpoint": endpoint} if job.get("tuned_model") else None
    return {
        "name": f"tuningJobs/{job['id']}", "id": job["id"], "state": PREFIX + job["state"],
        "tuned_model_display_name": job["display_name"], "method": job["method"],
        "source_model": job["source_model"], "train_dataset": job["train_dataset"],
        "validation_dataset": job["validation_dataset"],
        "create_time": iso(job["create_time"]), "start_time": iso(job["start_time"]),
        "end_time": iso(job["end_time"]), "update_time": iso(job["update_time"]),
        "progress": {"step": 0, "total_steps": None, "epoch": None, "eta_seconds": None, **job["progress"]},
        "latest_metrics": job["latest_metrics"], "best_metrics": job["best_metrics"],
        "final_metrics": job["final_metrics"],
        "error": {"message": job["error"]} if job["error"] else None,
        "attempt": job["attempt"], "config": job["config"],
        "tuned_model": tuned, "tuned_model_endpoint_name": endpoint,
        "compute": job.get("compute") or {}, "backend": _where(job),
    }


def _where(job: dict) -> dict | None:
    """Where the job runs (or ran): the backend, its own id for the job, the nodes and GPU ids."""
    if not job.get("backend"):
        return None
    handle, placement = job.get("handle") or {}, job.get("placement") or {}
    return {"name": job["backend"], "job_id": handle.get("job_id"), "nodes": placement.get("nodes", []),
            "gpus": placement.get("gpus", [])}


def file_json(record: dict) -> dict:
    """OpenAI's file object (id, object, bytes, created_at, filename, purpose, status), plus the rows and format
    tunelab read from it."""
    return {"id": record["id"], "object": "file", "filename": record["filename"], "bytes": record["bytes"],
            "created_at": int(record["created_at"]), "purpose": record.get("purpose") or "fine-tune",
            "status": "processed", "status_details": None, "expires_at": None,
            "rows": record["rows"], "format": record["format"]}


def endpoint_json(record: dict, display_name: str | None) -> dict:
    return {"name": f"endpoints/{record['name']}", "display_name": display_name or record["name"],
            "model": record["name"], "job_id": record["job_id"], "source_model": record["source_model"],
            "adapter": bool(record["adapter"]), "create_time": iso(record["create_time"])}
