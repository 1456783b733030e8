"""OpenAI's fine-tuning API on the service's one job store and scheduler: /v1/fine_tuning/jobs (create, list, get,
cancel, pause, resume, events, checkpoints), DELETE /v1/models/{name}, and /v1/fine_tuning/alpha/graders/{run,validate}.

A job created here is an ordinary job (also on /v1/tuningJobs and the dashboard) whose `openai` record keeps the
request and the hyperparameters chosen (openai_spec.py); its endpoint is named `ft:BASE:SUFFIX:JOBID`. Errors use
OpenAI's shape with `param` naming the field (errors.ApiError).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from tunelab import graders, run_files
from tunelab.config import UserError, dump_config

from .errors import ApiError
from .jobspec import estimate_steps
from .openai_ft_views import RESULTS_NAME, checkpoints, ft_job_json, event_json, results_csv
from .openai_lengths import check_lengths
from .openai_models import delete_model
from .judge import EngineJudge, check_models
from .openai_spec import FineTuneRequest, build_openai_config, check_grader
from .views import ENDED, job_json

router = APIRouter()
_results_lock = threading.Lock()  # a finished job's result file is written once


def _job(request: Request, job_id: str) -> dict:
    job = request.app.state.store.get_job(job_id)
    if job is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "fine_tune_not_found")
    return _with_results(request.app.state.store, job)


def _with_results(store, job: dict) -> dict:
    """A succeeded job gets its step metrics CSV as a file (purpose fine-tune-results) and its trained tokens."""
    o = job.get("openai")
    if job["state"] != "SUCCEEDED" or o is None or o.get("result_file"):
        return job
    with _results_lock:
        job = store.get_job(job["id"])
        if job["openai"].get("result_file"):
            return job
        text, tokens = results_csv(Path(job["run_dir"]))
        path = Path(job["run_dir"]) / RESULTS_NAME
        path.write_text(text)
        file_id = f"file-{secrets.token_hex(8)}"
        store.add_file({"id": file_id, "filename": RESULTS_NAME, "path": str(path), "bytes": path.stat().st_size,
                        "rows": max(0, text.count("\n") - 1), "format": "", "created_at": time.time(),
                        "purpose": "fine-tune-results"})
        return store.update_job(job["id"], openai={**job["openai"], "result_file": file_id, "trained_tokens": tokens})


def _parse(model: type[BaseModel], data) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        what = {"extra_forbidden": "is not a parameter of this endpoint", "missing": "is required"}.get(
            first["type"], first["msg"].removeprefix("Value error, "))
        raise ApiError(400, f"{where}: {what}" if where else what, where, "invalid_request") from None


async def _body(request: Request) -> dict:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return data


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request):
    req = _parse(FineTuneRequest, await _body(request))
    settings, store = request.app.state.settings, request.app.state.store
    job_id = f"ftjob-{secrets.token_hex(8)}"
    run_dir = settings.home / "runs" / job_id
    try:
        # reads the training file: off the event loop
        cfg, record = await run_in_threadpool(build_openai_config, req, settings, store, run_dir, job_id,
                                              request.app.state.registry)
        # over-long rows: tokenized here, where the model is known (openai_lengths)
        cfg, warnings = await run_in_threadpool(check_lengths, cfg, record["method"]["type"],
                                                record["merge_from"] or cfg.model.path)
    except UserError as e:  # a row of a file, a config value: OpenAI's file checks name the line
        raise ApiError(400, str(e), "training_file" if ".jsonl:" in str(e) else None, "invalid_request") from None
    run_dir.mkdir(parents=True)
    (run_dir / run_files.JOB_CONFIG).write_text(dump_config(cfg))
    job = store.add_job({
        "id": job_id, "state": "PENDING", "display_name": record["fine_tuned_model"], "method": cfg.method,
        "source_model": req.model, "train_dataset": req.training_file, "validation_dataset": req.validation_file,
        "config": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "openai": record,
        "phase": "merge" if record["merge_from"] else "train",
        "progress": {"step": 0, "total_steps": estimate_steps(cfg, record["rows"])},
    })
    store.add_event(job_id, "state", job_json(job))
    for line in warnings:
        store.add_event(job_id, "log", line)
    return ft_job_json(job)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    store = request.app.state.store
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
              if k.startswith("metadata[") and k.endswith("]")}
    jobs = store.list_jobs()  # newest first
    if after is not None:
        ids = [j["id"] for j in jobs]
        if after not in ids:
            raise ApiError(400, f"after: no fine-tuning job {after!r}", "after", "invalid_request")
        jobs = jobs[ids.index(after) + 1:]
    metadata = lambda job: (job.get("openai") or {}).get("metadata") or {}  # noqa: E731
    jobs = [j for j in jobs if all(metadata(j).get(k) == v for k, v in wanted.items())]
    page = jobs[:limit]
    return {"object": "list", "data": [ft_job_json(_with_results(store, j)) for j in page],
            "has_more": len(jobs) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, request: Request):
    return ft_job_json(_job(request, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request):
    job = _job(request, job_id)
    if job["state"] in ENDED:
        raise ApiError(409, f"fine-tuning job {job_id} has already ended ({ft_job_json(job)['status']})", None,
                       "invalid_state")
    return ft_job_json(request.app.state.scheduler.cancel(job))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, request: Request):
    job = _job(request, job_id)
    if job["state"] not in ("PENDING", "RUNNING"):
        raise ApiError(409, f"fine-tuning job {job_id} is {ft_job_json(job)['status']}; only a queued or running job "
                            "can be paused", None, "invalid_state")
    return ft_job_json(request.app.state.scheduler.pause(job))


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, request: Request):
    job = _job(request, job_id)
    if job["state"] != "PAUSED":
        raise ApiError(409, f"fine-tuning job {job_id} is {ft_job_json(job)['status']}, not paused; only a paused job "
                            "can be resumed", None, "invalid_state")
    return ft_job_json(request.app.state.scheduler.resume(job))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000)):
    store = request.app.state.store
    job = _job(request, job_id)
    total = job["progress"].get("total_steps")
    events = list(reversed(store.events(job_id, timed=True)))  # newest first
    if after is not None:
        if not after.startswith("ftevent-") or not after[8:].isdigit():
            raise ApiError(400, f"after: {after!r} is not an event id of this job", "after", "invalid_request")
        events = [e for e in events if e[0] < int(after[8:])]
    return {"object": "list", "has_more": len(events) > limit,
            "data": [event_json(i, created, kind, data, total) for i, created, kind, data in events[:limit]]}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = Query(10, ge=1, le=100)):
    items = checkpoints(_job(request, job_id))
    if after is not None:
        ids = [c["id"] for c in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit,
            "first_id": items[0]["id"] if items else None, "last_id": items[:limit][-1]["id"] if items else None}


@router.delete("/v1/models/{name:path}")
def delete_fine_tuned_model(name: str, request: Request):
    if name in request.app.state.settings.models:
        raise ApiError(403, f"{name} is a base model served with --model; only fine-tuned models can be deleted",
                       "model", "model_not_deletable")
    if not delete_model(request.app.state.store, name, request.app.state.engine.unload):
        raise ApiError(404, f"The model {name!r} does not exist", "model", "model_not_found")
    return {"id": name, "object": "model", "deleted": True}


# ---------------------------------------------------------------- graders

class _GraderRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict
    model_sample: str
    item: dict | None = None


class _GraderValidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict


@router.post("/v1/fine_tuning/alpha/graders/validate")
async def validate_grader(request: Request):
    body = _parse(_GraderValidate, await _body(request))
    check_grader(body.grader, request.app.state.settings.allow_code, "grader")
    check_models(body.grader, request.app.state.registry)
    return {"grader": body.grader}


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run_grader(request: Request):
    """Model graders ask this server's engine (judge.EngineJudge) from a worker thread; the event loop stays free
    to run the engine's side, and the job queue is not involved."""
    body = _parse(_GraderRun, await _body(request))
    state = request.app.state
    allow = state.settings.allow_code
    check_grader(body.grader, allow, "grader")
    check_models(body.grader, state.registry)
    sample = {"output_text": body.model_sample, "output_json": _json_or_none(body.model_sample), "output_tools": []}
    judge = EngineJudge(state.registry, state.engine, asyncio.get_running_loop())
    try:
        return await run_in_threadpool(graders.run, body.grader, sample, body.item or {}, allow_code=allow,
                                       judge=judge)
    except UserError as e:
        raise ApiError(400, str(e), "grader", "invalid_grader") from None


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
