"""The local backend: each job is a `tunelab train`/`tunelab eval` child process of the server, on this machine's
GPUs (or its CPU).

Each child gets its own process group (start_new_session) so a cancel reaches everything it started, and
PR_SET_PDEATHSIG = SIGTERM so it stops when the server dies, even by SIGKILL: the trainer answers SIGTERM by
saving a checkpoint at the end of its current step, so no orphan keeps training unwatched (holding the memory,
the GPUs and the run dir), and at most one step is lost. After a restart `attach` stops whatever is left of a
recorded process group (a child that outlived its server, e.g. on a system without PDEATHSIG) and answers False,
so the scheduler resumes the job from its checkpoint: two trainers never write one run dir.

Devices: the server's GPUs (--gpus, else what nvidia-smi lists) are a pool; each job takes a disjoint set, handed
to it as CUDA_VISIBLE_DEVICES, and gives it back when its process ends, however it ends. A job of several GPUs runs
as one process per GPU under torchrun (`tunelab train --nproc N`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .base import EXITED, LOG_NAME, RUNNING, Backend, Capacity, Compute, JobSpec, Status

log = logging.getLogger("tunelab.serve")
PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


PRCTL = _prctl()  # looked up before any fork: the child only calls it


def _die_with_server(parent: int):
    def preexec():
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the server died between fork and prctl
            os._exit(1)
    return preexec if PRCTL is not None else None


def discover_gpus() -> list[str]:
    """This machine's GPU ids, without importing torch: CUDA_VISIBLE_DEVICES if the server was given one, else the
    GPUs nvidia-smi lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


class LocalBackend(Backend):
    name = "local"
    program = [sys.executable, "-m", "tunelab"]  # what runs a tunelab command line (the tests put a fake here)
    time_limit_grace = 120.0  # a job past its time limit gets SIGTERM, and this long to checkpoint before the kill

    def __init__(self, gpus: list[str]):
        self.gpus = list(gpus)
        self.procs: dict[int, subprocess.Popen] = {}
        self.taken: dict[int, list[str]] = {}  # pid -> its GPUs
        self.kill_at: dict[int, float] = {}  # pid -> when a cancelled child is killed if it has not stopped

    def capacity(self) -> Capacity:
        return Capacity(nodes=1, gpus_per_node=len(self.gpus), cpus_per_node=os.cpu_count(), name="the local backend")

    def free_gpus(self) -> list[str]:
        taken = {g for ids in self.taken.values() for g in ids}
        return [g for g in self.gpus if g not in taken]

    def can_start(self, compute: Compute) -> bool:
        return compute.gpus <= len(self.free_gpus())

    def submit(self, spec: JobSpec) -> dict:
        argv = spec.one_node_argv()
        gpus = self.free_gpus()[: spec.compute.gpus]
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        if self.gpus:  # a job without GPUs on a GPU server must not touch the others' devices
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        with open(spec.run_dir / LOG_NAME, "ab") as out:
            out.write(f"$ tunelab {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen([*self.program, *argv], cwd=spec.run_dir, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_server(os.getpid()))
        self.procs[proc.pid] = proc
        self.taken[proc.pid] = gpus
        # `match`: a restarted server stops a leftover only if its command line still names this file
        return {"job_id": str(proc.pid), "pid": proc.pid, "match": argv[1], "gpus": gpus,
                "ends_at": time.time() + spec.compute.time_limit_s if spec.compute.time_limit_s else None}

    def poll(self, handle: dict) -> Status:
        pid = handle["pid"]
        proc = self.procs.get(pid)
        if proc is None:
            return Status(EXITED, exit_code=None)
        code = proc.poll()
        if code is None:
            if handle.get("ends_at") and time.time() > handle["ends_at"] and pid not in self.kill_at:
                log.warning("pid %s reached its time limit: asking it to checkpoint and stop", pid)
                self.cancel(handle, self.time_limit_grace)
            if pid in self.kill_at and time.time() > self.kill_at[pid]:
                _signal_group(pid, signal.SIGKILL)
            return Status(RUNNING, nodes=[os.uname().nodename], gpus=handle["gpus"])
        self._forget(pid)
        return Status(EXITED, exit_code=code, nodes=[os.uname().nodename], gpus=handle["gpus"])

    def cancel(self, handle: dict, grace: float) -> None:
        if handle["pid"] in self.procs:
            _signal_group(handle["pid"], signal.SIGTERM)  # the trainer checkpoints, then exits
            self.kill_at[handle["pid"]] = time.time() + grace

    def attach(self, handle: dict) -> bool:
        stop_orphan(handle["pid"], handle["match"])
        return False

    def shutdown(self, handles: list[dict], timeout: float) -> None:
        """Ask each child to checkpoint and stop; their jobs stay RUNNING, to resume on the next start. (With
        PDEATHSIG the end of the scheduler thread has asked already; the trainer takes a repeat as the same
        request.)"""
        for pid in self.procs:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        for pid, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(pid, signal.SIGKILL)
            self._forget(pid)

    def _forget(self, pid: int) -> None:
        self.procs.pop(pid, None)
        self.taken.pop(pid, None)  # its GPUs go back to the pool
        self.kill_at.pop(pid, None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def stop_orphan(pid: int, match: str, wait: float = 120.0) -> None:
    """Stop a child of an earlier server, if it is still that child (the pid may have been reused, so its command
    line must name this job's file `match`). Ask it to checkpoint and stop (with PDEATHSIG it was asked when its
    server died, maybe more than once; the trainer takes a repeat as the same request), wait for it; SIGKILL if it
    will not."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        cmdline = None
    if cmdline is not None and match not in cmdline:
        return
    if not _alive(pid):
        return
    log.warning("waiting for pid %s, left by the previous server, to checkpoint and stop", pid)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.time() + wait
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
