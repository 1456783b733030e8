"""OpenAI's file routes beyond upload/list/get (which jobs_api.py serves for both faces, on one file store):
GET /v1/files/{id}/content and DELETE /v1/files/{id}, refused while a live job reads the file."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from .views import ENDED

router = APIRouter()


def uploaded(request: Request, file_id: str) -> dict:
    record = request.app.state.store.get_file(file_id)
    if record is None:
        raise HTTPException(404, f"No such File object: {file_id}")
    return record


def jobs_using(store, record: dict) -> list[str]:
    """The ids of jobs not yet ended (paused ones included) that read the file."""
    out = []
    for job in store.list_jobs():
        if job["state"] in ENDED:
            continue
        named = record["id"] in (job["train_dataset"], job["validation_dataset"])
        if named or record["path"] in json.dumps(job["config"]):
            out.append(job["id"])
    return out


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request):
    record = uploaded(request, file_id)
    return FileResponse(record["path"], media_type="application/octet-stream", filename=record["filename"])


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request):
    store = request.app.state.store
    record = uploaded(request, file_id)
    users = jobs_using(store, record)
    if users:
        raise HTTPException(409, f"file {file_id} is used by the live job {users[0]}; delete it after the job ends "
                                 "(or cancel the job)")
    store.delete_file(file_id)
    Path(record["path"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
