"""`sft.train(...)`: submit a supervised tuning job (a LoRA adapter with tunelab's defaults) to the service."""

from __future__ import annotations

from tunelab.client import TuningJob


def train(source_model: str, train_dataset: str, validation_dataset: str | None = None,
          tuned_model_display_name: str | None = None, epochs: float | None = None,
          learning_rate_multiplier: float | None = None, adapter_size: int | None = None,
          batch_size: int | None = None, compute: dict | None = None) -> TuningJob:
    """Datasets are uploaded file ids (`file-...`) or paths the server can read (under its --data-root).
    `compute`: what the job needs, e.g. {"gpus": 2, "time_limit": "2h"} (keys gpus, nodes, cpus, memory_gb,
    time_limit, priority); the server's default is one GPU if it has GPUs, else the CPU."""
    hyper = {"epoch_count": epochs, "learning_rate_multiplier": learning_rate_multiplier,
             "adapter_size": adapter_size, "batch_size": batch_size}
    body = {"source_model": source_model, "train_dataset": train_dataset, "method": "sft",
            "hyperparameters": {k: v for k, v in hyper.items() if v is not None}}
    if validation_dataset is not None:
        body["validation_dataset"] = validation_dataset
    if tuned_model_display_name is not None:
        body["tuned_model_display_name"] = tuned_model_display_name
    if compute is not None:
        body["compute"] = compute
    return TuningJob.create(body)
