"""The python grader: the grader's source defines `grade(sample, item) -> float`, as OpenAI documents.

It runs only when the operator allowed code (--allow-code), each call in a fresh child process (python_runner.py
under `python -I`, in an empty temporary directory, with an empty environment) with OpenAI's limits: 2 minutes,
2 GiB of memory. A child past its time is killed with its whole process group.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tunelab.graders.base import Failed, GraderError

RUNNER = Path(__file__).with_name("python_runner.py")
TIME_LIMIT_S = 120.0
MEMORY_BYTES = 2 << 30
MAX_SOURCE_BYTES = 256 * 1024
ALLOW_CODE_HINT = "a python grader runs code: the operator must allow it with --allow-code"


def check_source(source: str, where: str) -> None:
    """Compile without running: a syntax error or a missing grade() is caught before any sample is graded."""
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise GraderError(f"{where}: the source is over {MAX_SOURCE_BYTES // 1024} kB")
    try:
        tree = ast.parse(source, "<grader source>")
    except SyntaxError as err:
        raise GraderError(f"{where}: syntax error on line {err.lineno}: {err.msg}") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "grade" for node in tree.body):
        raise GraderError(f"{where}: the source must define grade(sample, item) -> float at the top level")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone: every process in it has exited
        pass


def run_source(source: str, sample: dict, item: dict, time_limit_s: float | None = None) -> float:
    """grade(sample, item) of `source` in a fresh sandboxed child (the module's docstring); tunelab.verifiers'
    code_execution runs model-written code through it too. Failed when it raises, dies or runs out of time."""
    time_limit_s = TIME_LIMIT_S if time_limit_s is None else time_limit_s
    request = json.dumps({"source": source, "sample": sample, "item": item, "memory_bytes": MEMORY_BYTES})
    with tempfile.TemporaryDirectory(prefix="tunelab-grader-") as workdir:
        child = subprocess.Popen([sys.executable, "-I", str(RUNNER)], cwd=workdir, env={}, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)  # its own process group: a timeout kills what it started
        try:
            out, err = child.communicate(request, timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            child.communicate()
            raise Failed({"unresponsive_reward_error": True, "python_grader_runtime_error": True,
                          "python_grader_runtime_error_details":
                              f"grade() did not finish within {time_limit_s:g} s; the child process was killed"},
                         f"python grader: grade() did not finish within {time_limit_s:g} s") from None
        _kill_group(child.pid)  # a grandchild that let go of the pipes would outlive its parent otherwise
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        answer = {"error": f"the grader process died without an answer ({err.strip()[-300:] or 'no output'})"}
    if "error" in answer:
        raise Failed({"python_grader_runtime_error": True, "python_grader_runtime_error_details": answer["error"]},
                     f"python grader: {answer['error']}")
    return answer["score"]
