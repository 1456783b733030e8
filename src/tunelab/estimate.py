"""`tunelab estimate`: parameters, peak memory and time per epoch of a run, before running it.

Everything comes from the model's *config* (no weights are loaded) and accounting of what our loop
keeps alive. The activation terms are counted tensor by tensor from what autograd saves in a Llama
block under tunelab's setup (peft LoRA, bitsandbytes NF4, sdpa attention, autocast on GPUs) and were
checked against allocator-measured peaks of real training steps on CPU (tests/test_estimate.py).

Assumptions, also printed with every estimate:
- Params stay in their load dtype (model.dtype auto: bf16 on GPUs, fp32 on CPU); AdamW keeps two
  moments in the param dtype (torch's zeros_like), so there is no fp32 master copy: full FT in bf16 is
  2 + 2 + 4 = 8 bytes/param, in fp32 16. adamw_8bit / paged_adamw_8bit: 2 bytes/param of state.
- LoRA adapters are fp32 (peft upcasts them); QLoRA: linear layers NF4, and peft's
  prepare_model_for_kbit_training makes everything else fp32 (embeddings, lm_head, norms), so the
  residual stream and MLP activations are fp32 too.
- Micro-batches are full: micro_batch_size x max_length tokens (packing, or long rows).
- Attention uses a flash / memory-efficient sdpa kernel: no seq^2 memory term.
- GPUs: fused AdamW (no temporaries), a bool dropout mask, + 1 GiB CUDA context/workspaces and 5 %
  allocator slack. CPU: foreach AdamW (one param-sized temporary), dropout keeps a float noise tensor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import Config, InitConfig, UserError

GIB = 2**30

# Rows of logits the SFT loss computes at once (mirrors tunelab.objectives.sft.CE_CHUNK; a test checks).
CE_CHUNK = 2048

# bits per parameter of bitsandbytes 4-bit weights: 4-bit codes + one absmax per block of 64 weights,
# fp32 (32/64 bit), or with double quantization 8-bit absmax + one fp32 constant per 256 of those.
NF4_BITS = 4 + 32 / 64
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)


# ---------------------------------------------------------------- model shape

@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder model (biases are not counted)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    gated_mlp: bool = True  # SwiGLU (gate, up, down); False: a plain two-matrix MLP (GPT-2, BERT)
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by Llama's leaf names."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            shapes["gate_proj"] = (h, i)
        shapes.update(up_proj=(h, i), down_proj=(i, h))
        return shapes

    @property
    def linear_params(self) -> int:
        """Weights of all blocks' linear layers: what NF4 quantizes and what the matmul FLOPs scale with."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params + norms + embeddings


def _llama(h, layers, heads, kv, i, vocab, tied=False, name=""):
    return ModelShape(h, layers, heads, kv, i, vocab, tied, name=name)


# Well-known shapes, so the README table (and configs naming a hub id) need no download.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-7b": _llama(4096, 32, 32, 32, 11008, 32000, name="Llama-2-7B"),
    "llama-13b": _llama(5120, 40, 40, 40, 13824, 32000, name="Llama-2-13B"),
    "llama-65b": _llama(8192, 80, 64, 64, 22016, 32000, name="Llama-65B"),
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, name="Llama-3-8B"),
    "llama-3-70b": _llama(8192, 80, 64, 8, 28672, 128256, name="Llama-3-70B"),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, tied=True, name="Llama-3.2-1B"),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, tied=True, name="Llama-3.2-3B"),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32000, name="Mistral-7B"),
}
KNOWN_SHAPES.update({
    "meta-llama/Llama-2-7b-hf": KNOWN_SHAPES["llama-7b"],
    "meta-llama/Llama-2-13b-hf": KNOWN_SHAPES["llama-13b"],
    "huggyllama/llama-65b": KNOWN_SHAPES["llama-65b"],
    "meta-llama/Meta-Llama-3-8B": KNOWN_SHAPES["llama-3-8b"],
    "meta-llama/Llama-3.1-8B": KNOWN_SHAPES["llama-3-8b"],
    "meta-llama/Meta-Llama-3-70B": KNOWN_SHAPES["llama-3-70b"],
    "meta-llama/Llama-3.1-70B": KNOWN_SHAPES["llama-3-70b"],
    "meta-llama/Llama-3.2-1B": KNOWN_SHAPES["llama-3.2-1b"],
    "meta-llama/Llama-3.2-3B": KNOWN_SHAPES["llama-3.2-3b"],
    "mistralai/Mistral-7B-v0.1": KNOWN_SHAPES["mistral-7b"],
})

