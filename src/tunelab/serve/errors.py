"""Every error response is one JSON line in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, status 4xx.

Route code raises `UserError` (-> 400), `HTTPException(status, "one line")` or `ApiError` (also naming the field);
request validation errors become
400 with a message naming the field. Anything else is a 500 with a one-line message (and a traceback in the
server's log), so a client never sees a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunelab.config import UserError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error"}


class ApiError(HTTPException):
    """An HTTP error that names the request field at fault (OpenAI's `param`) and a machine-readable `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.param, self.code = param, code


def error_response(status: int, message: str, param: str | None = None, code=None) -> JSONResponse:
    line = " ".join(str(message).split())  # one line, whatever the message held
    return JSONResponse({"error": {"message": line, "type": _TYPES.get(status, "server_error"), "param": param,
                                   "code": status if code is None else code}}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")]
        where = ".".join(loc)
        if not loc and e.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("request body must be a JSON object (Content-Type: application/json)")
        elif e.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{where}'")
        elif e.get("type") == "missing":
            parts.append(f"missing field '{where}'")
        else:
            parts.append(f"'{where}': {e.get('msg')} (got {e.get('input')!r})" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, exc.detail, getattr(exc, "param", None), getattr(exc, "code", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, validation_message(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logging.getLogger("tunelab.serve").exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
