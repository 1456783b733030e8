"""SFT's token accuracy (issue 18: OpenAI's train/valid mean token accuracy) against the plain full-logits one,
`(logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]` of `model(input_ids).logits`: per forward on
every head path, and as the trainer logs it (padded and padding-free batches, full and LoRA, accumulated, eval).
Ours counts a label whose logit is the largest; the two differ only where the top logits tie exactly, which with
float32 logits of float weights has probability zero (none here: the counts are compared exactly)."""

from __future__ import annotations

import pytest
import torch
from lm_reference import lm_batch, tiny_llama
from tiny import config_dict, make_base_model, write_task_data

from tunelab.config import load_config
from tunelab.training.loop import Trainer


def reference_counts(model, batch) -> tuple[int, int]:
    """(label positions whose argmax is the label, label positions) from plain forwards: a padded batch as it is, a
    padding-free row one document at a time (its first token carries no label, as collate_padding_free says)."""
    if "doc_bounds" in batch:
        bounds = batch["doc_bounds"]
        pieces = [(batch["input_ids"][:, a:b], batch["labels"][:, a:b], None) for a, b in zip(bounds, bounds[1:])]
    else:
        pieces = [(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    correct = total = 0
    with torch.no_grad():
        for ids, labels, mask in pieces:
            logits = model(input_ids=ids, attention_mask=mask).logits
            target = labels[:, 1:]
            hits = (logits[:, :-1].argmax(-1) == target)[target != -100]
            correct, total = correct + int(hits.sum()), total + hits.numel()
    return correct, total


def with_top_token_targets(model, batch) -> dict:
    """`batch` with every other labelled target replaced by the model's top token there, so the accuracy is far
    from 0 and a wrong count shows."""
    with torch.no_grad():
        top = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    labels = batch["labels"].clone()
    swap = torch.zeros_like(labels, dtype=torch.bool)
    swap[:, 1::2] = labels[:, 1::2] != -100
    labels[swap] = top[:, :-1][swap[:, 1:]]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("mode", ["full", "lora", "lora-head", "softcap"])
def test_correct_count_equals_full_logits_argmax(mode, monkeypatch):
    """The fused head (full, LoRA with a frozen head) and the checkpointed chunks (an adapted head; a soft-capped
    one, whose cap keeps the argmax), several chunks each, padded and padding-free."""
    from tunelab.data import Example, collate_padding_free
    from tunelab.modeling.attention import use_padding_free_attention
    from tunelab.objectives import forward

    model = tiny_llama(tie=False)
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if mode == "lora-head" else [])
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    if mode == "softcap":
        model.config.final_logit_softcapping = 3.0  # Llama's own forward does not cap: argmax is the same either way
    _, head = forward.decoder_and_head(model)
    assert (forward.plain_linear(head) is None) == (mode in ("lora-head", "softcap"))
    monkeypatch.setattr(forward, "head_chunk_rows", lambda vocab, heads=1: 8)  # several chunks
    model.eval()
    batch = with_top_token_targets(model, lm_batch())
    want, n_want = reference_counts(model, batch)
    assert 0 < want < n_want
    loss, n, correct = forward.causal_lm_loss_and_correct(model, batch)  # with gradients: the training path
    assert (int(correct), int(n)) == (want, n_want) and correct.dtype == torch.long
    loss.backward()

    rows = [Example([int(t) for t in ids[m.bool()]], [int(t) for t in lab[m.bool()]])
            for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    free = collate_padding_free(rows)
    free_want, free_n = reference_counts(model, free)
    if mode != "softcap":
        use_padding_free_attention(model)
        with torch.no_grad():
            _, n, correct = forward.causal_lm_loss_and_correct(model, free)
        assert (int(correct), int(n)) == (free_want, free_n)
        assert free_want > 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_task_data(root / "train.jsonl", n=16), write_task_data(root / "eval.jsonl", n=6, seed=3)


@pytest.mark.parametrize("adapter,padding_free", [(None, False), (None, True), ("lora", False), ("lora", True)])
def test_logged_token_accuracy_is_the_steps_and_the_eval_sets(base, data, tmp_path, monkeypatch, adapter,
                                                              padding_free):
    """Each logged step's token_accuracy is the fraction over the step's micro-batches (grad_accum 2: correct
    summed over both, over their tokens summed), measured by plain forwards before the update; eval_token_accuracy
    likewise over the eval set."""
    from tunelab.training.tracking import read_metrics

    steps, evals = [], []
    step, evaluate = Trainer._step, Trainer.evaluate

    def reference_step(self, batches):
        self.module.model.eval()  # dropout 0 here; eval only so that nothing differs from a plain forward
        counts = [reference_counts(self.module.model, b) for b in batches]
        self.module.model.train()
        steps.append(counts)
        return step(self, batches)

    def reference_evaluate(self):
        evals.append([reference_counts(self.module.model, self._collate([i], self.eval_items))
                      for i in range(len(self.eval_items))])
        return evaluate(self)

    monkeypatch.setattr(Trainer, "_step", reference_step)
    monkeypatch.setattr(Trainer, "evaluate", reference_evaluate)
    train, held_out = data
    sections = {"train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 2, "lr": 5e-4, "eval_every": 2,
                          "log_every": 1},
                "data": {"eval": [{"path": str(held_out), "format": "alpaca"}], "padding_free": padding_free}}
    if adapter:
        sections["adapter"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    Trainer(load_config(data=config_dict(base, train, tmp_path, **sections)), say=lambda *a: None).run()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and len(steps) == 3 and len(evals) == 2
    unweighted = []
    for row, counts in zip(rows, steps):
        assert len(counts) == 2
        weighted = sum(c for c, _ in counts) / sum(n for _, n in counts)
        unweighted.append(abs(sum(c / n for c, n in counts) / 2 - weighted))
        assert 0 < weighted < 1
        assert row["token_accuracy"] == pytest.approx(weighted, abs=1e-12)
    assert max(unweighted) > 1e-3  # the mean of the micro-batches' fractions would be another number
    for row, counts in zip([rows[1], rows[2]], evals):
        want = sum(c for c, _ in counts) / sum(n for _, n in counts)
        assert 0 < want < 1
        assert row["eval_token_accuracy"] == pytest.approx(want, abs=1e-12)
