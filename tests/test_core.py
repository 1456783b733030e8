"""The core SFT path against references: PEFT's loader, merged weights, closed-form accumulation, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny import config_dict, make_base_model, write_task_data

from tunelab.config import load_config
from tunelab.training.loop import Trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data") / "train.jsonl", n=16)


def run(cfg_dict: dict, resume: bool = False) -> Trainer:
    trainer = Trainer(load_config(data=cfg_dict), resume=resume, say=lambda *a: None)
    trainer.run()
    return trainer


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


def test_saved_lora_loads_in_peft_with_identical_logits_and_merges(base, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.modeling.merging import merge

    trainer = run(config_dict(base, data, tmp_path / "run", adapter=LORA, train={"lr": 5e-3}))
    ours = trainer.module.model.eval()
    ids = torch.randint(5, 300, (2, 24))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "run" / "final").eval()
    base_only = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (logits_of(ours, ids) - logits_of(base_only, ids)).abs().max() > 1e-3  # the adapter did something
    assert torch.allclose(logits_of(ours, ids), logits_of(reloaded, ids), atol=1e-6, rtol=0)
    merged_dir = merge(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (logits_of(merged, ids) - logits_of(reloaded, ids)).abs().max() < 1e-5
    assert not (merged_dir / "adapter_config.json").exists()


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_loss_falls_on_memorisation(base, tmp_path, mode):
    """Eight rows seen every step: full fine-tuning memorises them. An adapter on this tiny frozen base
    plateaus near 3.3 nats whatever the optimiser (a plain PEFT loop with HF's own loss does the same:
    the frozen embeddings and final norm bound the logits), so it is held to a smaller, still
    unmistakable drop."""
    data = write_task_data(tmp_path / "eight.jsonl", n=8, seed=1)
    train = {"max_steps": 40 if mode == "full" else 60, "lr": 3e-3, "micro_batch_size": 8, "scheduler": "constant"}
    sections = {"train": train}
    if mode != "full":
        sections["adapter"] = {**LORA, "r": 16, "alpha": 32}
    if mode == "qlora":
        sections["model"] = {"path": str(base), "quantize": "nf4", "double_quant": True}
    trainer = run(config_dict(base, data, tmp_path / mode, **sections))
    losses = [m["loss"] for m in _metrics(tmp_path / mode)]
    assert losses[-1] < (0.3 if mode == "full" else 0.8) * losses[0], losses
    if mode == "qlora":
        linear = trainer.module.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert type(linear).__name__ == "Linear4bit"
        assert linear.weight.quant_state.nested  # double quantization


def _metrics(run_dir):
    from tunelab.training.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.named_parameters() if v.requires_grad}


def test_gradient_accumulation_matches_one_big_batch(base, data, tmp_path, monkeypatch):
    """Loss is normalised by the loss tokens of the whole window, so the split cannot change the update:
    the accumulated gradient of micro-batch 1 x accum 4 equals that of 4 x 1 to 1e-5 (a mean of per-micro-batch
    means would not), and so do the weights after three AdamW steps, relative (in norm) to how far they moved."""
    first_grads = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        if len(first_grads) < 2 and getattr(self, "_recorded", False) is False:
            self._recorded = True
            first_grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    common = {"lr": 1e-3, "max_steps": 3, "max_grad_norm": None, "scheduler": "constant"}
    a = run(config_dict(base, data, tmp_path / "a", train={**common, "micro_batch_size": 1, "grad_accum": 4}))
    b = run(config_dict(base, data, tmp_path / "b", train={**common, "micro_batch_size": 4, "grad_accum": 1}))
    ga, gb = first_grads
    assert max(x.abs().max() for x in ga) > 1e-3  # a real gradient
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) < 1e-5

    from transformers import AutoModelForCausalLM

    wa, wb = _trainable(a), _trainable(b)
    start = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    # Norms, not elementwise maxima: Adam divides by sqrt(v), so an element whose gradient is float noise in both
    # runs can move by up to lr in either direction; the update as a whole must still agree.
    moved = sum(((wa[k] - start[k.removeprefix("model.")]) ** 2).sum() for k in wa).sqrt()
    assert moved > 1e-4  # training moved the weights
    assert sum(((wa[k] - wb[k]) ** 2).sum() for k in wa).sqrt() < 1e-2 * moved


def test_resume_gives_the_same_weights(base, data, tmp_path):
    cfg = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, "lr": 2e-3, "warmup_steps": 2}
    straight = run(config_dict(base, data, tmp_path / "straight", adapter={**LORA, "dropout": 0.1}, train=cfg))
    partial = tmp_path / "partial"
    run(config_dict(base, data, partial, adapter={**LORA, "dropout": 0.1}, train=cfg))
    # Forget everything after step 3, as if the run had died there.
    shutil.rmtree(partial / "checkpoints" / "step-00000006")
    shutil.rmtree(partial / "final")
    resumed = run(config_dict(base, data, partial, adapter={**LORA, "dropout": 0.1}, train=cfg), resume=True)
    ws, wr = _trainable(straight), _trainable(resumed)
    assert max((ws[k] - wr[k]).abs().max() for k in ws) < 1e-6
    steps = [m["step"] for m in _metrics(partial)]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses_s = [m["loss"] for m in _metrics(tmp_path / "straight")]
    losses_r = [m["loss"] for m in _metrics(partial)]
    assert losses_s == pytest.approx(losses_r, abs=1e-6)


def test_qlora_merge_reproduces_the_trained_quantized_model(base, data, tmp_path):
    """QLoRA trains against NF4-rounded weights; the merge goes into the dequantized base, so it equals
    (dequantized base + adapter) exactly, and is far closer to the trained 4-bit model than a naive merge
    into the original full-precision base. (bitsandbytes' CPU 4-bit matmul itself differs from
    dequantize-then-matmul by ~0.5 % relative, so the 4-bit model is matched loosely.)"""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.modeling.merging import merge

    qlora = {"path": str(base), "quantize": "nf4", "double_quant": True}
    trainer = run(config_dict(base, data, tmp_path / "q", model=qlora, adapter=LORA, train={"lr": 5e-3}))
    # Reference: the 4-bit weights this run trained against, dequantized by bitsandbytes, + the adapter
    # through PEFT. (model.keep_4bit_layout stops bitsandbytes repacking them at the first eval forward.)
    dequant = AutoModelForCausalLM.from_pretrained(base)
    quantized = dict(trainer.module.model.get_base_model().named_modules())
    with torch.no_grad():
        for name, module in dequant.named_modules():
            q = quantized.get(f"{name}.base_layer")  # PEFT wraps each quantized linear
            if q is not None:
                module.weight.copy_(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state))
    ids = torch.randint(5, 300, (2, 24))
    reference = logits_of(PeftModel.from_pretrained(dequant, tmp_path / "q" / "final").eval(), ids)
    trained = logits_of(trainer.module.model.eval(), ids)
    merged = logits_of(AutoModelForCausalLM.from_pretrained(
        merge(str(tmp_path / "q"), str(tmp_path / "m"), dtype="float32")).eval(), ids)
    naive = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "q" / "final")
                      .merge_and_unload().eval(), ids)

    assert (merged - reference).abs().max() < 1e-5
    assert (merged - trained).abs().max() < 0.2 * (naive - trained).abs().max()
