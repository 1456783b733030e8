"""The service's REST routes: /v1/tuningJobs, /v1/files, /v1/endpoints. Thin: each parses, calls, formats."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import shutil
import threading
import time
from pathlib import Path

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from tunelab import run_files
from tunelab.config import DataSource, UserError, dump_config
from tunelab.data.readers import load_rows

from .compute import compute_json, resolve_compute
from .jobspec import NAME, JobRequest, build_config, file_format
from .scheduler import read_metrics
from .views import ENDED, PREFIX, STATES, endpoint_json, file_json, job_json

router = APIRouter()
_submit_lock = threading.Lock()  # display-name uniqueness is checked and claimed in one step
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# OpenAI's file purposes. fine-tune files (and tunelab uploads, which give none) are read and checked row by row
PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "evals", "vision")


def _job(request: Request, job_id: str) -> dict:
    job = request.app.state.store.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no tuning job {job_id!r}")
    return job


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.post("/v1/tuningJobs")
def create_job(body: JobRequest, request: Request):
    settings, store = request.app.state.settings, request.app.state.store
    name = body.tuned_model_display_name
    if name is not None and not NAME.fullmatch(name):
        raise UserError(f"tuned_model_display_name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    job_id = f"job-{secrets.token_hex(6)}"
    run_dir = settings.home / "runs" / job_id
    compute = resolve_compute(body.compute, request.app.state.backend.capacity())
    # every check, before anything is created
    cfg, summary = build_config(body, settings, store, run_dir, request.app.state.registry)
    with _submit_lock:
        if name is not None:
            taken = (store.get_endpoint(name) is not None or name in settings.models
                     or any(j["display_name"] == name for j in store.list_jobs() if j["state"] not in ("FAILED", "CANCELLED")))
            if taken:
                raise HTTPException(409, f"tuned_model_display_name {name!r} is already used by an endpoint or a "
                                         "live job; choose another name")
        run_dir.mkdir(parents=True)
        (run_dir / run_files.JOB_CONFIG).write_text(dump_config(cfg))
        converted = summary["converted_from"]
        if converted is not None:  # a peer config's notes open the job's log (GET .../logs), before the job can run
            (run_dir / run_files.TRAIN_LOG).write_text("".join(line + "\n" for line in converted["notes"]))
        job = store.add_job({
            "id": job_id, "state": "PENDING", "display_name": name, "method": summary["method"],
            "source_model": summary["source_model"], "train_dataset": summary["train_dataset"],
            "validation_dataset": summary["validation_dataset"], "config": cfg.model_dump(mode="json"),
            "run_dir": str(run_dir), "progress": {"step": 0, "total_steps": summary["total_steps"]},
            "compute": compute_json(compute),
        })
    store.add_event(job_id, "state", job_json(job))
    if converted is None:
        return job_json(job)
    for line in converted["notes"]:
        store.add_event(job_id, "log", line)
    return {**job_json(job), "converted_from": converted}


def _state_filter(state: str | None) -> list[str] | None:
    if state is None or state == "":
        return None
    short = state.upper().removeprefix(PREFIX)
    if short not in STATES:
        raise UserError(f"unknown state {state!r}; use one of {', '.join(PREFIX + s for s in STATES)} "
                        "(or the short name, e.g. RUNNING)")
    return [short]


def _page_token(token: str | None) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)).decode()
        kind, _, seq = text.partition(":")
        if kind == "seq" and seq.isdigit():
            return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise UserError(f"invalid page_token {token!r}: pass the next_page_token of an earlier list response")


@router.get("/v1/tuningJobs")
def list_jobs(request: Request, state: str | None = None, page_size: int = Query(50, ge=1, le=1000),
              page_token: str | None = None):
    store = request.app.state.store
    jobs = store.list_jobs(states=_state_filter(state), before_seq=_page_token(page_token), limit=page_size + 1)
    more = len(jobs) > page_size
    jobs = jobs[:page_size]
    token = base64.urlsafe_b64encode(f"seq:{jobs[-1]['seq']}".encode()).decode().rstrip("=") if more else None
    return {"tuning_jobs": [job_json(j) for j in jobs], "next_page_token": token}


@router.get("/v1/tuningJobs/{job_id}")
def get_job(job_id: str, request: Request):
    return job_json(_job(request, job_id))


@router.post("/v1/tuningJobs/{job_id}:cancel")
def cancel_job(job_id: str, request: Request):
    job = _job(request, job_id)
    if job["state"] in ENDED:
        raise HTTPException(409, f"tuning job {job_id} has already ended ({PREFIX}{job['state']}); nothing to cancel")
    return job_json(request.app.state.scheduler.cancel(job))


@router.get("/v1/tuningJobs/{job_id}/metrics")
def job_metrics(job_id: str, request: Request):
    job = _job(request, job_id)
    return {"metrics": read_metrics(Path(job["run_dir"]) / run_files.METRICS)}


@router.get("/v1/tuningJobs/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(job_id: str, request: Request, tail: int = Query(200, ge=1, le=100_000)):
    path = Path(_job(request, job_id)["run_dir"]) / run_files.TRAIN_LOG
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines() if path.exists() else []
    return PlainTextResponse("".join(line + "\n" for line in lines[-tail:] if line.strip()))


@router.get("/v1/tuningJobs/{job_id}/events")
async def job_events(job_id: str, request: Request, after: int = Query(0, ge=0)):
    """Server-sent events: every `state`, `metrics` and `log` event of the job from `after` (or the Last-Event-ID a
    reconnecting browser sends) on; the stream ends after the job has ended and its events are all sent."""
    store = request.app.state.store
    await run_in_threadpool(_job, request, job_id)
    last = request.headers.get("last-event-id")
    start = int(last) if last and last.isdigit() else after

    async def stream():
        nonlocal start
        quiet = 0.0
        while True:
            events = await run_in_threadpool(store.events, job_id, start)
            for event_id, kind, data in events:
                start = event_id
                yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if not events:
                job = await run_in_threadpool(store.get_job, job_id)
                if job["state"] in ENDED and not await run_in_threadpool(store.events, job_id, start):
                    return
                if await request.is_disconnected():
                    return
                quiet += 0.25
                if quiet >= 15:  # a comment line keeps proxies from closing an idle stream
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- files

@router.post("/v1/files")
def upload_file(request: Request, file: UploadFile = File(...), format: str | None = Form(None),
                purpose: str | None = Form(None)):
    settings, store = request.app.state.settings, request.app.state.store
    if purpose is not None and purpose not in PURPOSES:
        raise UserError(f"purpose {purpose!r} is not one of OpenAI's file purposes ({', '.join(PURPOSES)})")
    filename = Path(file.filename or "upload.jsonl").name
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise UserError(f"{filename}: unsupported file type '{suffix}'; upload one of {' '.join(UPLOAD_SUFFIXES)}")
    file_id = f"file-{secrets.token_hex(8)}"
    path = settings.home / "files" / f"{file_id}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out)
    if purpose not in (None, "fine-tune"):  # kept as it is; fine-tuning jobs refuse it (openai_spec.py)
        return file_json(store.add_file({"id": file_id, "filename": filename, "path": str(path), "rows": 0,
                                         "created_at": time.time(), "bytes": path.stat().st_size, "format": "",
                                         "purpose": purpose}))
    try:
        fmt = format or file_format(path)
        rows = load_rows([DataSource(path=str(path), format=fmt)])
    except UserError as e:  # name the file as the client knows it
        path.unlink()
        raise UserError(str(e).replace(str(path), filename)) from None
    except Exception as e:  # e.g. a format outside the Format names (pydantic)
        path.unlink()
        raise UserError(f"{filename}: format {format!r} is not a data format: {str(e).splitlines()[-1].strip()}") from None
    record = store.add_file({"id": file_id, "filename": filename, "path": str(path), "bytes": path.stat().st_size,
                             "rows": len(rows), "format": fmt, "created_at": time.time(), "purpose": purpose})
    return file_json(record)


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None):
    files = [file_json(r) for r in request.app.state.store.list_files()]
    data = [f for f in files if purpose is None or f["purpose"] == purpose]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, request: Request):
    record = request.app.state.store.get_file(file_id)
    if record is None:
        raise HTTPException(404, f"no uploaded file {file_id!r}")
    return file_json(record)


# ---------------------------------------------------------------- endpoints

@router.get("/v1/endpoints")
def list_endpoints(request: Request):
    store = request.app.state.store
    out = []
    for record in store.list_endpoints():
        job = store.get_job(record["job_id"])
        out.append(endpoint_json(record, job["display_name"] if job else None))
    return {"endpoints": out}