# transformers model types whose MLP is two matrices with a plain activation (no gate).
PLAIN_MLP_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "bert", "roberta", "distilbert", "phi", "falcon",
                   "bloom", "gpt_bigcode", "starcoder2"}


def shape_from_hf_config(c, name: str = "") -> ModelShape:
    """A ModelShape from a transformers PretrainedConfig (only its numbers are read)."""
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    h, heads = c.hidden_size, c.num_attention_heads
    return ModelShape(
        hidden=h,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h,
        vocab=c.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        head_dim=getattr(c, "head_dim", None),
        gated_mlp=c.model_type not in PLAIN_MLP_TYPES,
        name=name,
    )


def _init_shape(init: InitConfig, vocab: int) -> ModelShape:
    if init.architecture == "bert":
        return ModelShape(init.hidden_size, init.layers, init.heads, init.heads,
                          init.intermediate_size or 4 * init.hidden_size, vocab, True, gated_mlp=False, name="bert (init)")
    # Same default width as tunelab.scratch: 2/3 of 4·hidden, rounded up to a multiple of 64.
    width = init.intermediate_size or (int(8 * init.hidden_size / 3) + 63) // 64 * 64
    return ModelShape(init.hidden_size, init.layers, init.heads, init.kv_heads or init.heads, width, vocab,
                      init.tie_embeddings, name="llama (init)")


def model_shape(cfg: Config) -> ModelShape:
    """The model's shape from its config alone: model.init, a local model dir, a known name, or a hub config."""
    mc = cfg.model
    if mc.init is not None:
        vocab = cfg.tokenizer.vocab_size
        if cfg.tokenizer.path:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(cfg.tokenizer.path))
        return _init_shape(mc.init, vocab)
    if mc.path in KNOWN_SHAPES and not Path(mc.path).exists():
        return KNOWN_SHAPES[mc.path]
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(mc.path, trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError) as e:
        known = ", ".join(k for k in KNOWN_SHAPES if "/" not in k)
        raise UserError(f"{mc.path}: could not read a model config ({str(e).splitlines()[0]}); "
                        f"give a local model dir or one of: {known}") from None
    return shape_from_hf_config(hf, name=Path(mc.path).name)


# ---------------------------------------------------------------- devices

@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # dense bf16 tensor-core peak from the datasheet (CPU: measured fp32 matmul)
    memory_gib: float
    mfu: float = 0.4  # share of the peak a training step reaches (model FLOPs utilisation)
    cuda: bool = True


# Datasheet dense (no sparsity) bf16 TFLOP/s. A 40 % MFU is typical of a well-fed single-GPU loop.
DEVICES = {
    "h100": Device("H100 SXM 80GB", 989, 80),
    "h100-pcie": Device("H100 PCIe 80GB", 756, 80),
    "h200": Device("H200 141GB", 989, 141),
    "a100": Device("A100 80GB", 312, 80),
    "a100-80gb": Device("A100 80GB", 312, 80),
    "a100-40gb": Device("A100 40GB", 312, 40),
    "l40s": Device("L40S 48GB", 362, 48),
    "a10": Device("A10 24GB", 125, 24),
    "l4": Device("L4 24GB", 121, 24),
    "rtx4090": Device("RTX 4090 24GB", 165, 24),
    "rtx3090": Device("RTX 3090 24GB", 71, 24),
}
GENERIC_GPU = Device("a CUDA GPU (no --device: no time estimate)", 0, 0)
CPU_MFU = 0.7  # tunelab's loop reached 0.65 (LoRA) to 0.77 (full FT) of the fp32 matmul rate on a 2-core CPU


