"""STAND-IN for tunelab.graders (issue 18), used by tests/test_grpo.py ONLY when the real package is absent on
this branch: the interface of /work/wt/_notes/GRADERS_API.md with one grader type, string_check on
{{sample.output_text}} and {{item.FIELD}}. Once tunelab.graders is merged, the test uses the real one."""

from __future__ import annotations

import re

from tunelab.config import UserError


class GraderError(UserError):
    pass


_OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "like": lambda a, b: b.lower() in a.lower(),
        "ilike": lambda a, b: b.lower() in a.lower()}


def _fill(template: str, sample: dict, item: dict) -> str:
    def sub(m):
        scope, _, key = m.group(1).partition(".")
        return str((sample if scope == "sample" else item).get(key, ""))
    return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", sub, template)


def validate(grader: dict, *, allow_code: bool = False) -> None:
    if grader.get("type") != "string_check":
        raise GraderError(f"grader.type: the stand-in knows string_check only, got {grader.get('type')!r}")
    if grader.get("operation") not in _OPS:
        raise GraderError(f"grader.operation: one of {', '.join(_OPS)}")


class _StringCheck:
    def __init__(self, grader: dict):
        self.g = grader

    def __call__(self, sample: dict, item: dict) -> float:
        a, b = _fill(self.g["input"], sample, item), _fill(self.g["reference"], sample, item)
        return float(_OPS[self.g["operation"]](a, b))


def build(grader: dict, *, allow_code: bool = False, judge=None):
    validate(grader, allow_code=allow_code)
    return _StringCheck(grader)
