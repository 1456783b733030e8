"""Crash and resume through the real CLI: SIGKILL at any step and inside a checkpoint write, SIGTERM, torn
checkpoints, retention, disk full, non-finite steps. The reference is always the same run left alone: a resumed run
must end with the same weights (<= 1e-6, CPU fp32), the same data order and one continuous metrics log."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import config_dict, make_base_model, write_task_data

from tunelab.training import checkpoint
from tunelab.cli import main as cli_main
from tunelab.training.tracking import read_metrics

STEPS = 8
LORA = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must be restored too
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
         "save_every": 1, "keep_checkpoints": 3}

# Runs the real CLI (tunelab.cli.main) in a fresh process, optionally slowed per step (so a test can signal it
# mid-run) or made to SIGKILL itself in the middle of writing checkpoint N (weights written, state and manifest not).
RUNNER = r"""
import os, signal, sys, time
from tunelab.training import checkpoint
from tunelab.training import loop as trainer
delay, die_in = float(os.environ.get("T_DELAY", "0")), os.environ.get("T_DIE_IN_CHECKPOINT")
if delay:
    updates = trainer.Trainer._updates
    trainer.Trainer._updates = lambda self, u: (time.sleep(delay), updates(self, u))[1]
if die_in:
    save_file = checkpoint.save_file
    def dying(tensors, path, *a, **k):
        save_file(tensors, path, *a, **k)
        if f"step-{int(die_in):08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = dying
from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


def write_config(path: Path, base: Path, data: Path, out: Path, **train) -> Path:
    cfg = config_dict(base, data, out, adapter=LORA, train={**TRAIN, **train})
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def straight(base, data, tmp_path_factory):
    """The uninterrupted reference run (in-process, same config)."""
    from tunelab.config import load_config
    from tunelab.training.loop import train

    root = tmp_path_factory.mktemp("straight")
    cfg = write_config(root / "cfg.yaml", base, data, root / "run")
    train(load_config(cfg), say=lambda *a: None)
    return root / "run"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_run(run: Path, reference: Path) -> float:
    """Same final weights, and a metrics log that is one continuous run with the reference's losses (same data)."""
    diff = max_diff(adapter(run), adapter(reference))
    assert diff <= 1e-6, diff
    ours, ref = read_metrics(run / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in ref], abs=1e-6)
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in ref]  # the same batches, in the same order
    return diff


