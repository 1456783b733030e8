"""A judge behind any OpenAI-compatible chat completions endpoint (another `tunelab serve`, vLLM, OpenAI itself):
what a training run's score_model / label_model graders ask. Standard library only, so the trainer needs no client
package.

A judge that cannot be reached (after a few tries), refuses the API key or does not serve the model raises
JudgeUnavailable: every sample would fail alike, so the run stops with one line. Any other failure of one request
(a 5xx after the retries, a 400 for one over-long prompt, a reply that is not a chat completion) fails that sample
only, which scores 0 with model_grader_server_error, as on OpenAI.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from tunelab.graders.base import JudgeUnavailable
from tunelab.graders.judged import chat_params

FATAL_STATUS = (401, 403, 404)  # the key, the permission, the model: the same for every sample


class HttpJudge:
    """`judge(messages, model, sampling_params) -> reply text` by POST {base_url}/chat/completions."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 3):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout_s, self.retries = api_key, timeout_s, retries

    def __call__(self, messages: list[dict], model: str, params: dict) -> str:
        body = json.dumps({"model": model, "messages": messages, **chat_params(params)}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _reply_text(json.load(response))
            except urllib.error.HTTPError as err:
                detail = f"HTTP {err.code}: {_error_message(err)}"
                if err.code in FATAL_STATUS:
                    raise JudgeUnavailable(f"the judge at {self.base_url} refused model {model!r}: {detail}") from None
                if err.code < 500 or attempt == self.retries:
                    raise RuntimeError(detail) from None
            except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timed out
                if attempt == self.retries:
                    reason = getattr(err, "reason", err)
                    raise JudgeUnavailable(f"cannot reach the judge at {self.base_url} ({reason}; tried "
                                           f"{self.retries + 1} times): is that server up, and reachable from "
                                           "where this run is?") from None
            time.sleep(0.5 * 2**attempt)
            attempt += 1


def _reply_text(data) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"the judge's answer is not a chat completion: {str(data)[:200]}") from None
    return content if isinstance(content, str) else ""


def _error_message(err: urllib.error.HTTPError) -> str:
    """OpenAI's error shape {"error": {"message"}}, tunelab's {"detail"}, else the body's start."""
    try:
        text = err.read().decode(errors="replace")
    except OSError:
        return str(err.reason)
    try:
        data = json.loads(text)
        found = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("detail")
        return str(found or text)[:300]
    except (ValueError, AttributeError):
        return " ".join(text.split())[:300]
