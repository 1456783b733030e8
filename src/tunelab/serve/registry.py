"""Model names -> model paths, for the serving engine: the endpoints of succeeded jobs, the --model base models and
the kept checkpoints of OpenAI-style jobs (openai_models.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .openai_models import listed_checkpoints, resolve_checkpoint
from .settings import ServeSettings
from .store import Store


@dataclass(frozen=True)
class ModelRef:
    name: str  # what clients send as `model`: the endpoint's name (without 'endpoints/') or the --model name
    path: Path  # anything tunelab.modeling.load.load_pretrained loads: a model dir, an adapter dir, a run dir
    created: int  # unix seconds
    owned_by: str  # the job id of a tuned model, "tunelab" for a --model base model


class Registry:
    def __init__(self, settings: ServeSettings, store: Store):
        self.settings, self.store = settings, store
        self._started = int(time.time())

    def resolve(self, name: str) -> ModelRef | None:
        """Accepts `endpoints/NAME`, `NAME`, a job id (its endpoint), `ft:...:ckpt-step-N`, or a --model name."""
        if not isinstance(name, str):
            return None
        bare = name.removeprefix("endpoints/")
        record = self.store.get_endpoint(bare)
        if record is None:
            job = self.store.get_job(bare)
            if job is not None and job.get("tuned_model"):
                record = self.store.get_endpoint(job["tuned_model"]["endpoint"])
        if record is not None:
            return _ref(record)
        checkpoint = resolve_checkpoint(self.store, bare)
        if checkpoint is not None:
            path, final = checkpoint
            return ModelRef(bare, path, int(path.stat().st_mtime), final["job_id"])
        if bare == name and name in self.settings.models:
            return ModelRef(name, self.settings.models[name], self._started, "tunelab")
        return None

    def list(self) -> list[ModelRef]:
        base = [ModelRef(n, p, self._started, "tunelab") for n, p in self.settings.models.items()]
        checkpoints = [ModelRef(n, path, int(path.stat().st_mtime), final["job_id"])
                       for n, path, final in listed_checkpoints(self.store)]
        return base + [_ref(r) for r in self.store.list_endpoints()] + checkpoints


def _ref(record: dict) -> ModelRef:
    return ModelRef(record["name"], Path(record["path"]), int(record["create_time"]), record["job_id"])
