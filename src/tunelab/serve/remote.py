"""`tunelab generate URL` / `tunelab chat URL`: the same commands against a running `tunelab serve`, through its
OpenAI-compatible chat route. Standard library only: nothing heavy is imported on this path."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from tunelab.config import UserError


def is_url(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def split_url(url: str) -> tuple[str, str]:
    """http://HOST:PORT/endpoints/NAME -> ("http://HOST:PORT", "endpoints/NAME"): the server and the model name."""
    parts = urllib.parse.urlsplit(url)
    name = parts.path.strip("/")
    if not parts.netloc or not name or parts.query:
        raise UserError(f"{url}: expected a model URL such as http://127.0.0.1:8321/endpoints/NAME")
    return f"{parts.scheme}://{parts.netloc}", name


def remote_reply(url: str, *, max_new_tokens: int, temperature: float, top_p: float,
                 api_key: str | None) -> Callable[[list[dict]], str]:
    """The reply function for `infer.chat` and `generate`: one chat completion per turn, the history sent whole."""
    server, model = split_url(url)

    def reply(messages: list[dict]) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p}
        answer = post_json(f"{server}/v1/chat/completions", body, api_key)
        return answer["choices"][0]["message"]["content"].strip()  # stripped as the local decode_reply does

    return reply


def post_json(url: str, body: dict, api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code}: {_error_message(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None


def _error_message(raw: bytes) -> str:
    """The server's one-line message from its JSON error, else the start of the body."""
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip().splitlines()[0][:200] if raw.strip() else "no message"
