"""Padding-free batches (data.padding_free): the same loss and gradients as padded batches, the config checks,
`auto`'s choice and its fallback, and a model that loads anywhere afterwards."""

from __future__ import annotations

import pytest
import torch
from lm_reference import full_logits_loss, grads_of, lm_batch, tiny_llama


@pytest.mark.parametrize("batch_waste", [0.0, 1e9], ids=["per-document", "batched"])
def test_padding_free_batch_equals_the_padded_batch(batch_waste, monkeypatch):
    """One row of documents with per-document attention gives the padded batch's loss and gradients, whether the
    attention runs one SDPA call per document or one batched call over the documents padded inside it."""
    from peft import LoraConfig, get_peft_model

    from tunelab.modeling import attention
    from tunelab.modeling.attention import use_padding_free_attention

    monkeypatch.setattr(attention, "BATCH_WASTE", batch_waste)
    from tunelab.data import Example, collate, collate_padding_free
    from tunelab.objectives import forward

    torch.manual_seed(3)
    lengths = [7, 19, 3, 12]
    examples = []
    for n in lengths:
        ids = torch.randint(1, 97, (n,)).tolist()
        labels = [-100 if i < n // 3 else t for i, t in enumerate(ids)]  # a prompt, then the reply
        examples.append(Example(ids, labels))

    def loss_and_grads(padding_free):
        model = get_peft_model(tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if padding_free:
            use_padding_free_attention(model)
            batch = collate_padding_free(examples)
            assert batch["input_ids"].shape == (1, sum(lengths)) and batch["doc_bounds"] == [0, 7, 26, 29, 41]
        else:
            batch = collate(examples, pad_id=0)
        loss, count = forward.causal_lm_loss(model, batch)
        assert int(count) == int(batch["num_loss_tokens"])
        return loss, grads_of(model, loss), int(count)

    ref, ref_grads, n_ref = loss_and_grads(False)
    got, got_grads, n_got = loss_and_grads(True)
    assert n_got == n_ref
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for name, g in ref_grads.items():
        assert float((got_grads[name] - g).abs().max()) <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_padding_free_attention_keeps_padded_batches_working():
    """A model switched to padding-free attention still masks padding in ordinary (padded) batches."""
    from tunelab.modeling.attention import use_padding_free_attention

    model = tiny_llama(tie=False).eval()
    batch = lm_batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        use_padding_free_attention(model)
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(before[real], after[real], atol=1e-5)


def test_padding_free_config_checks():
    from tunelab.config import UserError, load_config

    base = {"model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl"}], "padding_free": True}}
    assert load_config(data=base).data.padding_free is True
    plain = {"model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}}
    assert load_config(data=plain).data.padding_free == "auto"  # the default, for every method
    assert load_config(data={**plain, "method": "reward"}).data.padding_free == "auto"
    assert load_config(data=plain, overrides=["data.padding_free=false"]).data.padding_free is False
    assert load_config(data=plain, overrides=["data.packing=true"]).data.packing  # auto gives way to packing
    with pytest.raises(UserError, match="padding_free"):
        load_config(data=plain, overrides=["data.padding_free=sometimes"])
    with pytest.raises(UserError, match="choose one"):
        load_config(data={**base, "data": {**base["data"], "packing": True}})
    assert load_config(data={**base, "method": "dpo"}).data.padding_free
    with pytest.raises(UserError, match="sft, dpo and orpo"):
        load_config(data={**base, "method": "reward"})


def test_padding_free_refuses_a_model_that_drops_the_bounds():
    """Bounds that never reach the attention would mean attention across documents: an error, not a silent run."""
    from tunelab.config import UserError
    from tunelab.data import Example, collate_padding_free
    from tunelab.objectives import forward

    batch = collate_padding_free([Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9])])
    with pytest.raises(UserError, match="padding_free"):
        forward.causal_lm_loss(tiny_llama(tie=False), batch)  # never switched to padding-free attention


def _auto_config(method="sft", **data):
    from tunelab.config import load_config

    return load_config(data={"model": {"path": "m"}, "method": method,
                             "data": {"train": [{"path": "d.jsonl"}], **data}})


def test_padding_free_auto_switches_a_model_that_keeps_documents_apart():
    from tunelab.modeling.attention import NAME, choose

    model = tiny_llama(tie=False)
    on, line = choose(_auto_config(), model)
    assert on and "auto -> padding-free" in line and model.config._attn_implementation == NAME
    for cfg in (_auto_config("reward"), _auto_config(packing=True), _auto_config(padding_free=False)):
        model = tiny_llama(tie=False)
        assert choose(cfg, model) == (False, None) and model.config._attn_implementation != NAME


def test_padding_free_auto_falls_back_to_padded_batches_with_a_notice():
    """A model whose layers drop the document bounds would attend across documents: auto keeps padded batches, says
    so in one line, and leaves the model's attention as it was (its padded batches still give the same loss)."""
    from tunelab.modeling.attention import BOUNDS_KWARG, choose
    from tunelab.objectives import forward

    model = tiny_llama(tie=False)
    batch = lm_batch()
    reference = full_logits_loss(model, batch)
    for layer in model.model.layers:
        attend = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=attend, **k: _f(*a, **{n: v for n, v in k.items() if n != BOUNDS_KWARG})
    on, line = choose(_auto_config(), model)
    assert not on and "auto -> padded batches" in line and "does not pass attention arguments" in line
    assert "\n" not in line and model.config._attn_implementation == "sdpa"
    assert float(forward.causal_lm_loss(model, batch)[0]) == pytest.approx(float(reference), rel=1e-5)


def test_padding_free_training_saves_a_model_that_loads_anywhere(tmp_path, capsys):
    """A run with the default data.padding_free (auto) trains through the CLI on padding-free batches and says so,
    and what it saves names no tunelab attention."""
    import yaml
    from tiny import config_dict, make_base_model, write_task_data
    from transformers import AutoModelForCausalLM

    from tunelab.cli import main

    base = make_base_model(tmp_path / "base", warm_steps=0)
    data = write_task_data(tmp_path / "train.jsonl", n=12)
    cfg = config_dict(base, data, tmp_path / "run", train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-3})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert "data.padding_free: auto -> padding-free batches" in capsys.readouterr().out
    final = tmp_path / "run" / "final"
    assert "tunelab" not in (final / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config._attn_implementation != "tunelab_padding_free"
