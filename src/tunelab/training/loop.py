"""The one training loop: accumulation, precision, clipping, schedule, eval, checkpoints, resume.

Every objective runs through `train`. An objective supplies data, collation and a *summed* loss;
the loop owns everything else, so resume, DDP, NaN guards and logging work the same for SFT, DPO,
PPO or distillation. Read `Trainer.setup` (what a run builds) and `Trainer.run` (epoch -> accumulation
window -> step -> log / eval / checkpoint); the machinery they call lives in modules named for their job:
preflight (checks before anything heavy), distributed (process group, DDP / FSDP), data.order (the seeded
batch order), optim, precision, run_state (checkpoint contents, save / load, the final model), tracking.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from tunelab import run_files
from tunelab.training import checkpoint
from tunelab.config import Config, dump_config
from tunelab.data.order import Batches, item_length
from tunelab.training.distributed import Dist, full_state_dict, grad_sync, wrap
from tunelab.objectives.base import Objective, move_to, real_tokens
from tunelab.training.optim import lr_lambda, make_optimizer
from tunelab.modeling.precision import precision_context
from tunelab.training.preflight import check_disk_space, check_run, check_sharding, report_data
from tunelab.training.run_state import RunCheckpoints, TrainState, save_final, seed_everything


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


class TooManyBadSteps(Exception):
    pass


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, say=print):
        self.cfg = cfg
        self.say = say
        self.dist = Dist.from_env(single_rank_group=cfg.train.distributed == "fsdp")
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / run_files.CHECKPOINTS
        self._stop_signal: int | None = None
        # Everything that can be checked without loading anything heavy, once (rank 0), before the data and model.
        try:
            self.resume_from = self.dist.agree(lambda: check_run(cfg, resume, self.dist.world, say))
        except BaseException:
            self.dist.close()
            raise

    # -- setup

    def setup(self) -> None:
        """Tokenizer and data first (cheap, and where most mistakes are), then the model, then the wrapping."""
        from tunelab.modeling.build import build_model, build_tokenizer
        from tunelab.modeling.load import pick_device, quiet_imports
        from tunelab.objectives import make_objective, objective_class

        cfg, tc = self.cfg, self.cfg.train
        quiet_imports()
        seed_everything(tc.seed)
        self.device = pick_device()
        if self.device.type == "cpu" and tc.gradient_checkpointing:
            from tunelab.modeling.memory import return_freed_memory

            return_freed_memory()  # the memory-saving mode: also hand freed activations back (modeling/memory.py)
        self.autocast, self.scaler = precision_context(tc.precision, self.device)
        if self.device.type != "cuda" and tc.optimizer == "paged_adamw_8bit":
            make_optimizer(tc, nn.Linear(1, 1), self.device)  # raises the clear error before loading
        traits = objective_class(cfg.method)
        # Rank 0 first: it trains and saves a tokenizer (model.init) and writes the tokenized-data cache; the other
        # ranks then read both instead of racing it. A data mistake stops every rank with rank 0's message.
        with self.dist.main_first():
            self.tokenizer, added = build_tokenizer(cfg, traits.model_kind, traits.text_only, say=self.say)
            self.objective = make_objective(cfg, self.tokenizer)
            self.train_items, self.eval_items = self.objective.datasets()
        report_data(self.objective, self.train_items, self.eval_items, self.dist.main, self.say)
        check_sharding(cfg, self.objective)
        self.sharded = tc.distributed == "fsdp"
        self.model = build_model(cfg, traits.model_kind, self.device, self.tokenizer, added)
        from tunelab.modeling.attention import choose

        padding_free, line = choose(cfg, self.model)
        if line and self.dist.main:
            self.say(line)
        self.objective.setup(self.model, self.dist, padding_free)
        self.module = ObjectiveModule(self.model, self.objective).to(self.device)
        self.dist.agree(lambda: check_disk_space(cfg, self.module))
        self.wrapped, self._tied_names = wrap(self.module, self.device, self.dist, self.sharded)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(tc, self.module, self.device)
        window = tc.micro_batch_size * tc.grad_accum * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_items) / window))
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc, self.total_steps))
        self.state = TrainState()
        self.checkpoints = RunCheckpoints(cfg, self.dist, self.ckpt_root, self.module, self.optimizer, self.scheduler,
                                          self.scaler, self.objective, self.sharded)
        if self.resume_from is not None:
            self.state = self.checkpoints.load(self.resume_from)
            if self.dist.main:
                self.say(f"resumed from {self.resume_from} (step {self.state.step})")

    # -- steps

    def _collate(self, indices: list[int], items: list) -> dict:
        return move_to(self.objective.collate([items[i] for i in indices]), self.device)

    def _idle(self, batches: list[dict], units: int) -> dict | None:
        """When no token of the update carries loss on any rank (GRPO with every completion masked), the update
        is a no-op whose metrics are the objective's (e.g. the rollout's rewards), averaged over ranks."""
        idle = self.objective.idle_metrics(batches, units)
        if self.dist.sum(int(idle is None), self.device):
            return None
        out = {k: self.dist.sum(v, self.device) / self.dist.world for k, v in idle.items()}
        return {**out, "loss": 0.0, "grad_norm": 0.0, "tokens": 0, "idle": True}

    def _step(self, batches: list[dict]) -> dict | None:
        """One optimizer step over this rank's micro-batches; None when skipped as non-finite."""
        units = sum(self.objective.units(b) for b in batches)  # this rank's (RL: a sum over a GPU mask)
        idle = self._idle(batches, units)
        if idle is not None:
            return idle
        units = self.dist.sum(units, self.device)
        if units == 0:  # loss on a normaliser of 0 would be NaN: skipped (idle_metrics said some token counts)
            return None
        # DDP averages gradients over ranks; scaling by world makes that a sum, normalised by all units.
        scale = self.dist.world / units
        loss_sum, metric_sums, tokens = 0.0, {}, 0
        for i, batch in enumerate(batches):
            with grad_sync(self.wrapped, self.dist, self.sharded, sync=i == len(batches) - 1):
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: DTensor
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
        with warnings.catch_warnings():  # a first step without loss steps no optimizer, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()
        idle = sum(bool(m.pop("idle", False)) for m in done)
        keys = dict.fromkeys(k for m in done for k in m)  # an idle update logs no per-token metrics
        out = {k: sum(m[k] for m in done if k in m) / sum(k in m for m in done) for k in keys}
        out["tokens"] = sum(m["tokens"] for m in done)
        if len(updates) > 1:
            out["updates"] = len(done)
        if idle:
            out["updates_without_loss"] = idle
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
        ce = self.objective.eval_cross_entropy(out)
        if ce is not None:
            out["eval_perplexity"] = math.exp(min(ce, 50.0))
        return out

    # -- the loop

    def _on_signal(self, signum, frame):
        # A second Ctrl-C means "stop now, without the checkpoint". A repeated SIGTERM is the same request again:
        # supervisors repeat it, and the kernel's parent-death signal comes once per exiting thread of the parent.
        # Whoever must stop a run at once sends SIGKILL.
        if self._stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._stop_signal = signum
        if self.dist.main:
            self.say(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint ...")

    def run(self) -> Path:
        from tunelab.training.tracking import Tracker, plot_loss, progress_bar, summary

        self.setup()
        cfg, tc, state = self.cfg, self.cfg.train, self.state
        if self.dist.main:
            _write_atomic(self.run_dir / run_files.CONFIG, dump_config(cfg))
        tracker = Tracker(cfg, self.run_dir, resume_step=state.step) if self.dist.main else None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        lengths = [item_length(item) for item in self.train_items] if tc.group_by_length else None
        stream = Batches(len(self.train_items), tc.micro_batch_size, tc.seed, state, lengths)
        bar = progress_bar(cfg, self.total_steps, state.step) if self.dist.main else None
        started, tokens_at_start, step_at_start, stopped_early = time.time(), state.tokens, state.step, False
        self.module.train()
        try:
            while state.step < self.total_steps:
                window = stream.take(tc.grad_accum * self.dist.world)
                mine = window[self.dist.rank::self.dist.world]
                updates = list(self.objective.updates(self.module.model, (self._collate(i, self.train_items) for i in mine)))
                t0 = time.time()
                metrics = self._updates(updates)
                stop = self.dist.any(self._stop_signal is not None)  # every rank stops at the same step
                if metrics is None:
                    state.bad_steps += 1
                    state.skipped_total += 1
                    if self.dist.main:
                        self.say(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                                 f"({state.bad_steps} in a row, train.max_bad_steps={tc.max_bad_steps})")
                    if state.bad_steps >= tc.max_bad_steps:
                        raise TooManyBadSteps(self._bad_steps_message())
                    if stop:
                        self._interrupt(force_save=True)
                    continue
                state.bad_steps = 0
                state.step += 1
                if self.dist.main and metrics.get("updates_without_loss") == len(updates):
                    self.say(f"step {state.step}: no token carried loss (e.g. every completion masked as truncated), "
                             "so the weights did not change")
                state.tokens += metrics["tokens"]
                metrics["tokens_per_s"] = metrics["tokens"] / max(time.time() - t0, 1e-9)
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                metrics["epoch"] = state.epoch + state.micro / max(1, math.ceil(len(self.train_items) / tc.micro_batch_size))
                new_best = False
                if tc.eval_every and state.step % tc.eval_every == 0 or state.step == self.total_steps:
                    metrics.update(self.evaluate())
                    best_before = state.best_step
                    stopped_early = self._early_stopping(metrics)
                    new_best = state.best_step != best_before
                if state.skipped_total:
                    metrics["skipped_steps"] = state.skipped_total
                if tracker and (state.step % tc.log_every == 0 or "eval_loss" in metrics):
                    tracker.log(state.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                # Saved after the metrics line is written, so a resumed run's log has no gap. With early stopping the
                # best step is saved too: the final model is restored from it, and pruning keeps it.
                keep_best = new_best and bool(tc.early_stopping_patience)
                if tc.save_every and (state.step % tc.save_every == 0 or stopped_early or keep_best):
                    self.checkpoints.save(self.state)
                if stop:
                    self._interrupt()
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
        final = self._finish()
        elapsed = time.time() - started
        if self.dist.main:
            plot = None
            if cfg.log.plot:
                plot = plot_loss(self.run_dir / run_files.METRICS, self.run_dir / run_files.LOSS_PLOT)
            self.say(summary(state, self.total_steps, elapsed, state.step - step_at_start, state.tokens - tokens_at_start,
                             final, self.run_dir / run_files.METRICS, plot))
        return final

    def _early_stopping(self, metrics: dict) -> bool:
        state, patience = self.state, self.cfg.train.early_stopping_patience
        loss = metrics.get("eval_loss")
        if loss is None:
            return False
        if loss < state.best_eval:
            state.best_eval, state.best_step, state.patience = loss, state.step, 0
            return False
        state.patience += 1
        return bool(patience) and state.patience >= patience

    def _finish(self) -> Path:
        """With early stopping the final model is the best step's, restored from its checkpoint."""
        best = checkpoint.step_dir(self.ckpt_root, self.state.best_step)
        if self.cfg.train.early_stopping_patience and self.state.best_step and best.is_dir():
            if self.state.best_step != self.state.step:
                if self.dist.main:
                    self.say(f"restoring the best checkpoint (step {self.state.best_step}) for the final model")
                self.checkpoints.load_weights(best)
        full_state = full_state_dict(self.module, self._tied_names) if self.sharded and self.dist.initialized else None
        return save_final(self.run_dir, self.module.model, self.tokenizer, self.cfg, self.dist, full_state)

    def _interrupt(self, force_save: bool = False) -> None:
        self.checkpoints.save(self.state, force=force_save)  # on a stop request always, whatever train.save_every says
        where = checkpoint.step_dir(self.ckpt_root, self.state.step)
        raise Interrupted(
            f"stopped at step {self.state.step}/{self.total_steps}; checkpoint saved: {where}. Continue with: "
            f"tunelab train CONFIG --resume (the same config; a copy is in {self.run_dir / run_files.CONFIG})")

    def _bad_steps_message(self) -> str:
        tc, steps = self.cfg.train, checkpoint.list_steps(self.ckpt_root)
        last = (f"The last good checkpoint, {checkpoint.step_dir(self.ckpt_root, steps[-1])}, is intact"
                if steps else "No checkpoint had been saved yet (train.save_every)")
        return (f"{self.state.bad_steps} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{tc.max_bad_steps}); stopped after step {self.state.step}, skipped updates leave the weights "
                f"unchanged. {last}. Lower train.lr, check the data, or use precision: fp32, then continue with --resume")


def train(cfg: Config, resume: bool = False, say=print) -> Path:
    trainer = Trainer(cfg, resume=resume, say=say)
    finished = False
    try:
        final = trainer.run()
        if cfg.output.hub_model_id and trainer.dist.main:
            from tunelab.hub import push

            push(final, cfg.output.hub_model_id, private=cfg.output.hub_private, say=say)
        finished = True
        return final
    finally:
        # The DDP wrapper holds the process group; dropping it first lets the group end inside
        # destroy_process_group, while the interpreter is fully alive (see tunelab.__main__).
        trainer.__dict__.pop("wrapped", None)
        gc.collect()
        trainer.dist.close(finished)