def measure_cpu_tflops() -> float:
    """fp32 matmul rate of this machine with torch's current thread count, TFLOP/s (best of a few)."""
    import time

    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def get_device(name: str | None) -> Device:
    if name is None:
        return GENERIC_GPU
    key = name.lower()
    if key == "cpu":
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        return Device(f"CPU ({os.cpu_count()} cores, measured)", measure_cpu_tflops(), ram, CPU_MFU, cuda=False)
    if key not in DEVICES:
        raise UserError(f"--device {name}: unknown; choose cpu or one of {', '.join(DEVICES)}")
    return DEVICES[key]


# ---------------------------------------------------------------- parameters and FLOPs

def lora_targets(shape: ModelShape, target_modules) -> list[str]:
    """Leaf names of the block's linear layers that get an adapter ("all-linear": all but lm_head, as peft)."""
    names = list(shape.linears())
    if target_modules == "all-linear":
        return names
    chosen = [n for n in names if n in set(target_modules)]
    if not chosen:
        raise UserError(f"adapter.target_modules {target_modules}: none matches this model's linear layers "
                        f"({', '.join(names)})")
    return chosen


def lora_params(shape: ModelShape, targets: list[str], r: int, dora: bool = False) -> int:
    """Adapter parameters, counted as peft does: A is r x in, B is out x r (DoRA adds a magnitude per output)."""
    per_layer = sum(r * (a + b) + (b if dora else 0) for n, (a, b) in shape.linears().items() if n in targets)
    return shape.layers * per_layer


def flops_per_token(shape: ModelShape, seq: int, train_base: bool, adapter_params: int = 0,
                    checkpointing: bool = False) -> float:
    """Training FLOPs per token: 6N with a trainable base, 4N frozen (no weight gradients), plus attention.

    N counts the matmul weights: the blocks' linear layers and the output head (also when tied: the head
    matmul still runs). Attention adds 6·layers·seq·d per token (Kaplan et al.). Checkpointing
    recomputes the blocks' forward: +2N (blocks only) and +2·layers·seq·d.
    """
    n_blocks, head = shape.linear_params, shape.vocab * shape.hidden
    attn = 2 * shape.layers * seq * shape.q_dim  # forward
    flops = (6 if train_base else 4) * (n_blocks + head) + 6 * adapter_params + 3 * attn
    if checkpointing:
        flops += 2 * n_blocks + attn
    return flops


# ---------------------------------------------------------------- memory

@dataclass(frozen=True)
class Plan:
    """The few facts about a run that decide what autograd keeps alive."""

    mode: str  # full | lora | qlora
    act: int  # bytes of matmul outputs: 2 under bf16/fp16, else 4
    autocast: bool  # 16-bit compute over fp32 adapters / fp32 QLoRA activations
    targets: tuple[str, ...] = ()
    r: int = 0
    dropout: bool = False
    cuda: bool = True


def _mask_bytes(plan: Plan, dropped: int) -> int:
    # CUDA's fused dropout keeps a bool mask; the CPU path multiplies by a noise tensor of the input's dtype.
    return 1 if plan.cuda else dropped


