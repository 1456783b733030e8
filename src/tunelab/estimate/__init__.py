"""`tunelab estimate`: parameters, peak memory and time per epoch of a run, before running it.

Everything comes from the model's *config* (no weights are loaded) and accounting of what our loop
keeps alive. The activation terms are counted tensor by tensor from what autograd saves in a Llama
block under tunelab's setup (peft LoRA, bitsandbytes NF4, sdpa attention, autocast on GPUs) and were
checked against allocator-measured peaks of real training steps on CPU (tests/test_estimate.py).

Assumptions, also printed with every estimate:
- Params stay in their load dtype (model.dtype auto: bf16 on GPUs, fp32 on CPU); AdamW keeps two
  moments in the param dtype (torch's zeros_like), so there is no fp32 master copy: full FT in bf16 is
  2 + 2 + 4 = 8 bytes/param, in fp32 16. adamw_8bit / paged_adamw_8bit: 2 bytes/param of state.
- LoRA adapters are fp32 (peft upcasts them); QLoRA: linear layers NF4, everything else (embeddings,
  lm_head, norms) in the load dtype, and so the residual stream and MLP activations (tunelab.modeling.build
  attach_adapter: no fp32 upcast of the rest as peft's prepare_model_for_kbit_training would do).
- The run's path: padded or padding-free micro-batches, by the trainer's rule (config.wants_padding_free). With the
  model's tokenizer on disk, the training data is tokenized as the run does it and the first epoch's micro-batches
  are formed in its seeded order (tokens.run_batches): memory at the largest, time over all of them, padding and
  each document's (or padded row's) attention included. Otherwise micro-batches are full (micro_batch_size x
  max_length tokens) and tokens are bytes / 4.
- Attention uses a flash / memory-efficient sdpa kernel: no seq^2 memory term, except padded batches on CPU, where
  SDPA keeps a float copy of the padding mask per layer.
- CPU: + a measured process baseline (interpreter, torch, transformers, peft) for a resident-memory total.
- GPUs: fused AdamW (no temporaries), a bool dropout mask, + 1 GiB CUDA context/workspaces and 5 %
  allocator slack. CPU: foreach AdamW (one param-sized temporary). LoRA dropout keeps a bool mask and the
  layer's input (tunelab.modeling.lora_dropout), on every device.

The pieces: shapes (a model's shape from its config), devices (datasheet GPUs, the measured CPU), counting
(parameters, FLOPs, memory by component: the model of what a step keeps alive), tokens (the run's micro-batches
from the data tokenized, or a rough count from the files' bytes), planner (the path, the estimate of a run, and
the switches that make it fit), report (the printout).
"""

from .counting import NF4_BITS, NF4_DQ_BITS, flops_per_token, lora_params, lora_targets, memory_breakdown
from .devices import CPU_BASELINE, DEVICES, GIB, Device, cpu_device, get_device
from .planner import Estimate, estimate, switches
from .report import format_estimate
from .shapes import KNOWN_SHAPES, ModelShape, model_shape, shape_from_hf_config
from .tokens import Batches, count_tokens, run_batches

__all__ = [
    "CPU_BASELINE", "DEVICES", "GIB", "KNOWN_SHAPES", "NF4_BITS", "NF4_DQ_BITS", "Batches", "Device",
    "Estimate", "ModelShape",
    "count_tokens", "cpu_device", "estimate", "flops_per_token", "format_estimate", "get_device", "lora_params",
    "lora_targets", "memory_breakdown", "model_shape", "run_batches", "shape_from_hf_config", "switches",
]
