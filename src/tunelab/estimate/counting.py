"""The counting model: trainable parameters, FLOPs per token and the peak memory of one training step, by
component, counted tensor by tensor from what tunelab's loop and autograd keep alive (see the package doc)."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config import Config, UserError
from tunelab.objectives.chunks import head_chunk_rows

from .devices import Device
from .shapes import ModelShape
from .tokens import Batches


# bits per parameter of bitsandbytes 4-bit weights: 4-bit codes + one absmax per block of 64 weights,
# fp32 (32/64 bit), or with double quantization 8-bit absmax + one fp32 constant per 256 of those.
NF4_BITS = 4 + 32 / 64
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)


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


@dataclass(frozen=True)
class Plan:
    """The few facts about a run that decide what autograd keeps alive."""

    mode: str  # full | lora | qlora
    act: int  # bytes of matmul outputs: 2 under bf16/fp16, else 4
    autocast: bool  # 16-bit compute over fp32 adapters (or fp32 weights)
    stream: int = 4  # bytes of the residual stream: `act`, or in QLoRA the load dtype (4-bit layers output it)
    targets: tuple[str, ...] = ()
    r: int = 0
    dropout: bool = False
    cuda: bool = True


def layer_activation_bytes(s: ModelShape, p: Plan) -> float:
    """Bytes one transformer block keeps for its backward pass, per token.

    Counted from what autograd saves in transformers' Llama block; within 1-2 % of the CPU measurements.
    """
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    a, full, quant = p.act, p.mode == "full", p.mode == "qlora"
    x = p.stream
    n = 0
    # Two RMSNorms: each keeps its input upcast to fp32; the normalised value only when its gain trains;
    # its output only when the linear layers after it train (LoRA keeps its own copy, below).
    n += 2 * (4 * h + (2 * a * h if full else 0))
    # Attention: sdpa keeps q, k, v and its output (which is also o_proj's input).
    n += a * (2 * q + 2 * kv)
    # MLP: SwiGLU keeps gate and up (tunelab.modeling.gated_mlp recomputes act(gate)); down_proj's input (their product)
    # only if it trains. A plain MLP keeps up and, if down trains, act(up).
    mlp_kept = 2 if s.gated_mlp else 1
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
            n += width  # tunelab.modeling.lora_dropout: a bool mask; the input itself is kept as without dropout
        if copies:
            n += width * kept
        else:
            shared.add(src)  # lora_A keeps the layer's own input, one tensor for q, k and v
        n += p.r * kept
    width = {"attn_in": h, "mlp_in": h, "mlp_mid": i}
    n += sum(width[src] * in_bytes[src] for src in shared if src != "attn_out")  # sdpa keeps attn_out already
    return n


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
    heap_retained: float = 0  # CPU: bytes glibc's heap keeps beyond the live tensors (see `heap_retained`)


def heap_retained(cfg: Config, dev: Device, activations: float) -> float:
    """Resident memory a CPU step holds beyond its live tensors: glibc's heap keeps the blocks it frees (its mmap
    threshold rises to each freed mapping's size, so activations come from the heap after the first step), the
    backward pass's allocations mostly do not fit the activation blocks it frees, and steps of different shapes
    fragment it further: the heap grows by about the activations once more. Measured on the benchmark model (LoRA,
    RSS - baseline - tensor peak over the estimate's activations): one step of 8 rows 1.06x padding-free, 1.14x
    padded; an epoch of 64 rows: see bench/README.md. None on GPUs, or with checkpointing (the trainer then fixes
    a 64 KiB threshold, so freed blocks go back to the system: tunelab.modeling.memory)."""
    if dev.cuda or cfg.train.gradient_checkpointing:
        return 0
    return activations


def memory_breakdown(cfg: Config, shape: ModelShape, dev: Device, chunked_ce: bool = True,
                     batches: Batches | None = None, padding_free: bool | None = None) -> Memory:
    """Peak tensor memory of one training step of `cfg`, by component: at the run's largest micro-batch (`batches`),
    or at full micro-batches of max_length tokens. `padding_free`: the path the run takes (tunelab.estimate.planner
    decides it); padded batches on CPU keep a float mask per layer. What the method runs is read from its
    objective's traits (objectives.base.Objective)."""
    from tunelab.objectives import objective_class

    method = objective_class(cfg.method)
    mode = "qlora" if cfg.model.quantize else ("lora" if cfg.adapter is not None else "full")
    mem, labels = {}, {}
    adapter, trainable, targets = _weights(cfg, shape, dev, mode, mem, labels)
    step_temp = _optimizer(cfg, dev, trainable, mem, labels)
    # DPO and ORPO run chosen and rejected together; KTO's mismatched KL rows run without gradients
    seqs = cfg.train.micro_batch_size * method.sequences_per_item
    plan = _activations(cfg, shape, dev, mode, method, seqs, adapter, targets, chunked_ce, batches, mem, labels)
    if padding_free is False and not dev.cuda and method.masked_batches:
        _attention_mask(cfg, shape, seqs, batches, mem, labels)
    mem["other"] = 0
    if mode == "qlora":
        # One 4-bit layer at a time is dequantized to the compute dtype (again in the backward pass).
        mem["other"] = max(i * o for i, o in shape.linears().values()) * DTYPE_BYTES[_dtypes(cfg, dev)[1]]
        labels["other"] = "one dequantized 4-bit layer"
    if step_temp:
        mem["step temp"] = step_temp
        labels["step temp"] = "foreach AdamW temporary, during optimizer.step()"
    peak, rule = _peak(mem, cfg.train.grad_accum, step_temp)
    return Memory(mem, labels, peak, rule, shape.params + (adapter if cfg.adapter is not None else 0), trainable, plan,
                  heap_retained(cfg, dev, mem["activations"]))


def _weights(cfg: Config, shape: ModelShape, dev: Device, mode: str, mem: dict, labels: dict):
    """Weights, adapter and gradients into `mem`; (adapter params, trainable params, the adapter's target names)."""
    ac = cfg.adapter
    weights_dtype, _ = _dtypes(cfg, dev)
    wb = DTYPE_BYTES[weights_dtype]
    rest = shape.params - shape.linear_params  # embeddings, head, norms: never quantized
    if mode == "qlora":
        bits = NF4_DQ_BITS if cfg.model.double_quant else NF4_BITS
        mem["weights"] = shape.linear_params * bits / 8 + rest * wb
        labels["weights"] = f"{cfg.model.quantize.upper()} {bits:.3f} bit/param; embeddings, head, norms {weights_dtype}"
    else:
        mem["weights"] = shape.params * wb
        labels["weights"] = weights_dtype
    trainable, adapter, targets = shape.params, 0, []
    if ac is not None:
        targets = lora_targets(shape, ac.target_modules)
        adapter = lora_params(shape, targets, ac.r, ac.dora)
        extra = sum(shape.vocab * shape.hidden for m in ac.modules_to_save if m in ("lm_head", "embed_tokens"))
        trainable = adapter + extra
        mem["adapter"] = adapter * 4 + extra * wb  # modules_to_save are trainable copies
        labels["adapter"] = f"LoRA r={ac.r} on {len(targets)}/{len(shape.linears())} linears per layer, fp32"
    mem["gradients"] = adapter * 4 + (trainable - adapter) * wb
    labels["gradients"] = "trainable params only"
    return adapter, trainable, targets


def _optimizer(cfg: Config, dev: Device, trainable: int, mem: dict, labels: dict) -> float:
    """The optimizer's state into `mem`; the bytes of the temporary its step makes."""
    tc = cfg.train
    if tc.optimizer == "adamw":
        mem["optimizer"] = 2 * mem["gradients"]  # exp_avg, exp_avg_sq in each param's dtype
        labels["optimizer"] = "AdamW, 2 moments in the param dtype"
    else:
        mem["optimizer"] = 2 * trainable
        labels["optimizer"] = "8-bit AdamW, 2 bytes/param" + (" (pageable to CPU RAM)" if "paged" in tc.optimizer else "")
    # CPU: foreach AdamW makes one param-sized temporary (sqrt of exp_avg_sq); GPU: fused, none.
    return 0 if dev.cuda or tc.optimizer != "adamw" else mem["gradients"]


def _activations(cfg: Config, shape: ModelShape, dev: Device, mode: str, method, seqs: int, adapter: int,
                 targets: list[str], chunked_ce: bool, batches: Batches | None, mem: dict, labels: dict) -> Plan:
    """Activations, logits and (with gradient checkpointing) the recomputed block into `mem`; the plan counted."""
    tc, ac = cfg.train, cfg.adapter
    weights_dtype, compute_dtype = _dtypes(cfg, dev)
    wb, cb = DTYPE_BYTES[weights_dtype], DTYPE_BYTES[compute_dtype]
    a = min(wb, cb)  # 16-bit weights or 16-bit autocast: matmul outputs are 16-bit
    T = batches.peak_tokens if batches else seqs * cfg.data.max_length
    head_out = 1 if method.model_kind == "sequence_classification" else shape.vocab  # reward models: a scalar head
    plan = Plan(mode, a, autocast=cb == 2, stream=wb if mode == "qlora" else a, cuda=dev.cuda,
                targets=tuple(targets) if ac is not None else (), r=ac.r if ac else 0,
                dropout=bool(ac and ac.dropout > 0))
    per_layer = layer_activation_bytes(shape, plan)
    x = plan.stream
    # The final norm keeps its fp32 input, and in full FT its normalised value and (for the head) its output.
    final_norm = 4 * shape.hidden + ((1 if chunked_ce else 2) * a * shape.hidden if mode == "full" else 0)
    # Autocast keeps 16-bit copies of fp32 weights it multiplies by: the adapters, and an fp32 QLoRA head
    # (model.dtype float32 under bf16 autocast).
    cast_copies = 2 * adapter if plan.autocast and ac is not None else 0
    head_copy = 2 * head_out * shape.hidden if plan.autocast and mode == "qlora" and wb == 4 else 0
    if tc.gradient_checkpointing:
        # Each block keeps only its input; one block at a time is recomputed in the backward pass.
        kept = T * (shape.layers * x * shape.hidden + final_norm) + head_copy
        recompute = T * per_layer + cast_copies / shape.layers
        labels["activations"] = f"checkpointed: the inputs of {shape.layers} blocks"
    else:
        kept = T * (shape.layers * per_layer + final_norm) + cast_copies + head_copy
        recompute = 0
        labels["activations"] = f"{shape.layers} blocks x {per_layer / shape.hidden:.1f} bytes x hidden per token"
    # -- logits. A plain loss keeps the fp32 log-softmax for backward, then makes two fp32 gradients of it at once:
    # 12 bytes per logit, over the whole micro-batch. The SFT/pretraining loss (losses.chunked_cross_entropy) makes
    # one chunk's fp32 logits into their gradient in place: 4 bytes per logit, +2 for the 16-bit copy at a 16-bit
    # matmul. Other chunked losses (DPO, ORPO, MLM) run a checkpointed fp32 cross-entropy per chunk of rows; both
    # take their chunk's rows from objectives.chunks.
    labelled = batches.peak_real if batches else T  # padding never carries a label
    fused = chunked_ce and method.fused_head_loss
    ce_tokens = min(labelled, head_chunk_rows(head_out, method.heads_per_chunk)) if chunked_ce else T
    # a chunk's logits of every head it runs (distillation: the student's and the teacher's)
    logits = (4 + (2 if a == 2 else 0) if fused else 12) * head_out * ce_tokens * method.heads_per_chunk
    if chunked_ce:
        kept += labelled * x * shape.hidden  # the hidden states at label positions, input of the chunks
    labels["logits"] = f"chunked CE: {ce_tokens} positions at a time" if chunked_ce else f"whole micro-batch ({T} positions)"
    mem["activations"] = kept
    mem["logits"] = logits
    if tc.gradient_checkpointing:
        mem["recompute"] = recompute
        labels["recompute"] = "one block's activations, rebuilt during the backward pass"
    return plan


def _attention_mask(cfg: Config, shape: ModelShape, seqs: int, batches: Batches | None, mem: dict,
                    labels: dict) -> None:
    """Padded (or packed) batches on CPU: SDPA turns the boolean mask into a float one in each layer and keeps it for
    the backward pass: rows x longest^2 x 4 bytes per layer (the full micro-batch of max_length rows when the
    batches are not known)."""
    rows, longest = (batches.peak_rows, batches.peak_longest) if batches else (seqs, cfg.data.max_length)
    mask_per_layer = rows * longest ** 2 * 4
    if cfg.train.gradient_checkpointing:  # only the block being recomputed holds one
        mem["attn mask"] = mask_per_layer
        mem["recompute"] += mask_per_layer
        labels["attn mask"] = ("masked (padded or packed) batches on CPU: the recomputed block's float L x L mask "
                               "(in recompute)")
    else:
        mem["attn mask"] = shape.layers * mask_per_layer
        mem["activations"] += mem["attn mask"]
        labels["attn mask"] = ("masked (padded or packed) batches on CPU: a float L x L mask per layer "
                               "(in activations)")


def _peak(mem: dict, grad_accum: int, step_temp: float) -> tuple[float, str]:
    """The peak and the rule that gives it. Gradients and activations coincide only once gradients outlive a step's
    first micro-batch (grad_accum > 1): otherwise the backward pass creates gradients as it frees activations."""
    static = mem["weights"] + mem.get("adapter", 0) + mem["optimizer"]
    # With checkpointing the loss backward and the blocks' recomputation happen one after the other.
    transient = max(mem["logits"], mem.get("recompute", 0))
    forward_backward = mem["activations"] + transient + mem["other"]
    fb_rule = "activations + " + ("max(logits, recompute)" if "recompute" in mem else "logits") + \
        (" + other" if mem["other"] else "")
    rule = "weights" + (" + adapter" if "adapter" in mem else "") + " + optimizer"
    if grad_accum > 1:
        peak = static + mem["gradients"] + max(forward_backward, step_temp)
        rule += f" + gradients + max({fb_rule}, step temp)" if step_temp else f" + gradients + {fb_rule}"
    else:
        peak = static + max(forward_backward, mem["gradients"] + step_temp)
        rule += f" + max({fb_rule}, gradients" + (" + step temp)" if step_temp else ")")
    return peak, rule
