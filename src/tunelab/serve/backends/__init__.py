"""Where jobs run: `tunelab serve --backend local|slurm|ray`. Each backend implements backends.base.Backend."""

from __future__ import annotations

from ..settings import ServeSettings
from .base import Backend


def make_backend(settings: ServeSettings) -> Backend:
    if settings.backend == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend(settings.home, partition=settings.slurm_partition, account=settings.slurm_account,
                            extra=settings.slurm_extra)
    if settings.backend == "ray":
        from .ray import RayBackend

        return RayBackend(settings.ray_address, stop_wait=settings.cancel_grace)
    from .local import LocalBackend, discover_gpus

    return LocalBackend(settings.gpus if settings.gpus is not None else discover_gpus())
