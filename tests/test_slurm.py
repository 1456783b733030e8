"""`tunelab serve --backend slurm` against a real one-node Slurm 22.05 (tests/slurm_cluster.py): a job through to
SUCCEEDED with the weights of `tunelab train` run directly; cancel (the trainer checkpoints); a SIGKILLed server
re-attaching to the same Slurm job; `scontrol requeue` resuming from the checkpoint; a 2-task job (two fake GPUs,
gloo) equal to one process with the same global batch."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import backend_util  # noqa: E402
from backend_util import (adapter, assert_equal_weights, cancel_after_two_steps, get, reference,  # noqa: E402
                          steps_done, submit, wait_job)
from service_util import Server, wait_for  # noqa: E402
from slurm_cluster import slurm  # noqa: E402,F401  (the session fixture)
from tiny import run_cli  # noqa: E402

pytestmark = pytest.mark.slow
TRAIN = {"max_steps": 40, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_every": None, "save_every": None}


@pytest.fixture(scope="module")
def env(slurm, tmp_path_factory):  # noqa: F811
    os.environ["SLURM_CONF"] = slurm.env["SLURM_CONF"]  # the server (and `tunelab train`) inherit it
    env = backend_util.start_env(tmp_path_factory, "slurm", "--backend", "slurm")
    env["slurm"] = slurm
    yield env
    env["server"].stop()  # the restart test replaces the first server


def job_config(train: dict | None = None, adapter: dict | None = None) -> dict:
    return backend_util.job_config({**TRAIN, **(train or {})}, adapter)


def squeue_state(env, slurm_id: str) -> str:
    out = env["slurm"].run("squeue", "--json", "-t", "all", "-j", slurm_id, check=False)
    # 22.05's `squeue --json` lists every job whatever -j says: pick ours
    jobs = [j for j in json.loads(out)["jobs"] if str(j["job_id"]) == slurm_id] if out.strip() else []
    return jobs[0]["job_state"] if jobs else "GONE"


@pytest.fixture(scope="module")
def plain_reference(env):
    return reference(env, "plain", job_config())


LONG = {"max_steps": 120}  # long enough for a server restart or a requeue to happen mid-run


@pytest.fixture(scope="module")
def long_reference(env):
    return reference(env, "long", job_config(LONG))


def test_job_succeeds_with_the_weights_of_tunelab_train(env, plain_reference):
    job = wait_job(env, submit(env, job_config(), gpus=0)["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    where = job["backend"]
    assert where["name"] == "slurm" and where["job_id"].isdigit() and where["nodes"] == [env["slurm"].node]
    run_dir = Path(job["tuned_model"]["path"]).parent
    script = (run_dir / "train.sbatch").read_text()  # the generated script is kept in the run dir
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:TERM@120" in script
    assert job["progress"]["step"] == 40 and job["attempt"] == 1
    assert_equal_weights(adapter(job), plain_reference, atol=1e-6)


def test_cancel_checkpoints_then_cancelled(env):
    job = cancel_after_two_steps(env, submit(env, job_config({"max_steps": 100000}), gpus=0))
    assert squeue_state(env, job["backend"]["job_id"]) in ("COMPLETED", "FAILED", "CANCELLED")


def test_server_sigkill_then_restart_reattaches_to_the_same_slurm_job(env, long_reference):
    job = submit(env, job_config(LONG), gpus=0)
    steps_done(env, job["id"], 2)
    slurm_id = get(env, job["id"])["backend"]["job_id"]
    server = env["server"]
    server.kill()
    while_down = squeue_state(env, slurm_id)
    rows_at_kill = (server.home / "runs" / job["id"] / "metrics.jsonl").read_text().count("\n")
    env["server"] = server = Server(server.home, *env["args"]).start()
    assert while_down == "RUNNING" and rows_at_kill < 120  # killed mid-run; Slurm's job does not need the server
    job = wait_job(env, job["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    assert job["backend"]["job_id"] == slurm_id and job["attempt"] == 1
    log = (server.home / "runs" / job["id"] / "train.log").read_text()
    assert log.count("$ tunelab train") == 1 and "--resume" not in log  # one run, never restarted
    steps = [r["step"] for r in httpx.get(f"{server.url}/v1/tuningJobs/{job['id']}/metrics").json()["metrics"]]
    assert steps == list(range(1, 121))
    assert_equal_weights(adapter(job), long_reference, atol=1e-6)


def test_requeue_resumes_from_the_checkpoint(env, long_reference):
    job = submit(env, job_config(LONG), gpus=0)
    steps_done(env, job["id"], 3)
    slurm_id = get(env, job["id"])["backend"]["job_id"]
    env["slurm"].run("scontrol", "requeue", slurm_id)
    wait_for(lambda: squeue_state(env, slurm_id) == "PENDING", what="requeued job pending", poll=0.1, timeout=60)
    time.sleep(1.5)  # StartTime=now in the same second as the requeue fails the job (CLUSTERS.md, gotcha 8)
    env["slurm"].run("scontrol", "update", f"JobId={slurm_id}", "StartTime=now")
    job = wait_job(env, job["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    log = (env["server"].home / "runs" / job["id"] / "train.log").read_text()
    assert "restart 1)" in log and "resumed from" in log
    assert_equal_weights(adapter(job), long_reference, atol=1e-6)


def test_two_tasks_equal_one_process_with_the_same_global_batch(env):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}  # one process draws its masks in turn, two side by side
    common = {"max_steps": 6, "micro_batch_size": 2, "lr": 3e-3, "max_grad_norm": 1.0, "scheduler": "linear"}
    single = reference(env, "single", job_config({**common, "grad_accum": 2}, adapter=lora))
    job = wait_job(env, submit(env, job_config({**common, "grad_accum": 1}, adapter=lora), gpus=2)["id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["error"]
    assert job["backend"]["gpus"] == ["0", "1"]  # the fake gres: two GPUs on the one node
    script = (Path(job["tuned_model"]["path"]).parent / "train.sbatch").read_text()
    assert "--ntasks-per-node=2" in script and "--gpus-per-node=2" in script
    assert_equal_weights(adapter(job), single, atol=1e-5)


def test_serve_refuses_to_start_when_a_job_cannot_reach_home(env):
    result = run_cli("serve", "--backend", "slurm", "--slurm-partition", "nowhere", "--home",
                     str(env["root"] / "other-home"), "--port", "0", timeout=300)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --backend slurm: a job on partition nowhere cannot read --home"), error
    assert "invalid partition" in error and "storage the cluster's nodes share" in error


def test_requests_beyond_the_cluster_are_refused_naming_the_limit(env):
    def error(compute):
        response = httpx.post(env["server"].url + "/v1/tuningJobs", json={"config": job_config(), "compute": compute})
        assert response.status_code == 400, response.text
        return response.json()["error"]["message"]

    assert error({"gpus": 3}) == "compute.gpus 3: the default partition has 2 GPUs per node"  # the fake gres
    assert error({"nodes": 2}) == "compute.nodes 2: the default partition has 1 node"
