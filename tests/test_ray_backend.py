"""`tunelab serve --backend ray` against a real local Ray head (tests/ray_cluster.py, Ray's Job Submission API): a
job through to SUCCEEDED with the weights of `tunelab train` run directly; cancel (stop_job's SIGTERM: the trainer
checkpoints); a SIGKILLed server re-attaching to the same Ray job by its submission id, never running it twice.
What Ray itself says about each job (status, exit code, submissions) is checked with Ray's own client. Those three
are slow (a Ray head, three training runs): `make test-ray` runs them."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import ray_head  # noqa: E402,F401  (the session fixture)
import backend_util  # noqa: E402
from backend_util import (adapter, assert_equal_weights, cancel_after_two_steps, get, reference,  # noqa: E402
                          steps_done, submit, wait_job)
from service_util import Server, wait_for  # noqa: E402

from tunelab.config import UserError  # noqa: E402
from tunelab.serve.settings import ServeSettings  # noqa: E402

TRAIN = {"max_steps": 30, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": None, "save_every": None}


@pytest.fixture(scope="module")
def env(ray_head, tmp_path_factory):  # noqa: F811
    from ray.job_submission import JobSubmissionClient

    env = backend_util.start_env(tmp_path_factory, "ray", "--backend", "ray", "--ray-address", ray_head.address)
    env["ray"] = JobSubmissionClient(ray_head.address)
    yield env
    env["server"].stop()


def job_config(train: dict | None = None) -> dict:
    return backend_util.job_config({**TRAIN, **(train or {})})


@pytest.fixture(scope="module")
def plain_reference(env):
    return reference(env, "plain", job_config())


def ray_submissions(env, job_id: str) -> list:
    return [j for j in env["ray"].list_jobs() if (j.metadata or {}).get("tunelab_job") == job_id]


@pytest.mark.slow
def test_job_succeeds_with_the_weights_of_tunelab_train(env, plain_reference):
    job = wait_job(env, submit(env, job_config())["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    where = job["backend"]
    assert where["name"] == "ray" and where["job_id"] == f"tunelab-{job['id']}-train-1"
    assert where["nodes"] == ["127.0.0.1"]
    info = env["ray"].get_job_info(where["job_id"])  # Ray's own account of the job
    assert info.status == "SUCCEEDED" and info.driver_exit_code == 0
    assert info.entrypoint.startswith(f"cd {Path(job['tuned_model']['path']).parent} && exec {sys.executable} -m "
                                      "tunelab train ")
    assert job["progress"]["step"] == 30 and job["attempt"] == 1
    assert_equal_weights(adapter(job), plain_reference, atol=1e-6)


@pytest.mark.slow
def test_requests_beyond_a_ray_node_are_refused_naming_the_limit(env):
    for compute, message in [({"nodes": 2}, "compute.nodes 2: the Ray cluster at "),
                             ({"gpus": 1}, "compute.gpus 1: the Ray cluster at "),
                             ({"cpus": 3}, "compute.cpus 3 per process x 1 processes: the Ray cluster at ")]:
        response = httpx.post(env["server"].url + "/v1/tuningJobs", json={"config": job_config(), "compute": compute},
                              timeout=60)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


@pytest.mark.slow
def test_cancel_checkpoints_then_cancelled(env):
    job = cancel_after_two_steps(env, submit(env, job_config({"max_steps": 100000})))
    assert env["ray"].get_job_status(job["backend"]["job_id"]) == "STOPPED"


@pytest.mark.slow
def test_server_sigkill_then_restart_reattaches_to_the_same_ray_job(env, plain_reference):
    job = submit(env, job_config())
    steps_done(env, job["id"], 2)
    submission_id = get(env, job["id"])["backend"]["job_id"]
    server = env["server"]
    server.kill()
    assert env["ray"].get_job_status(submission_id) == "RUNNING"  # Ray's job does not depend on the server
    env["server"] = server = Server(server.home, *env["args"]).start()
    job = wait_job(env, job["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    assert job["backend"]["job_id"] == submission_id and job["attempt"] == 1
    assert [j.submission_id for j in ray_submissions(env, job["id"])] == [submission_id]  # never submitted again
    log = (server.home / "runs" / job["id"] / "train.log").read_text()
    assert log.count("$ tunelab train") == 1 and "resumed from" not in log  # one run, never restarted
    steps = [r["step"] for r in httpx.get(f"{server.url}/v1/tuningJobs/{job['id']}/metrics").json()["metrics"]]
    assert steps == list(range(1, 31))
    assert_equal_weights(adapter(job), plain_reference, atol=1e-6)


def test_backend_ray_needs_an_address_and_ray_itself(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="--backend ray needs --ray-address"):
        ServeSettings(home=tmp_path, backend="ray")
    with pytest.raises(UserError, match="--ray-address needs --backend ray"):
        ServeSettings(home=tmp_path, ray_address="http://127.0.0.1:8265")
    monkeypatch.setitem(sys.modules, "ray.job_submission", None)  # as if Ray were not installed
    from tunelab.serve.backends.ray import RayBackend

    with pytest.raises(UserError, match=r"^--backend ray needs Ray: pip install 'tunelab\[ray\]'$"):
        RayBackend("http://127.0.0.1:8265")


def test_only_the_ray_backend_imports_ray():
    import ast

    src = Path(__file__).parent.parent / "src" / "tunelab"
    importers = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(path.relative_to(src).as_posix())
    assert importers == {"serve/backends/ray.py"}


@pytest.mark.slow
def test_a_job_that_fails_before_the_trainer_starts_says_why_in_its_log(ray_head, tmp_path):  # noqa: F811
    """As when a Ray node cannot see --home: the entrypoint's shell fails to cd into the run dir, and what it said
    (only in Ray's own message) reaches train.log, where the scheduler takes the error line from."""
    from tunelab.serve.backends.base import EXITED, Compute, JobSpec
    from tunelab.serve.backends.ray import RayBackend

    backend = RayBackend(ray_head.address)
    backend.entrypoint = lambda spec: "cd /nonexistent/tunelab-home/runs/x && exec true"
    spec = JobSpec("unseen", tmp_path, ["train", "job.yaml"], Compute())
    handle = backend.submit(spec)
    status = wait_for(lambda: (s := backend.poll(handle)).state == EXITED and s, timeout=60, what="the job's end")
    assert status.exit_code == 2  # what /bin/sh exits with when cd fails
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    assert last.startswith("ray: ") and "/nonexistent/tunelab-home/runs/x" in last
    backend.poll(handle)
    assert (tmp_path / "train.log").read_text().count("ray: ") == 1  # reported once
