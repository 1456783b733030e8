"""What a checkpoint of a run holds, and how it comes back.

A run's state is its trainable weights, the optimizer, the LR schedule, the fp16 scaler, the objective's own state
(e.g. PPO's adaptive KL), the loop's counters (TrainState: step, data position, best eval) and the RNG streams.
`RunCheckpoints` writes them into the atomic checkpoint directories of checkpoint.py, plainly from rank 0 or, with
FSDP, as a torch.distributed.checkpoint directory every rank writes its shards into; loading restores all of it,
so a resumed run continues as the interrupted one would have. `save_final` writes the finished model.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunelab import run_files
from tunelab.training import checkpoint
from tunelab.config import Config, UserError, dump_config
from tunelab.training.distributed import Dist


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


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns that it assumes one process when no process group exists: that is intended
    (an FSDP-format checkpoint written or read by a single process)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        yield


class RunCheckpoints:
    """Saves and restores one run's state in `root` (output_dir/checkpoints)."""

    def __init__(self, cfg: Config, group: Dist, root: Path, module: nn.Module, optimizer, scheduler, scaler,
                 objective, sharded: bool):
        self.cfg, self.dist, self.root = cfg, group, root
        self.module, self.optimizer, self.scheduler, self.scaler = module, optimizer, scheduler, scaler
        self.objective, self.sharded = objective, sharded
        self.saved_step: int | None = None  # a step is saved at most once, unless forced

    def save(self, train_state: TrainState, force: bool = False) -> Path | None:
        """Checkpoint the current step (at most once per step, unless `force`). Rank 0 writes alone, except with FSDP,
        where every rank writes its shards into the same temporary dir. A failed write raises CheckpointWriteError on
        every rank."""
        if self.saved_step == train_state.step and not force:
            return None
        tc = self.cfg.train
        train_state.rng = rng_state()
        state = {
            "scheduler": self.scheduler.state_dict(),
            "trainer": asdict(train_state),
            "objective": self.objective.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        protect = {train_state.best_step} if tc.early_stopping_patience else set()
        meta = {"config": self.cfg.model_dump(mode="json"), "world_size": self.dist.world}
        if self.sharded:
            path = self._save_sharded(train_state.step, state, protect, meta)
        else:
            path, error = None, None
            if self.dist.main:
                state["optimizer"] = self.optimizer.state_dict()
                try:
                    path = checkpoint.save(self.root, train_state.step, trainable_state(self.module), state,
                                           tc.keep_checkpoints, protect, meta)
                except checkpoint.CheckpointWriteError as e:
                    error = str(e)
            error = self.dist.from_main(error)
            if error is not None:
                raise checkpoint.CheckpointWriteError(error)
        self.saved_step = train_state.step
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

    def _save_sharded(self, step: int, state: dict, protect: set[int], meta: dict) -> Path | None:
        import torch.distributed.checkpoint as dcp

        root, tc = self.root, self.cfg.train
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

    def load(self, path: Path) -> TrainState:
        """Everything a checkpoint holds back into place; returns the loop's counters."""
        weights, state = checkpoint.load(path, verify=False)  # rank 0 verified it before the run started
        if self.sharded:
            self._load_sharded(path, optimizer=True)
        else:
            self._load_weights(weights, path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        train_state = TrainState(**state["trainer"])
        self.objective.load_state_dict(state.get("objective", {}))
        set_rng_state(train_state.rng)
        self.saved_step = train_state.step
        return train_state

    def load_weights(self, path: Path) -> None:
        """Only the trainable weights (restoring the best step for the final model)."""
        if self.sharded:
            self._load_sharded(path, optimizer=False)
        else:
            self._load_weights(checkpoint.load(path)[0], path)

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


def save_final(run_dir: Path, model: nn.Module, tokenizer, cfg: Config, group: Dist,
               state_dict: dict | None = None) -> Path:
    """Rank 0 writes `run_dir/final` (an adapter dir or a full model dir, with the run's config.yaml) beside the
    old one, then swaps it in: a crash leaves the previous final/ or the new one, whole. A failed write raises
    CheckpointWriteError on every rank; the checkpoints are untouched."""
    from tunelab.modelcard import write_model_card
    from tunelab.modeling.build import save_model

    final = run_dir / run_files.FINAL
    error = None
    if group.main:
        tmp, old = run_dir / run_files.FINAL_TMP, run_dir / run_files.FINAL_OLD
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            save_model(model, tokenizer, tmp, state_dict=state_dict)
            (tmp / run_files.CONFIG).write_text(dump_config(cfg))
            write_model_card(tmp, cfg)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = (f"could not write the final model to {final}: {e.strerror or e}"
                     f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}; the checkpoints in "
                     f"{run_dir / 'checkpoints'} are intact. Free space and continue with --resume")
    error = group.from_main(error)
    if error is not None:
        raise checkpoint.CheckpointWriteError(error)
    return final
