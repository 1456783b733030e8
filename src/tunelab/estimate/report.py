"""`tunelab estimate`'s printout of an Estimate."""

from __future__ import annotations

from .devices import GIB
from .planner import Estimate


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(est: Estimate) -> str:
    s, st = est.shape, est.settings
    mode = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[est.mode]
    lines = [
        f"{s.name or 'model'}: {_count(s.params)} params ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab}), "
        f"{mode}, {est.weight_dtype} weights, {est.compute_dtype} compute, on {est.device.name}",
        f"trainable: {_count(est.trainable)} ({100 * est.trainable / est.params:.2f} %)",
        f"step: micro-batch {st['micro_batch']} x {st['max_length']} tokens, grad_accum {st['grad_accum']}, "
        f"gradient checkpointing {'on' if st['checkpointing'] else 'off'}, {st['optimizer']}",
        f"path: {'padding-free' if est.padding_free else 'packed' if st['packing'] else 'padded'} micro-batches "
        f"(data.padding_free {st['padding_free_setting']}{', data.packing' if st['packing'] else ''})",
    ]
    unit, size = ("GiB", GIB) if est.total_bytes >= GIB else ("MiB", 2**20)
    lines += ["", f"{'memory':<14}{unit:>8}"]
    for key, n in est.memory.items():
        if n or key != "other":
            lines.append(f"  {key:<12}{n / size:8.2f}  {est.labels.get(key, '')}")
    lines.append(f"  {'peak':<12}{est.peak_bytes / size:8.2f}  = {est.peak_rule}")
    if est.overhead_bytes:
        if est.device.cuda:
            lines.append(f"  {'runtime':<12}{est.overhead_bytes / size:8.2f}  CUDA context and workspaces, "
                         "allocator slack")
        else:
            lines.append(f"  {'baseline':<12}{(est.overhead_bytes - est.heap_bytes) / size:8.2f}  process before "
                         "any tensor: interpreter, torch, transformers, peft (measured)")
            if est.heap_bytes:
                lines.append(f"  {'heap':<12}{est.heap_bytes / size:8.2f}  freed activations glibc's heap keeps "
                             "(measured: about the activations once more)")
        lines.append(f"  {'total':<12}{est.total_bytes / size:8.2f}")
    if est.memory_gb is not None:
        verdict = "yes" if est.fits else "NO"
        lines.append(f"fits in {est.memory_gb:g} GiB: {verdict} ({est.total_bytes / GIB:.1f} GiB)")
        if est.switches:
            lines.append("switches (predicted total):")
            for name, total in est.switches:
                mark = "fits" if total <= est.memory_gb else "    "
                lines.append(f"  {mark}  {total:7.2f} GiB  {name}")
    lines.append("")
    lines.append(f"compute: {est.flops_per_token / 1e9:.3g} GFLOP per token")
    if est.tokens_per_epoch:
        lines.append(f"tokens per epoch: {est.tokens_per_epoch:,} ({est.tokens_source})")
        if est.seconds_per_epoch is not None:
            epochs = st["epochs"]
            total = f", {epochs:g} epochs: {_duration(epochs * est.seconds_per_epoch)}" if epochs != 1 else ""
            dev = est.device
            lines.append(f"time per epoch: {_duration(est.seconds_per_epoch)} (at {dev.tflops * dev.mfu:.3g} TFLOP/s = "
                         f"{dev.mfu:.0%} of {dev.tflops:.3g} TFLOP/s, {dev.rate_source}){total}")
    else:
        lines.append(f"time per epoch: unknown ({est.tokens_source})")
    lines.append("assumptions: " + "; ".join(est.assumptions))
    return "\n".join(lines)
