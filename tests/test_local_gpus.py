"""The local backend's GPU assignment, on CPU with a fake device list: the real scheduler and LocalBackend start a
fake trainer (a few lines of Python standing in for `tunelab train`) that records the CUDA_VISIBLE_DEVICES and
command line it was given and then waits for the test to say how it ends. Checked: what each child sees, that no
two running jobs share a GPU, the queue rule (the head is never delayed: only a CPU job runs ahead of it), and that
GPUs come back on success, failure, cancel and a server restart."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tunelab.run_files import JOB_CONFIG
from tunelab.serve.backends.local import LocalBackend
from tunelab.serve.scheduler import Scheduler
from tunelab.serve.settings import ServeSettings
from tunelab.serve.store import SQLiteStore

FAKE_TRAINER = """
import json, os, pathlib, signal, sys, time
run = pathlib.Path.cwd()
if (run / "stubborn").exists():  # a trainer that never answers SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
(run / "seen.tmp").write_text(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv[1:]}))
os.replace(run / "seen.tmp", run / "seen.json")  # whole or absent: the test may read it at any moment
while not (run / "exit").exists():
    time.sleep(0.02)
sys.exit(int((run / "exit").read_text()))
"""


@pytest.fixture
def world(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    settings = ServeSettings(home=tmp_path / "home", max_jobs=4, poll_seconds=0.05, cancel_grace=5)
    store = SQLiteStore(tmp_path / "home" / "tunelab.db")

    def scheduler() -> Scheduler:
        backend = LocalBackend(["0", "1", "2"])
        backend.program = [sys.executable, str(fake)]
        return Scheduler(settings, store, backend)

    yield store, scheduler
    store.close()


def add_job(store, home: Path, name: str, gpus: int) -> str:
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / JOB_CONFIG).write_text("{}")
    store.add_job({"id": name, "state": "PENDING", "method": "sft", "config": {}, "run_dir": str(run_dir),
                   "compute": {"gpus": gpus}})
    return name


def seen(store, job_id: str, timeout: float = 30) -> dict:
    path = Path(store.get_job(job_id)["run_dir"]) / "seen.json"
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    return json.loads(path.read_text())


def finish(store, scheduler, job_id: str, code: int) -> None:
    (Path(store.get_job(job_id)["run_dir"]) / "exit").write_text(str(code))
    wait_state(store, scheduler, job_id, ("SUCCEEDED", "FAILED", "CANCELLED"))


def wait_state(store, scheduler, job_id, states, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        scheduler.tick()
        job = store.get_job(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} stayed {store.get_job(job_id)['state']}, wanted {states}")


def running_gpus(store) -> dict[str, list[str]]:
    return {j["id"]: j["placement"]["gpus"] for j in store.list_jobs(states=["RUNNING", "CANCELLING"])}


def assert_disjoint(store) -> None:
    taken = [g for gpus in running_gpus(store).values() for g in gpus]
    assert len(taken) == len(set(taken)), running_gpus(store)


def test_jobs_get_disjoint_gpus_in_queue_order_and_give_them_back(world, tmp_path):
    store, make = world
    home = tmp_path / "home"
    sched = make()
    a = add_job(store, home, "a", gpus=2)
    b = add_job(store, home, "b", gpus=2)  # the head once a runs: waits for a GPU
    c = add_job(store, home, "c", gpus=0)  # needs none: may run ahead of b
    d = add_job(store, home, "d", gpus=1)  # one GPU is free, but it is b's: must not run ahead
    sched.tick()
    assert seen(store, a) == {"cuda": "0,1", "argv": ["train", str(home / "runs/a" / JOB_CONFIG), "--nproc", "2"]}
    assert seen(store, c)["cuda"] == ""  # a CPU job on a GPU server sees no GPU
    assert [store.get_job(j)["state"] for j in (a, b, c, d)] == ["RUNNING", "PENDING", "RUNNING", "PENDING"]
    assert store.get_job(a)["backend"] == "local" and store.get_job(a)["placement"]["gpus"] == ["0", "1"]

    finish(store, sched, a, 0)  # success: a's GPUs go to b, and d takes the third
    assert store.get_job(a)["state"] == "SUCCEEDED"
    wait_state(store, sched, d, ("RUNNING",))
    assert sorted([seen(store, b)["cuda"], seen(store, d)["cuda"]]) == ["0,1", "2"]
    assert "--nproc" not in seen(store, d)["argv"]  # one GPU: one process, no torchrun
    assert_disjoint(store)

    e = add_job(store, home, "e", gpus=3)  # waits for all three
    finish(store, sched, b, 1)  # failure gives them back too
    assert store.get_job(b)["state"] == "FAILED"
    sched.tick()
    assert store.get_job(e)["state"] == "PENDING"  # d still holds one
    sched.cancel(store.get_job(d))  # cancel: SIGTERM ends the fake at once
    wait_state(store, sched, d, ("CANCELLED",))
    wait_state(store, sched, e, ("RUNNING",))
    assert seen(store, e)["cuda"] == "0,1,2"
    finish(store, sched, c, 0)
    finish(store, sched, e, 0)
    assert running_gpus(store) == {}


def test_a_server_restart_stops_the_leftover_and_its_gpus_come_back(world, tmp_path):
    store, make = world
    home = tmp_path / "home"
    first = make()
    a = add_job(store, home, "a", gpus=3)
    first.tick()
    pid = store.get_job(a)["handle"]["pid"]
    assert seen(store, a)["cuda"] == "0,1,2"
    (Path(store.get_job(a)["run_dir"]) / "seen.json").unlink()
    # A new server on the same database (the first one's child is still running, as if PDEATHSIG had not fired):
    # the leftover is stopped, the job queued again, and it gets all three GPUs of the new server's pool.
    second = make()
    second.recover()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert store.get_job(a)["state"] == "PENDING" and store.get_job(a)["handle"] is None
    second.tick()
    assert seen(store, a)["cuda"] == "0,1,2"
    finish(store, second, a, 0)
    assert store.get_job(a)["state"] == "SUCCEEDED"
    first.backend.procs[pid].wait()  # reap the first server's child


def test_schema_1_database_migrates_a_running_child_to_a_local_handle(tmp_path):
    import sqlite3

    from tunelab.serve.store import MIGRATIONS

    path = tmp_path / "tunelab.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    db.execute("INSERT INTO jobs (id, state, method, config, run_dir, pid, create_time, update_time) "
               "VALUES ('job-1', 'RUNNING', 'sft', '{}', '/h/runs/job-1', 4242, 0, 0)")
    db.close()
    store = SQLiteStore(path)
    job = store.get_job("job-1")
    assert job["backend"] == "local" and job["compute"] == {} and "pid" not in job
    assert job["handle"] == {"job_id": "4242", "pid": 4242, "match": "/h/runs/job-1/job.yaml", "gpus": []}
    store.close()


def test_a_cancelled_job_that_ignores_sigterm_is_killed_after_the_grace(world, tmp_path):
    store, make = world
    sched = make()
    a = add_job(store, tmp_path / "home", "a", gpus=1)
    (Path(store.get_job(a)["run_dir"]) / "stubborn").touch()
    sched.tick()
    seen(store, a)
    t0 = time.time()
    sched.cancel(store.get_job(a))
    time.sleep(1)
    assert wait_state(store, sched, a, ("CANCELLING",))["state"] == "CANCELLING"  # still there after SIGTERM
    wait_state(store, sched, a, ("CANCELLED",))
    assert time.time() - t0 >= 5  # the settings' cancel_grace
    assert sched.backend.free_gpus() == ["0", "1", "2"]


def test_gpus_are_discovered_without_torch(tmp_path, monkeypatch):
    from tunelab.serve.backends.local import discover_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the server's own share of the machine
    assert discover_gpus() == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "bin" / "nvidia-smi"  # answers --query-gpu=index --format=csv,noheader like the real one
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert discover_gpus() == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert discover_gpus() == []


def test_pausing_and_paused_jobs_stay_paused_across_a_server_restart(world, tmp_path):
    """A server killed while a job is being paused: the restarted server ends the pause (PAUSED, never PENDING)
    and runs neither that job nor an already paused one until they are resumed."""
    store, make = world
    home = tmp_path / "home"
    sched = make()
    a = add_job(store, home, "a", gpus=1)
    b = add_job(store, home, "b", gpus=1)
    sched.tick()
    seen(store, a), seen(store, b)
    sched.pause(store.get_job(b))
    wait_state(store, sched, b, ("PAUSED",))
    sched.pause(store.get_job(a))  # SIGTERM sent; the server "dies" before it sees the child end
    assert store.get_job(a)["state"] == "PAUSING"
    for job in (a, b):
        (Path(store.get_job(job)["run_dir"]) / "seen.json").unlink(missing_ok=True)

    restarted = make()
    restarted.recover()
    restarted.tick()
    assert [store.get_job(j)["state"] for j in (a, b)] == ["PAUSED", "PAUSED"]
    time.sleep(0.3)
    assert not any((Path(store.get_job(j)["run_dir"]) / "seen.json").exists() for j in (a, b))  # nothing reran
    restarted.resume(store.get_job(a))
    wait_state(store, restarted, a, ("RUNNING",))
    assert seen(store, a)["cuda"] == "0"
    finish(store, restarted, a, 0)