def layer_activation_bytes(s: ModelShape, p: Plan) -> float:
    """Bytes one transformer block keeps for its backward pass, per token.

    Counted from what autograd saves in transformers' Llama block; within 1-2 % of the CPU measurements.
    """
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    a, full, quant = p.act, p.mode == "full", p.mode == "qlora"
    x = 4 if quant else a  # the residual stream and 4-bit layer outputs are fp32 in QLoRA (see module doc)
    n = 0
    # Two RMSNorms: each keeps its input upcast to fp32; the normalised value only when its gain trains;
    # its output only when the linear layers after it train (LoRA keeps its own copy, below).
    n += 2 * (4 * h + (2 * a * h if full else 0))
    # Attention: sdpa keeps q, k, v and its output (which is also o_proj's input).
    n += a * (2 * q + 2 * kv)
    # MLP: SwiGLU keeps gate, act(gate) and up; down_proj's input (their product) only if it trains.
    # A plain MLP keeps up and, if down trains, act(up).
    mlp_kept = 3 if s.gated_mlp else 1
    n += x * i * (mlp_kept + (1 if full else 0))
    if full:
        return n
    # LoRA: lora_A keeps its (dropped-out) input, lora_B keeps lora_A's r-wide output.
    inputs = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
    in_bytes = {"attn_in": x, "attn_out": a, "mlp_in": x, "mlp_mid": x}
    shared = set()
    for name in p.targets:
        width, src = s.linears()[name][0], inputs[name]
        if p.autocast:
            # fp32 adapters under autocast: peft casts x to fp32 first (its 4-bit layer skips that under
            # CUDA autocast); autocast then gives lora_A a 16-bit copy of an fp32 input, which it keeps.
            dropped = in_bytes[src] if quant and p.cuda else 4
            copies = dropped == 4
            kept = 2
        else:
            dropped, copies, kept = 4, False, 4
        if p.dropout:
            n += width * (_mask_bytes(p, dropped) + kept)
        elif copies:
            n += width * kept
        else:
            shared.add(src)  # lora_A keeps the layer's own input, one tensor for q, k and v
        n += p.r * kept
    width = {"attn_in": h, "mlp_in": h, "mlp_mid": i}
    n += sum(width[src] * in_bytes[src] for src in shared if src != "attn_out")  # sdpa keeps attn_out already
    return n


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
    overhead_bytes: float  # CUDA context / allocator slack on top
    flops_per_token: float
    tokens_per_epoch: int | None
    tokens_source: str
    seconds_per_epoch: float | None
    memory_gb: float | None
    settings: dict
    switches: list[tuple[str, float]] = field(default_factory=list)  # (change, its predicted total GiB)
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return self.peak_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.memory_gb is None else self.total_bytes <= self.memory_gb * GIB


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _dtypes(cfg: Config, dev: Device) -> tuple[str, str]:
    """(weight dtype, compute dtype) as tunelab resolves them (model.resolve_dtype, precision.precision_context)."""
    weights = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if dev.cuda else "float32")
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if dev.cuda else "fp32")
    compute = {"bf16": "bfloat16", "fp16": "float16", "fp32": weights}[precision]
    return weights, compute


@dataclass
class Memory:
    parts: dict[str, float]  # bytes by component
    labels: dict[str, str]  # a short note per component
    peak: float  # bytes of tensors at the peak moment of a step
    rule: str  # how the parts combine into the peak
    params: int  # base + adapter
    trainable: int
    plan: Plan


