"""Runs one python grader in a child process: `python -I python_runner.py`, the request as JSON on stdin
({"source", "sample", "item", "memory_bytes"}), the answer as one JSON line on stdout ({"score"} or {"error"}).
Imports nothing of tunelab: it is started with -I (no PYTHONPATH, no user site, not the working directory).
"""

import json
import math
import sys
import traceback


def main() -> None:
    request = json.loads(sys.stdin.read())
    answer = sys.stdout
    sys.stdout = sys.stderr  # the grader's own prints must not mix with the answer line
    try:
        import resource  # Linux / macOS only; elsewhere the time limit alone applies

        limit = request["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    try:
        namespace = {"__name__": "grader"}
        exec(compile(request["source"], "<grader source>", "exec"), namespace)
        score = namespace["grade"](request["sample"], request["item"])
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise TypeError(f"grade() must return a finite number, not {score!r}")
        result = {"score": float(score)}
    except BaseException as err:  # noqa: BLE001 - whatever the grader's code raises is reported, not re-raised
        last = traceback.extract_tb(err.__traceback__)[-1:]
        where = f" (line {last[0].lineno})" if last and last[0].filename == "<grader source>" else ""
        result = {"error": f"{type(err).__name__}: {err}{where}"}
    answer.write(json.dumps(result) + "\n")
    answer.flush()


if __name__ == "__main__":
    main()
