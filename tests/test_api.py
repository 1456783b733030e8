"""The Python API (`from tunelab import train, load_config, evaluate, merge, generate`): the CLI's behaviour from a
notebook, user errors as tunelab.UserError carrying the CLI's one line, and a light `import tunelab`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from archs import build
from tiny import config_dict, run_cli, write_task_data

import tunelab


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = write_task_data(root / "train.jsonl", n=8)
    base = build("llama", root / "base", data.read_text().splitlines())
    cfg = config_dict(base, data, root / "run", adapter={"r": 4}, data={"template": "alpaca", "max_length": 160},
                      train={"max_steps": 1, "micro_batch_size": 2},
                      eval={"data": [{"path": str(data), "format": "alpaca"}], "max_rows": 2, "max_new_tokens": 4})
    return root, cfg


def test_import_is_light_and_names_resolve():
    code = ("import sys, tunelab; from tunelab import train, load_config, evaluate, merge, generate, UserError; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), callable(evaluate))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"
    with pytest.raises(AttributeError):
        tunelab.no_such_name


def test_user_errors_carry_the_cli_line(setup, tmp_path):
    root, cfg = setup
    bad = dict(cfg, train={**cfg["train"], "lr_rate": 1e-3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    cli = run_cli("validate", str(path))
    assert cli.returncode == 2
    with pytest.raises(tunelab.UserError) as err:
        tunelab.load_config(path)
    assert cli.stderr.strip() == f"error: {err.value}"
    assert "train.lr_rate" in str(err.value) and "did you mean" in str(err.value)
    with pytest.raises(tunelab.UserError, match="unknown config key 'train.lr_rate'"):
        tunelab.train(cfg, {"train.lr_rate": 1e-3})
    with pytest.raises(tunelab.UserError, match="config: expected a YAML path, a dict or a tunelab Config"):
        tunelab.load_config(42)
    with pytest.raises(tunelab.UserError, match="model path not found"):
        tunelab.generate(tmp_path / "missing", "hi")


def test_train_evaluate_merge_generate(setup, tmp_path):
    root, cfg = setup
    cfg = tunelab.load_config(cfg, {"train.max_steps": 2})  # dict overrides, values as YAML
    assert cfg.train.max_steps == 2
    run = tunelab.train(cfg, quiet=True)
    assert run == cfg.run_dir and (run / "final" / "adapter_config.json").is_file()
    report = tunelab.evaluate(cfg, out=tmp_path / "eval.json", quiet=True)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert report["rows"] == cfg.eval.max_rows < 8  # eval.max_rows of the 8 rows in eval.data
    merged = tunelab.merge(run, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    prompts = ["Reverse the word: apple", "What is 2 + 3?"]
    replies = tunelab.generate(run, prompts, max_new_tokens=6)  # one batched call: each reply as if alone
    assert replies == [tunelab.generate(run, prompt, max_new_tokens=6) for prompt in prompts]
    cli = run_cli("generate", str(run), "--prompt", "Reverse the word: apple", "--max-new-tokens", "6")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == replies[0]
