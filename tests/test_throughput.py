"""Throughput machinery, checked for correctness (timings live in bench/): length-grouped batch order, the fused
linear cross-entropy in the SFT loss against the plain one, the tokenized-data cache and its invalidation."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.order import Batches, epoch_order, item_length
from tunelab.training.run_state import TrainState

# ---------------------------------------------------------------- length-grouped order


def _lengths(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 500 + 10).long().tolist()


@pytest.mark.parametrize("n,mb", [(1000, 8), (37, 4), (5, 8)])
def test_grouped_order_is_a_seeded_permutation(n, mb):
    lengths = _lengths(n)
    order = epoch_order(n, mb, seed=3, epoch=1, lengths=lengths)
    flat = [i for b in order for i in b]
    assert sorted(flat) == list(range(n))  # every item exactly once
    assert sum(len(b) != mb for b in order) <= 1  # one short batch at most, like the plain order
    assert order == epoch_order(n, mb, seed=3, epoch=1, lengths=lengths)  # deterministic
    if n > mb:
        assert order != epoch_order(n, mb, seed=4, epoch=1, lengths=lengths)
        assert order != epoch_order(n, mb, seed=3, epoch=2, lengths=lengths)


def test_grouped_order_pads_less_and_still_shuffles_batches():
    n, mb = 2000, 8
    lengths = _lengths(n)

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order)

    plain = epoch_order(n, mb, 0, 0)
    grouped = epoch_order(n, mb, 0, 0, lengths)
    assert padding(grouped) < 0.1 * padding(plain)
    # batches are not served longest-first: the batch order is shuffled after grouping
    first = [max(lengths[i] for i in b) for b in grouped]
    assert first != sorted(first, reverse=True) and first != sorted(first)


def test_grouped_stream_resumes_exactly():
    n, mb, seed = 300, 4, 7
    lengths = _lengths(n, 1)
    straight = Batches(n, mb, seed, TrainState(), lengths)
    expected = [straight.take(3) for _ in range(60)]  # crosses several epoch boundaries
    state = TrainState()
    first = Batches(n, mb, seed, state, lengths)
    got = [first.take(3) for _ in range(23)]
    resumed = Batches(n, mb, seed, copy.deepcopy(state), lengths)  # a new process, from the saved (epoch, micro)
    got += [resumed.take(3) for _ in range(37)]
    assert got == expected


def test_item_length_of_examples_and_pairs():
    from types import SimpleNamespace

    from tunelab.config import UserError

    assert item_length(SimpleNamespace(input_ids=[1, 2, 3])) == 3
    assert item_length(SimpleNamespace(chosen_ids=[1, 2], rejected_ids=[1, 2, 3, 4], chosen_labels=[0])) == 4
    with pytest.raises(UserError, match="group_by_length"):
        item_length(SimpleNamespace(blocks=None, index=0))


def test_group_by_length_trains_and_resumes_exactly(tmp_path):
    """End to end through the loop: a grouped run interrupted and resumed ends with the same weights."""
    from tiny import config_dict, make_base_model, write_task_data

    from tunelab.config import load_config
    from tunelab.training.loop import Trainer

    base = make_base_model(tmp_path / "base", warm_steps=0)
    data = write_task_data(tmp_path / "train.jsonl", n=24)
    train = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, "lr": 2e-3, "group_by_length": True}

    def run(out, resume=False):
        cfg = config_dict(base, data, out, adapter={"r": 4, "alpha": 8, "dropout": 0.1}, train=train)
        t = Trainer(load_config(data=cfg), resume=resume, say=lambda *a: None)
        t.run()
        return {k: v.detach().clone() for k, v in t.module.named_parameters() if v.requires_grad}

    straight = run(tmp_path / "straight")
    run(tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "partial" / "final")
    resumed = run(tmp_path / "partial", resume=True)
    assert max((straight[k] - resumed[k]).abs().max() for k in straight) < 1e-6


# ---------------------------------------------------------------- fused cross-entropy in the SFT loss


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a head with real spread, so the softmax is not nearly uniform
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[1, 15:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _reference_loss(model, batch):
    """Plain full-logits cross-entropy, summed over the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["full", "full-tied", "lora", "lora-save-head"])
