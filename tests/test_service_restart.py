"""Restart safety: SIGKILL the server mid-job and start it again. The running job resumes from the checkpoint its
trainer wrote on the way down (PR_SET_PDEATHSIG delivers SIGTERM) and ends with the weights of an uninterrupted
run of the same config; the job queued behind it still runs, after it."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server, wait_for  # noqa: E402
from tiny import make_base_model, write_task_data  # noqa: E402


def test_sigkill_restart_resumes_exactly(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    base = make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)
    write_task_data(root / "data" / "train.jsonl", n=32)
    args = ("--data-root", str(root / "data"), "--model", f"base={base}")
    cfg = {"model": {"path": "base"}, "adapter": {"r": 4},
           "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}], "max_length": 64},
           "train": {"max_steps": 30, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": None,
                     "save_every": None},
           "log": {"tensorboard": False, "plot": False}}
    server = Server(root / "home", *args).start()
    url = server.url
    first = httpx.post(url + "/v1/tuningJobs", json={"config": cfg}).json()
    second = httpx.post(url + "/v1/tuningJobs", json={"config": cfg}).json()  # the uninterrupted reference
    metrics = root / "home" / "runs" / first["id"] / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, what="two steps of the first job", poll=0.02)
    child = httpx.get(url + f"/v1/tuningJobs/{first['id']}").json()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.log.close()

    server = Server(root / "home", *args).start()  # stops the orphan (it is checkpointing), then resumes
    try:
        jobs = {}
        for job in (first, second):
            jobs[job["id"]] = wait_for(lambda: (j := httpx.get(f"{server.url}/v1/tuningJobs/{job['id']}").json())[
                "state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED") and j, what=f"job {job['id']}")
    finally:
        server.stop()
    a, b = jobs[first["id"]], jobs[second["id"]]
    assert a["state"] == b["state"] == "JOB_STATE_SUCCEEDED", (a["error"], b["error"])
    assert child["state"] == "JOB_STATE_RUNNING" and a["attempt"] == 2 and b["attempt"] == 1
    log = (root / "home" / "runs" / first["id"] / "train.log").read_text()
    assert "SIGTERM received" in log and "resumed from" in log and "--resume" in log
    assert b["start_time"] >= a["end_time"]  # the queue kept its order across the restart
    wa = load_file(Path(a["tuned_model"]["path"]) / "adapter_model.safetensors")
    wb = load_file(Path(b["tuned_model"]["path"]) / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)
    assert any((wa[n] != 0).any() for n in wa if "lora_B" in n)  # training moved the adapter off its start
