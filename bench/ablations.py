"""Patches that switch one technique off (or an experimental one on) inside a tunelab child run, so each
technique's effect is measured against the shipped code path on identical work. Named in a spec's "patches"."""

from __future__ import annotations


def ce_checkpoint():
    """The SFT loss's previous head path: each chunk of logits recomputed under activation checkpointing,
    instead of losses.chunked_cross_entropy's gradients-in-forward."""
    from tunelab.objectives import forward

    forward.plain_linear = lambda head: None


def _optimizer(fused: bool):
    import torch

    from tunelab.training import loop as trainer

    original = trainer.make_optimizer

    def make(tc, module, device):
        opt = original(tc, module, device)
        if isinstance(opt, torch.optim.AdamW):
            opt = torch.optim.AdamW(opt.param_groups, lr=tc.lr, betas=tc.adam_betas, fused=fused,
                                    foreach=None if fused else True)
        return opt

    trainer.make_optimizer = make


def adamw_fused():
    """torch's fused AdamW kernel (one pass over each parameter's state) instead of the foreach one."""
    _optimizer(True)


def adamw_foreach():
    _optimizer(False)


def compile_layers():
    """torch.compile each decoder layer (dynamic shapes: batch lengths vary). Compilation happens in the untimed
    warm-up step; its cost is reported separately as the child's warm-up time."""
    import torch

    from tunelab.training import loop as trainer

    setup = trainer.Trainer.setup

    def patched(self):
        setup(self)
        from tunelab.modeling.load import unwrap

        layers = unwrap(self.model).model.layers
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer, dynamic=True)

    trainer.Trainer.setup = patched


def no_lora_dropout():
    """LoRA dropout 0 (a hyper-parameter change, measured only to size what dropout costs)."""
    from tunelab.modeling import build as model

    attach = model.attach_adapter

    def patched(m, ac, **kw):
        return attach(m, ac.model_copy(update={"dropout": 0.0}), **kw)

    model.attach_adapter = patched


def malloc_fixed():
    """glibc's mmap threshold fixed at 64 KiB (tunelab.modeling.memory.return_freed_memory) from the start of the run."""
    from tunelab.modeling.memory import return_freed_memory

    assert return_freed_memory()


def malloc_default():
    """glibc's default, dynamic mmap threshold: skip tunelab.modeling.memory.return_freed_memory."""
    from tunelab.modeling import memory

    memory.return_freed_memory = lambda: False


def malloc_trim_steps():
    """Return the heap's free pages to the OS after every optimizer step (glibc malloc_trim), default threshold."""
    import ctypes

    from tunelab.training import loop as trainer

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    step = trainer.Trainer._step

    def patched(self, batches):
        out = step(self, batches)
        trim(0)
        return out

    trainer.Trainer._step = patched
