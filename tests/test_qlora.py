"""QLoRA precision: the 4-bit base keeps its other weights (embeddings, head, norms) in the load dtype, the adapter
is fp32, and a bf16 step matches an fp32 reference (PEFT's prepare_model_for_kbit_training on the same 4-bit
weights) to bf16 accuracy; bitsandbytes' packed CPU layout stays off in every forward without grad (issue 21 §3)."""

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


# ---------------------------------------------------------------- bitsandbytes' packed CPU layout (issue 21 §3)
# On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit weight for its CPU inference kernel at the first forward
# in eval mode without grad; tunelab.modeling.load.keep_4bit_layout turns that off on every 4-bit layer it loads. Each
# Linear4bit reads bitsandbytes' CPU check when it is built: the fixture forces the check both ways, so the tests
# below run the same on every CPU (the test ids say which way: bnb-packing-on / bnb-packing-off).
# ODD's k/v projections have 24 outputs, which the packed layout cannot take (it needs multiples of 32).
ODD = dict(hidden_size=48, layers=2, heads=4, kv_heads=2, intermediate_size=80, max_position=256)


@pytest.fixture(params=[True, False], ids=["bnb-packing-on", "bnb-packing-off"])
def bnb_cpu_check(request, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: request.param)
    return request.param


@pytest.fixture(scope="module")
def odd_base(tmp_path_factory, tiny_tokenizer):
    from tunelab.config import InitConfig
    from tunelab.modeling.scratch import save_tiny_model

    torch.manual_seed(0)
    return save_tiny_model(tmp_path_factory.mktemp("odd-base"), tiny_tokenizer, InitConfig(**ODD))


def layers_4bit(model) -> list:
    return [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]


def packed(model) -> list[bool]:
    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers_4bit(model)]


def test_the_forced_check_reaches_bitsandbytes(bnb_cpu_check):
    """The fixture's switch is the one bitsandbytes acts on: forced on, a 4-bit layer whose output dimension is not a
    multiple of 32 fails in an eval forward without grad (issue 21's failure, on any CPU); forced off, it runs."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(48, 24, quant_type="nf4", compute_dtype=torch.float32).to("cpu").eval()
    assert layer.support_avx512bf16_for_cpu is bnb_cpu_check
    x = torch.randn(2, 48)
    if bnb_cpu_check:
        with pytest.raises(AssertionError, match="divisible by block_n"), torch.no_grad():
            layer(x)
    else:
        with torch.no_grad():
            assert layer(x).shape == (2, 24)


def _qlora_run(base, data, out, eval_every):
    from tiny import config_dict

    from tunelab.config import load_config
    from tunelab.training.loop import Trainer

    cfg = config_dict(base, data, out, model={"quantize": "nf4", "double_quant": True, "dtype": "float32"},
                      adapter={"r": 4, "alpha": 8, "dropout": 0.0}, data={"eval_fraction": 0.25, "max_length": 256},
                      train={"max_steps": 3, "eval_every": eval_every, "lr": 5e-3})
    trainer = Trainer(load_config(data=cfg), say=lambda *a: None)
    trainer.run()
    return trainer


def test_evaluating_inside_qlora_training_changes_nothing(bnb_cpu_check, odd_base, tmp_path):
    """A QLoRA run that evaluates after every step trains, saves and merges exactly as the same run that evaluates
    after its last step only; its 4-bit layers (and a frozen copy, as DPO, KTO and RL make their reference) stay
    unpacked."""
    import copy

    from safetensors.torch import load_file
    from tiny import write_task_data

    from tunelab.modeling.merging import merge
    from tunelab.training.tracking import read_metrics

    data = write_task_data(tmp_path / "train.jsonl", n=16)
    runs = {every: _qlora_run(odd_base, data, tmp_path / f"every-{every}", every) for every in (1, None)}
    for trainer in runs.values():
        assert layers_4bit(trainer.module.model) and not any(packed(trainer.module.model))
        reference = copy.deepcopy(trainer.module.model).eval()
        with torch.no_grad():
            reference(input_ids=torch.tensor([[1, 5, 9, 14]]))
        assert not any(packed(reference))
    logs = {every: read_metrics(tmp_path / f"every-{every}" / "metrics.jsonl") for every in runs}
    evaluated = {every: [m["step"] for m in log if "eval_loss" in m] for every, log in logs.items()}
    assert evaluated == {1: [1, 2, 3], None: [3]}  # the trainer always evaluates after its last step
    losses = {every: [m["loss"] for m in log if "loss" in m] for every, log in logs.items()}
    assert len(losses[1]) == 3 and losses[1] == losses[None]
    adapters = {every: load_file(tmp_path / f"every-{every}" / "final" / "adapter_model.safetensors") for every in runs}
    assert adapters[1].keys() == adapters[None].keys()
    assert all(torch.equal(adapters[1][k], adapters[None][k]) for k in adapters[1])
    assert any(float(adapters[1][k].abs().max()) > 0 for k in adapters[1] if "lora_B" in k)  # it trained
    merged = {every: load_file(merge(str(tmp_path / f"every-{every}"), str(tmp_path / f"merged-{every}"),
                                     dtype="float32") / "model.safetensors") for every in runs}
    assert all(torch.equal(merged[1][k], merged[None][k]) for k in merged[1])


def test_a_checkpoint_saved_4bit_runs_on_the_inference_path(bnb_cpu_check, odd_base, tmp_path):
    """`tunelab eval`, `generate`, serving and a distillation teacher load through model.load_pretrained; a
    checkpoint saved 4-bit loads as bitsandbytes layers. Its logits match the same weights dequantized by
    bitsandbytes in a plain model, and generation runs, with no layer packed."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunelab.modeling.load import load_pretrained

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(odd_base, quantization_config=quant, device_map={"": "cpu"}) \
        .save_pretrained(tmp_path / "q4")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (odd_base / name).is_file():
            (tmp_path / "q4" / name).write_bytes((odd_base / name).read_bytes())
    model, _ = load_pretrained(str(tmp_path / "q4"), dtype="float32", device=torch.device("cpu"))
    assert len(layers_4bit(model)) == 2 * 7
    reference = AutoModelForCausalLM.from_pretrained(odd_base, dtype=torch.float32).eval()
    quantized = dict(model.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in quantized and hasattr(quantized[name], "support_avx512bf16_for_cpu"):
                q = quantized[name]
                module.weight.copy_(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state))
        ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        logits, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not any(packed(model))
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)
    assert out.shape == (1, 16)


