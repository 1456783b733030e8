"""Where metrics go: metrics.jsonl always, TensorBoard by default, W&B / MLflow when configured, loss.svg at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunelab import run_files
from tunelab.config import Config, UserError


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / run_files.METRICS
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
    """The train (and eval) loss curve as a small SVG: any browser shows it, and writing it costs no plotting
    library (matplotlib's import and render were about a second of every run's wall time)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), float)]
    if not train:
        return None
    out.write_text(loss_svg(train, evals))
    return out


def loss_svg(train: list[tuple[int, float]], evals: list[tuple[int, float]], width: int = 640,
             height: int = 320) -> str:
    left, right, top, bottom = 56, 12, 12, 36  # margins for the axis labels
    points = [p for p in train + evals if math.isfinite(p[1])]
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * (width - left - right),
                top + (y1 - value) / (y1 - y0) * (height - top - bottom))

    def line(series, colour, name, dots=False):
        pts = [xy(s, v) for s, v in series if math.isfinite(v)]
        svg = (f'<polyline class="{name}" fill="none" stroke="{colour}" stroke-width="1.5" '
               f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        return svg + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in pts if dots)

    plot_bottom = height - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
        f'<line x1="{left}" y1="{plot_bottom}" x2="{width - right}" y2="{plot_bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{plot_bottom}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{y1:.4g}</text>',
        f'<text x="{left - 4}" y="{plot_bottom}" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{left}" y="{plot_bottom + 14}">{x0}</text>',
        f'<text x="{width - right}" y="{plot_bottom + 14}" text-anchor="end">{x1}</text>',
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">step</text>',
        line(train, "#1f77b4", "train"),
        f'<text x="{width - right - 4}" y="{top + 12}" text-anchor="end" fill="#1f77b4">train loss</text>',
    ]
    if evals:
        parts += [line(evals, "#d62728", "eval", dots=True),
                  f'<text x="{width - right - 4}" y="{top + 26}" text-anchor="end" fill="#d62728">eval loss</text>']
    return "\n".join(parts) + "\n</svg>\n"


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
        f"{run_files.DONE_PREFIX}{state.step}/{total_steps}: {steps} steps in {elapsed:.1f}s, {tokens:,} tokens "
        f"({tokens / max(elapsed, 1e-9):,.0f} tok/s)",
    ]
    if state.best_eval < math.inf:
        lines.append(f"best eval loss {state.best_eval:.4f} at step {state.best_step}")
    if state.skipped_total:
        lines.append(f"skipped {state.skipped_total} non-finite steps")
    lines.append(f"model: {final}")
    lines.append(f"metrics: {metrics}" + (f", plot: {plot}" if plot else ""))
    return "\n".join(lines)
