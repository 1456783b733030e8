"""Several machines from the command line (`tunelab train --nnodes 2 ...`), played by two launches on loopback with
one gloo process each. The reference is one process with the same global batch (grad_accum doubled), as in
test_distributed.py: the weights agree to 1e-5. Resuming the 2-node checkpoint is exact on one process when the
global batch is kept, and refused, naming both world sizes, when it is not. Running under an outside srun without
torchrun reads Slurm's variables: checked as a mapping, and with a real `srun --ntasks 2` (tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from slurm_cluster import slurm  # noqa: F401  (the session fixture)
from tiny import config_dict, make_base_model, write_task_data

from tunelab.cli import main as cli_main
from tunelab.config import UserError
from tunelab.training.distributed import adopt_slurm_env
from tunelab.launch import Nodes, torchrun_args
from tunelab.training.tracking import read_metrics

STEPS = 3
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "lr": 3e-3, "max_grad_norm": 1.0, "save_every": 1,
         "keep_checkpoints": 5, "scheduler": "linear"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: masks drawn in another order would differ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(cfg: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg), "--nnodes", "2", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def run_two_nodes(cfg: Path, flags_of) -> str:
    """Both launches at once (each waits for the other at the rendezvous); their output together."""
    nodes = [start_node(cfg, *flags_of(rank)) for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return "".join(outs)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train_single_and_write_two(tmp_path: Path, out: str) -> Path:
    """Train the one-process reference (grad_accum 2) in tmp_path/single; write the config for two processes with
    the same global batch (grad_accum 1), output tmp_path/out, and return its path."""
    base = make_base_model(tmp_path / "base", warm_steps=0)
    data = write_task_data(tmp_path / "train.jsonl", n=16)
    single, two = tmp_path / "single.yaml", tmp_path / "two.yaml"
    single.write_text(yaml.safe_dump(config_dict(base, data, tmp_path / "single", adapter=LORA,
                                                 train={**TRAIN, "grad_accum": 2})))
    two.write_text(yaml.safe_dump(config_dict(base, data, tmp_path / out, adapter=LORA,
                                              train={**TRAIN, "grad_accum": 1})))
    assert cli_main(["train", str(single)]) == 0
    return two


def assert_same_as_single(tmp_path: Path, out: str) -> None:
    assert max_diff(load_file(tmp_path / out / "final" / "adapter_model.safetensors"),
                    load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")) < 1e-5


def test_two_nodes_on_loopback_equal_one_process_and_resume_on_one(tmp_path, capsys):
    two = train_single_and_write_two(tmp_path, "two-nodes")
    run = tmp_path / "two-nodes"
    port = free_port()
    out = run_two_nodes(two, lambda rank: ["--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                           "--master-port", str(port)])
    assert out.count("done at step") == 1  # global rank 0 alone reports
    reference = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    adapter = lambda: load_file(run / "final" / "adapter_model.safetensors")  # noqa: E731
    diff = max_diff(adapter(), reference)
    assert diff < 1e-5
    ours, ref = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in ref], abs=1e-5)
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in ref]

    # As if the machines had died after step 2: on one process the same grad_accum is another global batch.
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert cli_main(["train", str(two), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.grad_accum x ranks: 1 x 2 -> 1 x 1" in err and "set train.grad_accum: 2" in err
    assert len(err.strip().splitlines()) == 1
    assert cli_main(["train", str(two), "train.grad_accum=2", "--resume"]) == 0
    assert f"resumed from {run / 'checkpoints' / f'step-{STEPS - 1:08d}'}" in capsys.readouterr().out
    resumed = max_diff(adapter(), reference)
    assert resumed < 1e-5
    print(f"\n2 nodes x 1 process vs 1 process: max abs diff {diff:.3g}; resumed on 1 process: {resumed:.3g}")


@pytest.mark.slow
def test_two_nodes_meet_at_a_rendezvous_endpoint(tmp_path):
    """--rdzv-endpoint (torchrun's c10d rendezvous): the machines are numbered as they arrive."""
    two = train_single_and_write_two(tmp_path, "two")
    endpoint = f"127.0.0.1:{free_port()}"
    run_two_nodes(two, lambda rank: ["--rdzv-endpoint", endpoint])
    assert_same_as_single(tmp_path, "two")


def test_node_flags_are_checked_and_become_torchruns():
    argv = ["train", "c.yaml", "--nnodes", "2", "--node-rank=1", "--master-addr", "h0", "--master-port", "29400",
            "--nproc", "2", "--resume"]
    nodes = Nodes(2, 1, "h0", 29400)
    nodes.check()
    assert torchrun_args(2, argv, nodes) == ["--nnodes=2", "--node_rank=1", "--master_addr=h0",
                                             "--master_port=29400", "--nproc_per_node=2", "-m", "tunelab",
                                             "train", "c.yaml", "--resume"]
    assert Nodes(3, rdzv_endpoint="h0:29400").torchrun_args()[:3] == ["--nnodes=3", "--rdzv_backend=c10d",
                                                                      "--rdzv_endpoint=h0:29400"]
    for bad, message in [(Nodes(2, 2, "h0"), "--node-rank 2: between 0 and 1"),
                         (Nodes(2, None, "h0"), "give --node-rank and --master-addr"),
                         (Nodes(1, 0, "h0"), "--node-rank is for several machines"),
                         (Nodes(2, rdzv_endpoint="h0"), "HOST:PORT"),
                         (Nodes(2, 0, "h0", rdzv_endpoint="h0:1"), "not both")]:
        with pytest.raises(UserError, match=message):
            bad.check()


def test_srun_tasks_without_torchrun_read_slurms_variables():
    # What srun sets in task 3 of a 4-task step on two nodes (names as Slurm compresses them).
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "41234",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4"}
    adopt_slurm_env(env)
    assert {k: env[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}
    batch_script = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}  # no srun step
    adopt_slurm_env(batch_script)
    assert "WORLD_SIZE" not in batch_script
    under_torchrun = {**env, "WORLD_SIZE": "8", "RANK": "5"}
    adopt_slurm_env(under_torchrun)
    assert (under_torchrun["WORLD_SIZE"], under_torchrun["RANK"]) == ("8", "5")


@pytest.mark.slow
def test_srun_tasks_without_torchrun_equal_one_process(slurm, tmp_path):  # noqa: F811
    two = train_single_and_write_two(tmp_path, "srun")
    env = {k: v for k, v in slurm.env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    result = subprocess.run(["srun", "--ntasks=2", "--time=10", sys.executable, "-m", "tunelab", "train", str(two)],
                            env={**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done at step") == 1  # two ranks, rank 0 alone reports
    assert_same_as_single(tmp_path, "srun")
