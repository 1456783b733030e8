"""Scale-out on torch's own engine, on CPU with gloo and 2 processes (`tunelab train --nproc 2`, i.e. torchrun).

The reference is one process with the same global batch: single (micro_batch m, grad_accum 2A) vs distributed
(m, A, 2 ranks). Each rank trains on a disjoint half of every window, rank 0 alone logs and writes checkpoints,
and the weights agree to 1e-5. FSDP (train.distributed: fsdp, FSDP2 fully_shard) checkpoints with
torch.distributed.checkpoint and resumes at another world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import TINY_SHAPE, config_dict, make_base_model, run_cli, write_task_data

from tunelab.training import checkpoint
from tunelab.cli import main as cli_main
from tunelab.training.tracking import read_metrics

STEPS = 3
COMMON = {"max_steps": STEPS, "micro_batch_size": 2, "lr": 3e-3, "max_grad_norm": 1.0, "save_every": 1,
          "keep_checkpoints": 5, "scheduler": "linear"}
# No dropout: one process draws one mask per micro-batch in turn, two ranks draw theirs side by side, so masks
# (not the math) would differ. Everything else is the same computation.
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(cfg: Path, *extra: str):
    result = run_cli("train", str(cfg), "--nproc", "2", *extra, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def in_process(cfg: Path, *extra: str) -> None:
    assert cli_main(["train", str(cfg), *extra]) == 0


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def forget_last_step(run: Path) -> None:
    """As if the run had died after its second-to-last checkpoint."""
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(run / "final")


def test_ddp_two_ranks_equal_one_process_and_resume(base, data, tmp_path, capsys):
    single = write(tmp_path / "single.yaml", config_dict(base, data, tmp_path / "single", adapter=LORA,
                                                          train={**COMMON, "grad_accum": 2}))
    ddp_run = tmp_path / "ddp"
    ddp = write(tmp_path / "ddp.yaml", config_dict(base, data, ddp_run, adapter=LORA, train={**COMMON, "grad_accum": 1}))
    in_process(single)
    result = torchrun(ddp)
    assert result.stdout.count("done at step") == 1  # rank 0 alone reports, logs and writes
    reference = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    adapter = lambda: load_file(ddp_run / "final" / "adapter_model.safetensors")  # noqa: E731
    diff = max_diff(adapter(), reference)
    assert diff < 1e-5
    ours, ref = read_metrics(ddp_run / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in ref], abs=1e-5)
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in ref]  # the two halves make the same global batch
    assert checkpoint.list_steps(ddp_run / "checkpoints") == list(range(1, STEPS + 1))
    # Resume under DDP from the step before the end.
    forget_last_step(ddp_run)
    result = torchrun(ddp, "--resume")
    assert result.stdout.count(f"resumed from {ddp_run / 'checkpoints' / f'step-{STEPS - 1:08d}'}") == 1
    resumed = max_diff(adapter(), reference)
    assert resumed < 1e-5
    assert [m["step"] for m in read_metrics(ddp_run / "metrics.jsonl")] == list(range(1, STEPS + 1))
    print(f"\nDDP 2 ranks vs 1 process: max abs diff {diff:.3g}; after a DDP resume: {resumed:.3g}")


def scratch_config(data: Path, out: Path, **train) -> dict:
    """A model built from an architecture with a tokenizer trained on the data: under torchrun rank 0 trains and
    saves the tokenizer while the other rank waits, then reads it."""
    return {
        "model": {"init": TINY_SHAPE.model_dump()}, "tokenizer": {"train": True, "vocab_size": 400},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "max_length": 64, "eval_fraction": 0.25},
        "train": {**COMMON, "eval_every": None, "progress": False, **train},  # eval at the last step: sharded too
        "log": {"tensorboard": False, "plot": False}, "output_dir": str(out),
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def test_fsdp_two_ranks_equal_one_process_and_resume_on_one(data, tmp_path, capsys):
    single = write(tmp_path / "single.yaml", scratch_config(data, tmp_path / "single", grad_accum=2))
    fsdp_run = tmp_path / "fsdp"
    fsdp = write(tmp_path / "fsdp.yaml", scratch_config(data, fsdp_run, grad_accum=1, distributed="fsdp"))
    in_process(single)
    torchrun(fsdp)
    assert (fsdp_run / "tokenizer" / "tokenizer.json").read_text() == (tmp_path / "single" / "tokenizer" / "tokenizer.json").read_text()
    diff = max_diff(weights(fsdp_run), weights(tmp_path / "single"))
    assert diff < 1e-5
    ckpt = fsdp_run / "checkpoints" / f"step-{STEPS:08d}"
    assert checkpoint.is_sharded(ckpt) and checkpoint.verify(ckpt) is None
    assert sorted(p.name for p in (ckpt / checkpoint.SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # The 2-rank sharded checkpoint resumes in ONE process (torch.distributed.checkpoint reshards on load), with
    # grad_accum doubled to keep the global batch; the same grad_accum on fewer ranks is refused.
    forget_last_step(fsdp_run)
    assert cli_main(["train", str(fsdp), "--resume"]) == 2
    assert "on 1 rank(s) set train.grad_accum: 2" in capsys.readouterr().err
    in_process(fsdp, "train.grad_accum=2", "--resume")
    assert f"resumed from {fsdp_run / 'checkpoints' / f'step-{STEPS - 1:08d}'}" in capsys.readouterr().out
    resumed = max_diff(weights(fsdp_run), weights(tmp_path / "single"))
    assert resumed < 1e-5
    print(f"\nFSDP 2 ranks vs 1 process: max abs diff {diff:.3g}; 2-rank checkpoint resumed on 1 process: {resumed:.3g}")


@pytest.mark.slow
def test_fsdp_one_process_checkpoint_resumes_on_two_ranks(data, tmp_path):
    single = write(tmp_path / "single.yaml", scratch_config(data, tmp_path / "single", grad_accum=2))
    in_process(single)
    run = tmp_path / "one-to-two"
    in_process(write(tmp_path / "one.yaml", scratch_config(data, run, grad_accum=2, distributed="fsdp")))
    forget_last_step(run)  # a world-1 sharded checkpoint (one shard, no process group)
    # Same global batch on 2 ranks: grad_accum 2 x 1 rank = 1 x 2 ranks, so the resume is exact.
    torchrun(write(tmp_path / "two.yaml", scratch_config(data, run, grad_accum=1, distributed="fsdp")), "--resume")
    assert max_diff(weights(run), weights(tmp_path / "single")) < 1e-5


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_the_same_step_and_ddp_resume_is_exact(base, data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    steps = 40
    run = tmp_path / "ddp"
    ddp = write(tmp_path / "ddp.yaml", config_dict(base, data, run, adapter=LORA,
                                                   train={**COMMON, "max_steps": steps, "grad_accum": 1, "save_every": None}))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(ddp), "--nproc", "2"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to both ranks; they agree on the step to stop at
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err
    stopped = read_metrics(metrics)[-1]["step"]
    assert stopped < steps and checkpoint.list_steps(run / "checkpoints") == [stopped]
    assert err.count(f"stopped: stopped at step {stopped}/{steps}") == 1
    torchrun(ddp, "--resume")
    single = write(tmp_path / "single.yaml", config_dict(base, data, tmp_path / "single", adapter=LORA,
                                                          train={**COMMON, "max_steps": steps, "grad_accum": 2}))
    in_process(single)
    assert max_diff(load_file(run / "final" / "adapter_model.safetensors"),
                    load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")) < 1e-5
    assert [m["step"] for m in read_metrics(metrics)] == list(range(1, steps + 1))


@pytest.mark.slow
def test_a_rank_error_is_one_clean_line_per_rank(base, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    result = run_cli("train", str(write(tmp_path / "c.yaml", config_dict(base, bad, tmp_path / "out"))), "--nproc", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    # Each rank that got as far as the message prints it (the launcher stops the other once one has failed)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2
    assert set(errors) == {f"error: {bad}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"}


@pytest.mark.slow
def test_fsdp_with_a_lora_adapter_equals_one_process(base, data, tmp_path):
    """Frozen base and trainable adapter weights in the same FSDP units; final/ is a PEFT adapter dir gathered on
    rank 0."""
    single = write(tmp_path / "single.yaml", config_dict(base, data, tmp_path / "single", adapter=LORA,
                                                          train={**COMMON, "grad_accum": 2}))
    fsdp = write(tmp_path / "fsdp.yaml", config_dict(base, data, tmp_path / "fsdp", adapter=LORA,
                                                      train={**COMMON, "grad_accum": 1, "distributed": "fsdp"}))
    in_process(single)
    torchrun(fsdp)
    assert max_diff(load_file(tmp_path / "fsdp" / "final" / "adapter_model.safetensors"),
                    load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")) < 1e-5
