"""The architecture matrix: tiny random-weight models of each family (tests/archs.py), trained and checked against
transformers and PEFT. One small case per family runs in `make test`; the whole matrix (QLoRA, full fine-tuning,
padding-free training, DPO, generation, reward models) is `@pytest.mark.slow`."""

from __future__ import annotations

import json

import pytest
import torch
from archs import DECODERS, ENCODERS, MOE, build
from tiny import config_dict, write_task_data

from tunelab.config import UserError, load_config

SLOW_MODES = ["qlora", "full", "padding_free", "dpo"]
# make test's share of the ~9 s-per-family LoRA + merge case (CPU time): one family per code path that differs
# (plain, Gemma's soft-capped head, GPT-2's Conv1D, MoE expert weights); every family still has its fast loss check.
FAST_LORA = {"llama", "gemma2", "gpt2", "mixtral"}
FAST_MLM = {"bert"}


def tiered(families, fast):
    return [f if f in fast else pytest.param(f, marks=pytest.mark.slow) for f in families]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data") / "train.jsonl", n=8)


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    from tunelab import tasks

    items, _ = tasks.split_items(16, 4, 0)
    rows = [{"prompt": tasks.to_alpaca(it)["instruction"], "chosen": tasks.to_alpaca(it)["output"], "rejected": "no"}
            for it in items[:8]]
    return tasks.write_jsonl(rows, tmp_path_factory.mktemp("pref") / "pref.jsonl")


_MODELS: dict = {}


def model_dir(family: str, data, tmp_path_factory, kind: str | None = None):
    key = (family, kind)
    if key not in _MODELS:
        texts = data.read_text().splitlines()
        _MODELS[key] = build(family, tmp_path_factory.mktemp(f"{family}-{kind or 'base'}"), texts, kind=kind)
    return _MODELS[key]


def arch_config(base, data_path, out, **sections) -> dict:
    # Templates: the tokenizers have no chat template; alpaca needs no new tokens (an adapter cannot train them).
    sections["data"] = {"template": "alpaca", "max_length": 160, **sections.get("data", {})}
    sections["train"] = {"max_steps": 2, "micro_batch_size": 2, "lr": 2e-2, **sections.get("train", {})}
    return config_dict(base, data_path, out, **sections)


def train_quietly(cfg: dict):
    from tunelab.training.loop import train

    return train(load_config(data=cfg), say=lambda *a, **k: None)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(10, vocab, (2, 20), generator=torch.Generator().manual_seed(0))