def test_fused_sft_loss_matches_plain_cross_entropy(mode, monkeypatch):
    from tunelab.objectives import forward, losses

    model = _tiny_llama(tie=mode == "full-tied")
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        save = ["lm_head"] if mode == "lora-save-head" else None
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 modules_to_save=save, task_type="CAUSAL_LM"))
        with torch.no_grad():  # non-zero B, so the adapter's gradients are not trivially zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    _, head = forward.decoder_and_head(model)
    linear = forward.plain_linear(head)
    assert linear is not None
    if mode == "lora-save-head":
        assert linear is head.modules_to_save["default"] and linear.weight.requires_grad
    calls = []
    monkeypatch.setattr(forward, "chunked_cross_entropy",
                        lambda *a, **k: calls.append(1) or losses.chunked_cross_entropy(*a, **k))
    monkeypatch.setattr(forward, "head_chunk_rows", lambda vocab, heads=1: 16)  # several chunks
    batch = _batch()
    model.train()  # dropout is 0 in this config: train and eval forwards agree
    ref = _reference_loss(model, batch)
    ref_grads = _grads(model, ref)
    fused, count = forward.causal_lm_loss(model, batch)
    fused_grads = _grads(model, fused)
    assert calls, "the fused path was not taken"
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert float(fused) == pytest.approx(float(ref), rel=1e-5)
    assert set(fused_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        scale = max(1.0, float(g.abs().max()))
        assert float((fused_grads[name] - g).abs().max()) <= 1e-5 * scale, name
    if mode.startswith("lora") and mode != "lora-save-head":
        assert not any("lm_head" in n for n in fused_grads)  # frozen head: no weight gradient formed


def test_adapted_head_falls_back_to_checkpointed_chunks():
    from peft import LoraConfig, get_peft_model

    from tunelab.objectives import forward

    model = get_peft_model(_tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    _, head = forward.decoder_and_head(model)
    assert forward.plain_linear(head) is None
    batch = _batch()
    ref = _reference_loss(model, batch)
    got, _ = forward.causal_lm_loss(model, batch)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


# ---------------------------------------------------------------- tokenized-data cache


@pytest.fixture
def sft_setup(tmp_path, tiny_tokenizer, monkeypatch):
    from tunelab.config import load_config

    monkeypatch.setenv("TUNELAB_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def make(**data_cfg):
        cfg = load_config(data={"model": {"path": "unused"},
                                "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "chatml",
                                         "max_length": 64, **data_cfg}})
        return cfg

    return make, data, tmp_path / "cache"


def _datasets(cfg, tokenizer, monkeypatch):
    """(train, eval, built): built says whether the rows were read and tokenized (a cache miss)."""
    from tunelab.objectives.sft import SFT

    objective = SFT(cfg, tokenizer)
    built = []
    original = objective._tokenized
    monkeypatch.setattr(objective, "_tokenized", lambda: built.append(1) or original())
    train, evals = objective.datasets()
    return train, evals, bool(built), objective.stats


def _plain(items):
    return [(list(e.input_ids), list(e.labels), getattr(e, "position_ids", None)) for e in items]


def test_token_cache_hits_and_returns_the_same_examples(sft_setup, tiny_tokenizer, monkeypatch):
    make, _, cache_root = sft_setup
    train1, _, built1, stats1 = _datasets(make(), tiny_tokenizer, monkeypatch)
    train2, _, built2, stats2 = _datasets(make(), tiny_tokenizer, monkeypatch)
    assert built1 and not built2
    assert _plain(train1) == _plain(train2) and stats1 == stats2
    assert len(list((cache_root / "tokenized").glob("*.npz"))) == 1
    # packing is applied after the cache: same entry, and the same blocks as packing uncached examples
    packed, _, built3, _ = _datasets(make(packing=True), tiny_tokenizer, monkeypatch)
    monkeypatch.setenv("TUNELAB_CACHE_DIR", "off")
    uncached, _, built4, _ = _datasets(make(packing=True), tiny_tokenizer, monkeypatch)
    assert not built3 and built4 and _plain(packed) == _plain(uncached)


@pytest.mark.parametrize("change", ["template", "max_length", "train_on_prompt", "data", "tokenizer", "eval_split"])
def test_token_cache_invalidates(change, sft_setup, tiny_tokenizer, monkeypatch):
    make, data, _ = sft_setup
    tok = tiny_tokenizer
    before, _, built, _ = _datasets(make(), tok, monkeypatch)
    assert built
    cfg = make()
    if change == "template":
        cfg = make(template="alpaca")
    elif change == "max_length":
        cfg = make(max_length=12)
    elif change == "train_on_prompt":
        cfg = make(train_on_prompt=True)
    elif change == "data":
        data.write_text(data.read_text().replace("plus 3", "plus three"))  # same size, other bytes
    elif change == "tokenizer":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.add_tokens(["plus"])
    elif change == "eval_split":
        cfg = make(eval_fraction=0.25)
    after, evals, built, _ = _datasets(cfg, tok, monkeypatch)
    assert built, f"changing {change} must not reuse the cached examples"
    if change != "eval_split":
        assert _plain(after) != _plain(before)
    else:
        assert len(after) + len(evals) == len(before) and evals


def test_token_cache_survives_a_bad_entry(sft_setup, tiny_tokenizer, monkeypatch):
    make, _, cache_root = sft_setup
    train1, _, _, _ = _datasets(make(), tiny_tokenizer, monkeypatch)
    for entry in (cache_root / "tokenized").glob("*.npz"):
        entry.write_bytes(b"not a zip file")
    train2, _, built, _ = _datasets(make(), tiny_tokenizer, monkeypatch)
    assert built and _plain(train1) == _plain(train2)


# ---------------------------------------------------------------- padding-free batches


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
        model = get_peft_model(_tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
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
        return loss, _grads(model, loss), int(count)

    ref, ref_grads, n_ref = loss_and_grads(False)
    got, got_grads, n_got = loss_and_grads(True)
    assert n_got == n_ref
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for name, g in ref_grads.items():
        assert float((got_grads[name] - g).abs().max()) <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_padding_free_attention_keeps_padded_batches_working():
    """A model switched to padding-free attention still masks padding in ordinary (padded) batches."""
    from tunelab.modeling.attention import use_padding_free_attention

    model = _tiny_llama(tie=False).eval()
    batch = _batch()
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
        forward.causal_lm_loss(_tiny_llama(tie=False), batch)  # never switched to padding-free attention


def _auto_config(method="sft", **data):
    from tunelab.config import load_config

    return load_config(data={"model": {"path": "m"}, "method": method,
                             "data": {"train": [{"path": "d.jsonl"}], **data}})


def test_padding_free_auto_switches_a_model_that_keeps_documents_apart():
    from tunelab.modeling.attention import NAME, choose

    model = _tiny_llama(tie=False)
    on, line = choose(_auto_config(), model)
    assert on and "auto -> padding-free" in line and model.config._attn_implementation == NAME
    for cfg in (_auto_config("reward"), _auto_config(packing=True), _auto_config(padding_free=False)):
        model = _tiny_llama(tie=False)
        assert choose(cfg, model) == (False, None) and model.config._attn_implementation != NAME


def test_padding_free_auto_falls_back_to_padded_batches_with_a_notice():
    """A model whose layers drop the document bounds would attend across documents: auto keeps padded batches, says
    so in one line, and leaves the model's attention as it was (its padded batches still give the same loss)."""
    from tunelab.modeling.attention import BOUNDS_KWARG, choose
    from tunelab.objectives import forward

    model = _tiny_llama(tie=False)
    batch = _batch()
    reference = _reference_loss(model, batch)
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


# ---------------------------------------------------------------- LoRA dropout


def _saved_bytes(forward):
    """(forward(), bytes autograd keeps for the backward pass while it runs: each storage once)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(kept.values())


def test_lora_dropout_keeps_a_mask_and_gives_the_dropped_out_matmul(monkeypatch):
    """DroppedInputLinear equals lora_A(dropout(x)) with the mask it drew (output and both gradients), keeps less for
    the backward pass than PEFT's dropout + linear, and fuse_lora_dropout switches a PEFT model's plain adapters."""
    from peft import LoraConfig, get_peft_model

    from tunelab.modeling import lora_dropout
    from tunelab.modeling.lora_dropout import DroppedInputLinear, fuse_lora_dropout, rounded_p

    p = 0.25
    x = torch.randn(3, 11, 32, requires_grad=True)
    layer = torch.nn.Linear(32, 8, bias=False)
    layer.__class__ = DroppedInputLinear
    layer.dropout_p = p
    drawn = []
    draw = lora_dropout.keep_mask
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda *a: drawn.append(draw(*a)) or drawn[-1])
    out = layer(x)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.weight), grad_out)
    (keep,) = drawn
    assert keep.dtype == torch.bool and keep.shape == x.shape and 0 < int(keep.sum()) < keep.numel()
    ref = F.linear(x * keep / (1 - p), layer.weight)  # p = 0.25 is a multiple of 1/65536: exact
    rx, rw = torch.autograd.grad(ref, (x, layer.weight), grad_out)
    assert rounded_p(p) == p
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(gx, rx, atol=1e-6) and torch.allclose(gw, rw, atol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # no dropout outside training

    def kept_bytes(model):
        return _saved_bytes(lambda: model(input_ids=torch.randint(0, 97, (2, 24))))[1]

    def lora(fused):
        torch.manual_seed(0)
        model = get_peft_model(_tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                  target_modules="all-linear"))
        if fused:
            assert fuse_lora_dropout(model) == 14  # 7 linears x 2 layers
        return model.train()

    peft_model, fused_model = lora(False), lora(True)
    assert sum(isinstance(m, DroppedInputLinear) for m in fused_model.modules()) == 14
    assert kept_bytes(fused_model) < 0.8 * kept_bytes(peft_model)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_lora_dropout_mask_drops_each_element_independently_with_p(p):
    """keep_mask draws 16 random bits per element, four elements from each 64-bit draw: every one of the four lanes
    must drop at rate p (a generator that leaves the sign bit 0 would never drop one lane), neighbours must be
    uncorrelated, and two draws must differ. Bounds are 6 standard deviations of the binomial."""
    from tunelab.modeling.lora_dropout import keep_mask, rounded_p

    assert abs(rounded_p(p) - p) <= 0.5 / 65536
    n = 1 << 20
    keep = keep_mask((n // 64, 64), p, "cpu").flatten()
    drop = (~keep).double()
    sd = (p * (1 - p) / (n // 4)) ** 0.5
    for lane in range(4):
        assert abs(drop[lane::4].mean().item() - rounded_p(p)) < 6 * sd
    pairs = torch.stack([drop[0::2], drop[1::2]])
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 6 / (n // 2) ** 0.5
    assert not torch.equal(keep, keep_mask((n // 64, 64), p, "cpu").flatten())


# ---------------------------------------------------------------- gated MLP


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gated_mlp_keeps_no_activated_gate_and_gives_the_same_gradients(lora):
    """A model whose MLPs keep_less_in_gated_mlps switched gives transformers' own loss and gradients, no longer
    keeps act(gate) for the backward pass (gate, up and their product stay), and the probe leaves the run's random
    state alone. An MLP with the same attribute names that computes something else keeps its forward."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tunelab.modeling.gated_mlp import keep_less_in_gated_mlps

    def build():
        model = _tiny_llama(tie=False)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        return model.train()

    reference, model = build(), build()
    state = torch.get_rng_state()
    assert keep_less_in_gated_mlps(model, torch.float32) == 2
    assert torch.equal(torch.get_rng_state(), state)
    ids = torch.randint(0, 97, (2, 24))

    def loss_grads_kept(m):
        loss, kept = _saved_bytes(lambda: m(input_ids=ids, labels=ids).loss)
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, kept

    loss, grads, kept = loss_grads_kept(model)
    ref_loss, ref_grads, ref_kept = loss_grads_kept(reference)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5), name
    assert ref_kept - kept == 2 * (2 * 24 * 64 * 4)  # 2 layers x act(gate) [2, 24, 64] fp32

    class Doubled(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)

    mlp = Doubled(_tiny_llama(tie=False).config)
    assert keep_less_in_gated_mlps(mlp, torch.float32) == 0 and type(mlp) is Doubled
