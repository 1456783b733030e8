"""A local Ray head for the tests (session fixture `ray_head`): on loopback only, two CPUs, a small object store, in a
temp dir, stopped and deleted afterwards. ../shared/CLUSTERS.md part A has why each flag is there.

Skipped with the reason when Ray is not installed (`make test-ray` installs it), except under CI=true, where a
missing Ray is a failure: CI must run these tests. `ray stop` stops every Ray process on the machine, so two test
sessions (or a bench run) with a Ray head at once on one machine stop each other's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: single-node mode, or --node-ip-address 127.0.0.1 is silently replaced by the
# machine's network address.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class RayHead:
    address: str  # the dashboard's HTTP address: the Job Submission API
    temp_dir: Path
    env: dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> Path:
    return Path(sys.executable).parent / "ray"


def start_head() -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="tl-ray-"))  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    env = {**os.environ, **RAY_ENV}
    subprocess.run([str(ray_cli()), "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                    "--port", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port),
                    "--object-store-memory", "500000000", "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    head = RayHead(f"http://127.0.0.1:{port}", temp_dir, env)
    deadline = time.time() + 60
    while time.time() < deadline:  # the job server answers a little after `ray start` returns
        try:
            urllib.request.urlopen(head.address + "/api/version", timeout=2).read()
            return head
        except OSError:
            time.sleep(0.3)
    stop_head(head)
    raise RuntimeError("the Ray head's job server did not answer")


def stop_head(head: RayHead) -> None:
    """Stop every job first (`ray stop` SIGKILLs them without a SIGTERM), then Ray, then delete its files."""
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(head.address)
        for job in client.list_jobs():
            if not JobStatus(job.status).is_terminal():
                client.stop_job(job.submission_id)
        deadline = time.time() + 60
        while time.time() < deadline and any(not JobStatus(j.status).is_terminal() for j in client.list_jobs()):
            time.sleep(0.5)
    finally:
        subprocess.run([str(ray_cli()), "stop"], env=head.env, capture_output=True, timeout=120)
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Ray is not installed: `make test-ray` installs tunelab[ray] and runs these tests")
    head = start_head()
    try:
        yield head
    finally:
        stop_head(head)
