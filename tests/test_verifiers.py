"""tunelab.verifiers, the ready-made reward functions: numbers against closed-form values (evaluated by sympy),
tool-call arguments against the jsonschema library, code run in the sandboxed child (passing, failing, timeout,
an infinite loop, a forking grandchild), and their options validated at the edge."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jsonschema
import pytest
import sympy

from tunelab import verifiers as V
from tunelab.config import UserError
from tunelab.objectives.rewards import FunctionReward, PromptItem

# (as written, the same value as a sympy expression)
NUMBERS = [
    ("42", "42"), ("-7", "-7"), ("+3", "3"), ("1,234,567", "1234567"), ("1 234 567", "1234567"),
    ("3.14159", "314159/100000"), (".5", "1/2"), ("0.125", "1/8"), ("\\frac{3}{8}", "3/8"),
    ("\\dfrac{22}{7}", "22/7"), ("-\\frac{1}{3}", "-1/3"), ("5/4", "5/4"), ("2.5e3", "2500"), ("1E-4", "1/10000"),
    ("1.5 \\times 10^{3}", "1500"), ("6.02 \\times 10^{23}", "602*10**21"), ("10^{-2}", "1/100"),
    ("$1,000$", "1000"), ("1{,}000", "1000"), ("\\$12.50", "25/2"), ("\u22124", "-4"),
]


@pytest.mark.parametrize("text,expr", [n for n in NUMBERS if n[1] is not None])
def test_numbers_parse_to_their_closed_form_values(text, expr):
    assert V.parse_number(text) == [pytest.approx(float(sympy.sympify(expr)), rel=1e-12)]


def test_percentages_mean_a_hundredth_or_the_number_itself():
    assert V.parse_number("12.5%") == [pytest.approx(float(sympy.Rational(1, 8))), 12.5]
    assert V.parse_number("50\\%") == [0.5, 50.0]


@pytest.mark.parametrize("text", ["", "abc", "1/0", "1.2.3", "x^2", "\\frac{a}{b}", "e5"])
def test_non_numbers_parse_to_nothing(text):
    assert V.parse_number(text) == []


@pytest.mark.parametrize("response,reference,score", [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{\\frac{1}{2}} wait, no: \\boxed{0.25}", "1/4", 1.0),  # the last boxed answer counts
    ("<think>9*8 = 72</think><answer>72</answer>", "72", 1.0),
    ("Step 1: 1200 + 34 = 1234. Answer: 1,234", "1234", 1.0),
    ("so we get 1,234 apples", "1234", 1.0),  # no marker: the last number
    ("the sides are 3, 4 and 5", "5", 1.0),
    ("Answer: 73", "72", 0.0),
    ("Answer: 12.5%", "0.125", 1.0),
    ("Answer: 1.5e3", "1500", 1.0),
    ("Answer: 3.1416", str(sympy.pi.evalf(20)), 0.0),  # 2.3e-6 relative: outside the default 1e-6
    ("no idea", "5", 0.0),
])
def test_numeric_match(response, reference, score):
    assert V.numeric_match(response=response, answer=reference) == score


def test_numeric_tolerance_and_field():
    pi = str(sympy.pi.evalf(30))
    assert V.numeric_match(response="Answer: 3.1416", answer=pi, tolerance=1e-5) == 1.0
    row = {"solution": "\\frac{2}{3}"}
    assert V.numeric_match(response="0.6666667", row=row, field="solution") == 1.0
    assert V.numeric_match(response="0.67", row=row, field="solution") == 0.0
    with pytest.raises(ValueError, match="no 'solution' field"):
        V.numeric_match(response="1", row={}, field="solution")


@pytest.mark.parametrize("response,reference,score", [
    ("  Paris. ", "paris", 1.0), ("<answer>New  York</answer>", "new york", 1.0),
    ("The answer is: $x+1$", "x+1", 1.0), ("\\boxed{B}", "b", 1.0), ("Paris, France", "Paris", 0.0),
])
def test_exact_match_normalises(response, reference, score):
    assert V.exact_match(response=response, answer=reference) == score


def test_format_match():
    assert V.format_match(response="<think>\nhm\n</think>\n<answer>4</answer>\n") == 1.0
    assert V.format_match(response="<answer>4</answer>") == 0.0
    assert V.format_match(response="<think>x</think><answer>4</answer> and more") == 0.0
    assert V.format_match(response="Answer: 4", pattern=r"Answer: \d+") == 1.0


# ---------------------------------------------------------------- JSON schemas, against the jsonschema library

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 14}},
     "required": ["city"], "additionalProperties": False},
    {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "values": {
        "type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3}}},
    {"type": "object", "properties": {"q": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                                      "n": {"type": ["integer", "null"], "exclusiveMinimum": 0}},
     "additionalProperties": {"type": "boolean"}},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                                      "y": {"oneOf": [{"type": "number"}, {"type": "integer"}]},
                                      "z": {"allOf": [{"type": "number"}, {"minimum": 0}]}, "k": {"const": True}}},
]
VALUES = [
    {}, {"city": "Oslo"}, {"city": "Oslo", "days": 3}, {"city": "Oslo", "days": 3.0}, {"city": "Oslo", "days": 2.5},
    {"city": "Oslo", "days": 0}, {"city": "Oslo", "days": 15}, {"city": 7}, {"city": "Oslo", "extra": 1},
    {"city": "Oslo", "days": True}, {"unit": "c"}, {"unit": "k"}, {"values": []}, {"values": [1, 2.5]},
    {"values": [1, 2, 3, 4]}, {"values": ["1"]}, {"q": "ab"}, {"q": "a"}, {"q": "abcdef"}, {"q": "AB"}, {"n": None},
    {"n": 0}, {"n": 1}, {"flag": True}, {"flag": 1}, {"x": "s"}, {"x": 1}, {"x": 1.5}, {"y": 1}, {"y": 1.5},
    {"z": -1}, {"z": 2}, {"k": True}, {"k": 1}, [], "text", None,
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_checks_agree_with_jsonschema(schema):
    validator = jsonschema.Draft202012Validator(schema)
    assert [V.fits_schema(v, schema) for v in VALUES] == [validator.is_valid(v) for v in VALUES]


def _call(name, arguments) -> str:
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_tool_call_validity_is_the_fraction_of_valid_calls():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": SCHEMAS[0]}}]
    calls = [("weather", {"city": "Oslo", "days": 2}), ("weather", {"days": 2}), ("forecast", {"city": "Oslo"})]
    response = "Let me look.\n" + "\n".join(_call(*c) for c in calls) + "\n<tool_call>\n{not json\n</tool_call>"
    valid = [name == "weather" and jsonschema.Draft202012Validator(SCHEMAS[0]).is_valid(args) for name, args in calls]
    expected = sum(valid) / 4  # the block that is not JSON is an invalid call
    assert V.tool_call_validity(response=response, row={"tools": tools}) == expected == 0.25
    bare = [{"name": "weather", "parameters": SCHEMAS[0]}]  # as LLaMA-Factory stores them, a JSON string
    import json
    assert V.tool_call_validity(response=_call(*calls[0]), row={"tools": json.dumps(bare)}) == 1.0
    assert V.tool_call_validity(response=_call(*calls[0]), tools=tools) == 1.0  # the environment's tools
    assert V.tool_call_validity(response="no calls", row={"tools": tools}) == 0.0
    assert V.tool_call_validity(response="no calls", row={"tools": tools}, no_calls=1.0) == 1.0


# ---------------------------------------------------------------- code in the sandboxed child

CODE = "Here:\n```python\ndef double(x):\n    return 2 * x\n```\n"


def test_code_execution_scores_the_fraction_of_tests_passed():
    row = {"tests": ["assert double(2) == 4", "assert double(0) == 0", "assert double(3) == 7"]}
    assert V.code_execution(response=CODE, row=row) == pytest.approx(2 / 3)
    assert V.code_execution(response="```python\ndef double(x) return\n```", row=row) == 0.0  # syntax error
    assert V.code_execution(response="```\nraise SystemExit(0)\n```", row=row) == 0.0
    assert V.code_execution(response=CODE, row={"checks": "assert double(1) == 2"}, field="checks") == 1.0
    # the child has no environment and an empty working directory
    env = {"tests": ["import os\nassert os.environ.get('HOME') is None and os.listdir('.') == []"]}
    assert V.code_execution(response="x = 1", row=env) == 1.0
    with pytest.raises(ValueError, match="'tests' field"):
        V.code_execution(response=CODE, row={})


def test_code_execution_past_its_time_is_killed():
    row = {"tests": ["assert True"]}
    start = time.monotonic()
    assert V.code_execution(response="```python\nwhile True:\n    pass\n```", row=row, timeout_s=1.0) == 0.0
    assert V.code_execution(response="import time\ntime.sleep(60)", row=row, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 20


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """Whether the process no longer runs (absent, or a zombie waiting for its reaper)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("detach", [False, True])
def test_a_forking_grandchild_is_killed(tmp_path, detach):
    """A grandchild that keeps the pipes runs the child past its time; one that closes them lets the child answer
    at once. Either way it is killed with the child's process group."""
    pidfile = tmp_path / "pid"
    code = (f"import os, time\nif os.fork() == 0:\n    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            + ("    os.close(0); os.close(1); os.close(2)\n" if detach else "")
            + "    while True:\n        time.sleep(0.05)\ntime.sleep(0.5)\n")
    score = V.code_execution(response=code, row={"tests": ["assert True"]}, timeout_s=3.0)
    assert score == (1.0 if detach else 0.0)
    pid = int(pidfile.read_text())
    assert _gone(pid), f"grandchild {pid} still runs"


