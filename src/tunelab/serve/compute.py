"""A request's `compute` section: what the job needs, checked against what the backend can ever give.

An impossible request (more GPUs than a node of the backend has, several nodes on the local backend) is refused at
submission, naming the limit, instead of becoming a job that waits forever.
"""

from __future__ import annotations

import re
from dataclasses import asdict

from pydantic import BaseModel, ConfigDict, Field

from tunelab.config import UserError

from .backends.base import Capacity, Compute

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CLOCK = re.compile(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)")  # [D-]H:MM:SS, as Slurm writes it


class ComputeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: int | None = Field(None, ge=0, le=1024, description="per node; default one when the backend has GPUs")
    nodes: int = Field(1, ge=1, le=4096)
    cpus: int | None = Field(None, ge=1, le=4096, description="per process")
    memory_gb: float | None = Field(None, gt=0, description="per node")
    time_limit: str | None = Field(None, description='"2h", "30m", "1.5h", "1:30:00"')
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first among queued jobs")


def parse_duration(text: str) -> int:
    """Seconds in "90s", "30m", "2h", "1.5h", "1d", "1:30:00" or "2-00:00:00"."""
    t = text.strip().lower()
    clock = CLOCK.fullmatch(t)
    if clock:
        days, h, m, s = (int(x or 0) for x in clock.groups())
        seconds = days * 86400 + h * 3600 + m * 60 + s
    else:
        number = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
        if not number:
            raise UserError(f'compute.time_limit {text!r}: write it as "30m", "2h", "1d" or "H:MM:SS"')
        seconds = round(float(number.group(1)) * UNITS[number.group(2)])
    if seconds < 60:
        raise UserError(f"compute.time_limit {text!r}: at least one minute")
    return seconds


def resolve_compute(req: ComputeRequest | None, capacity: Capacity) -> Compute:
    """The request with its defaults filled in, or a UserError naming the limit it exceeds."""
    req = req or ComputeRequest()
    gpus = req.gpus if req.gpus is not None else min(1, capacity.gpus_per_node)
    where = capacity.name
    if req.nodes > capacity.nodes:
        raise UserError(f"compute.nodes {req.nodes}: {where} has {_count(capacity.nodes, 'node')}")
    if gpus > capacity.gpus_per_node:
        raise UserError(f"compute.gpus {gpus}: {where} has {_count(capacity.gpus_per_node, 'GPU')} per node")
    processes = max(1, gpus)
    if req.cpus and capacity.cpus_per_node and req.cpus * processes > capacity.cpus_per_node:
        raise UserError(f"compute.cpus {req.cpus} per process x {processes} processes: {where} has "
                        f"{_count(capacity.cpus_per_node, 'CPU')} per node")
    if req.memory_gb and capacity.memory_gb_per_node and req.memory_gb > capacity.memory_gb_per_node:
        raise UserError(f"compute.memory_gb {req.memory_gb:g}: {where} has {capacity.memory_gb_per_node:g} GB per node")
    time_limit = parse_duration(req.time_limit) if req.time_limit is not None else None
    return Compute(gpus=gpus, nodes=req.nodes, cpus=req.cpus, memory_gb=req.memory_gb, time_limit_s=time_limit,
                   priority=req.priority)


def compute_json(compute: Compute) -> dict:
    return asdict(compute)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
