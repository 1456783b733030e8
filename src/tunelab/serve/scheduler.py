"""Runs tuning jobs through a backend (serve/backends: this machine's processes, or a cluster's scheduler),
max_jobs at a time, in submission order (higher `compute.priority` first); follows them through the files the
trainer writes in the run dir (metrics.jsonl, the log, final/, eval.json); retries; survives restarts.

Queue rule: the head of the queue starts as soon as the backend can start it. While it waits (for GPUs), a job
behind it may run ahead only if it needs no GPUs, and only while a job slot stays free for the head: every GPU
that frees up is the head's, so no job that runs ahead can delay it.

After a restart, a job the backend still has (a Slurm job) is attached to again by its handle, never rerun; one it
no longer has (the local backend stops a leftover child) goes back to the queue and resumes from its last
checkpoint with `--resume`. The trainer's resume is exact, so the resumed run ends with the weights of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import run_files

from .backends.base import CANCELLED, EXITED, LOG_NAME, RUNNING, Backend, Compute, JobSpec, Status
from .judge import job_env
from .store import Store
from .settings import ServeSettings
from .views import job_json

log = logging.getLogger("tunelab.serve")


@dataclass
class Running:
    """A job the backend has (queued or running), as the scheduler follows it."""
    job_id: str
    phase: str
    handle: dict
    run_dir: Path
    metrics_offset: int = 0
    log_offset: int = 0
    last_step: int = 0
    first_seen: tuple[float, int] | None = None  # (time, step) of the first metrics row of this run: for the ETA
    placement: dict | None = None  # the nodes and GPUs last recorded on the job
    log_tail: list[str] = field(default_factory=list)


def job_compute(job: dict) -> Compute:
    return Compute(**(job.get("compute") or {}))


class Scheduler:
    def __init__(self, settings: ServeSettings, store: Store, backend: Backend):
        self.settings, self.store, self.backend = settings, store, backend
        self.running: dict[str, Running] = {}
        self._lock = threading.RLock()  # state transitions: the loop and cancel requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        self.recover()
        # Jobs are submitted from this thread only: the local backend's PR_SET_PDEATHSIG fires when the *thread*
        # that forked a child ends, and this one lives exactly as long as the server.
        self._thread = threading.Thread(target=self._loop, name="tunelab-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            self.backend.shutdown([run.handle for run in self.running.values()], timeout)
            self.running.clear()

    def recover(self) -> None:
        """After a restart: attach to every job the backend was given. One it still has is followed on; one it no
        longer has goes back to the queue (keeping its place: the queue is ordered by submission) to resume from
        its checkpoint, or ends CANCELLED if it was being cancelled."""
        for job in self.store.list_jobs(states=["PENDING", "RUNNING", "CANCELLING", "PAUSING"], oldest_first=True):
            if not job["handle"]:
                continue
            if job["backend"] != self.backend.name:  # never rerun what another backend may still be running
                self._set(job, "FAILED", end_time=time.time(), error=f"the server restarted with --backend "
                          f"{self.backend.name}; this job was given to {job['backend']} ({json.dumps(job['handle'])})")
            elif self.backend.attach(job["handle"]):
                self.running[job["id"]] = self._follower(job, job["handle"])
                if job["state"] in ("CANCELLING", "PAUSING"):
                    self.backend.cancel(job["handle"], self.settings.cancel_grace)
            elif job["state"] == "CANCELLING":
                self._set(job, "CANCELLED", end_time=time.time())
            elif job["state"] == "PAUSING":
                self._set(job, "PAUSED", handle=None)
            else:
                self.store.add_event(job["id"], "log", "server restarted: the job resumes from its last checkpoint")
                self._set(job, "PENDING", handle=None)

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
            for run in list(self.running.values()):
                self._follow(run)
                status = self.backend.poll(run.handle)
                self._placed(run, status)
                if status.state in (EXITED, CANCELLED):
                    del self.running[run.job_id]
                    self._follow(run)
                    self._ended(run, status)
            if not self._stop.is_set():
                self._start_queued()

    def _start_queued(self) -> None:
        """The queue rule of the module docstring."""
        free = self.settings.max_jobs - len(self.running)
        queued = [j for j in self.store.list_jobs(states=["PENDING"], oldest_first=True) if j["id"] not in self.running]
        queued.sort(key=lambda j: -job_compute(j).priority)  # stable: submission order within a priority
        head_waits = False
        for job in queued:
            if free <= 0:
                return
            compute = job_compute(job)
            if head_waits and compute.gpus > 0:
                continue
            if self.backend.can_start(compute):
                self._launch(job)
            elif not head_waits:
                head_waits = True  # keep a slot for it
            free -= 1

    def cancel(self, job: dict) -> dict:
        with self._lock:
            job = self.store.get_job(job["id"])
            run = self.running.get(job["id"])
            if run is None and job["state"] in ("PENDING", "PAUSED"):
                return self._set(job, "CANCELLED", end_time=time.time())
            if job["state"] in ("PENDING", "RUNNING"):
                if run is not None:
                    self.backend.cancel(run.handle, self.settings.cancel_grace)  # the trainer checkpoints, exits
                return self._set(job, "CANCELLING")
            return job

    def pause(self, job: dict) -> dict:
        """A running job checkpoints and stops (PAUSING, then PAUSED when it has ended); a queued one pauses at
        once. Either keeps its run dir, and `resume` puts it back in the queue: its next run starts with --resume,
        whose continuation is exact."""
        with self._lock:
            job = self.store.get_job(job["id"])
            run = self.running.get(job["id"])
            if run is None and job["state"] == "PENDING":
                return self._set(job, "PAUSED")
            if job["state"] in ("PENDING", "RUNNING"):
                if run is not None:
                    self.backend.cancel(run.handle, self.settings.cancel_grace)  # the trainer checkpoints, exits
                return self._set(job, "PAUSING")
            return job

    def resume(self, job: dict) -> dict:
        with self._lock:
            job = self.store.get_job(job["id"])
            return self._set(job, "PENDING", handle=None) if job["state"] == "PAUSED" else job

    # -- jobs in the backend

    def _launch(self, job: dict) -> None:
        run_dir = Path(job["run_dir"])
        config = run_dir / run_files.JOB_CONFIG
        if job["phase"] == "eval":
            argv = ["eval", str(config), "--model", str(run_dir), "--out", str(run_dir / run_files.EVAL_REPORT)]
        elif job["phase"] == "merge":  # continuous tuning from an adapter: its merged model is the run's base
            argv = ["merge", job["openai"]["merge_from"], "--out", str(run_dir / run_files.START_MODEL)]
        else:
            argv = ["train", str(config)]
        attempt = job["attempt"] + (job["phase"] == "train")
        spec = JobSpec(job["id"], run_dir, argv, job_compute(job), resume=job["phase"] == "train", attempt=attempt,
                       env=job_env(job["config"], self.settings))
        run = self._follower(job, None)  # from the log's current end: earlier attempts are in the events already
        try:
            run.handle = self.backend.submit(spec)
        except Exception as e:  # noqa: BLE001 - whatever the backend hit, the job says it and the queue goes on
            log.exception("submitting %s failed", job["id"])
            self._set(job, "FAILED", end_time=time.time(), error=f"the {self.backend.name} backend could not "
                      f"start the job: {' '.join(str(e).split())[:500]}")
            return
        self.running[job["id"]] = run
        job = self.store.update_job(job["id"], handle=run.handle, backend=self.backend.name, attempt=attempt)
        status = self.backend.poll(run.handle)
        self._placed(run, status)
        if job["state"] == "PENDING" and status.state == "PENDING":  # queued in the backend: say so
            self._set(job, "PENDING")

    def _follower(self, job: dict, handle: dict | None) -> Running:
        run_dir = Path(job["run_dir"])
        # Metrics rows are read from the start and kept from the job's last known step on; log lines from the
        # current end (after a restart, the lines written meanwhile are in the log file, not in the events).
        log_file = run_dir / LOG_NAME
        return Running(job["id"], job["phase"], handle, run_dir, last_step=job["progress"].get("step", 0),
                       log_offset=log_file.stat().st_size if log_file.exists() else 0)

    def _placed(self, run: Running, status: Status) -> None:
        """The backend's view -> the job: RUNNING once it runs, and where."""
        placement = {"nodes": status.nodes, "gpus": status.gpus} if status.nodes else None
        fields = {}
        if placement and placement != run.placement:
            run.placement = fields["placement"] = placement
        job = self.store.get_job(run.job_id)
        if status.state == RUNNING and job["state"] == "PENDING":
            self._set(job, "RUNNING", start_time=job["start_time"] or time.time(), **fields)
        elif fields:
            self.store.update_job(run.job_id, **fields)

    def _follow(self, run: Running) -> None:
        """New metrics rows and log lines -> events; progress and latest metrics -> the job."""
        job = self.store.get_job(run.job_id)
        rows = self._new_metrics(run)
        for line in self._new_log_lines(run):
            self.store.add_event(run.job_id, "log", line)
        if not rows:
            return
        progress, latest = dict(job["progress"]), job["latest_metrics"]
        for row in rows:
            self.store.add_event(run.job_id, "metrics", row)
            latest = {**latest, **row}
        now, step = time.time(), rows[-1]["step"]
        run.first_seen = run.first_seen or (now, rows[0]["step"])
        total = max(progress.get("total_steps") or step, step)
        t0, s0 = run.first_seen
        eta = (total - step) * (now - t0) / (step - s0) if step > s0 else None
        progress.update(step=step, total_steps=total, epoch=rows[-1].get("epoch", progress.get("epoch")),
                        eta_seconds=round(eta, 1) if eta is not None else None)
        self.store.update_job(run.job_id, progress=progress, latest_metrics=latest)

    def _new_metrics(self, run: Running) -> list[dict]:
        path = run.run_dir / run_files.METRICS
        if not path.exists():
            return []
        if path.stat().st_size < run.metrics_offset:  # a resumed trainer cut the log back to its checkpoint
            run.metrics_offset = 0
        with open(path, "rb") as f:
            f.seek(run.metrics_offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next pass
        run.metrics_offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) > run.last_step:
                rows.append(row)
                run.last_step = row["step"]
        return rows

    def _new_log_lines(self, run: Running) -> list[str]:
        path = run.run_dir / LOG_NAME
        if not path.exists():  # a job still queued in the backend
            return []
        with open(path, "rb") as f:
            f.seek(run.log_offset)
            data = f.read()
        complete = data[: max(data.rfind(b"\n"), data.rfind(b"\r")) + 1]
        run.log_offset += len(complete)
        lines = [" ".join(x.split())[:2000] for x in complete.decode("utf-8", "replace").replace("\r", "\n").split("\n")]
        lines = [x for x in lines if x]
        run.log_tail = (run.log_tail + lines)[-20:]
        return lines

    def _ended(self, run: Running, status: Status) -> None:
        job = self.store.get_job(run.job_id)
        code = status.exit_code
        if code == 0 and run.phase == "merge":
            job = self.store.update_job(job["id"], phase="train")
            if job["state"] == "RUNNING":
                return self._launch(job)
            if job["state"] == "CANCELLING":
                return self._set(job, "CANCELLED", end_time=time.time(), handle=None)
        if job["state"] == "PAUSING" and (code != 0 or run.phase == "merge"):
            return self._set(job, "PAUSED", handle=None)
        if code == 0 and run.phase == "train" and _has_eval_data(job["config"]):
            job = self.store.update_job(job["id"], phase="eval")
            if job["state"] == "RUNNING":
                self._launch(job)
                return
        if code == 0:
            return self._succeeded(job, eval_error=None)
        if job["state"] == "CANCELLING" or status.state == CANCELLED:
            error = None if job["state"] == "CANCELLING" else f"cancelled by the {self.backend.name} backend"
            return self._set(job, "CANCELLED", end_time=time.time(), error=error)
        message = _error_line(run.log_tail, code)
        if run.phase == "eval":  # the model is trained and whole: keep it, say what the evaluation hit
            return self._succeeded(job, eval_error=message)
        retryable = code != run_files.EXIT_USER_ERROR  # the same input fails the same way again
        if retryable and job["attempt"] <= self.settings.max_retries:
            self.store.add_event(job["id"], "log", f"attempt {job['attempt']} failed ({message}); retrying from the "
                                                   "last checkpoint")
            return self._set(job, "PENDING", handle=None, error=None)
        self._set(job, "FAILED", end_time=time.time(), error=message)

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
        step = _final_step(run_dir / LOG_NAME)
        if step is None and rows:
            step = rows[-1]["step"]
        if step is not None:
            progress["step"] = step
        return self._set(job, "SUCCEEDED", end_time=time.time(), best_metrics=best, progress=progress,
                         final_metrics=final_metrics, tuned_model={"path": str(final), "adapter": adapter, "endpoint": name})

    def _set(self, job: dict, state: str, **fields) -> dict:
        job = self.store.update_job(job["id"], state=state, **fields)
        self.store.add_event(job["id"], "state", job_json(job))
        return job


# ---------------------------------------------------------------- helpers

def _has_eval_data(config: dict) -> bool:
    data, ev = config.get("data", {}), config.get("eval", {})
    return bool(data.get("eval") or data.get("eval_fraction") or ev.get("data"))


def _error_line(tail: list[str], code: int | None) -> str:
    for line in reversed(tail):
        if line.startswith((run_files.ERROR_PREFIX, run_files.STOPPED_PREFIX)):
            return line
    last = tail[-1] if tail else "no output"
    if code is None:
        return f"the backend lost the training process: {last}"
    return f"the training process exited with code {code}: {last}" if code > 0 else \
        f"the training process was killed by signal {-code}: {last}"


def _final_step(log: Path, tail_bytes: int = 1 << 20) -> int | None:
    """The step of the trainer's last `done at step N/T` line: metrics rows come only every train.log_every steps,
    so a run shorter than that has none. Only the log's tail is read (an eval phase may follow the line)."""
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - tail_bytes))
        text = f.read().decode("utf-8", "replace")
    steps = re.findall(rf"{re.escape(run_files.DONE_PREFIX)}(\d+)/", text)  # a launcher may prefix lines
    return int(steps[-1]) if steps else None


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
