"""The one training loop: accumulation, precision, clipping, schedule, eval, checkpoints, resume.

Every objective runs through `train`. An objective supplies data, collation and a *summed* loss;
the loop owns everything else, so resume, DDP, NaN guards and logging work the same for SFT, DPO,
PPO or distillation.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tunelab import checkpoint
from tunelab.config import Config, TrainConfig, UserError, dump_config, load_config
from tunelab.objectives.base import Objective, move_to, real_tokens


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


class TooManyBadSteps(Exception):
    pass


# ---------------------------------------------------------------- distributed context

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return cls(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))

    def sum(self, value: float | torch.Tensor, device) -> float:
        if self.world == 1:
            return float(value)
        t = torch.as_tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t)


# ---------------------------------------------------------------- state

@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro: int = 0  # micro-batches consumed within `epoch` (all ranks together)
    tokens: int = 0
    bad_steps: int = 0  # consecutive skipped (non-finite) steps
    skipped_total: int = 0
    best_eval: float = math.inf
    best_step: int = 0
    patience: int = 0
    rng: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- pieces

class ObjectiveModule(nn.Module):
    """Model + the objective's own modules as one nn.Module, so DDP wraps the whole loss computation
    (the objective may call submodules directly, e.g. the decoder without the LM head)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.extra = nn.ModuleDict(objective.extra_modules())
        self.objective = objective

    def forward(self, batch: dict):
        return self.objective.loss(self.model, batch)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def make_optimizer(tc: TrainConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            # Biases and norm gains are not weights to shrink (Loshchilov & Hutter's AdamW setup).
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if tc.optimizer == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.adam_betas, fused=fused, foreach=None if fused else True)
    if device.type != "cuda" and tc.optimizer == "paged_adamw_8bit":
        raise UserError("train.optimizer: paged_adamw_8bit is CUDA only (it pages optimizer state through "
                        "CUDA unified memory); use adamw on this machine")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=tc.lr, betas=tc.adam_betas)