def memory_breakdown(cfg: Config, shape: ModelShape, dev: Device, chunked_ce: bool = True) -> Memory:
    """Peak tensor memory of one training step of `cfg`, by component."""
    tc, ac = cfg.train, cfg.adapter
    mode = "qlora" if cfg.model.quantize else ("lora" if ac is not None else "full")
    weights_dtype, compute_dtype = _dtypes(cfg, dev)
    wb, cb = DTYPE_BYTES[weights_dtype], DTYPE_BYTES[compute_dtype]
    a = min(wb, cb)  # 16-bit weights or 16-bit autocast: matmul outputs are 16-bit
    seqs = tc.micro_batch_size * (2 if cfg.method == "dpo" else 1)  # DPO runs chosen and rejected together
    T = seqs * cfg.data.max_length
    head_out = 1 if cfg.method == "reward" else shape.vocab  # reward models end in a scalar head
    rest = shape.params - shape.linear_params  # embeddings, head, norms: never quantized
    mem, labels = {}, {}

    # -- weights, adapter, trainable count
    if mode == "qlora":
        bits = NF4_DQ_BITS if cfg.model.double_quant else NF4_BITS
        mem["weights"] = shape.linear_params * bits / 8 + rest * 4
        labels["weights"] = f"{cfg.model.quantize.upper()} {bits:.3f} bit/param; embeddings, head, norms fp32"
    else:
        mem["weights"] = shape.params * wb
        labels["weights"] = weights_dtype
    trainable, adapter = shape.params, 0
    if ac is not None:
        targets = lora_targets(shape, ac.target_modules)
        adapter = lora_params(shape, targets, ac.r, ac.dora)
        extra = sum(shape.vocab * shape.hidden for m in ac.modules_to_save if m in ("lm_head", "embed_tokens"))
        trainable = adapter + extra
        mem["adapter"] = adapter * 4 + extra * wb  # modules_to_save are trainable copies
        labels["adapter"] = f"LoRA r={ac.r} on {len(targets)}/{len(shape.linears())} linears per layer, fp32"
    mem["gradients"] = adapter * 4 + (trainable - adapter) * wb
    labels["gradients"] = "trainable params only"

    # -- optimizer
    if tc.optimizer == "adamw":
        mem["optimizer"] = 2 * mem["gradients"]  # exp_avg, exp_avg_sq in each param's dtype
        labels["optimizer"] = "AdamW, 2 moments in the param dtype"
    else:
        mem["optimizer"] = 2 * trainable
        labels["optimizer"] = "8-bit AdamW, 2 bytes/param" + (" (pageable to CPU RAM)" if "paged" in tc.optimizer else "")
    # CPU: foreach AdamW makes one param-sized temporary (sqrt of exp_avg_sq); GPU: fused, none.
    step_temp = 0 if dev.cuda or tc.optimizer != "adamw" else mem["gradients"]

    # -- activations
    plan = Plan(mode, a, autocast=cb == 2, cuda=dev.cuda,
                targets=tuple(targets) if ac is not None else (), r=ac.r if ac else 0,
                dropout=bool(ac and ac.dropout > 0))
    per_layer = layer_activation_bytes(shape, plan)
    x = 4 if mode == "qlora" else a
    # The final norm keeps its fp32 input, and in full FT its normalised value and (for the head) its output.
    final_norm = 4 * shape.hidden + ((1 if chunked_ce else 2) * a * shape.hidden if mode == "full" else 0)
    # Autocast keeps 16-bit copies of fp32 weights it multiplies by: the adapters, and in QLoRA the fp32 head.
    cast_copies = 2 * adapter if plan.autocast and ac is not None else 0
    head_copy = 2 * head_out * shape.hidden if plan.autocast and mode == "qlora" else 0
    if tc.gradient_checkpointing:
        # Each block keeps only its input; one block at a time is recomputed in the backward pass.
        kept = T * (shape.layers * x * shape.hidden + final_norm) + head_copy
        recompute = T * per_layer + cast_copies / shape.layers
        labels["activations"] = f"checkpointed: the inputs of {shape.layers} blocks"
    else:
        kept = T * (shape.layers * per_layer + final_norm) + cast_copies + head_copy
        recompute = 0
        labels["activations"] = f"{shape.layers} blocks x {per_layer / shape.hidden:.1f} bytes x hidden per token"
    # -- logits: the fp32 log-softmax kept for backward, then two fp32 gradients of it at once = 12 bytes per
    # logit, over the whole micro-batch, or one chunk of label positions (tunelab's SFT loss recomputes them).
    ce_tokens = min(T, CE_CHUNK) if chunked_ce else T
    logits = 12 * head_out * ce_tokens
    if chunked_ce:
        kept += T * x * shape.hidden  # the hidden states at label positions, input of the chunks
    labels["logits"] = f"chunked CE: {ce_tokens} positions at a time" if chunked_ce else f"whole micro-batch ({T} positions)"
    mem["activations"] = kept
    mem["logits"] = logits
    if tc.gradient_checkpointing:
        mem["recompute"] = recompute
        labels["recompute"] = "one block's activations, rebuilt during the backward pass"
    mem["other"] = 0
    if mode == "qlora":
        # One 4-bit layer at a time is dequantized to the compute dtype (again in the backward pass).
        mem["other"] = max(i * o for i, o in shape.linears().values()) * cb
        labels["other"] = "one dequantized 4-bit layer"
    if step_temp:
        mem["step temp"] = step_temp
        labels["step temp"] = "foreach AdamW temporary, during optimizer.step()"

    # -- the peak. Gradients and activations coincide only once gradients outlive a step's first micro-batch
    # (grad_accum > 1): otherwise the backward pass creates gradients as it frees activations.
    static = mem["weights"] + mem.get("adapter", 0) + mem["optimizer"]
    # With checkpointing the loss backward and the blocks' recomputation happen one after the other.
    transient = max(mem["logits"], mem.get("recompute", 0))
    forward_backward = mem["activations"] + transient + mem["other"]
    fb_rule = "activations + " + ("max(logits, recompute)" if "recompute" in mem else "logits") + \
        (" + other" if mem["other"] else "")
    rule = "weights" + (" + adapter" if "adapter" in mem else "") + " + optimizer"
    if tc.grad_accum > 1:
        peak = static + mem["gradients"] + max(forward_backward, step_temp)
        rule += f" + gradients + max({fb_rule}, step temp)" if step_temp else f" + gradients + {fb_rule}"
    else:
        peak = static + max(forward_backward, mem["gradients"] + step_temp)
        rule += f" + max({fb_rule}, gradients" + (" + step temp)" if step_temp else ")")
    return Memory(mem, labels, peak, rule, shape.params + (adapter if ac is not None else 0), trainable, plan)


