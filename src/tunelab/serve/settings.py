"""What `tunelab serve` was started with. Plain data: every other module reads it from app.state.settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


BACKENDS = ("local", "slurm", "ray")


@dataclass
class ServeSettings:
    home: Path = Path("tunelab-home")  # the database, run dirs and uploaded files live here
    host: str = "127.0.0.1"
    port: int = 8321
    api_key: str | None = None
    max_jobs: int | None = None  # jobs handed to the backend at a time; default 1 locally, 1000 on a cluster
    data_roots: list[Path] = field(default_factory=list)  # where client-named paths may point (home always may)
    models: dict[str, Path] = field(default_factory=dict)  # --model NAME=PATH: base models served and tunable by name
    max_loaded: int = 4  # models the engine keeps in memory
    allow_code: bool = False  # accept config keys that import code or unpickle on the server
    max_retries: int = 0  # a child that dies on its own is restarted from its checkpoint this many times
    max_body_mb: float = 16.0
    max_upload_mb: float = 512.0
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides loopback and the bind
    allowed_origins: list[str] = field(default_factory=list)  # sites whose pages may POST besides the server's own
    poll_seconds: float = 0.5  # how often the scheduler looks at its jobs and their metrics
    backend: str = "local"  # local | slurm | ray: where jobs run (serve/backends)
    gpus: list[str] | None = None  # the local backend's GPU ids; None: discovered (nvidia-smi)
    cancel_grace: float = 120.0  # seconds between a cancel's SIGTERM (the trainer checkpoints) and the kill
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_extra: list[str] = field(default_factory=list)  # more sbatch options, as given to --slurm-extra
    ray_address: str | None = None  # the Ray dashboard's HTTP address (the Job Submission API), with --backend ray

    def __post_init__(self):
        from tunelab.config import UserError

        from .origins import check_allowed_host, check_allowed_origin

        if self.max_jobs is None:  # a cluster queues and places jobs itself: give it them all
            self.max_jobs = 1 if self.backend == "local" else 1000
        for name, low in (("max_jobs", 1), ("max_loaded", 1), ("max_retries", 0), ("port", 0)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend}: use one of {', '.join(BACKENDS)}")
        if (self.backend == "ray") != (self.ray_address is not None):
            raise UserError("--backend ray needs --ray-address (the dashboard's, e.g. http://HEAD:8265), and "
                            "--ray-address needs --backend ray")
        if self.backend != "slurm" and (self.slurm_partition or self.slurm_account or self.slurm_extra):
            raise UserError("--slurm-partition, --slurm-account and --slurm-extra need --backend slurm")
        if self.backend != "local" and self.gpus is not None:
            raise UserError(f"--gpus is for the local backend; {self.backend} finds its own")
        if self.cancel_grace < 0:
            raise UserError(f"--cancel-grace must be at least 0, got {self.cancel_grace}")
        if self.max_body_mb <= 0 or self.max_upload_mb <= 0:
            raise UserError("--max-body-mb and --max-upload-mb must be positive")
        self.allowed_hosts = [check_allowed_host(h) for h in self.allowed_hosts]
        self.allowed_origins = [check_allowed_origin(o) for o in self.allowed_origins]
        self.home = Path(self.home).resolve()
        self.data_roots = [Path(p).resolve() for p in self.data_roots]
        self.models = {name: Path(p).resolve() for name, p in self.models.items()}

    @property
    def roots(self) -> list[Path]:
        """Every directory a client-named path may resolve into."""
        return [self.home, *self.data_roots]