def lr_lambda(tc: TrainConfig, total_steps: int):
    warmup = tc.warmup_steps or int(round(tc.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if tc.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if tc.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def precision_context(precision: str, device: torch.device):
    """(autocast context factory, GradScaler or None) for the resolved precision."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA GPU (CPUs have no fast fp16 math); use fp32 or bf16")
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def epoch_order(n_items: int, micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of item indices for one epoch: a seeded shuffle, so resume replays the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_items, generator=g).tolist()
    return [perm[i:i + micro_batch] for i in range(0, n_items, micro_batch)]


class Batches:
    """Endless micro-batch index stream over epochs, positioned by (epoch, micro) for exact resume."""

    def __init__(self, n_items: int, micro_batch: int, seed: int, state: TrainState):
        self.n, self.mb, self.seed, self.state = n_items, micro_batch, seed, state
        self._order = epoch_order(n_items, micro_batch, seed, state.epoch)

    def take(self, count: int) -> list[list[int]]:
        out = []
        while len(out) < count:
            if self.state.micro >= len(self._order):
                self.state.epoch += 1
                self.state.micro = 0
                self._order = epoch_order(self.n, self.mb, self.seed, self.state.epoch)
            out.append(self._order[self.state.micro])
            self.state.micro += 1
        return out


# ---------------------------------------------------------------- the run

RESUME_KEYS = ("model", "adapter", "method", "data", "tokenizer", "train.micro_batch_size", "train.grad_accum",
               "train.seed", "train.optimizer")


def _check_resume_compatible(saved: Config, cfg: Config) -> None:
    old, new = saved.model_dump(), cfg.model_dump()
    for key in RESUME_KEYS:
        a, b = old, new
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if a != b:
            raise UserError(
                f"--resume: '{key}' changed since the checkpoint was written ({a!r} -> {b!r}); "
                "that breaks an exact resume. Restore it, or start a new run with another output_dir"
            )


def _check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {run_dir} is not writable: {e.strerror}") from None


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, say=print):
        self.cfg = cfg
        self.say = say
        self.dist = Dist.from_env()
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume_from = self._find_resume() if resume else None
        if not resume and checkpoint.list_steps(self.ckpt_root):
            raise UserError(
                f"{self.ckpt_root} already holds checkpoints; continue with `tunelab train CONFIG --resume`, "
                "or set another output_dir"
            )
        if self.dist.main:
            _check_output_dir(self.run_dir)
        self._stop_signal: int | None = None

    def _find_resume(self) -> Path:
        path = checkpoint.latest_valid(self.ckpt_root, warn=self.say)
        if path is None:
            raise UserError(f"--resume: no usable checkpoint in {self.ckpt_root}")
        saved_cfg = self.run_dir / "config.yaml"
        if saved_cfg.is_file():
            _check_resume_compatible(load_config(saved_cfg), self.cfg)
        return path

    # -- setup

    def setup(self) -> None:
        from tunelab.model import build, pick_device
        from tunelab.objectives import make_objective, model_kind

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.device = pick_device()
        self.autocast, self.scaler = precision_context(cfg.train.precision, self.device)
        if self.device.type != "cuda" and cfg.train.optimizer == "paged_adamw_8bit":
            make_optimizer(cfg.train, nn.Linear(1, 1), self.device)  # raises the clear error before loading
        self.model, self.tokenizer = build(cfg, model_kind(cfg.method), self.device)
        self.objective = make_objective(cfg, self.tokenizer)
        self.train_items, self.eval_items = self.objective.datasets()
        if not self.train_items:
            raise UserError("no training examples left after loading and filtering the data")
        self.objective.setup(self.model)
        self.module = ObjectiveModule(self.model, self.objective).to(self.device)
        self.wrapped: nn.Module = self.module
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.wrapped = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.train, self.module, self.device)
        tc = cfg.train
        window = tc.micro_batch_size * tc.grad_accum * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_items) / window))
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc, self.total_steps))
        self.state = TrainState()
        if self.resume_from is not None:
            self._load(self.resume_from)

    # -- checkpoints

    def _save(self) -> Path | None:
        if not self.dist.main:
            return None
        self.state.rng = rng_state()
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
            "objective": self.objective.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        protect = {self.state.best_step} if self.cfg.train.early_stopping_patience else set()
        return checkpoint.save(self.ckpt_root, self.state.step, trainable_state(self.module), state,
                               self.cfg.train.keep_checkpoints, protect)

    def _load(self, path: Path) -> None:
        weights, state = checkpoint.load(path)
        self._load_weights(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["trainer"])
        self.objective.load_state_dict(state.get("objective", {}))
        set_rng_state(self.state.rng)
        self.say(f"resumed from {path} (step {self.state.step})")

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        expected = trainable_state(self.module)
        if set(weights) != set(expected):
            raise UserError("checkpoint does not match this model's trainable parameters "
                            "(was the adapter or model config changed?)")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(weights[name].to(p.device, p.dtype))

    # -- steps

    def _collate(self, indices: list[int], items: list) -> dict:
        return move_to(self.objective.collate([items[i] for i in indices]), self.device)

    def _step(self, batches: list[dict]) -> dict | None:
        """One optimizer step over this rank's micro-batches; None when skipped as non-finite."""
        units = self.dist.sum(sum(self.objective.units(b) for b in batches), self.device)
        if units == 0:
            return None
        # DDP averages gradients over ranks; scaling by world makes that a sum, normalised by all units.
        scale = self.dist.world / units
        loss_sum, metric_sums, tokens = 0.0, {}, 0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or self.dist.world == 1
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with ctx:
                with self.autocast():
                    loss, metrics = self.wrapped(batch)
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += float(loss.detach())
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            tokens += real_tokens(batch)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        loss_total = self.dist.sum(loss_sum, self.device)
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: self.dist.sum(v, self.device) / units for k, v in metric_sums.items()}
        out["loss"] = loss_total / units
        out["grad_norm"] = grad_norm
        out["tokens"] = int(self.dist.sum(tokens, self.device))
        return out

    def _updates(self, updates: list[list[dict]]) -> dict | None:
        """The optimizer updates of one loop step (one for most objectives; PPO: epochs x minibatches of a
        rollout batch). The LR schedule advances once per loop step; metrics are averaged over the updates.
        None when every update was skipped as non-finite."""
        done = [m for m in (self._step(batches) for batches in updates) if m is not None]
        if not done:
            return None
        self.scheduler.step()
        out = {k: sum(m[k] for m in done) / len(done) for k in done[0]}
        out["tokens"] = sum(m["tokens"] for m in done)
        if len(updates) > 1:
            out["updates"] = len(done)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_items:
            return {}
        self.module.eval()
        mb = self.cfg.train.micro_batch_size
        indices = list(range(self.dist.rank, len(self.eval_items), self.dist.world))
        loss_sum, metric_sums, units = 0.0, {}, 0
        for start in range(0, len(indices), mb):
            batch = self._collate(indices[start:start + mb], self.eval_items)
            with self.autocast():
                loss, metrics = self.module(batch)
            loss_sum += float(loss)
            units += self.objective.units(batch)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        self.module.train()
        units = self.dist.sum(units, self.device)
        out = {f"eval_{k}": self.dist.sum(v, self.device) / max(units, 1) for k, v in metric_sums.items()}
        out["eval_loss"] = self.dist.sum(loss_sum, self.device) / max(units, 1)
        if self.cfg.method in ("sft", "pretrain", "distill"):
            out["eval_perplexity"] = math.exp(min(out.get("eval_ce", out["eval_loss"]), 50.0))  # distill: CE part
        return out

    # -- the loop

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.say(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint ...")

    def run(self) -> Path:
        from tunelab.tracking import Tracker, plot_loss

        self.setup()
        cfg, tc, state = self.cfg, self.cfg.train, self.state
        if self.dist.main:
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        tracker = Tracker(cfg, self.run_dir, resume_step=state.step) if self.dist.main else None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        stream = Batches(len(self.train_items), tc.micro_batch_size, tc.seed, state)
        bar = self._progress_bar()
        started, tokens_at_start, step_at_start, stopped_early = time.time(), state.tokens, state.step, False
        self.module.train()
        try:
            while state.step < self.total_steps:
                window = stream.take(tc.grad_accum * self.dist.world)
                mine = window[self.dist.rank::self.dist.world]
                updates = list(self.objective.updates(self.module.model, (self._collate(i, self.train_items) for i in mine)))
                t0 = time.time()
                metrics = self._updates(updates)
                if metrics is None:
                    state.bad_steps += 1
                    state.skipped_total += 1
                    self.say(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                             f"({state.bad_steps} in a row)")
                    if state.bad_steps >= tc.max_bad_steps:
                        raise TooManyBadSteps(
                            f"{state.bad_steps} steps in a row had a non-finite loss or gradient; stopped. "
                            f"The last good checkpoint is in {self.ckpt_root}. Lower train.lr, check the data, "
                            "or use precision: fp32")
                    continue
                state.bad_steps = 0
                state.step += 1
                state.tokens += metrics["tokens"]
                metrics["tokens_per_s"] = metrics["tokens"] / max(time.time() - t0, 1e-9)
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                metrics["epoch"] = state.epoch + state.micro / max(1, math.ceil(len(self.train_items) / tc.micro_batch_size))
                if tc.eval_every and state.step % tc.eval_every == 0 or state.step == self.total_steps:
                    metrics.update(self.evaluate())
                    stopped_early = self._early_stopping(metrics)
                if tracker and (state.step % tc.log_every == 0 or "eval_loss" in metrics):
                    tracker.log(state.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if tc.save_every and state.step % tc.save_every == 0 or (stopped_early and tc.save_every):
                    self._save()
                if self._stop_signal is not None:
                    self._save()
                    raise Interrupted(
                        f"stopped at step {state.step}/{self.total_steps}; checkpoint saved in {self.ckpt_root}. "
                        "Continue with: tunelab train CONFIG --resume")
                if stopped_early:
                    self.say(f"early stopping at step {state.step}: eval loss has not improved for "
                             f"{tc.early_stopping_patience} evaluations (best {state.best_eval:.4f} at step {state.best_step})")
                    break
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if tracker:
                tracker.close()
        final = self._finish(stopped_early)
        elapsed = time.time() - started
        if self.dist.main:
            plot = plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png") if cfg.log.plot else None
            self._summary(elapsed, state.step - step_at_start, state.tokens - tokens_at_start, final, plot)
        return final

    def _early_stopping(self, metrics: dict) -> bool:
        state, patience = self.state, self.cfg.train.early_stopping_patience
        loss = metrics.get("eval_loss")
        if loss is None:
            return False
        if loss < state.best_eval:
            state.best_eval, state.best_step, state.patience = loss, state.step, 0
            if patience and self.cfg.train.save_every:
                self._save()  # keep the best weights: the final model is restored from them
            return False
        state.patience += 1
        return bool(patience) and state.patience >= patience

    def _finish(self, stopped_early: bool) -> Path:
        from tunelab.model import save_model

        final = self.run_dir / "final"
        best = checkpoint.step_dir(self.ckpt_root, self.state.best_step)
        if self.cfg.train.early_stopping_patience and self.state.best_step and best.is_dir():
            if self.state.best_step != self.state.step:
                self.say(f"restoring the best checkpoint (step {self.state.best_step}) for the final model")
                self._load_weights(checkpoint.load(best)[0])
        if self.dist.main:
            tmp = self.run_dir / ".final-tmp"
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            save_model(self.module.model, self.tokenizer, tmp)
            (tmp / "config.yaml").write_text(dump_config(self.cfg))
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.rename(tmp, final)
        if self.dist.world > 1:
            dist.barrier()
        return final

    def _progress_bar(self):
        if not (self.dist.main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc=self.cfg.method, unit="step", dynamic_ncols=True)

    def _summary(self, elapsed: float, steps: int, tokens: int, final: Path, plot: Path | None) -> None:
        state = self.state
        lines = [
            f"done at step {state.step}/{self.total_steps}: {steps} steps in {elapsed:.1f}s, {tokens:,} tokens "
            f"({tokens / max(elapsed, 1e-9):,.0f} tok/s)",
        ]
        if state.best_eval < math.inf:
            lines.append(f"best eval loss {state.best_eval:.4f} at step {state.best_step}")
        if state.skipped_total:
            lines.append(f"skipped {state.skipped_total} non-finite steps")
        lines.append(f"model: {final}")
        lines.append(f"metrics: {self.run_dir / 'metrics.jsonl'}" + (f", plot: {plot}" if plot else ""))
        self.say("\n".join(lines))


def train(cfg: Config, resume: bool = False, say=print) -> Path:
    return Trainer(cfg, resume=resume, say=say).run()
