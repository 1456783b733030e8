"""The Ray backend: each job is a Ray job (the Job Submission API at --ray-address, the dashboard's HTTP address)
whose entrypoint runs `tunelab train` (or `tunelab eval`) with this server's own interpreter, on one node of the
cluster that has the GPUs and CPUs the job asked for; Ray does the queueing and placement. On Kubernetes, KubeRay's
RayCluster gives the same API.

The entrypoint writes the trainer's output to the run dir's train.log, and everything else the scheduler reads
(metrics.jsonl, checkpoints, final/) is in the run dir too, so --home and this tunelab install must be at the same
paths on the Ray nodes (shared storage, or the same image): nothing is uploaded.

Each submission has a deterministic id (tunelab job id, phase, attempt), kept in the handle: a restarted server
attaches to the Ray job by that id, and a server that died between submitting and recording the handle finds the
job already there instead of running it twice. `stop_job` sends SIGTERM to the trainer (and each process it
started): it saves a checkpoint at the end of its step; Ray kills it RAY_JOB_STOP_WAIT_TIME_S later, which each
job's environment sets to --cancel-grace.

A job runs on one node: several GPUs there run under torchrun (`--nproc`); several nodes are refused at submission.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tunelab.config import UserError

from .base import CANCELLED, EXITED, LOG_NAME, PENDING, RUNNING, Backend, Capacity, JobSpec, Status

RAY_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t[A-Z]+ ")  # Ray's logger: "<time>\tINFO job_manager..."
# Variables of the server's environment the job gets too (the rest of its environment is the Ray node's).
FORWARDED = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")


def _import_ray():
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'tunelab[ray]'") from None
    return JobStatus, JobSubmissionClient


class RayBackend(Backend):
    name = "ray"

    def __init__(self, address: str, stop_wait: float = 120.0):
        self.JobStatus, client_class = _import_ray()
        self.address = address.rstrip("/")
        self.stop_wait = stop_wait
        self.program = [sys.executable, "-m", "tunelab"]
        self.reported: set[str] = set()  # submission ids whose failure message is already in their train.log
        try:
            self.client = client_class(self.address)
        except ConnectionError as e:
            raise UserError(f"--ray-address {address}: {e} (give the dashboard's address, e.g. "
                            "http://HEAD:8265)") from None

    def capacity(self) -> Capacity:
        """The largest node: a job runs on one node. From the state API the dashboard serves (`ray list nodes`)."""
        try:
            with urllib.request.urlopen(f"{self.address}/api/v0/nodes?limit=10000", timeout=30) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--ray-address {self.address}: cannot list the cluster's nodes ({e})") from None
        alive = [n["resources_total"] for n in nodes if n.get("state") == "ALIVE"]
        return Capacity(nodes=1, gpus_per_node=int(max((r.get("GPU", 0) for r in alive), default=0)),
                        cpus_per_node=int(max((r.get("CPU", 0) for r in alive), default=0)) or None,
                        memory_gb_per_node=max((r.get("memory", 0) for r in alive), default=0) / 2**30 or None,
                        name=f"the Ray cluster at {self.address} (one node per job)")

    def entrypoint(self, spec: JobSpec) -> str:
        argv = spec.one_node_argv()
        # exec: the trainer itself gets stop_job's SIGTERM; a redirect, not tee, so no pipe breaks while it saves
        return (f"cd {shlex.quote(str(spec.run_dir))} && exec {shlex.join([*self.program, *argv])} "
                f">> {shlex.quote(str(spec.run_dir / LOG_NAME))} 2>&1")

    def runtime_env(self, spec: JobSpec) -> dict:
        # The tunelab this server runs, wherever it is installed (an editable checkout, PYTHONPATH=src)
        source = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
        env = {k: os.environ[k] for k in FORWARDED if k in os.environ}
        return {"env_vars": {**env, **spec.env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
                             "RAY_JOB_STOP_WAIT_TIME_S": str(int(self.stop_wait))}}

    def submit(self, spec: JobSpec) -> dict:
        submission_id = f"tunelab-{spec.job_id}-{spec.argv[0]}-{spec.attempt}"
        handle = {"job_id": submission_id, "log": str(spec.run_dir / LOG_NAME)}
        if self._exists(submission_id):  # submitted before a crash that lost the handle: never run it twice
            return handle
        c = spec.compute
        with open(spec.run_dir / LOG_NAME, "ab") as out:
            out.write(f"$ tunelab {' '.join(spec.argv)}  (ray job {submission_id})\n".encode())
        self.client.submit_job(entrypoint=self.entrypoint(spec), submission_id=submission_id,
                               runtime_env=self.runtime_env(spec), entrypoint_num_gpus=c.gpus or None,
                               entrypoint_num_cpus=(c.cpus or 1) * c.processes_per_node,
                               entrypoint_memory=int(c.memory_gb * 2**30) if c.memory_gb else None,
                               metadata={"tunelab_job": spec.job_id})
        return handle

    def _exists(self, submission_id: str) -> bool:
        try:
            self.client.get_job_status(submission_id)
        except RuntimeError as e:
            if "404" in str(e):
                return False
            raise
        return True

    def poll(self, handle: dict) -> Status:
        try:
            info = self.client.get_job_info(handle["job_id"])
        except RuntimeError as e:
            if "404" in str(e):  # deleted from Ray (or another cluster): its outcome is unknown
                return Status(EXITED, exit_code=None)
            raise
        nodes = [urlparse(info.driver_agent_http_address).hostname] if info.driver_agent_http_address else []
        state = self.JobStatus(info.status)
        if state == self.JobStatus.PENDING:
            return Status(PENDING)
        if state == self.JobStatus.RUNNING:
            return Status(RUNNING, nodes=nodes)
        if state == self.JobStatus.STOPPED:  # stop_job: the trainer has saved and exited, or was killed
            return Status(CANCELLED, nodes=nodes)
        if state == self.JobStatus.SUCCEEDED:
            return Status(EXITED, exit_code=0, nodes=nodes)
        self._report_entrypoint_output(handle, info.message or "")
        return Status(EXITED, exit_code=info.driver_exit_code, nodes=nodes)

    def _report_entrypoint_output(self, handle: dict, message: str) -> None:
        """A job that failed before its output went to the run dir (the Ray node cannot see --home, so `cd` fails):
        what the entrypoint's shell said is only in Ray's message, which ends with its log. Copied into train.log,
        where the scheduler takes the job's error line from."""
        said = [line for line in message.splitlines()[1:]  # after Ray's own summary line
                if line.strip() and not RAY_LOG_LINE.match(line) and not line.startswith("Running entrypoint for job")]
        if said and "log" in handle and handle["job_id"] not in self.reported:
            self.reported.add(handle["job_id"])
            with open(handle["log"], "a") as log:
                log.writelines(f"ray: {line}\n" for line in said[-5:])

    def cancel(self, handle: dict, grace: float) -> None:
        """SIGTERM now; Ray's own SIGKILL comes RAY_JOB_STOP_WAIT_TIME_S (--cancel-grace, set at submission) later."""
        self.client.stop_job(handle["job_id"])

    def attach(self, handle: dict) -> bool:
        return self._exists(handle["job_id"])