# ---------------------------------------------------------------- tokens per epoch

def _count_rows(path: Path) -> tuple[int, int]:
    """(rows, bytes of row text) of one data file, without parsing rows (parquet: from its metadata)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return meta.num_rows, sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    data = path.read_bytes()
    if path.suffix == ".json":
        rows = json.loads(data)
        return (len(rows) if isinstance(rows, list) else 1), len(data)
    lines = sum(1 for line in data.splitlines() if line.strip())
    return lines - (1 if path.suffix in (".csv", ".tsv") else 0), len(data)


def count_tokens(cfg: Config, chars_per_token: float = 4.0) -> tuple[int | None, str]:
    """Training tokens per epoch from the data files: rows x min(max_length, bytes per row / 4).

    Cheap and rough: nothing is tokenised; ~4 bytes per token is typical of BPE on English text, and the
    JSON keys counted in the bytes roughly make up for the template tokens added at training time.
    """
    rows = size = 0
    for source in cfg.data.train:
        p = Path(source.path)
        files = sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")) \
            if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            return None, f"{source.path} is not a local file: pass tokens"
        for f in files:
            r, b = _count_rows(f)
            rows, size = rows + r, size + b
    if rows == 0:
        return None, "no rows found"
    rows = round(rows * (1 - cfg.data.eval_fraction))
    per_row = min(cfg.data.max_length, size / rows / chars_per_token) if rows else 0
    return int(rows * per_row), f"{rows} rows x ~{per_row:.0f} tokens (bytes/{chars_per_token:g}, not tokenised)"


# ---------------------------------------------------------------- the estimate

def estimate(cfg: Config, device: str | None = None, memory_gb: float | None = None, tokens: int | None = None,
             chunked_ce: bool = True, shape: ModelShape | None = None, suggest: bool = True) -> Estimate:
    """Parameters, peak memory, fit and time per epoch of `cfg` on `device`.

    `chunked_ce`: the loss computes logits in chunks over label positions (tunelab's SFT loss does);
    False for a plain `model(input_ids, labels=...)` loss. `tokens`: training tokens per epoch, instead
    of counting rows in the data files. `shape`: skip reading the model config.
    """
    dev = get_device(device) if isinstance(device, str) or device is None else device
    shape = shape or model_shape(cfg)
    m = memory_breakdown(cfg, shape, dev, chunked_ce)
    overhead = (GIB + 0.05 * m.peak) if dev.cuda else 0
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
    if tokens is None:
        tokens, source = count_tokens(cfg)
    seconds = None
    if tokens and dev.tflops:
        seconds = tokens * fpt / (dev.tflops * 1e12 * dev.mfu)
    weights_dtype, compute_dtype = _dtypes(cfg, dev)
    est = Estimate(
        shape=shape, mode=m.plan.mode, device=dev, weight_dtype=weights_dtype, compute_dtype=compute_dtype,
        params=m.params, trainable=m.trainable, memory=m.parts, labels=m.labels, peak_bytes=m.peak,
        peak_rule=m.rule, overhead_bytes=overhead,
        flops_per_token=fpt,
        tokens_per_epoch=tokens, tokens_source=source, seconds_per_epoch=seconds, memory_gb=memory_gb,
        settings=dict(micro_batch=tc.micro_batch_size, grad_accum=tc.grad_accum, max_length=seq,
                      checkpointing=tc.gradient_checkpointing, optimizer=tc.optimizer, chunked_ce=chunked_ce,
                      method=cfg.method, epochs=tc.epochs),
        assumptions=_assumptions(cfg, dev, chunked_ce),
    )
    if suggest and memory_gb is not None and not est.fits:
        est.switches = switches(cfg, shape, dev, memory_gb, chunked_ce)
    return est


def _assumptions(cfg: Config, dev: Device, chunked_ce: bool) -> list[str]:
    notes = [
        "params and AdamW state in the load dtype (no fp32 master copy); LoRA adapters fp32",
        f"full micro-batches of {cfg.data.max_length} tokens; flash/memory-efficient attention (no seq^2 term)",
    ]
    if cfg.model.quantize:
        notes.append("QLoRA: peft's prepare_model_for_kbit_training keeps embeddings, head and norms in fp32")
    if dev.cuda:
        notes.append("GPU: + 1 GiB CUDA context/workspaces + 5 % allocator slack")
    if dev.tflops:
        notes.append(f"time: {dev.tflops:.3g} TFLOP/s x {dev.mfu:.0%} MFU; padding and eval not counted"
                     + ("; 4-bit dequantisation makes QLoRA slower than this" if cfg.model.quantize else ""))
    if cfg.method not in ("sft", "pretrain", "dpo", "reward"):
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
             chunked_ce: bool = True) -> list[tuple[str, float]]:
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
        return estimate(c, dev, tokens=0, chunked_ce=chunked_ce, shape=shape, suggest=False).total_bytes / GIB

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


# ---------------------------------------------------------------- display

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
    ]
    unit, size = ("GiB", GIB) if est.total_bytes >= GIB else ("MiB", 2**20)
    lines += ["", f"{'memory':<14}{unit:>8}"]
    for key, n in est.memory.items():
        if n or key != "other":
            lines.append(f"  {key:<12}{n / size:8.2f}  {est.labels.get(key, '')}")
    lines.append(f"  {'peak':<12}{est.peak_bytes / size:8.2f}  = {est.peak_rule}")
    if est.overhead_bytes:
        lines.append(f"  {'runtime':<12}{est.overhead_bytes / size:8.2f}  CUDA context and workspaces, allocator slack")
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
            lines.append(f"time per epoch: {_duration(est.seconds_per_epoch)} "
                         f"(at {est.device.tflops * est.device.mfu:.3g} TFLOP/s){total}")
    else:
        lines.append(f"time per epoch: unknown ({est.tokens_source})")
    lines.append("assumptions: " + "; ".join(est.assumptions))
    return "\n".join(lines)
