"""score_model and label_model: a judge model reads the grader's rendered messages; its reply is parsed.

OpenAI asks its judge for structured output; a tunelab Judge returns text, so the grader's own messages must ask
for the score or the label. A reply that is JSON with a "result" is read like OpenAI's structured output.
The judge gets the messages rendered ("developer" sent as "system", which every chat template knows) and the
grader's sampling_params as chat completions fields (chat_params); what a judge leaves unset is its server's default
(tunelab serve: temperature 1, 128 tokens, as on /v1/chat/completions).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from tunelab.graders.base import Failed, JudgeUnavailable
from tunelab.graders.schema import LabelModel, ScoreModel
from tunelab.graders.template import render

Judge = Callable[[list[dict], str, dict], str]  # (messages, model name, sampling params) -> the reply's text
# sampling_params -> chat completions fields; reasoning_effort has no equivalent on the served models and is dropped
CHAT_FIELDS = {"max_completions_tokens": "max_completion_tokens", "temperature": "temperature", "top_p": "top_p",
               "seed": "seed"}
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def ask(spec: ScoreModel | LabelModel, judge: Judge, sample: dict, item: dict, where: str) -> str:
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": render(m.content, sample, item, f"{where}.input.{i}.content")}
                for i, m in enumerate(spec.input)]
    params = spec.sampling_params.model_dump(exclude_none=True) if spec.sampling_params else {}
    try:
        reply = judge(messages, spec.model, params)
    except JudgeUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the judge's server fails this sample only
        raise Failed({"model_grader_server_error": True, "model_grader_server_error_details": str(err)[:500]},
                     f"{where}: the judge {spec.model!r} failed: {err}") from None
    if not isinstance(reply, str):
        raise Failed({"model_grader_parse_error": True}, f"{where}: the judge returned {type(reply).__name__}")
    return reply


def chat_params(params: dict) -> dict:
    """A grader's sampling_params as the fields of a chat completions request."""
    return {CHAT_FIELDS[name]: value for name, value in params.items() if name in CHAT_FIELDS}


def _structured(reply: str) -> Any:
    try:
        value = json.loads(reply)
    except ValueError:
        return None
    return value.get("result") if isinstance(value, dict) else None


def parse_score(reply: str, low: float, high: float, where: str) -> float:
    """The JSON "result", else the reply if it is one number, else the last number in it (a judge that reasons
    first ends with its score). Clamped to the grader's range, as OpenAI truncates to it."""
    result = _structured(reply)
    if not (isinstance(result, (int, float)) and not isinstance(result, bool)):
        numbers = NUMBER.findall(reply)
        if not numbers:
            raise Failed({"model_grader_parse_error": True}, f"{where}: no number in the judge's reply {reply[:200]!r}")
        result = float(numbers[-1])
    return min(max(float(result), low), high)


def parse_label(reply: str, labels: list[str], where: str) -> str:
    """The JSON "result", else the reply itself (quotes and final punctuation stripped, any case), else the one
    label the reply names as a word. Anything else (no label, or several) is a parse error."""
    result = _structured(reply)
    if isinstance(result, str) and result in labels:
        return result
    bare = reply.strip().strip("\"'`*.").strip()
    exact = [label for label in labels if label.lower() == bare.lower()]
    if exact:
        return exact[0]
    named = [label for label in labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", reply, re.I)]
    if len(named) == 1:
        return named[0]
    raise Failed({"model_grader_parse_error": True},
                 f"{where}: the judge's reply names {'several' if named else 'none'} of the labels {labels}: "
                 f"{reply[:200]!r}")
