"""QLoRA precision: the 4-bit base keeps its other weights (embeddings, head, norms) in the load dtype, the adapter
is fp32, and a bf16 step matches an fp32 reference (PEFT's prepare_model_for_kbit_training on the same 4-bit
weights) to bf16 accuracy."""

from __future__ import annotations

import logging

import pytest
import torch

from tunelab.config import Config

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


HF = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
          vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qlora-base")
    LlamaForCausalLM(LlamaConfig(**HF)).save_pretrained(path)
    return path


def qlora_config(path, dtype="bfloat16", gc=True) -> Config:
    return Config.model_validate({
        "model": {"path": str(path), "quantize": "nf4", "double_quant": True, "dtype": dtype},
        "data": {"train": [{"path": "absent.jsonl"}]},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"gradient_checkpointing": gc, "precision": "bf16"},
    })


def tunelab_qlora(path, dtype="bfloat16", gc=True):
    from tunelab.modeling.build import build_model

    return build_model(qlora_config(path, dtype, gc), "causal_lm", torch.device("cpu"), tokenizer=None).train()


def test_only_the_adapter_is_fp32_and_trains(base):
    model = tunelab_qlora(base)
    hf = model.get_base_model()
    assert hf.get_input_embeddings().weight.dtype == torch.bfloat16
    assert hf.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [m for m in hf.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(m.weight.dtype == torch.bfloat16 for m in norms)
    assert type(hf.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert len(trainable) == 2 * 7 * 2  # A and B on all seven linear layers of both blocks
    assert hf.is_gradient_checkpointing


def test_explicit_fp32_stays_fp32(base):
    hf = tunelab_qlora(base, dtype="float32", gc=False).get_base_model()
    assert hf.get_input_embeddings().weight.dtype == torch.float32
    assert hf.model.norm.weight.dtype == torch.float32


def peft_prepared_fp32(path):
    """The reference: the same NF4 weights, PEFT's preparation (everything else upcast to fp32), fp32 compute."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant,
                                             device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM")).train()


def lora_grads(model, batch, autocast):
    from tunelab.objectives.forward import causal_lm_loss

    with autocast():
        total, n = causal_lm_loss(model, batch)
    loss = total / n
    loss.backward()
    grads = torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])
    return loss.detach(), grads


def test_bf16_step_matches_the_fp32_reference(base):
    from tunelab.modeling.precision import precision_context

    model = tunelab_qlora(base)
    reference = peft_prepared_fp32(base)
    assert reference.get_base_model().model.norm.weight.dtype == torch.float32  # what PEFT's helper does
    with torch.no_grad():  # the same adapter in both, B non-zero so that A gets gradients too
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
        reference.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False)
    ids = torch.randint(0, HF["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    autocast, _ = precision_context("bf16", torch.device("cpu"))
    loss, grads = lora_grads(model, batch, autocast)
    ref_loss, ref_grads = lora_grads(reference, batch, lambda: torch.autocast("cpu", enabled=False))

    assert abs(loss.item() / ref_loss.item() - 1) < 1e-3
    assert (grads - ref_grads).norm() / ref_grads.norm() < 0.03  # measured 0.8 %
    assert ref_grads.abs().max() > 0


def test_estimate_of_a_bf16_qlora_step_matches_the_allocator(base):
    """The estimator's peak for a bf16 QLoRA step (checkpointing, tunelab's chunked SFT loss, bf16 autocast) against
    torch's CPU allocator accounting of the same step on the model tunelab.modeling.build builds."""
    from test_estimate import adamw, profiled_peak, run_config, shape_of
    from transformers import LlamaConfig

    from tunelab.estimate import estimate
    from tunelab.objectives.forward import causal_lm_loss
    from tunelab.modeling.precision import precision_context

    hf = LlamaConfig(**HF)
    model = tunelab_qlora(base)
    optimizer = adamw(model)
    autocast, _ = precision_context("bf16", torch.device("cpu"))
    ids = torch.randint(0, hf.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))

    def step(batch=ids):
        with autocast():
            total, n = causal_lm_loss(model, {"input_ids": batch, "labels": batch})
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ids[:1, :8])  # creates the optimizer state
    measured = profiled_peak(model, optimizer, step)
    cfg = run_config(mode="qlora", mb=1, seq=256, gc=True, bf16=True, dropout=0.0, r=8)
    predicted = estimate(cfg, device="cpu", shape=shape_of(hf), tokens=0, suggest=False).peak_bytes
    assert abs(predicted / measured - 1) < 0.15, f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
