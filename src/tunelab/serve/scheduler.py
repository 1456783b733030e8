"""Runs tuning jobs as `tunelab train` child processes, max_jobs at a time, oldest first; follows them through the
files the trainer writes (metrics.jsonl, the log, final/, eval.json); survives restarts.

Each child gets its own process group (start_new_session) so a cancel reaches everything it started, and
PR_SET_PDEATHSIG = SIGTERM so it stops when the server dies, even by SIGKILL: the trainer answers SIGTERM by
saving a checkpoint at the end of its current step, so no orphan keeps training unwatched (holding the memory and
the run dir), and at most one step is lost. On start, the scheduler stops whatever is left of a recorded process
group (a child that outlived its server, e.g. on a system without PDEATHSIG) before it resumes that job from its
last checkpoint with `--resume`, so two trainers never write one run dir. The trainer's resume is exact, so the
resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import run_files

from .store import Store
from .settings import ServeSettings
from .views import job_json

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


@dataclass
class Child:
    job_id: str
    phase: str
    proc: subprocess.Popen
    run_dir: Path
    metrics_offset: int = 0
    log_offset: int = 0
    last_step: int = 0
    first_seen: tuple[float, int] | None = None  # (time, step) of the first metrics row of this child: for the ETA
    log_tail: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, settings: ServeSettings, store: Store):
        self.settings, self.store = settings, store
        self.children: dict[str, Child] = {}
        self._lock = threading.RLock()  # state transitions: the loop and cancel requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        self.recover()
        # Children are started from this thread only: PR_SET_PDEATHSIG fires when the *thread* that forked a child
        # ends, and this one lives exactly as long as the server.
        self._thread = threading.Thread(target=self._loop, name="tunelab-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        """Ask each running child to checkpoint and stop; their jobs stay RUNNING, to resume on the next start.
        (With PDEATHSIG the end of the scheduler thread has asked already; the trainer takes a repeat as the same
        request.)"""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for child in self.children.values():
                _signal_group(child.proc.pid, signal.SIGTERM)
            deadline = time.time() + timeout
            for child in self.children.values():
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    _signal_group(child.proc.pid, signal.SIGKILL)
            self.children.clear()

    def recover(self) -> None:
        """After a restart: stop leftovers of the recorded children; RUNNING jobs go back to the queue (they keep their
        place: the queue is ordered by submission) and resume from their checkpoint, CANCELLING ones end CANCELLED."""
        for job in self.store.list_jobs(states=["RUNNING", "CANCELLING"], oldest_first=True):
            if job["pid"]:
                stop_orphan(job["pid"], Path(job["run_dir"]) / run_files.JOB_CONFIG)
            if job["state"] == "CANCELLING":
                self._set(job, "CANCELLED", end_time=time.time(), pid=None)
            else:
                self.store.add_event(job["id"], "log", "server restarted: the job resumes from its last checkpoint")
                self._set(job, "PENDING", pid=None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not end the scheduler: log it and carry on
                log.exception("scheduler tick failed")
            self._stop.wait(self.settings.poll_seconds)

    # -- one pass

    def tick(self) -> None:
        with self._lock:
            for child in list(self.children.values()):
                self._follow(child)
                code = child.proc.poll()
                if code is not None:
                    del self.children[child.job_id]
                    self._follow(child)
                    self._ended(child, code)
            free = self.settings.max_jobs - len(self.children)
            if free > 0 and not self._stop.is_set():
                for job in self.store.list_jobs(states=["PENDING"], oldest_first=True, limit=free):
                    self._launch(job)

    def cancel(self, job: dict) -> dict:
        with self._lock:
            job = self.store.get_job(job["id"])
            if job["state"] == "PENDING":
                return self._set(job, "CANCELLED", end_time=time.time())
            if job["state"] == "RUNNING":
                child = self.children.get(job["id"])
                if child is not None:
                    _signal_group(child.proc.pid, signal.SIGTERM)  # the trainer checkpoints, then exits
                return self._set(job, "CANCELLING")
            return job

    # -- children

    def _launch(self, job: dict) -> None:
        run_dir = Path(job["run_dir"])
        config = run_dir / run_files.JOB_CONFIG
        if job["phase"] == "eval":
            cmd = ["eval", str(config), "--model", str(run_dir), "--out", str(run_dir / run_files.EVAL_REPORT)]
        else:
            resume = any((run_dir / run_files.CHECKPOINTS).glob(f"{run_files.STEP_PREFIX}*"))
            cmd = ["train", str(config), *(["--resume"] if resume else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(run_dir / run_files.TRAIN_LOG, "ab") as out:
            out.write(f"$ tunelab {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", "tunelab", *cmd], cwd=run_dir, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_server(os.getpid()))
        child = Child(job["id"], job["phase"], proc, run_dir, last_step=job["progress"].get("step", 0))
        metrics = run_dir / run_files.METRICS
        child.metrics_offset = metrics.stat().st_size if metrics.exists() else 0
        child.log_offset = (run_dir / run_files.TRAIN_LOG).stat().st_size
        self.children[job["id"]] = child
        attempt = job["attempt"] + (job["phase"] == "train")
        self._set(job, "RUNNING", pid=proc.pid, attempt=attempt, start_time=job["start_time"] or time.time())

    def _follow(self, child: Child) -> None:
        """New metrics rows and log lines -> events; progress and latest metrics -> the job."""
        job = self.store.get_job(child.job_id)
        rows = self._new_metrics(child)
        for line in self._new_log_lines(child):
            self.store.add_event(child.job_id, "log", line)
        if not rows:
            return
        progress, latest = dict(job["progress"]), job["latest_metrics"]
        for row in rows:
            self.store.add_event(child.job_id, "metrics", row)
            latest = {**latest, **row}
        now, step = time.time(), rows[-1]["step"]
        child.first_seen = child.first_seen or (now, rows[0]["step"])
        total = max(progress.get("total_steps") or step, step)
        t0, s0 = child.first_seen
        eta = (total - step) * (now - t0) / (step - s0) if step > s0 else None
        progress.update(step=step, total_steps=total, epoch=rows[-1].get("epoch", progress.get("epoch")),
                        eta_seconds=round(eta, 1) if eta is not None else None)
        self.store.update_job(child.job_id, progress=progress, latest_metrics=latest)

    def _new_metrics(self, child: Child) -> list[dict]:
        path = child.run_dir / run_files.METRICS
        if not path.exists():
            return []
        if path.stat().st_size < child.metrics_offset:  # a resumed trainer cut the log back to its checkpoint
            child.metrics_offset = 0
        with open(path, "rb") as f:
            f.seek(child.metrics_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next pass
        child.metrics_offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) > child.last_step:
                rows.append(row)
                child.last_step = row["step"]
        return rows

    def _new_log_lines(self, child: Child) -> list[str]:
        path = child.run_dir / run_files.TRAIN_LOG
        with open(path, "rb") as f:
            f.seek(child.log_offset)
            data = f.read()
        complete = data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
        child.log_offset += len(complete)
        lines = [" ".join(x.split())[:2000] for x in complete.decode("utf-8", "replace").replace("\r", "\n").split("\n")]
        lines = [x for x in lines if x]
        child.log_tail = (child.log_tail + lines)[-20:]
        return lines

    def _ended(self, child: Child, code: int) -> None:
        job = self.store.get_job(child.job_id)
        if code == 0 and child.phase == "train" and _has_eval_data(job["config"]):
            job = self.store.update_job(job["id"], phase="eval")
            if job["state"] == "RUNNING":
                self._launch(job)
                return
        if code == 0:
            return self._succeeded(job, eval_error=None)
        if job["state"] == "CANCELLING":
            return self._set(job, "CANCELLED", end_time=time.time(), pid=None)
        message = _error_line(child.log_tail, code)
        if child.phase == "eval":  # the model is trained and whole: keep it, say what the evaluation hit
            return self._succeeded(job, eval_error=message)
        retryable = code != run_files.EXIT_USER_ERROR  # the same input fails the same way again
        if retryable and job["attempt"] <= self.settings.max_retries:
            self.store.add_event(job["id"], "log", f"attempt {job['attempt']} failed ({message}); retrying from the "
                                                   "last checkpoint")
            return self._set(job, "PENDING", pid=None, error=None)
        self._set(job, "FAILED", end_time=time.time(), pid=None, error=message)

    def _succeeded(self, job: dict, eval_error: str | None) -> dict:
        run_dir = Path(job["run_dir"])
        final = run_dir / run_files.FINAL
        rows = read_metrics(run_dir / run_files.METRICS)
        evals = [r for r in rows if "eval_loss" in r]
        best = min(evals, key=lambda r: r["eval_loss"]) if evals else {}
        final_metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_") or k == "step"}
        report = run_dir / run_files.EVAL_REPORT
        if report.is_file():
            final_metrics.update(_eval_summary(json.loads(report.read_text())))
        if eval_error:
            final_metrics["eval_error"] = eval_error
        name = job["display_name"] or job["id"]
        adapter = (final / "adapter_config.json").is_file()
        if self.store.get_endpoint(name) is None:  # a restart may repeat this step
            self.store.add_endpoint({"name": name, "job_id": job["id"], "source_model": job["source_model"],
                                     "path": str(final), "adapter": int(adapter), "create_time": time.time()})
        progress = {**job["progress"], "eta_seconds": 0}
        if rows:
            progress["step"] = rows[-1]["step"]
        return self._set(job, "SUCCEEDED", end_time=time.time(), pid=None, best_metrics=best, progress=progress,
                         final_metrics=final_metrics, tuned_model={"path": str(final), "adapter": adapter, "endpoint": name})

    def _set(self, job: dict, state: str, **fields) -> dict:
        job = self.store.update_job(job["id"], state=state, **fields)
        self.store.add_event(job["id"], "state", job_json(job))
        return job


# ---------------------------------------------------------------- helpers

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


def stop_orphan(pid: int, config: Path, wait: float = 120.0) -> None:
    """Stop a child of an earlier server, if it is still that child (the pid may have been reused, so its command
    line must name this job's config). Ask it to checkpoint and stop (with PDEATHSIG it was asked when its server
    died, maybe more than once; the trainer takes a repeat as the same request), wait for it; SIGKILL if it will not."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        cmdline = None
    if cmdline is not None and str(config) not in cmdline:
        return
    if not _alive(pid):
        return
    log.warning("waiting for pid %s, left by the previous server, to checkpoint and stop", pid)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.time() + wait
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)


def _has_eval_data(config: dict) -> bool:
    data, ev = config.get("data", {}), config.get("eval", {})
    return bool(data.get("eval") or data.get("eval_fraction") or ev.get("data"))


def _error_line(tail: list[str], code: int) -> str:
    for line in reversed(tail):
        if line.startswith((run_files.ERROR_PREFIX, run_files.STOPPED_PREFIX)):
            return line
    last = tail[-1] if tail else "no output"
    return f"the training process exited with code {code}: {last}" if code > 0 else \
        f"the training process was killed by signal {-code}: {last}"


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _eval_summary(report: dict) -> dict:
    """The headline numbers of a tunelab eval.json."""
    out = {}
    if "generation" in report:
        out[f"eval_{report['generation']['scorer']}"] = report["generation"]["score"]
    if "perplexity" in report:
        out["eval_perplexity"] = report["perplexity"]["perplexity"]
    if "preference" in report:
        out["eval_preference_accuracy"] = report["preference"]["accuracy"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
