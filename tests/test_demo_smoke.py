"""The embedded demo end to end at toy size: every stage runs, the table is written from measured results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples/demo.py"), "--smoke", "--root", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    work = tmp_path / "work"
    # issue 2's artefacts: the base model and the data examples/sft-*.yaml use
    assert (work / "models/tiny/config.json").is_file() and (work / "models/tiny/tokenizer.json").is_file()
    for name in ("tasks-train", "tasks-test", "prefs-train", "prefs-test", "text-train", "text-test"):
        assert (work / f"data/{name}.jsonl").is_file()
    # CLI-first: the commands are printed as a user would type them
    for command in ("$ tunelab train", "$ tunelab merge work/runs/sft-lora", "$ tunelab generate work/models/tiny-sft",
                    "$ tunelab eval"):
        assert command in out
    assert (work / "models/tiny-sft/model.safetensors").is_file()  # the merged model
    results = json.loads((work / "demo/results.json").read_text())
    stages = {row["stage"]: row for row in results["stages"]}
    assert {"base", "sft", "dpo", "student"} <= set(stages)
    for name, row in stages.items():
        assert "pending" not in row and "pending" not in out  # every method of the pipeline is in this tree
        assert row["params"] > 0 and row["train_seconds"] > 0
        assert set(row["exact_match_by_family"]) == {"add", "lookup", "reverse", "sort", "upper"}
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["preference_accuracy"] <= 1
        assert row["perplexity_text"] > 1 and row["perplexity_answers"] > 1
        assert (work / f"demo/eval-{name}.json").is_file()
    assert stages["student"]["params"] <= stages["base"]["params"] / 4
    # the tuning service: a job through the Python client succeeded and its endpoint answered the openai client
    service = results["service"]
    assert service["state"] == "JOB_STATE_SUCCEEDED" and service["steps"] >= 1
    assert service["endpoint"] == "endpoints/tiny-tasks" and isinstance(service["reply"], str)
    assert "$ tunelab serve" in out and f"{service['reply']!r}    (expected:" in out
    table = (work / "demo/results.md").read_text()
    assert table.startswith("| stage |") and "| sft |" in table
    assert table.strip() in out  # the printed table is the written one
