"""Helpers shared by the cluster-backend service tests (test_slurm.py, test_ray_backend.py): the env fixture's dict
holds "server" (service_util.Server), "root", "base" and "data"; jobs go through the HTTP API and their weights are
compared with `tunelab train` run directly on the same config."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import torch
import yaml
from safetensors.torch import load_file
from service_util import Server, wait_for
from tiny import make_base_model, run_cli, write_task_data

ENDED = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


def start_env(tmp_path_factory, name: str, *backend_args: str) -> dict:
    """A tiny base model served as "base", 32 alpaca rows in data/train.jsonl, and a server started with
    `backend_args` (--backend ...): the env dict the tests share (its caller stops env["server"])."""
    root = tmp_path_factory.mktemp(name)
    base = make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)
    data = write_task_data(root / "data" / "train.jsonl", n=32)
    args = (*backend_args, "--data-root", str(root / "data"), "--model", f"base={base}", "--cancel-grace", "30")
    server = Server(root / "home", *args).start()
    return {"server": server, "root": root, "base": base, "data": data, "args": args}


def job_config(train: dict, adapter: dict | None = None) -> dict:
    """A tiny LoRA run on the env's alpaca train.jsonl and model "base"; `train` is the whole train section."""
    return {"model": {"path": "base"}, "adapter": adapter or {"r": 4},
            "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}], "max_length": 64},
            "train": train, "log": {"tensorboard": False, "plot": False}}


def reference(env, name: str, cfg: dict) -> dict:
    """The same config run by `tunelab train` directly: its final adapter."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["path"] = str(env["base"])
    cfg["data"]["train"][0]["path"] = str(env["data"])
    out = env["root"] / "reference" / name
    cfg["output_dir"] = str(out)
    path = env["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli("train", str(path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "final" / "adapter_model.safetensors")


def submit(env, cfg: dict, **compute) -> dict:
    body = {"config": cfg, **({"compute": compute} if compute else {})}
    response = httpx.post(env["server"].url + "/v1/tuningJobs", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def get(env, job_id: str) -> dict:
    return httpx.get(f"{env['server'].url}/v1/tuningJobs/{job_id}", timeout=60).json()


def wait_job(env, job_id: str, states=ENDED, timeout: float = 900) -> dict:
    return wait_for(lambda: (j := get(env, job_id))["state"] in states and j, timeout=timeout,
                    what=f"{job_id} {states}")


def steps_done(env, job_id: str, n: int) -> None:
    metrics = env["server"].home / "runs" / job_id / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= n, what=f"{n} steps of {job_id}",
             poll=0.05, timeout=600)


def cancel_after_two_steps(env, job: dict) -> dict:
    """Cancel a running job once it has logged two steps; assert it was CANCELLED after checkpointing on SIGTERM."""
    steps_done(env, job["id"], 2)
    response = httpx.post(f"{env['server'].url}/v1/tuningJobs/{job['id']}:cancel", timeout=60)
    assert response.json()["state"] == "JOB_STATE_CANCELLING"
    job = wait_job(env, job["id"], timeout=120)
    assert job["state"] == "JOB_STATE_CANCELLED", job
    run_dir = env["server"].home / "runs" / job["id"]
    assert list((run_dir / "checkpoints").glob("step-*")), "the trainer saved a checkpoint on SIGTERM"
    assert "SIGTERM received" in (run_dir / "train.log").read_text()
    return job


def adapter(job: dict) -> dict:
    return load_file(Path(job["tuned_model"]["path"]) / "adapter_model.safetensors")


def assert_equal_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)
    assert any((a[n] != 0).any() for n in a if "lora_B" in n)  # training moved the adapter off its start
