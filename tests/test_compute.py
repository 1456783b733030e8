"""The request's `compute` section: defaults from what the backend has, impossible requests refused at submission
with a 4xx naming the limit, and the job record saying where it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tunelab.config import UserError
from tunelab.serve.app import create_app
from tunelab.serve.compute import parse_duration
from tunelab.serve.settings import ServeSettings

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_base_model, write_task_data  # noqa: E402


@pytest.mark.parametrize("text,seconds", [("2h", 7200), ("30m", 1800), ("1.5h", 5400), ("90s", 90), ("1d", 86400),
                                          ("1:30:00", 5400), ("2-00:00:00", 172800), (" 45M ", 2700)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["2 hours", "1:30", "-1h", "10s", ""])
def test_bad_durations(text):
    with pytest.raises(UserError, match="time_limit"):
        parse_duration(text)


def client_for(tmp_path, gpus: list[str]) -> TestClient:
    data = tmp_path / "data"
    write_task_data(data / "train.jsonl", n=8)
    base = make_base_model(tmp_path / "base", warm_steps=0)
    settings = ServeSettings(home=tmp_path / f"home-{len(gpus)}", data_roots=[data], models={"base": base},
                             gpus=gpus)
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8321")  # no `with`: the scheduler does not start, jobs stay PENDING


def post(client, compute: dict | None):
    body = {"source_model": "base", "train_dataset": "train.jsonl"}
    return client.post("/v1/tuningJobs", json=body if compute is None else {**body, "compute": compute})


def error(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in message
    return message


def test_defaults_and_limits_on_a_gpu_server(tmp_path):
    client = client_for(tmp_path, ["0", "1"])
    job = post(client, None).json()
    assert job["compute"] == {"gpus": 1, "nodes": 1, "cpus": None, "memory_gb": None, "time_limit_s": None,
                              "priority": 0}  # one GPU when the server has GPUs
    assert job["backend"] is None  # not given to a backend yet
    job = post(client, {"gpus": 2, "time_limit": "1:30:00", "priority": 5}).json()
    assert (job["compute"]["gpus"], job["compute"]["time_limit_s"], job["compute"]["priority"]) == (2, 5400, 5)
    assert post(client, {"gpus": 0}).json()["compute"]["gpus"] == 0
    assert "2 GPUs per node" in error(post(client, {"gpus": 3}), 400)
    assert "1 node" in error(post(client, {"nodes": 2}), 400)
    assert "time_limit" in error(post(client, {"time_limit": "soon"}), 400)
    assert "gpu" in error(post(client, {"gpu": 1}), 400)  # unknown key: named
    assert "priority" in error(post(client, {"priority": 10**6}), 400)


def test_cpu_server_defaults_to_the_cpu_and_refuses_gpus(tmp_path):
    client = client_for(tmp_path, [])
    assert post(client, None).json()["compute"]["gpus"] == 0
    assert "0 GPUs per node" in error(post(client, {"gpus": 1}), 400)


def test_the_clients_send_the_compute_section(tmp_path, monkeypatch):
    import argparse

    from tunelab.client import jobs_cli
    from tunelab.client import TuningJob
    from tunelab.tuning import sft

    sent = []

    class Recorder:
        def request(self, method, path, body=None, **kw):
            sent.append(body)
            return {"id": "job-x", "state": "JOB_STATE_PENDING"}

    request = tmp_path / "request.yaml"
    request.write_text("source_model: base\ntrain_dataset: t.jsonl\ncompute: {nodes: 1, cpus: 4}\n")
    args = argparse.Namespace(file=str(request), display_name=None, gpus=2, nodes=None, cpus=None, memory_gb=64.0,
                              time_limit="2h", priority=None)
    jobs_cli.submit(Recorder(), args)
    assert sent[-1]["compute"] == {"nodes": 1, "cpus": 4, "gpus": 2, "memory_gb": 64.0, "time_limit": "2h"}
    monkeypatch.setattr(TuningJob, "create", classmethod(lambda cls, body: sent.append(body)))
    sft.train(source_model="base", train_dataset="t.jsonl", compute={"gpus": 1, "time_limit": "30m"})
    assert sent[-1]["compute"] == {"gpus": 1, "time_limit": "30m"}


def test_serve_refuses_slurm_flags_without_slurm(tmp_path):  # ray's flags: tests/test_ray_backend.py
    with pytest.raises(UserError, match="need --backend slurm"):
        ServeSettings(home=tmp_path, slurm_partition="gpu")
