"""Where metrics go: metrics.jsonl always, TensorBoard by default, W&B / MLflow when configured, loss.png at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab.config import Config, UserError


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if resume_step:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._sinks = []
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            self._sinks.append(lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()])
            self._close_tb = writer.close
        if cfg.log.wandb is not None:
            try:
                import wandb
            except ImportError:
                raise UserError("log.wandb is set but wandb is not installed: pip install wandb") from None
            run = wandb.init(config=cfg.model_dump(mode="json"), resume="allow", **cfg.log.wandb)
            self._sinks.append(lambda step, m: run.log(m, step=step))
        if cfg.log.mlflow is not None:
            try:
                import mlflow
            except ImportError:
                raise UserError("log.mlflow is set but mlflow is not installed: pip install mlflow") from None
            mlflow_cfg = dict(cfg.log.mlflow)
            if "tracking_uri" in mlflow_cfg:
                mlflow.set_tracking_uri(mlflow_cfg.pop("tracking_uri"))
            if "experiment" in mlflow_cfg:
                mlflow.set_experiment(mlflow_cfg.pop("experiment"))
            mlflow.start_run(**mlflow_cfg)
            self._sinks.append(lambda step, m: mlflow.log_metrics(m, step=step))

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from, so the log reads as one continuous run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self._sinks:
            sink(step, numeric)

    def close(self) -> None:
        self._file.close()
        if hasattr(self, "_close_tb"):
            self._close_tb()


def _step_of(line: str) -> float:
    """The step of a metrics line; a line torn by a crash mid-write (or any unreadable one) counts as past the end."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), float)]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def progress_bar(cfg: Config, total_steps: int, step: int):
    """A tqdm bar over the run's optimizer steps (train.progress), or None."""
    if not cfg.train.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=step, desc=cfg.method, unit="step", dynamic_ncols=True)


def summary(state, total_steps: int, elapsed: float, steps: int, tokens: int, final: Path, metrics: Path,
            plot: Path | None) -> str:
    """The lines a finished run ends with; `state` is the loop's TrainState."""
    lines = [
        f"done at step {state.step}/{total_steps}: {steps} steps in {elapsed:.1f}s, {tokens:,} tokens "
        f"({tokens / max(elapsed, 1e-9):,.0f} tok/s)",
    ]
    if state.best_eval < math.inf:
        lines.append(f"best eval loss {state.best_eval:.4f} at step {state.best_step}")
    if state.skipped_total:
        lines.append(f"skipped {state.skipped_total} non-finite steps")
    lines.append(f"model: {final}")
    lines.append(f"metrics: {metrics}" + (f", plot: {plot}" if plot else ""))
    return "\n".join(lines)
