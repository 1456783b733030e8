"""Rewards that verify: ready-made reward functions for `grpo.rewards: [{function: tunelab.verifiers:NAME, args}]`.

    exact_match         the final answer equals the row's reference (normalised text)
    numeric_match       the final answer equals the row's reference as a number, within a tolerance
    format_match        the response matches a regular expression (default <think>...</think><answer>...</answer>)
    tool_call_validity  the fraction of the response's tool calls whose arguments fit the named tool's JSON schema
    code_execution      the fraction of the row's tests the response's code passes, run in a child process

Each is called as every reward function is (objectives/rewards.FunctionReward): prompt, response, answer, the data
row and the tool schemas, plus the options of `args`, which are validated against the annotations below before
any model loads. Pure Python: nothing here imports torch. All but code_execution run no code from the config or
the data, so the service accepts them without --allow-code (RUNS_NO_CODE).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import Field

from tunelab.data.tools import check_tools, parse_tool_calls
from tunelab.graders.base import Failed
from tunelab.graders.python_code import run_source

THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


# ---------------------------------------------------------------- the final answer

def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(text: str) -> str:
    """What a response answers: the last \\boxed{}, else the last <answer>...</answer>, else what follows the last
    "answer:" (to the end of its line), else the whole response."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if tagged:
        return tagged[-1].strip()
    said = re.findall(r"answer\s*(?:is)?\s*:\s*(.*)", text, re.I)
    return (said[-1] if said else text).strip()


def _reference(answer: Any, row: dict | None, field: str) -> str:
    if field == "answer" and answer is not None:
        return str(answer)
    if not row or row.get(field) is None:
        raise ValueError(f"the data row has no {field!r} field to compare with (args: {{field: ...}} names it)")
    return str(row[field])


def normalise_text(text: str) -> str:
    """Case, surrounding whitespace and $, inner runs of whitespace, a trailing full stop."""
    return re.sub(r"\s+", " ", text.strip().strip("$").strip()).rstrip(".").strip().casefold()


def exact_match(prompt=None, response: str = "", answer=None, row: dict | None = None, *,
                field: str = "answer", **_) -> float:
    """1.0 when the response's final answer equals the row's `field`, both normalised (normalise_text)."""
    return float(normalise_text(final_answer(response)) == normalise_text(_reference(answer, row, field)))


# ---------------------------------------------------------------- numbers

_NUMBER = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_SCIENTIFIC = re.compile(rf"^({_NUMBER})\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{{?([-+]?\d+)\}}?$")
_FRACTION = re.compile(r"^([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_CANDIDATE = re.compile(r"[-+]?\\[dt]?frac\{[^{}]+\}\{[^{}]+\}|[-+]?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
                        r"(?:\s*/\s*\d+(?:\.\d+)?)?\s*(?:\\?%)?|[-+]?\.\d+")


def _plain(text: str) -> float | None:
    text = text.strip()
    if not re.fullmatch(_NUMBER, text):
        return None
    return float(text.replace(",", ""))


def parse_number(text: str) -> list[float]:
    """The values a number written as text may mean: [] when it is not one. Thousands separators, LaTeX
    fractions, a/b, decimals, 1.5e3, 1.5 \\times 10^{3}, 10^{-2}; a percentage means p/100 or p (graders differ)."""
    s = text.replace("\\$", "").strip().strip("$").strip()  # math delimiters and a dollar sign
    s = re.sub(r"\\[,!;: ]|\\left|\\right|\\text\{\s*\}", "", s).replace("{,}", ",").replace("\u2212", "-").strip()
    s = re.sub(r"(?<=\d)[ \u2009\u202f](?=\d{3}\b)", ",", s)  # 1 234 567 -> 1,234,567
    if s.endswith("%"):
        p = parse_number(s[:-1].rstrip("\\"))
        return [v / 100 for v in p] + p
    if (m := _FRACTION.match(s)) or (m := re.match(r"^([-+]?)\(?([^/()]+)\)?\s*/\s*\(?([^/()]+)\)?$", s)):
        top, bottom = _plain(m.group(2)), _plain(m.group(3))
        if top is None or bottom is None or bottom == 0:
            return []
        return [(-1 if m.group(1) == "-" else 1) * top / bottom]
    if m := _SCIENTIFIC.match(s):  # float("1e999") is inf where 10.0 ** 999 would raise
        return [_plain(m.group(1)) * float(f"1e{int(m.group(2))}")]
    if m := re.match(r"^10\s*\^\s*\{?([-+]?\d+)\}?$", s):
        return [float(f"1e{int(m.group(1))}")]
    value = _plain(s)
    return [] if value is None else [value]


def answer_number(text: str) -> list[float]:
    """The final answer's values; when the answer is not a number by itself, the last number in it."""
    answer = final_answer(text)
    values = parse_number(answer)
    if not values:
        found = _CANDIDATE.findall(answer)
        values = parse_number(found[-1]) if found else []
    return values


def numeric_match(prompt=None, response: str = "", answer=None, row: dict | None = None, *, field: str = "answer",
                  tolerance: Annotated[float, Field(ge=0)] = 1e-6, **_) -> float:
    """1.0 when the response's final answer and the row's `field` are the same number: |a - b| <= tolerance x
    max(|a|, |b|), or <= tolerance near zero (math.isclose with rel_tol = abs_tol = tolerance)."""
    want = parse_number(_reference(answer, row, field))
    if not want:
        raise ValueError(f"the reference {_reference(answer, row, field)!r} is not a number")
    got = answer_number(response)
    return float(any(math.isclose(g, w, rel_tol=tolerance, abs_tol=tolerance) for g in got for w in want))