def start(cfg: Path, *extra: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, "train", str(cfg), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env.items()}})


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> int:
    """Poll metrics.jsonl until it shows `step` (or later); return the last step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.communicate()}")
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sigkill_anywhere_and_inside_a_checkpoint_write_then_resume_matches(straight, base, data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", base, data, run)
    # 1. SIGKILL from outside, wherever the run happens to be once step 3 is logged.
    proc = start(cfg, T_DELAY=0.3)
    wait_for_step(proc, run / "metrics.jsonl", 3)  # step 2's checkpoint is written before step 3 is logged
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resume_at = checkpoint.list_steps(run / "checkpoints")[-1]
    assert 2 <= resume_at < STEPS - 2
    # 2. Resume, and SIGKILL it in the middle of writing the checkpoint two steps later.
    torn = resume_at + 2
    proc = start(cfg, "--resume", T_DIE_IN_CHECKPOINT=torn)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err
    assert f"resumed from {run / 'checkpoints' / f'step-{resume_at:08d}'}" in out
    leftovers = [d.name for d in (run / "checkpoints").iterdir() if d.name.startswith(".tmp-")]
    assert leftovers == [f".tmp-step-{torn:08d}"]
    assert checkpoint.list_steps(run / "checkpoints")[-1] == torn - 1  # the half-written one is not a checkpoint
    # 3. Resume again: the leftover is removed, the newest whole checkpoint used, and the run ends as if never stopped.
    proc = start(cfg, "--resume")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert f"removed the incomplete checkpoint {run / 'checkpoints' / f'.tmp-step-{torn:08d}'}" in out
    assert f"step-{torn - 1:08d} (step {torn - 1})" in out
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.startswith(".")]
    diff = assert_same_run(run, straight)
    print(f"\nSIGKILL after step 3 was logged (resumed from {resume_at}), SIGKILL inside checkpoint {torn}: "
          f"max abs diff of final weights vs uninterrupted = {diff:.3g}")


def test_sigterm_even_repeated_finishes_the_step_saves_and_says_how_to_resume(straight, base, data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", base, data, run, save_every=None)  # only the stop itself saves
    proc = start(cfg, T_DELAY=0.3)
    wait_for_step(proc, run / "metrics.jsonl", 2)
    for _ in range(3):  # repeated, as supervisors and the kernel's parent-death signal do: still one orderly stop
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stopped = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert stopped < STEPS
    ckpt = run / "checkpoints" / f"step-{stopped:08d}"
    assert f"stopped at step {stopped}/{STEPS}; checkpoint saved: {ckpt}" in err
    assert "tunelab train CONFIG --resume" in err
    assert "SIGTERM received: finishing this step and saving a checkpoint" in out
    assert checkpoint.verify(ckpt) is None and checkpoint.list_steps(run / "checkpoints") == [stopped]
    code, out, err = cli(capsys, "train", cfg, "--resume")
    assert code == 0, err
    diff = assert_same_run(run, straight)
    print(f"\nSIGTERM at step {stopped}, resumed: max abs diff vs uninterrupted = {diff:.3g}")


@pytest.mark.parametrize("victim", [checkpoint.WEIGHTS, checkpoint.STATE])
def test_torn_checkpoint_is_reported_set_aside_and_the_previous_one_used(straight, tmp_path, capsys, victim):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "final")
    cfg = run / "config.yaml"  # the run's own copy of its config, pointed at the copy
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "output_dir": str(run)}))
    newest = run / "checkpoints" / f"step-{STEPS:08d}"
    with open(newest / victim, "r+b") as f:  # a torn write: the file cut short
        f.truncate(os.path.getsize(newest / victim) // 2)
    code, out, err = cli(capsys, "train", cfg, "--resume")
    assert code == 0, err
    assert f"checkpoint {newest} is damaged: {victim} does not match its checksum" in out
    assert f"moved to damaged-step-{STEPS:08d}" in out
    assert f"resumed from {run / 'checkpoints' / f'step-{STEPS - 1:08d}'}" in out
    assert (run / "checkpoints" / f"damaged-step-{STEPS:08d}").is_dir()
    assert checkpoint.verify(newest) is None  # step 8 written anew, whole
    assert max_diff(adapter(run), adapter(straight)) <= 1e-6


def test_keep_checkpoints_prunes_to_the_newest(straight):
    assert checkpoint.list_steps(straight / "checkpoints") == [STEPS - 2, STEPS - 1, STEPS]


def test_best_eval_checkpoint_is_kept_and_restored_with_early_stopping(base, data, tmp_path, capsys, monkeypatch):
    from tunelab.training.loop import Trainer

    script = iter([5.0, 3.0, 4.0, 4.5, 4.7, 4.9])  # best at step 2, then two evaluations without improvement
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"eval_loss": next(script)})
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", base, data, run, keep_checkpoints=1, eval_every=1,
                       early_stopping_patience=2)
    code, out, err = cli(capsys, "train", cfg)
    assert code == 0, err
    assert "early stopping at step 4" in out and "restoring the best checkpoint (step 2)" in out
    assert checkpoint.list_steps(run / "checkpoints") == [2, 4]  # keep 1 = the newest, plus the best
    best = load_file(run / "checkpoints" / "step-00000002" / checkpoint.WEIGHTS)
    best = {k.removeprefix("model.").replace(".default.", "."): v for k, v in best.items()}  # PEFT's file names
    assert max_diff(adapter(run), best) == 0.0  # final/ holds the best step's weights
    last = load_file(run / "checkpoints" / "step-00000004" / checkpoint.WEIGHTS)
    assert max_diff(adapter(run), {k.removeprefix("model.").replace(".default.", "."): v for k, v in last.items()}) > 0


def test_not_enough_disk_space_is_refused_before_training(base, data, tmp_path, capsys, monkeypatch):
    import tunelab.training.preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(tunelab.training.preflight.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", write_config(tmp_path / "cfg.yaml", base, data, run))
    assert code == 2
    assert err.startswith(f"error: output_dir {run}: 5e-06 GB free, but this run writes about") and "keep_checkpoints" in err
    assert len(err.strip().splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "final").exists() and not (run / "metrics.jsonl").exists()


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_ones(base, data, tmp_path, capsys, monkeypatch):
    real, calls = checkpoint.save_file, []

    def filling_up(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            real(tensors, path, *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", filling_up)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", base, data, run, max_steps=4)
    code, out, err = cli(capsys, "train", cfg)
    assert code == 3 and "Traceback" not in err
    ckpts = run / "checkpoints"
    assert err.startswith(f"error: could not write checkpoint {ckpts / 'step-00000003'}: No space left on device")
    assert f"the previous checkpoints are intact (newest: {ckpts / 'step-00000002'})" in err
    assert checkpoint.list_steps(ckpts) == [1, 2] and checkpoint.verify(ckpts / "step-00000002") is None
    assert sorted(d.name for d in ckpts.iterdir()) == ["step-00000001", "step-00000002"]  # no half-written dir
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed: the run continues from step 2
    code, out, err = cli(capsys, "train", cfg, "--resume")
    assert code == 0, err
    assert f"resumed from {ckpts / 'step-00000002'}" in out


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(base, data, tmp_path, capsys, monkeypatch):
    from tunelab.objectives.sft import SFT

    real, attempts = SFT.loss, []
    poisoned = {3, 5, 6}  # step attempts (grad_accum 1): one isolated, then two in a row

    def loss(self, model, batch):
        total, metrics = real(self, model, batch)
        if torch.is_grad_enabled():
            attempts.append(1)
            if len(attempts) in poisoned:
                total = total * float("nan")
        return total, metrics

    monkeypatch.setattr(SFT, "loss", loss)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", base, data, run, grad_accum=1, max_bad_steps=2)
    code, out, err = cli(capsys, "train", cfg)
    assert code == 3 and "Traceback" not in err
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row" in out
    assert "step 4: non-finite loss or gradient, update skipped (2 in a row" in out
    ckpts = run / "checkpoints"
    assert err.strip() == (
        "error: 2 steps in a row had a non-finite loss or gradient (train.max_bad_steps=2); stopped after step 3, "
        f"skipped updates leave the weights unchanged. The last good checkpoint, {ckpts / 'step-00000003'}, is "
        "intact. Lower train.lr, check the data, or use precision: fp32, then continue with --resume")
    assert checkpoint.list_steps(ckpts) == [1, 2, 3] and checkpoint.verify(ckpts / "step-00000003") is None
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["skipped_steps"] == 1 and all(isinstance(m["loss"], float) for m in metrics)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys):
    from tunelab.config import ModelConfig, UserError
    from tunelab.modeling.load import check_model_dir

    defaults = ModelConfig(path="m")
    assert defaults.allow_pickle is False and defaults.trust_remote_code is False  # both are opt-in

    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds only pickle weights .* model.allow_pickle: true"):
        check_model_dir(str(model), allow_pickle=False)
    capsys.readouterr()
    check_model_dir(str(model), allow_pickle=True)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {model}: loading pickle weights") and "pickle can run arbitrary code" in err