def _step_after_an_eval(model, ids, evaluate: bool):
    """Loss and LoRA gradients of one training step, after an eval forward without grad if `evaluate`."""
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)  # B non-zero: the layers below get gradients through the 4-bit weights
    if evaluate:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])


def test_what_the_packed_layout_would_do_to_training(base):
    """Why keep_4bit_layout keeps the packed layout off even where its shape constraint holds (this base: every
    output dimension a multiple of 32): on a CPU that runs bitsandbytes' kernel, an evaluation that packs the
    weights changes the next training step's loss (bf16 compute) and gradients (no backward through the packed
    matmul) and the 4-bit weights a checkpoint saves; with the layout kept, the step equals that of a model that never
    evaluated. Runs only where the CPU has AVX512-BF16 (the kernel cannot run elsewhere)."""
    import bitsandbytes.functional as bnbf

    if not bnbf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' packed 4-bit kernel cannot run here")
    ids = torch.randint(0, HF["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    models = {}
    for name in ("never", "kept", "packed"):
        torch.manual_seed(0)  # the same LoRA A in all three
        models[name] = tunelab_qlora(base, dtype="float32", gc=False)
    saved_before = {k: v.clone() for k, v in models["packed"].state_dict().items() if "absmax" in k}
    for layer in layers_4bit(models["packed"]):
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    never_loss, never_grads = _step_after_an_eval(models["never"], ids, evaluate=False)
    kept_loss, kept_grads = _step_after_an_eval(models["kept"], ids, evaluate=True)
    packed_loss, packed_grads = _step_after_an_eval(models["packed"], ids, evaluate=True)
    assert all(packed(models["packed"])) and not any(packed(models["kept"]))

    assert kept_loss == never_loss and torch.equal(kept_grads, never_grads)
    grad_error = float((packed_grads - never_grads).norm() / never_grads.norm())
    print(f"packed layout: loss {packed_loss:.7f} vs {never_loss:.7f}, gradients off by {grad_error:.1%}")
    assert packed_loss != never_loss
    assert grad_error > 0.01  # measured 87 % (bitsandbytes 0.50.2)
    saved_after = {k: v for k, v in models["packed"].state_dict().items() if "absmax" in k}
    assert any(not torch.equal(saved_after[k], saved_before[k]) for k in saved_before)