# ---------------------------------------------------------------- format

def format_match(prompt=None, response: str = "", answer=None, *, pattern: re.Pattern = re.compile(THINK_ANSWER),
                 **_) -> float:
    """1.0 when the whole response (surrounding whitespace stripped) matches `pattern`, with . matching newlines."""
    source = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    return float(re.fullmatch(source, response.strip(), re.S) is not None)


# ---------------------------------------------------------------- tool calls against their JSON schemas

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return name == "number" or isinstance(value, int) or float(value).is_integer()
    return isinstance(value, _TYPES.get(name, object))


def fits_schema(value, schema) -> bool:
    """Whether `value` fits a JSON schema, in the subset tool signatures use: type (one or a list), enum, const,
    properties, required, additionalProperties, items, min/max(Length|Items|imum), exclusive bounds, pattern,
    anyOf / oneOf / allOf. Other keywords ($ref, format, ...) are not checked."""
    if schema is True or not isinstance(schema, dict):
        return schema is not False
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return False
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        return False
    if "const" in schema and not _same(value, schema["const"]):
        return False
    if isinstance(value, dict) and not _fits_object(value, schema):
        return False
    if isinstance(value, list):
        n = len(value)
        if n < schema.get("minItems", 0) or n > schema.get("maxItems", math.inf):
            return False
        if isinstance(schema.get("items"), (dict, bool)) and not all(fits_schema(v, schema["items"]) for v in value):
            return False
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            return False
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return False
    if _is_type(value, "number") and not _in_bounds(value, schema):
        return False
    return (all(fits_schema(value, s) for s in schema.get("allOf", []))
            and ("anyOf" not in schema or any(fits_schema(value, s) for s in schema["anyOf"]))
            and ("oneOf" not in schema or sum(fits_schema(value, s) for s in schema["oneOf"]) == 1))


def _in_bounds(value, schema: dict) -> bool:
    def bound(key, default):  # draft 4's boolean exclusiveMinimum / exclusiveMaximum is not checked
        b = schema.get(key, default)
        return default if isinstance(b, bool) or not isinstance(b, (int, float)) else b

    return (bound("minimum", -math.inf) <= value <= bound("maximum", math.inf)
            and bound("exclusiveMinimum", -math.inf) < value < bound("exclusiveMaximum", math.inf))


def _same(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _fits_object(value: dict, schema: dict) -> bool:
    properties = schema.get("properties", {})
    if any(name not in value for name in schema.get("required", [])):
        return False
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if not fits_schema(item, properties[name] if name in properties else extra):
            return False
    return True


def tool_call_validity(prompt=None, response: str = "", answer=None, row: dict | None = None,
                       tools: list | None = None, *, no_calls: float = 0.0, **_) -> float:
    """The fraction of the response's tool calls (data.tools.parse_tool_calls) that name one of the tools (the
    environment's, else the row's `tools`) with arguments that fit its parameters' schema; a <tool_call> block
    that is not JSON counts as an invalid call. A response without calls scores `no_calls`."""
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
               for t in (tools or check_tools("the data row", (row or {}).get("tools")) or [])}
    calls = parse_tool_calls(response)[1]
    n = max(len(calls), response.count("<tool_call>"))
    if n == 0:
        return no_calls
    return sum(c["name"] in schemas and fits_schema(c["arguments"], schemas[c["name"]]) for c in calls) / n


# ---------------------------------------------------------------- code

# Run as a python grader's grade(), so the one sandboxed runner (graders/python_code.run_source: `python -I` in an
# empty directory, an empty environment, a memory limit, the process group killed) runs model-written code too.
_TEST_HARNESS = '''
def grade(sample, item):
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(sample["code"], "<completion>", "exec"), namespace)
    except BaseException:
        return 0.0
    passed = 0
    for test in sample["tests"]:
        try:
            exec(compile(test, "<test>", "exec"), dict(namespace))
            passed += 1
        except BaseException:
            pass
    return passed / len(sample["tests"])
'''


def code_block(text: str) -> str:
    """The last fenced code block (```python or bare ```), else the whole response."""
    blocks = re.findall(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", text, re.S | re.I)
    return blocks[-1] if blocks else text


def code_execution(prompt=None, response: str = "", answer=None, row: dict | None = None, *, field: str = "tests",
                   timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0, **_) -> float:
    """The fraction of the row's `field` tests (Python source each, e.g. MBPP's "assert f(2) == 4"; one string is
    one test) that pass after the response's code block runs, all in one child process limited to `timeout_s`
    seconds and 2 GiB; past the time, or when the process dies, the reward is 0."""
    tests = (row or {}).get(field)
    tests = [tests] if isinstance(tests, str) else tests
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"the data row's {field!r} field must be a test (Python source) or a list of them")
    try:
        return run_source(_TEST_HARNESS, {"code": code_block(response), "tests": tests}, {}, time_limit_s=timeout_s)
    except Failed:
        return 0.0


# Function rewards the service accepts without --allow-code: they run no code named by, or written in, a request.
RUNS_NO_CODE = frozenset(f"tunelab.verifiers:{name}" for name in (
    "exact_match", "numeric_match", "format_match", "tool_call_validity"))
