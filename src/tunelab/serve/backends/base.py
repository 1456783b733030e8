"""The one interface the scheduler uses to run a job somewhere: this machine, a Slurm cluster, later Ray or
Kubernetes. The scheduler keeps the queue, the retries and the job states, and follows progress through the files
the trainer writes in the run dir (metrics.jsonl, train.log), which every backend makes it write there; a backend
only starts, watches and stops the processes.

A handle is a JSON-able dict a backend returns from `submit` (its own job id among it); the scheduler stores it on
the job row, so a restarted server can `attach` to it again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import run_files

# What `poll` reports. EXITED comes with the exit code of the trainer (0 = done); CANCELLED is a job the backend
# itself ended without an exit code (scancel of a job still queued, an administrator's cancel).
PENDING, RUNNING, EXITED, CANCELLED = "PENDING", "RUNNING", "EXITED", "CANCELLED"
LOG_NAME = run_files.TRAIN_LOG  # in the run dir: the job's stdout and stderr, whichever backend ran it


@dataclass
class Compute:
    """What a job asked for (the request's `compute` section, validated)."""
    gpus: int = 0  # per node
    nodes: int = 1
    cpus: int | None = None  # per process
    memory_gb: float | None = None  # per node
    time_limit_s: int | None = None
    priority: int = 0

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus)  # one process per GPU, else one on the CPU


@dataclass
class JobSpec:
    job_id: str
    run_dir: Path
    argv: list[str]  # a tunelab command line after `tunelab`: ["train", CONFIG] or ["eval", ...]
    compute: Compute
    resume: bool = False  # add --resume when the run dir holds a checkpoint when the process starts
    env: dict[str, str] = field(default_factory=dict)  # on top of the server's own environment
    attempt: int = 1  # of this phase: with job_id and the phase, names one submission (a backend may key on it)

    def one_node_argv(self) -> list[str]:
        """argv as started now on one node: --resume when asked for and the run dir holds a checkpoint, --nproc for
        one process per GPU."""
        argv = list(self.argv)
        if self.resume and any((self.run_dir / run_files.CHECKPOINTS).glob(f"{run_files.STEP_PREFIX}*")):
            argv.append("--resume")
        if self.compute.gpus > 1:
            argv += ["--nproc", str(self.compute.gpus)]
        return argv


@dataclass
class Status:
    state: str
    exit_code: int | None = None  # with EXITED: negative = killed by that signal
    nodes: list[str] = field(default_factory=list)  # where it runs (or ran)
    gpus: list[str] = field(default_factory=list)  # device ids as the backend names them


@dataclass
class Capacity:
    """The largest job the backend can ever run: a request beyond it is refused at submission."""
    nodes: int
    gpus_per_node: int
    cpus_per_node: int | None = None
    memory_gb_per_node: float | None = None
    name: str = ""  # how the limit is named in errors, e.g. "the local backend", "partition debug"


class Backend(ABC):
    name: str

    @abstractmethod
    def capacity(self) -> Capacity: ...

    def can_start(self, compute: Compute) -> bool:
        """Whether a job of this size could start now. Backends with a queue of their own (Slurm) take every job."""
        return True

    @abstractmethod
    def submit(self, spec: JobSpec) -> dict:
        """Start (or queue) the job; its handle."""

    @abstractmethod
    def poll(self, handle: dict) -> Status: ...

    @abstractmethod
    def cancel(self, handle: dict, grace: float) -> None:
        """Ask the job to stop with SIGTERM (the trainer saves a checkpoint at the end of its step), and kill it if it
        is still there `grace` seconds later (checked on `poll`). Returns at once."""

    @abstractmethod
    def attach(self, handle: dict) -> bool:
        """After a server restart: True if the backend still has the job (queued, running or ended but not yet
        reported): the scheduler goes on following it and never reruns it. False if it is gone for good: the
        scheduler queues it again, to resume from its checkpoint."""

    def shutdown(self, handles: list[dict], timeout: float) -> None:
        """The server is stopping. Jobs the backend runs on its own keep running (the next server attaches)."""
