"""bench/grpo.py's instrument (bench/peers/step_clock.py), which both tunelab's and TRL's processes install: it
must force every completion to full length, however the caller passes its generation settings, and count and
time what it saw, or the benchmark compares unequal work."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))
from step_clock import StepClock  # noqa: E402


@pytest.fixture
def eager_stopper():
    """A tiny Llama whose greedy choice is always its EOS (token 0): zero final-norm gain, so every logit is 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, eos_token_id=0, pad_token_id=0, bos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    model.model.norm.weight.data.zero_()
    return model


@pytest.mark.parametrize("style", ["kwargs", "generation_config"])  # tunelab's call, TRL's call
def test_clock_forces_full_length_and_counts_it(eager_stopper, style):
    from transformers import GenerationConfig

    ids = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=0, pad_token_id=0)
    call = (dict(**settings, min_new_tokens=None) if style == "kwargs"
            else dict(generation_config=GenerationConfig(**settings)))
    unforced = eager_stopper.generate(input_ids=ids, attention_mask=mask, **call)
    assert unforced.shape[1] == ids.shape[1] + 1  # without the clock it stops at once: the test can fail
    clock = StepClock(min_new_tokens=6)
    clock.install()
    try:
        out = eager_stopper.generate(input_ids=ids, attention_mask=mask, **call)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        opt.step()
    finally:
        clock.uninstall()
    assert out.shape == (2, ids.shape[1] + 6) and not (out[:, ids.shape[1]:] == 0).any()
    (step,) = clock.steps
    assert (step["sequences"], step["generated_tokens"], step["prompt_tokens"], step["stopped_early"]) == (2, 12, 7, 0)
    assert 0 < step["generate_s"] <= step["step_s"] and step["update_s"] == pytest.approx(
        step["step_s"] - step["generate_s"])
    assert 0 <= step["generate_cpu_s"] <= step["step_cpu_s"]
    assert clock.dtype == "torch.float32"
    opt.step()  # uninstalled: no second step recorded
    assert len(clock.steps) == 1
