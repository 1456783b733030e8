"""Running on several processes: the process group and the collectives the loop needs (Dist), wrapping the
model for DDP or FSDP2, switching gradient reduction off inside an accumulation window, and gathering a sharded
model's weights for saving. Started by torchrun (`tunelab train --nproc N`, --nnodes, or an outside torchrun),
or one process per task by an outside `srun` (Slurm's variables stand in for torchrun's); on one process every
collective is a no-op, so the loop calls them unconditionally."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tunelab.config import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, single_rank_group: bool = False) -> "Dist":
        """From torchrun's variables (or srun's, see adopt_slurm_env). A process group is started for world > 1, and for a world of 1 under torchrun
        when `single_rank_group` (FSDP on one GPU still shards through the same collectives)."""
        adopt_slurm_env(os.environ)
        world = int(os.environ.get("WORLD_SIZE", 1))
        wanted = world > 1 or (single_rank_group and "WORLD_SIZE" in os.environ)
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        owns = wanted and not dist.is_initialized()
        if owns:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return cls(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)), owns)

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, value: float | torch.Tensor, device=None) -> float:
        if not self.initialized:
            return float(value)
        t = torch.as_tensor(float(value), dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (a stop request, a failed write)."""
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, fn):
        """Run `fn` on rank 0 only and give its result to every rank; a UserError it raises is raised on every rank
        (so no rank waits forever at a collective its peer never reaches)."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        result, error = self.from_main((result, error))
        if error is not None:
            raise UserError(error)
        return result

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it trains the tokenizer, writes caches); the others wait, then run it and read
        what rank 0 wrote. If rank 0 fails, the others fail with its message instead of waiting forever."""
        if not self.initialized:
            yield
            return
        if self.main:
            try:
                yield
            except BaseException as e:
                self.from_main(str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}")
                raise
            self.from_main(None)
        else:
            error = self.from_main(None)
            if error is not None:
                raise UserError(error)
            yield

    def close(self, finished: bool = False) -> None:
        """End the group this run started. After a finished run every rank waits for the others first, so no rank
        tears its connections down while a peer still has a collective in flight."""
        if self.owns_group and self.initialized:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def adopt_slurm_env(env) -> None:
    """A process started by `srun` as one of several tasks, with no torchrun: set torchrun's variables from
    Slurm's, which is all init_process_group needs. The step's own task count (SLURM_STEP_NUM_TASKS, set by srun
    only) decides, not the job's, so a batch script that runs tunelab once is one process. The rendezvous is on the
    step's first node, at MASTER_PORT if set, else a port every task derives from the job id."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if "WORLD_SIZE" in env or tasks < 2:
        return
    env["WORLD_SIZE"] = str(tasks)
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))


def first_host(nodelist: str) -> str:
    """The first name in a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03" (what `scontrol show hostnames` would
    print first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def wrap(module: nn.Module, device: torch.device, group: Dist, sharded: bool) -> tuple[nn.Module, set[str]]:
    """(what the loop calls forward on, the tied parameter names a gathered state dict must leave out).
    FSDP2 shards `module` in place; DDP wraps it; on one process it is used as it is."""
    if sharded and group.initialized:
        return module, shard(module)
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None), set()
    return module, set()


def shard(module: nn.Module) -> set[str]:
    """FSDP2: each decoder layer its own unit, then the root (the trainer's ObjectiveModule: embeddings, head, the
    objective's modules), whose forward runs the whole loss so every parameter is gathered while it is used.
    Returns the names of tied parameters after the first (see full_state_dict)."""
    from torch.distributed.fsdp import fully_shard

    from tunelab.modeling.load import unwrap

    hf = unwrap(module.model)
    # Tied weights (input embedding = output head) are one parameter under two names; gathered, they become two
    # tensors, and save_pretrained expects the second name left out, as an unsharded model's state dict does.
    seen: set[int] = set()
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    names = set(getattr(hf, "_no_split_modules", None) or ())
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:  # no hint from transformers: shard each block of the longest ModuleList
        lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    return tied


def grad_sync(wrapped: nn.Module, group: Dist, sharded: bool, sync: bool):
    """Reduce gradients across ranks only on the last micro-batch of an update (DDP no_sync, FSDP2's switch)."""
    if sync or not group.initialized:
        return contextlib.nullcontext()
    if sharded:
        return _fsdp_no_sync(wrapped)
    return wrapped.no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_state_dict(module: nn.Module, tied: set[str]) -> dict[str, torch.Tensor]:
    """FSDP: the whole model's weights gathered onto rank 0's CPU (empty on the other ranks), keyed as the
    unwrapped model names them, for save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.") and k not in tied}
