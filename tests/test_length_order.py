"""Length-grouped batch order (train.group_by_length): a seeded permutation that pads less, resumes exactly."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from tunelab.data.order import Batches, epoch_order, item_length
from tunelab.training.run_state import TrainState


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