def check_merge(run_dir, merged_dir, base):
    """The merged model (plain transformers load) gives the adapter's logits (PEFT load) to 1e-4, and the adapter
    changed the base's by far more, so the comparison can fail."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = sample_ids(base_model.config.vocab_size)
    before = logits(base_model, ids)
    adapted = logits(PeftModel.from_pretrained(base_model, run_dir / "final").eval(), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), ids)
    assert (adapted - before).abs().max() > 1e-2
    assert (merged - adapted).abs().max() <= 1e-4


# ---------------------------------------------------------------- make test: one small case per family

@pytest.mark.parametrize("family", tiered(DECODERS, FAST_LORA))
def test_lora_sft_then_merge_reloads_same_logits(family, data, tmp_path, tmp_path_factory):
    """Default adapter (r 16, dropout 0.05, all-linear), two steps in-process, `merge`, plain reload."""
    from tunelab import merge

    base = model_dir(family, data, tmp_path_factory)
    train_quietly(arch_config(base, data, tmp_path / "run", adapter={}))
    merged = merge(tmp_path / "run", tmp_path / "merged", dtype="float32")
    check_merge(tmp_path / "run", merged, base)
    if family in MOE:
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["router_aux_loss"] > 0 for r in rows if "loss" in r)
        assert_routers_frozen_and_experts_adapted(base, merged)


def assert_routers_frozen_and_experts_adapted(base, merged):
    from transformers import AutoModelForCausalLM

    from tunelab.modeling.moe import expert_parameters, router_modules

    before = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    after_model = AutoModelForCausalLM.from_pretrained(merged)
    after = dict(after_model.named_parameters())
    routers = [f"{name}.weight" for name in router_modules(after_model)]
    experts = expert_parameters(after_model)
    assert routers and experts
    for name in routers:
        assert torch.equal(before[name], after[name]), name
    for name in experts:
        assert not torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("family", list(DECODERS))
def test_training_loss_is_the_models_loss(family, data, tmp_path_factory):
    """The SFT objective runs the decoder and the head itself (chunked CE): its loss must be the model's own
    (Gemma's final logit soft-capping included), and padding-free batches give the padded batch's loss (sliding
    windows included), or padding-free is refused with the reason."""
    from transformers import AutoModelForCausalLM

    from tunelab.modeling.attention import unsupported_reason, use_padding_free_attention
    from tunelab.data import collate, collate_padding_free
    from tunelab.modeling.load import load_tokenizer
    from tunelab.objectives.forward import causal_lm_loss
    from tunelab.objectives.sft import SFT

    base = model_dir(family, data, tmp_path_factory)
    tokenizer = load_tokenizer(str(base))
    cfg = load_config(data=arch_config(base, data, base / "unused"))
    examples = SFT(cfg, tokenizer)._tokenized()[0]
    batch = collate(examples[:3], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        total, n = causal_lm_loss(model, batch)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert max(len(e.input_ids) for e in examples[:3]) > 16  # longer than the sliding windows of archs.py
    assert abs(float(total / n) - float(reference)) < 1e-5
    if unsupported_reason(model):
        with pytest.raises(UserError, match="data.padding_free: .*soft-caps"):
            use_padding_free_attention(model)
        return
    use_padding_free_attention(model)
    with torch.no_grad():
        free_total, free_n = causal_lm_loss(model, collate_padding_free(examples[:3]))
    assert int(free_n) == int(n)
    assert abs(float(free_total) - float(total)) < 1e-4 * float(n)


@pytest.mark.parametrize("family", tiered(ENCODERS, FAST_MLM))
def test_encoder_mlm_with_lora(family, data, tmp_path, tmp_path_factory):
    base = model_dir(family, data, tmp_path_factory)
    cfg = arch_config(base, data, tmp_path / "run", method="mlm", adapter={},
                      data={"train": [{"path": str(data), "format": "text", "text_field": "instruction"}]})
    train_quietly(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


# ---------------------------------------------------------------- MoE

def test_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tunelab.modeling.moe import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2 * 7, 6, generator=g) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for m in (None, mask):
        ours = load_balancing_loss(layers, num_experts=6, top_k=2, attention_mask=m)
        theirs = load_balancing_loss_func(layers, 6, 2, m)
        assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)
    assert not torch.allclose(load_balancing_loss(layers, 6, 2, mask), load_balancing_loss(layers, 6, 2, None))


def test_router_aux_loss_is_added_per_unit(data, tmp_path_factory):
    """SFT on a MoE model: summed loss = CE sum + coef * aux * loss tokens, with aux from transformers' function on
    the same router logits; a dense model refuses an explicit coefficient."""
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tunelab.data import collate
    from tunelab.modeling.load import load_tokenizer
    from tunelab.objectives.forward import causal_lm_loss
    from tunelab.objectives.sft import SFT

    base = model_dir("mixtral", data, tmp_path_factory)
    tokenizer = load_tokenizer(str(base))
    cfg = load_config(data=arch_config(base, data, base / "unused", train={"router_aux_loss_coef": 0.5}))
    objective = SFT(cfg, tokenizer)
    examples = objective._tokenized()[0]
    batch = collate(examples[:3], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    objective.setup(model)
    with torch.no_grad():
        total, metrics = objective.loss(model, batch)
        ce, n = causal_lm_loss(model, batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        aux = load_balancing_loss_func(out.router_logits, 4, 2, batch["attention_mask"])
    assert torch.allclose(total, ce + 0.5 * aux * n, rtol=1e-5)
    assert torch.allclose(metrics["router_aux_loss"], aux * n, rtol=1e-5)
    dense = model_dir("llama", data, tmp_path_factory)
    cfg = load_config(data=arch_config(dense, data, dense / "unused", train={"router_aux_loss_coef": 0.5}))
    with pytest.raises(UserError, match="train.router_aux_loss_coef: llama has no experts"):
        SFT(cfg, tokenizer).setup(AutoModelForCausalLM.from_pretrained(dense))


def test_modules_lists_experts_routers_and_all_linear(data, tmp_path_factory, capsys):
    from tunelab.cli import main

    base = model_dir("qwen2_moe", data, tmp_path_factory)
    assert main(["modules", str(base)]) == 0
    out = capsys.readouterr().out
    assert "experts.gate_up_proj" in out and "experts.down_proj" in out
    routers = out.split("routers")[1].split("all-linear")[0]
    assert "gate" in routers and "shared_expert_gate" in routers
    all_linear = out.split("all-linear = ")[1]
    assert "q_proj" in all_linear and "experts.gate_up_proj" in all_linear and "shared_expert_gate" not in all_linear


# ---------------------------------------------------------------- the full matrix (make test-slow)

@pytest.mark.slow
@pytest.mark.parametrize("mode", SLOW_MODES)
@pytest.mark.parametrize("family", list(DECODERS))
def test_matrix(family, mode, data, preference_data, tmp_path, tmp_path_factory):
    base = model_dir(family, data, tmp_path_factory)
    sections: dict = {"adapter": {}}
    if mode == "qlora":
        sections["model"] = {"quantize": "nf4"}
    elif mode == "full":
        sections = {}
    elif mode == "padding_free":
        sections["data"] = {"padding_free": True}
    elif mode == "dpo":
        sections.update(method="dpo", data={"train": [{"path": str(preference_data), "format": "preference"}]})
    cfg = arch_config(base, data, tmp_path / "run", **sections)
    if mode == "padding_free" and family == "gemma2":  # attention soft-capping: refused with the reason
        with pytest.raises(UserError, match="data.padding_free: gemma2 soft-caps its attention scores"):
            train_quietly(cfg)
        return
    train_quietly(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if mode == "qlora":
        from tunelab import merge

        merged = merge(tmp_path / "run", tmp_path / "merged", dtype="float32")
        assert (merged / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(DECODERS))
def test_generate_matches_plain_transformers(family, data, tmp_path_factory):
    """`tunelab.generate` gives plain transformers' greedy continuation of the same prompt ids."""
    from transformers import AutoModelForCausalLM

    from tunelab import generate
    from tunelab.modeling.infer import prompt_ids
    from tunelab.modeling.load import load_tokenizer

    base = model_dir(family, data, tmp_path_factory)
    prompt = "Reverse the word: apple"
    reply = generate(base, prompt, max_new_tokens=8, template="alpaca", dtype="float32")
    tokenizer = load_tokenizer(str(base))
    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}], "alpaca")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert expected.strip() and reply.strip() == expected.strip()


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, {}])
@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_reward_model(family, adapter, data, preference_data, tmp_path, tmp_path_factory):
    base = model_dir(family, data, tmp_path_factory)
    sections = {"method": "reward", "data": {"train": [{"path": str(preference_data), "format": "preference"}]}}
    if adapter is not None:
        sections["adapter"] = adapter
    train_quietly(arch_config(base, data, tmp_path / "run", **sections))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] > 0 for r in rows if "loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_mlm_full(family, data, tmp_path, tmp_path_factory):
    base = model_dir(family, data, tmp_path_factory)
    train_quietly(arch_config(base, data, tmp_path / "run", method="mlm",
                              data={"train": [{"path": str(data), "format": "text", "text_field": "instruction"}]}))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
