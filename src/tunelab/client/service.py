"""A small client for the tuning service, in the managed service's style (stdlib only, no heavy imports):

    import tunelab
    from tunelab.tuning import sft
    tunelab.init(url="http://127.0.0.1:8321", api_key=None)
    job = sft.train(source_model="base", train_dataset="data/train.jsonl", tuned_model_display_name="v1")
    job.wait()
    print(tunelab.GenerativeModel(job.tuned_model_endpoint_name).generate_content("Hi").text)

Every error the server returns is raised as `ServiceError` with the server's one-line message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


class ServiceError(Exception):
    """The service refused or failed a request; the message is the server's one line."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    # Generous: the first request for a model waits while the server loads it.
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.url = (url or os.environ.get("TUNELAB_URL") or "http://127.0.0.1:8321").rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("TUNELAB_API_KEY")
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None, *, query: dict | None = None,
                data: bytes | None = None, content_type: str | None = None, raw: bool = False):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise ServiceError(_error_message(e.read(), e.code), e.code) from None
        except urllib.error.URLError as e:
            raise ServiceError(f"cannot reach the tuning service at {self.url}: {e.reason}") from None
        except TimeoutError:
            raise ServiceError(f"{method} {path}: no answer from {self.url} within {self.timeout:g}s") from None
        return payload.decode() if raw else json.loads(payload)

    def upload(self, path: str | Path, format: str | None = None) -> dict:
        """POST /v1/files: a local data file -> its file record (use record['id'] as a dataset)."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n"]
        if format:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\n{format}\r\n'.encode())
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/files", data=data, content_type=f"multipart/form-data; boundary={boundary}")


def _error_message(payload: bytes, status: int) -> str:
    try:
        return json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {payload[:200].decode(errors='replace').strip()}"


_client: Client | None = None


def init(url: str | None = None, api_key: str | None = None) -> Client:
    """Point this process at a tuning service (default: $TUNELAB_URL, else http://127.0.0.1:8321)."""
    global _client
    _client = Client(url, api_key)
    return _client


def client() -> Client:
    return _client or init()


class TuningJob:
    """One tuning job on the service; attributes read the last fetched state (`refresh()` fetches)."""

    def __init__(self, name_or_id: str, data: dict | None = None):
        self.id = name_or_id.removeprefix("tuningJobs/")
        self._data = data or client().request("GET", f"/v1/tuningJobs/{self.id}")
        # {"tool", "notes"} when the job's config was an axolotl / LLaMA-Factory one (the create response only)
        self.converted_from: dict | None = self._data.get("converted_from")

    @classmethod
    def create(cls, body: dict) -> TuningJob:
        """POST /v1/tuningJobs: a managed-service request, or {"config": CONFIG} where CONFIG is a tunelab config
        or an axolotl / LLaMA-Factory one as a dict (converted by the server; its notes in `converted_from`)."""
        data = client().request("POST", "/v1/tuningJobs", body)
        return cls(data["id"], data)

    @classmethod
    def list(cls, state: str | None = None) -> list[TuningJob]:
        jobs, token = [], None
        while True:
            page = client().request("GET", "/v1/tuningJobs", query={"state": state, "page_token": token})
            jobs += [cls(d["id"], d) for d in page["tuning_jobs"]]
            token = page["next_page_token"]
            if not token:
                return jobs

    def to_dict(self) -> dict:
        return dict(self._data)

    def refresh(self) -> TuningJob:
        self._data = client().request("GET", f"/v1/tuningJobs/{self.id}")
        return self

    def cancel(self) -> TuningJob:
        self._data = client().request("POST", f"/v1/tuningJobs/{self.id}:cancel")
        return self

    def wait(self, poll: float = 1.0, timeout: float | None = None) -> TuningJob:
        """Block until the job has ended (whatever its end state: check `state`)."""
        deadline = None if timeout is None else time.time() + timeout
        while not self.refresh().has_ended:
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"tuning job {self.id} still {self.state} after {timeout}s")
            time.sleep(poll)
        return self

    @property
    def resource_name(self) -> str:
        return self._data["name"]

    @property
    def state(self) -> str:
        return self._data["state"]

    @property
    def has_ended(self) -> bool:
        return self.state in ENDED

    @property
    def error(self) -> str | None:
        return (self._data.get("error") or {}).get("message")

    @property
    def tuned_model_endpoint_name(self) -> str | None:
        return self._data.get("tuned_model_endpoint_name")

    def __repr__(self) -> str:
        return f"TuningJob({self.id!r}, state={self.state})"


class Response:
    def __init__(self, data: dict):
        self.raw = data
        self.text = data["choices"][0]["message"]["content"]


class GenerativeModel:
    """A served model (an endpoint name, a tuned job's endpoint, or a base --model name); generates through the
    service's OpenAI-compatible chat route."""

    def __init__(self, model_name: str, system_instruction: str | None = None):
        self.model_name = model_name
        self.system_instruction = system_instruction

    def generate_content(self, contents: str, *, max_tokens: int = 128, temperature: float = 0.0) -> Response:
        messages = [{"role": "system", "content": self.system_instruction}] if self.system_instruction else []
        messages.append({"role": "user", "content": contents})
        return Response(client().request("POST", "/v1/chat/completions", {
            "model": self.model_name, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}))
