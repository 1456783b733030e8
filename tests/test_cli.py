"""User errors through the real CLI: a one-line message naming the culprit, a non-zero exit, no traceback."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny import config_dict, run_cli


def _write(tmp_path, cfg: dict, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "hi", "output": "hello"}\n')
    return path


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


CASES = [
    # (description, change to the config dict, expected fragment of the message)
    ("unknown key with suggestion", lambda c: c["train"].update(lrr=1.0), "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("unknown section", lambda c: c.update(trian={}), "did you mean 'train'"),
    ("wrong type", lambda c: c["train"].update(micro_batch_size="four"), "'train.micro_batch_size'"),
    ("negative lr", lambda c: c["train"].update(lr=-1), "'train.lr'"),
    ("bad method", lambda c: c.update(method="sftt"), "'method'"),
    ("quantize without adapter", lambda c: c["model"].update(quantize="nf4"), "model.quantize needs an adapter"),
    ("lora r = 0", lambda c: c.update(adapter={"r": 0}), "'adapter.r'"),
    ("dropout >= 1", lambda c: c.update(adapter={"dropout": 1.0}), "'adapter.dropout'"),
    ("no model", lambda c: c.update(model={}), "set model.path"),
]


@pytest.mark.parametrize("desc,change,fragment", CASES, ids=[c[0] for c in CASES])
def test_config_errors_via_validate(tmp_path, data, model_dir, desc, change, fragment):
    cfg = config_dict(model_dir, data, tmp_path / "out")
    change(cfg)
    result = run_cli("validate", str(_write(tmp_path, cfg)))
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_override_is_applied_and_validated(tmp_path, data, model_dir):
    path = _write(tmp_path, config_dict(model_dir, data, tmp_path / "out"))
    ok = run_cli("validate", str(path), "train.lr=1e-4", "adapter.r=4")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("validate", str(path), "train.lr=abc")
    assert bad.returncode == 2 and "'train.lr'" in bad.stderr


def test_missing_config_and_missing_data(tmp_path, data, model_dir):
    result = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    cfg = config_dict(model_dir, tmp_path / "missing.jsonl", tmp_path / "out")
    result = run_cli("validate", str(_write(tmp_path, cfg)))
    assert result.returncode == 2 and "missing.jsonl" in result.stderr


def test_train_errors_name_the_culprit(tmp_path, data, model_dir):
    # a model path that does not exist
    cfg = config_dict(tmp_path / "no-such-model", data, tmp_path / "out")
    result = run_cli("train", str(_write(tmp_path, cfg)))
    assert result.returncode == 2 and "no-such-model" in result.stderr and "Traceback" not in result.stderr
    # --resume with nothing to resume
    cfg = config_dict(model_dir, data, tmp_path / "fresh")
    result = run_cli("train", str(_write(tmp_path, cfg)), "--resume")
    assert result.returncode == 2 and "no usable checkpoint" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the paged optimizer is available: nothing to refuse")
def test_paged_optimizer_without_cuda_is_refused_before_loading(tmp_path, data, model_dir):
    cfg = config_dict(model_dir, data, tmp_path / "out2", train={"optimizer": "paged_adamw_8bit"})
    result = run_cli("train", str(_write(tmp_path, cfg)))
    assert result.returncode == 2 and "CUDA only" in result.stderr and "Traceback" not in result.stderr
