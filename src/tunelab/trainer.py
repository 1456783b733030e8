"""The one training loop: accumulation, precision, clipping, schedule, eval, checkpoints, resume.

Every objective runs through `train`. An objective supplies data, collation and a *summed* loss;
the loop owns everything else, so resume, DDP, NaN guards and logging work the same for SFT, DPO,
PPO or distillation.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunelab import checkpoint
from tunelab.config import Config, TrainConfig, UserError, dump_config, load_config
from tunelab.data.order import Batches, item_length
from tunelab.distributed import Dist, full_state_dict, grad_sync, wrap
from tunelab.objectives.base import Objective, move_to, real_tokens
from tunelab.precision import precision_context


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


class TooManyBadSteps(Exception):
    pass


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
        # The fused kernel updates each parameter in one pass; on CPU it is several times faster than the
        # foreach path, which makes ~6 full passes over the weights and both moments (bench/README.md).
        fused = device.type in ("cuda", "cpu")
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


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns that it assumes one process when no process group exists: that is intended
    (an FSDP-format checkpoint written or read by a single process)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


# ---------------------------------------------------------------- the run

# What fixes the weights, the data and its order. train.grad_accum is checked as part of the global batch
# (micro_batch_size x grad_accum x ranks), so a resume on another number of ranks stays exact when that is kept.
RESUME_KEYS = ("model", "adapter", "method", "data", "tokenizer", "train.micro_batch_size", "train.seed",
               "train.optimizer", "train.distributed", "train.group_by_length")


def _check_resume_compatible(saved: dict, cfg: Config, source: str, saved_world: int = 1, world: int = 1) -> None:
    old, new = saved, cfg.model_dump(mode="json")
    accum = (old.get("train") or {}).get("grad_accum")
    if accum is not None and accum * saved_world != cfg.train.grad_accum * world:
        fix = (f"; on {world} rank(s) set train.grad_accum: {accum * saved_world // world}"
               if accum * saved_world % world == 0 else "")
        raise UserError(
            f"--resume: the global batch changed since {source} was written (train.grad_accum x ranks: "
            f"{accum} x {saved_world} -> {cfg.train.grad_accum} x {world}); that breaks an exact resume{fix}")
    for key in RESUME_KEYS:
        a, b = old, new
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            raise UserError(
                f"--resume: '{key}' changed since {source} was written ({a!r} -> {b!r}); "
                "that breaks an exact resume. Restore it, or start a new run with another output_dir"
            )


def _check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        culprit = f" ({e.filename})" if e.filename and str(e.filename) != str(run_dir) else ""
        raise UserError(f"output_dir {run_dir} is not writable: {e.strerror or e}{culprit}") from None


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
        self.ckpt_root = self.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        # Everything that can be checked without loading anything heavy, once (rank 0), before the data and model.
        try:
            self.resume_from = self.dist.agree(lambda: self._preflight(resume))
        except BaseException:
            self.dist.close()
            raise

    def _preflight(self, resume: bool) -> Path | None:
        from tunelab.objectives import REGISTRY

        cfg = self.cfg
        if cfg.method not in REGISTRY:
            raise UserError(f"method: {cfg.method} is not available in this version (available: {', '.join(REGISTRY)})")
        if cfg.train.distributed == "fsdp" and cfg.model.quantize:
            raise UserError("train.distributed: fsdp cannot shard 4-bit (model.quantize) weights; use distributed: ddp "
                            "for QLoRA, or leave out model.quantize to shard a full-precision model")
        _check_output_dir(self.run_dir)
        for line in checkpoint.clean_leftovers(self.ckpt_root):
            self.say(line)
        final, old = self.run_dir / "final", self.run_dir / ".final-old"
        if old.is_dir() and not final.exists():  # killed while swapping in a new final/: the old one is whole
            os.rename(old, final)
        for leftover in (self.run_dir / ".final-tmp", old):
            shutil.rmtree(leftover, ignore_errors=True)
        if cfg.model.path and cfg.model.init is None:
            from tunelab.model import check_model_dir

            check_model_dir(cfg.model.path, cfg.model.allow_pickle)
        if not resume:
            if checkpoint.list_steps(self.ckpt_root):
                raise UserError(
                    f"{self.ckpt_root} already holds checkpoints; continue with `tunelab train CONFIG --resume`, "
                    "or set another output_dir")
            return None
        return self._find_resume()

    def _find_resume(self) -> Path:
        path = checkpoint.latest_valid(self.ckpt_root, warn=self.say, quarantine=True)
        if path is None:
            raise UserError(f"--resume: no usable checkpoint in {self.ckpt_root}")
        meta = checkpoint.manifest(path).get("meta", {})
        saved = meta.get("config")
        if saved is not None:
            _check_resume_compatible(saved, self.cfg, str(path), meta.get("world_size", 1), self.dist.world)
        elif (self.run_dir / "config.yaml").is_file():
            saved_cfg = load_config(self.run_dir / "config.yaml")
            _check_resume_compatible(saved_cfg.model_dump(mode="json"), self.cfg, str(self.run_dir / "config.yaml"))
        if checkpoint.is_sharded(path) != (self.cfg.train.distributed == "fsdp"):
            raise UserError(f"--resume: {path} was written with train.distributed: "
                            f"{'fsdp' if checkpoint.is_sharded(path) else 'ddp'}; resume with the same setting")
        return path

    # -- setup

    def setup(self) -> None:
        """Tokenizer and data first (cheap, and where most mistakes are), then the model, then the wrapping."""
        from tunelab.model import build_model, build_tokenizer, pick_device, quiet_imports
        from tunelab.objectives import make_objective, model_kind

        cfg, tc = self.cfg, self.cfg.train
        quiet_imports()
        seed_everything(tc.seed)
        self.device = pick_device()
        if self.device.type == "cpu" and tc.gradient_checkpointing:
            from tunelab.memory import return_freed_memory

            return_freed_memory()  # the memory-saving mode: also hand freed activations back (tunelab/memory.py)
        self.autocast, self.scaler = precision_context(tc.precision, self.device)
        if self.device.type != "cuda" and tc.optimizer == "paged_adamw_8bit":
            make_optimizer(tc, nn.Linear(1, 1), self.device)  # raises the clear error before loading
        kind = model_kind(cfg.method)
        # Rank 0 first: it trains and saves a tokenizer (model.init) and writes the tokenized-data cache; the other
        # ranks then read both instead of racing it. A data mistake stops every rank with rank 0's message.
        with self.dist.main_first():
            self.tokenizer, added = build_tokenizer(cfg, kind, say=self.say)
            self.objective = make_objective(cfg, self.tokenizer)
            self.train_items, self.eval_items = self.objective.datasets()
        self._report_data()
        self.sharded = tc.distributed == "fsdp"
        if self.sharded and self._on_policy():
            raise UserError(f"train.distributed: fsdp does not support method {cfg.method} yet (it generates with the "
                            "model outside the sharded forward pass); use distributed: ddp")
        self.model = build_model(cfg, kind, self.device, self.tokenizer, added)
        self.objective.setup(self.model)
        self.module = ObjectiveModule(self.model, self.objective).to(self.device)
        self.dist.agree(lambda: self._check_disk_space())
        self.wrapped, self._tied_names = wrap(self.module, self.device, self.dist, self.sharded)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(tc, self.module, self.device)
        window = tc.micro_batch_size * tc.grad_accum * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_items) / window))
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc, self.total_steps))
        self.state = TrainState()
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _on_policy(self) -> bool:
        base = Objective
        cls = type(self.objective)
        return cls.stream is not base.stream or getattr(cls, "updates", None) is not getattr(base, "updates", None)

    def _report_data(self) -> None:
        """Say what the data came to, the rows skipped (data.skip_bad_rows) and dropped (no loss tokens) counted;
        refuse when nothing is left to train on, naming where the rows went."""
        stats = self.objective.log_stats() or {}
        skipped, dropped = stats.get("skipped_bad_rows", 0), stats.get("dropped_no_loss", 0)
        where = ", ".join(stats.get("dropped_lines", []))
        notes = []
        if skipped:
            first = stats.get("skipped_errors") or []
            notes.append(f"skipped {skipped} bad rows (data.skip_bad_rows)" + (f", first: {first[0]}" if first else ""))
        if dropped:
            notes.append(f"dropped {dropped} rows with no loss tokens after masking/truncation"
                         + (f" ({where}{', ...' if dropped > len(stats.get('dropped_lines', [])) else ''})" if where else ""))
        if not self.train_items:
            detail = "; ".join(notes) or "the data produced no examples"
            raise UserError(f"no training examples left after loading and filtering the data: {detail}. "
                            "Check data.max_length (truncation), data.train_on_prompt and the assistant turns")
        if self.dist.main:
            self.say(f"data: {len(self.train_items)} training / {len(self.eval_items)} eval examples"
                     + (f"; {'; '.join(notes)}" if notes else ""))

    def _check_disk_space(self) -> None:
        """Refuse before training when the checkpoints and the final model cannot fit in output_dir's free space."""
        tc = self.cfg.train
        params = list(self.module.parameters())
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        n_trainable = sum(p.numel() for p in params if p.requires_grad)
        moment_bytes = 1 if tc.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 4
        one_ckpt = trainable + 2 * n_trainable * moment_bytes
        n_ckpts = (tc.keep_checkpoints + 1 + bool(tc.early_stopping_patience)) if tc.save_every else 0
        final = trainable if self.cfg.adapter is not None else sum(
            p.numel() * p.element_size() for p in params if p.dtype.is_floating_point)
        need = n_ckpts * one_ckpt + final - checkpoint.bytes_on_disk(self.ckpt_root)
        free = shutil.disk_usage(self.run_dir).free
        if need > free:
            gb = 1e9
            raise UserError(
                f"output_dir {self.run_dir}: {free / gb:.3g} GB free, but this run writes about {need / gb:.3g} GB "
                f"({n_ckpts} checkpoints of {one_ckpt / gb:.3g} GB at train.keep_checkpoints={tc.keep_checkpoints}, "
                f"plus the final model of {final / gb:.3g} GB). Free space, lower train.keep_checkpoints, "
                "or set another output_dir")

    # -- checkpoints

    def _save(self) -> Path | None:
        """Checkpoint the current step (at most once per step). Rank 0 writes alone, except with FSDP, where every rank
        writes its shards into the same temporary dir. A failed write raises CheckpointWriteError on every rank."""
        if self._saved_step == self.state.step:
            return None
        tc = self.cfg.train
        self.state.rng = rng_state()
        state = {
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(self.state),
            "objective": self.objective.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        protect = {self.state.best_step} if tc.early_stopping_patience else set()
        meta = {"config": self.cfg.model_dump(mode="json"), "world_size": self.dist.world}
        if self.sharded:
            path = self._save_sharded(state, protect, meta)
        else:
            path, error = None, None
            if self.dist.main:
                state["optimizer"] = self.optimizer.state_dict()
                try:
                    path = checkpoint.save(self.ckpt_root, self.state.step, trainable_state(self.module), state,
                                           tc.keep_checkpoints, protect, meta)
                except checkpoint.CheckpointWriteError as e:
                    error = str(e)
            error = self.dist.from_main(error)
            if error is not None:
                raise checkpoint.CheckpointWriteError(error)
        self._saved_step = self.state.step
        return path

    def _sharded_state(self, optimizer: bool = True):
        """(trainable weights, optimizer state) as torch.distributed.checkpoint state dicts: this rank's shards."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        names = set(trainable_state(self.module))
        if optimizer:
            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        else:
            model_sd, optim_sd = get_model_state_dict(self.module), None
        return {k: v for k, v in model_sd.items() if k in names}, optim_sd

    def _save_sharded(self, state: dict, protect: set[int], meta: dict) -> Path | None:
        import torch.distributed.checkpoint as dcp

        root, step, tc = self.ckpt_root, self.state.step, self.cfg.train
        error = None
        if self.dist.main:
            try:
                checkpoint.begin(root, step)
            except checkpoint.CheckpointWriteError as e:
                error = str(e)
        error = self.dist.from_main(error)
        if error is not None:
            raise checkpoint.CheckpointWriteError(error)
        tmp = checkpoint.tmp_dir(root, step)
        model_sd, optim_sd = self._sharded_state()
        failure = None
        try:
            with _quiet_dcp():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / checkpoint.SHARDED)
            if self.dist.main:
                torch.save(state, tmp / checkpoint.STATE)
        except Exception as e:  # an OSError, or dcp's CheckpointException carrying one from some rank
            failure = e
        path = None
        if self.dist.any(failure is not None):
            if self.dist.main:
                try:
                    checkpoint.abort(root, step, failure or OSError("another rank failed to write its shard"))
                except checkpoint.CheckpointWriteError as e:
                    error = str(e)
        elif self.dist.main:
            try:
                path = checkpoint.commit(root, step, tc.keep_checkpoints, protect, meta)
            except checkpoint.CheckpointWriteError as e:
                error = str(e)
        error = self.dist.from_main(error)
        if error is not None:
            raise checkpoint.CheckpointWriteError(error)
        return path

    def _load(self, path: Path) -> None:
        weights, state = checkpoint.load(path, verify=False)  # rank 0 verified it in _find_resume
        if self.sharded:
            self._load_sharded(path, optimizer=True)
        else:
            self._load_weights(weights, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["trainer"])
        self.objective.load_state_dict(state.get("objective", {}))
        set_rng_state(self.state.rng)
        self._saved_step = self.state.step
        if self.dist.main:
            self.say(f"resumed from {path} (step {self.state.step})")

    def _load_sharded(self, path: Path, optimizer: bool) -> None:
        """Load a torch.distributed.checkpoint written at any world size into this rank's shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        model_sd, optim_sd = self._sharded_state(optimizer)
        sd = {"model": model_sd, **({"optim": optim_sd} if optimizer else {})}
        try:
            with _quiet_dcp():
                dcp.load(sd, checkpoint_id=path / checkpoint.SHARDED)
        except Exception as e:  # dcp reports a missing key as a CheckpointException / RuntimeError
            raise UserError(f"checkpoint {path} does not match this model's trainable parameters "
                            f"(was the adapter or model config changed?): {str(e).splitlines()[0][:300]}") from None
        options = StateDictOptions(strict=False)
        if optimizer:
            set_state_dict(self.module, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=options)
        else:
            set_model_state_dict(self.module, sd["model"], options=options)

    def _load_weights(self, weights: dict[str, torch.Tensor], path: Path | None = None) -> None:
        expected = trainable_state(self.module)
        if set(weights) != set(expected):
            raise UserError(f"checkpoint {path or ''} does not match this model's trainable parameters "
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
        if self.dist.main:
            self.say(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint ...")

    def run(self) -> Path:
        from tunelab.tracking import Tracker, plot_loss

        self.setup()
        cfg, tc, state = self.cfg, self.cfg.train, self.state
        if self.dist.main:
            _write_atomic(self.run_dir / "config.yaml", dump_config(cfg))
        tracker = Tracker(cfg, self.run_dir, resume_step=state.step) if self.dist.main else None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        lengths = [item_length(item) for item in self.train_items] if tc.group_by_length else None
        stream = Batches(len(self.train_items), tc.micro_batch_size, tc.seed, state, lengths)
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
                    self._save()
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
            return False
        state.patience += 1
        return bool(patience) and state.patience >= patience

    def _finish(self, stopped_early: bool) -> Path:
        from tunelab.model import save_model

        final = self.run_dir / "final"
        best = checkpoint.step_dir(self.ckpt_root, self.state.best_step)
        if self.cfg.train.early_stopping_patience and self.state.best_step and best.is_dir():
            if self.state.best_step != self.state.step:
                if self.dist.main:
                    self.say(f"restoring the best checkpoint (step {self.state.best_step}) for the final model")
                if self.sharded:
                    self._load_sharded(best, optimizer=False)
                else:
                    self._load_weights(checkpoint.load(best)[0], best)
        full_state = full_state_dict(self.module, self._tied_names) if self.sharded and self.dist.initialized else None
        error = None
        if self.dist.main:
            tmp, old = self.run_dir / ".final-tmp", self.run_dir / ".final-old"
            try:  # written beside, then swapped in: a crash leaves the previous final/ or the new one, whole
                if tmp.exists():
                    shutil.rmtree(tmp)
                save_model(self.module.model, self.tokenizer, tmp, state_dict=full_state)
                (tmp / "config.yaml").write_text(dump_config(self.cfg))
                if final.exists():
                    os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                error = (f"could not write the final model to {final}: {e.strerror or e}"
                         f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}; the checkpoints in "
                         f"{self.ckpt_root} are intact. Free space and continue with --resume")
        error = self.dist.from_main(error)
        if error is not None:
            raise checkpoint.CheckpointWriteError(error)
        return final

    def _interrupt(self, force_save: bool = False) -> None:
        if force_save:
            self._saved_step = None
        self._save()  # on a stop request always, whatever train.save_every says
        where = checkpoint.step_dir(self.ckpt_root, self.state.step)
        raise Interrupted(
            f"stopped at step {self.state.step}/{self.total_steps}; checkpoint saved: {where}. Continue with: "
            f"tunelab train CONFIG --resume (the same config; a copy is in {self.run_dir / 'config.yaml'})")

    def _bad_steps_message(self) -> str:
        tc, steps = self.cfg.train, checkpoint.list_steps(self.ckpt_root)
        last = (f"The last good checkpoint, {checkpoint.step_dir(self.ckpt_root, steps[-1])}, is intact"
                if steps else "No checkpoint had been saved yet (train.save_every)")
        return (f"{self.state.bad_steps} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{tc.max_bad_steps}); stopped after step {self.state.step}, skipped updates leave the weights "
                f"unchanged. {last}. Lower train.lr, check the data, or use precision: fp32, then continue with --resume")

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
    trainer = Trainer(cfg, resume=resume, say=say)
    finished = False
    try:
        final = trainer.run()
        finished = True
        return final
    finally:
        # The DDP wrapper holds the process group; dropping it first lets the group end inside
        # destroy_process_group, while the interpreter is fully alive (see tunelab.__main__).
        trainer.__dict__.pop("wrapped", None)
        gc.collect()
        trainer.dist.close(finished)
