"""The estimate of a run: its counts put together with a device and the data, the assumptions behind them, and
the switches that would make a run that does not fit fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import PADDING_FREE_METHODS, Config, wants_padding_free

from .counting import _dtypes, flops_per_token, memory_breakdown
from .devices import CPU_BASELINE, GIB, Device, get_device
from .shapes import ModelShape, model_shape
from .tokens import Batches, count_tokens, local_tokenizer, run_batches


@dataclass
class Estimate:
    shape: ModelShape
    mode: str  # full | lora | qlora
    device: Device
    weight_dtype: str
    compute_dtype: str
    params: int
    trainable: int
    memory: dict[str, float]  # bytes by component (peak_rule says how they combine)
    labels: dict[str, str]  # a short note per component
    peak_bytes: float  # tensors at the peak moment of a step
    peak_rule: str  # how the memory parts combine into the peak
    overhead_bytes: float  # CUDA context and allocator slack, or the CPU process baseline, on top
    padding_free: bool  # the path the run takes: padding-free or padded micro-batches
    flops_per_token: float
    tokens_per_epoch: int | None
    tokens_source: str
    seconds_per_epoch: float | None
    memory_gb: float | None
    settings: dict
    switches: list[tuple[str, float]] = field(default_factory=list)  # (change, its predicted total GiB)
    assumptions: list[str] = field(default_factory=list)
    heap_bytes: float = 0  # CPU: freed activation memory glibc's heap keeps (part of overhead_bytes)

    @property
    def total_bytes(self) -> float:
        return self.peak_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.memory_gb is None else self.total_bytes <= self.memory_gb * GIB


def estimate(cfg: Config, device: str | None = None, memory_gb: float | None = None, tokens: int | None = None,
             chunked_ce: bool = True, shape: ModelShape | None = None, suggest: bool = True) -> Estimate:
    """Parameters, peak memory, fit and time per epoch of `cfg` on `device`.

    `chunked_ce`: the loss computes logits in chunks over label positions (tunelab's SFT loss does);
    False for a plain `model(input_ids, labels=...)` loss. `tokens`: training tokens per epoch, instead
    of reading the data. `shape`: skip reading the model config.

    The run's path decides what a step holds: padded or padding-free micro-batches, by the rule the trainer applies
    (`config.wants_padding_free`; `auto` falls back to padded at run time only for a model that cannot keep documents
    apart, which needs the weights to tell). With the tokenizer on disk the data is tokenized as the run does it and
    the first epoch's micro-batches are formed in its seeded order; otherwise the tokens are bytes / 4.
    """
    dev = get_device(device) if isinstance(device, str) or device is None else device
    shape = shape or model_shape(cfg)
    padding_free = wants_padding_free(cfg)
    batches = run_batches(cfg, padding_free) if tokens is None else None
    m = memory_breakdown(cfg, shape, dev, chunked_ce, batches, padding_free)
    overhead = (GIB + 0.05 * m.peak) if dev.cuda else CPU_BASELINE + m.heap_retained
    if memory_gb is None and dev.memory_gib:
        memory_gb = dev.memory_gib
    tc = cfg.train
    seq = cfg.data.max_length
    adapter = m.params - shape.params
    fpt = flops_per_token(shape, seq, train_base=cfg.adapter is None, adapter_params=adapter,
                          checkpointing=tc.gradient_checkpointing)
    if chunked_ce:
        fpt += 2 * shape.vocab * shape.hidden  # the loss chunks recompute the head's forward
    source = "given" if tokens else "no token count given"
    flops = None
    if batches is not None:
        tokens, source = batches.tokens, batches.source
        # The layers compute the padding too; the head only the labelled positions (the chunked loss); attention
        # (linear in the length it sees, per token) runs over what attends: each document, or each padded row. A
        # causal kernel skips the masked half that flops_per_token leaves out; a padded batch's explicit mask makes
        # the kernel compute the whole square: twice that.
        base, ckpt = cfg.adapter is None, tc.gradient_checkpointing
        attention = flops_per_token(shape, seq, base, 0, ckpt) - flops_per_token(shape, 0, base, 0, ckpt)
        head = ((6 if base else 4) + (2 if chunked_ce else 0)) * shape.vocab * shape.hidden
        labelled = batches.labelled or batches.tokens
        flops = (batches.computed * (fpt - attention - head) + labelled * head
                 + attention / seq * batches.attention * (1 if batches.padding_free else 2))
    elif tokens is None:
        tokens, source = count_tokens(cfg)
        if tokens is not None and cfg.method in PADDING_FREE_METHODS and not local_tokenizer(cfg):
            source += "; the model's tokenizer is not on disk"
    seconds = None
    if tokens and dev.tflops:
        seconds = (flops if flops is not None else tokens * fpt) / (dev.tflops * 1e12 * dev.mfu)
    weights_dtype, compute_dtype = _dtypes(cfg, dev)
    est = Estimate(
        shape=shape, mode=m.plan.mode, device=dev, weight_dtype=weights_dtype, compute_dtype=compute_dtype,
        params=m.params, trainable=m.trainable, memory=m.parts, labels=m.labels, peak_bytes=m.peak,
        peak_rule=m.rule, overhead_bytes=overhead, padding_free=padding_free,
        flops_per_token=fpt,
        tokens_per_epoch=tokens, tokens_source=source, seconds_per_epoch=seconds, memory_gb=memory_gb,
        settings=dict(micro_batch=tc.micro_batch_size, grad_accum=tc.grad_accum, max_length=seq,
                      checkpointing=tc.gradient_checkpointing, optimizer=tc.optimizer, chunked_ce=chunked_ce,
                      method=cfg.method, epochs=tc.epochs, padding_free_setting=str(cfg.data.padding_free).lower(),
                      packing=cfg.data.packing),
        assumptions=_assumptions(cfg, dev, chunked_ce, batches, padding_free), heap_bytes=m.heap_retained,
    )
    if suggest and memory_gb is not None and not est.fits:
        est.switches = switches(cfg, shape, dev, memory_gb, chunked_ce, from_data=batches is not None)
    return est


def _assumptions(cfg: Config, dev: Device, chunked_ce: bool, batches: Batches | None = None,
                 padding_free: bool = False) -> list[str]:
    notes = ["params and AdamW state in the load dtype (no fp32 master copy); LoRA adapters fp32"]
    if batches is None:
        notes.append(f"full micro-batches of {cfg.data.max_length} tokens")
    if padding_free and cfg.data.padding_free == "auto":
        notes.append("padding-free batches (data.padding_free auto; a model that cannot keep documents apart falls "
                     "back to padded ones at run time)")
    attention_note = "flash/memory-efficient attention (no seq^2 term)"
    if not padding_free and not dev.cuda:
        attention_note = "attention: SDPA's kept float padding mask on CPU counted"
    notes.append(attention_note)
    if not dev.cuda:
        notes.append(f"CPU: + {CPU_BASELINE / GIB:.2f} GiB process baseline (interpreter, torch, transformers, peft: "
                     "measured resident memory)"
                     + ("" if cfg.train.gradient_checkpointing else " + the activations once more for glibc's heap, "
                        "which keeps freed blocks (measured on the benchmark model)"))
    if cfg.model.quantize:
        notes.append("QLoRA: embeddings, head and norms stay in the load dtype; only the adapter is fp32")
    if dev.cuda:
        notes.append("GPU: + 1 GiB CUDA context/workspaces + 5 % allocator slack")
    if dev.tflops:
        notes.append(f"time: {dev.tflops:.3g} TFLOP/s ({dev.rate_source}) x {dev.mfu:.0%} MFU; "
                     + ("eval not counted" if batches else "padding and eval not counted")
                     + ("; 4-bit dequantisation makes QLoRA slower than this" if cfg.model.quantize else ""))
    from tunelab.objectives import objective_class

    if objective_class(cfg.method).extra_models:
        notes.append(f"method {cfg.method}: extra models (reference, value, teacher) are not counted")
    if not chunked_ce:
        notes.append("loss over the whole micro-batch's logits (no chunking)")
    weights, compute = _dtypes(cfg, dev)
    if weights == "float32" and compute != weights and not cfg.model.quantize:
        notes.append("mixed precision: activations counted as 16-bit (the fp32 residual stream is not)")
    return notes


def _with(cfg: Config, **sections) -> Config:
    """A copy of cfg with some fields of some sections changed, e.g. train={"grad_accum": 8}."""
    data = cfg.model_dump()
    for section, changes in sections.items():
        data[section] = None if changes is None else {**(data.get(section) or {}), **changes}
    return Config.model_validate(data)


def switches(cfg: Config, shape: ModelShape, dev: Device, memory_gb: float,
             chunked_ce: bool = True, from_data: bool = False) -> list[tuple[str, float]]:
    """What lowers the memory: each switch alone and, when none is enough, the switches combined in order
    (least intrusive first) until the run fits. (description, predicted total GiB) pairs."""
    tc = cfg.train
    options = []
    if not tc.gradient_checkpointing:
        options.append(("gradient checkpointing", dict(train={"gradient_checkpointing": True})))
    if tc.micro_batch_size > 1:
        accum = tc.grad_accum * tc.micro_batch_size  # same tokens per optimizer step
        options.append((f"micro_batch_size 1, grad_accum {accum}",
                        dict(train={"micro_batch_size": 1, "grad_accum": accum})))
    if tc.optimizer == "adamw":
        name = "paged_adamw_8bit" if dev.cuda else "adamw_8bit"
        options.append((f"optimizer {name}", dict(train={"optimizer": name})))
    if cfg.adapter is None and cfg.model.init is None:
        options.append(("LoRA r=16 all-linear", dict(adapter={"r": 16})))
    if not cfg.model.quantize and cfg.model.init is None and dev.cuda:
        adapter = cfg.adapter.model_dump() if cfg.adapter else {"r": 16}
        options.append(("QLoRA (NF4)", dict(model={"quantize": "nf4"}, adapter=adapter)))
    if cfg.data.max_length > 512:
        n = cfg.data.max_length // 2
        options.append((f"max_length {n} (truncates longer rows)", dict(data={"max_length": n})))

    def total(c: Config) -> float:
        # The switches change the micro-batches (size, max_length): with known batches they are formed again.
        return estimate(c, dev, tokens=None if from_data else 0, chunked_ce=chunked_ce, shape=shape,
                        suggest=False).total_bytes / GIB

    out = [(name, total(_with(cfg, **change))) for name, change in options]
    if any(t <= memory_gb for _, t in out):
        return out
    combined, steps = cfg, []
    for name, change in options:
        combined = _with(combined, **change)
        steps = [s for s in steps if not (name.startswith("QLoRA") and s.startswith("LoRA"))] + [name]
        if len(steps) > 1:
            out.append((" + ".join(steps), total(combined)))
            if out[-1][1] <= memory_gb:
                break
    return out