# ---------------------------------------------------------------- as grpo.rewards entries

def test_options_are_validated_at_the_edge():
    with pytest.raises(UserError, match=r"r\.args: tunelab.verifiers:numeric_match has no option 'tolerence'; "
                                        r"did you mean 'tolerance'\?"):
        FunctionReward("tunelab.verifiers:numeric_match", "r", {"tolerence": 1e-3})
    with pytest.raises(UserError, match=r"r\.args\.tolerance: Input should be greater than or equal to 0"):
        FunctionReward("tunelab.verifiers:numeric_match", "r", {"tolerance": -1})
    with pytest.raises(UserError, match=r"r\.args\.pattern: .*regular expression"):
        FunctionReward("tunelab.verifiers:format_match", "r", {"pattern": "(unclosed"})
    with pytest.raises(UserError, match=r"r\.args\.timeout_s: .*less than or equal to 120"):
        FunctionReward("tunelab.verifiers:code_execution", "r", {"timeout_s": 600})
    with pytest.raises(UserError, match="it takes no options"):
        FunctionReward("rl_rewards:target_fraction", "r", {"x": 1})


def test_function_rewards_get_the_row_and_their_options():
    reward = FunctionReward("tunelab.verifiers:numeric_match", "r", {"field": "solution", "tolerance": "1e-2"})
    items = [PromptItem([1], [{"role": "user", "content": "2/3?"}], None, row={"solution": "2/3"})] * 2
    assert reward(items, ["Answer: 0.667", "Answer: 0.7"]).tolist() == [1.0, 0.0]
    # a function that takes neither row nor **kwargs is called as before
    plain = FunctionReward("rl_rewards:returns_text", "r")
    assert "row" not in plain.extra and "tools" not in plain.extra


def test_service_counts_only_code_execution_as_code(tmp_path):
    from tiny import config_dict

    from tunelab.config import load_config
    from tunelab.serve.jobspec import code_keys

    def keys(rewards):
        cfg = config_dict(tmp_path, tmp_path / "p.jsonl", tmp_path / "o", method="grpo",
                          data={"train": [{"path": str(tmp_path / "p.jsonl"), "format": "prompt"}]},
                          grpo={"rewards": rewards})
        return code_keys(load_config(data=cfg))

    safe = [{"function": f"tunelab.verifiers:{n}"} for n in
            ("exact_match", "numeric_match", "format_match", "tool_call_validity")]
    assert keys(safe) == []
    assert keys(safe + [{"function": "tunelab.verifiers:code_execution"}]) == ["grpo.rewards[4].function"]
    assert keys([{"function": "rl_rewards:target_fraction"}]) == ["grpo.rewards[0].function"]
    with pytest.raises(UserError, match="only a grpo.rewards entry with a function takes them"):
        keys([{"grader": {"type": "string_check"}, "args": {"x": 1}}])


def test_verifiers_import_no_torch():
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", "import sys, tunelab.verifiers; print('torch' in sys.modules)"],
                         env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
