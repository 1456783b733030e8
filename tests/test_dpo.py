"""method: dpo end to end: the objective's loss against dpo_loss on log-probs from a plain HF forward, the
reference model (adapter disabled / frozen copy / precomputed), one copy of the base weights under LoRA,
learning on held-out pairs, preference-pair tokenization and the report of pairs that cannot teach anything.
(losses.dpo_loss itself is checked against TRL in test_losses.py.)"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from tiny import config_dict, make_base_model

from tunelab import tasks
from tunelab.config import UserError, load_config
from tunelab.objectives.losses import dpo_loss

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
FAMILIES = ["upper", "sort"]  # preferences a 2-layer, 64-wide model can generalise to unseen prompts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def split():
    return tasks.split_items(192, 40, seed=1, families=FAMILIES)


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, split):
    root = tmp_path_factory.mktemp("prefs")
    train, test = split
    return (tasks.write_jsonl([tasks.to_preference(i) for i in train], root / "train.jsonl"),
            tasks.write_jsonl([tasks.to_preference(i) for i in test], root / "test.jsonl"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, split):
    """24 training and 8 held-out pairs, for the tests that do not learn."""
    root = tmp_path_factory.mktemp("small")
    train, test = split
    return (tasks.write_jsonl([tasks.to_preference(i) for i in train[:24]], root / "train.jsonl"),
            tasks.write_jsonl([tasks.to_preference(i) for i in test[:8]], root / "test.jsonl"))


def dpo_config(base, train_path, out, eval_path=None, **sections):
    data = {"train": [{"path": str(train_path), "format": "preference"}], **sections.pop("data", {})}
    if eval_path is not None:
        data["eval"] = [{"path": str(eval_path), "format": "preference"}]
    return config_dict(base, train_path, out, method="dpo", data=data, **sections)


def build_objective(cfg_dict):
    """(objective with its datasets loaded, model) as the trainer builds them, without the loop."""
    from tunelab.modeling.build import build
    from tunelab.objectives import make_objective

    cfg = load_config(data=cfg_dict)
    model, tokenizer = build(cfg, "causal_lm", torch.device("cpu"))
    objective = make_objective(cfg, tokenizer)
    objective.datasets()
    return objective, model


def plain_logps(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Summed log-prob of the labelled tokens of ONE unpadded sequence, from the model's full logits."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    target = torch.tensor(labels[1:], device=device)
    keep = target != -100
    return logits[:-1].log_softmax(-1)[keep].gather(-1, target[keep][:, None]).sum()


def n_response(labels: list[int]) -> int:
    return sum(label != -100 for label in labels[1:])


def plain_dpo(policy, reference, items, dc, grad=False):
    """dpo_loss from per-sequence log-probs computed one sequence at a time with plain HF forwards."""
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        pc = torch.stack([plain_logps(policy, i.chosen_ids, i.chosen_labels) for i in items])
        pr = torch.stack([plain_logps(policy, i.rejected_ids, i.rejected_labels) for i in items])
    with torch.no_grad():
        rc = torch.stack([plain_logps(reference, i.chosen_ids, i.chosen_labels) for i in items])
        rr = torch.stack([plain_logps(reference, i.rejected_ids, i.rejected_labels) for i in items])
    lc = torch.tensor([n_response(i.chosen_labels) for i in items])
    lr = torch.tensor([n_response(i.rejected_labels) for i in items])
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=dc.beta, loss_type=dc.loss, label_smoothing=dc.label_smoothing,
                                gamma=dc.gamma, chosen_len=lc, rejected_len=lr)
    # RPO: + alpha x the mean NLL of each chosen response's tokens
    return losses + dc.nll_alpha * (-pc / lc), r_c, r_r


def dpo_loss_only(objective, model, batch) -> float:
    objective.dc.nll_alpha, alpha = 0.0, objective.dc.nll_alpha
    try:
        with torch.no_grad():
            return objective.loss(model, batch)[0].item()
    finally:
        objective.dc.nll_alpha = alpha


class AdapterOff:
    """The PEFT model called with its adapter disabled: the reference model of LoRA DPO."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids):
        with self.model.disable_adapter():
            return self.model(input_ids=input_ids)

    def parameters(self):
        return self.model.parameters()


# ---------------------------------------------------------------- the loss against an independent computation

@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("ipo", {"beta": 0.5}),
                                        ("label_smoothing", {"label_smoothing": 0.2}),
                                        ("simpo", {"beta": 2.0, "gamma": 0.7}),
                                        ("sigmoid", {"nll_alpha": 0.7})])
def test_lora_objective_loss_equals_dpo_loss_of_plain_forward(base, small, tmp_path, loss, extra):
    objective, model = build_objective(dpo_config(base, small[0], tmp_path / "run", adapter=LORA,
                                                  dpo={"loss": loss, **extra}))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    objective.setup(model)
    model.eval()
    items = objective.train_items[:6]
    batch = objective.collate(items)
    assert batch["input_ids"].shape[0] == 12  # chosen and rejected in one forward
    reference = AdapterOff(model)
    with torch.no_grad():
        got, metrics = objective.loss(model, batch)
        want, r_c, r_r = plain_dpo(model, reference, items, objective.dc)
    assert got.item() == pytest.approx(want.sum().item(), rel=1e-5, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(r_c.sum().item(), rel=1e-5, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(r_r.sum().item(), rel=1e-5, abs=1e-5)
    assert metrics["accuracy"].item() == (r_c > r_r).sum().item()
    assert abs(r_c - r_r).max() > 1e-3  # the perturbed adapter makes the pairs differ: the check has teeth
    if loss != "sigmoid":
        return
    if extra:  # RPO: the NLL term is a visible part of the loss
        assert got.item() > dpo_loss_only(objective, model, batch) + 0.1
    # the gradient through the chunked, recomputed head equals autograd through the full logits
    model.zero_grad()
    objective.loss(model, batch)[0].backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain_dpo(model, reference, items, objective.dc, grad=True)[0].sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # equal up to float summation order (batched and padded vs one sequence at a time)
            assert (ours[name] - p.grad).abs().max() <= 1e-3 * p.grad.abs().max() + 1e-8, name
    assert max(g.abs().max() for g in ours.values()) > 0


@pytest.mark.parametrize("precompute", [False, True])
def test_full_finetuning_reference_is_the_starting_model(base, small, tmp_path, precompute):
    """Full fine-tuning: a frozen copy, or log-probs precomputed in setup, both equal the untouched base."""
    from transformers import AutoModelForCausalLM

    objective, model = build_objective(dpo_config(base, small[0], tmp_path / "run", eval_path=small[1],
                                                  dpo={"precompute_reference": precompute}))
    objective.setup(model)
    with torch.no_grad():  # training moves the policy; the reference must not move with it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    items = objective.train_items[:4]
    batch = objective.collate(items)
    assert ("ref_chosen" in batch) == precompute
    assert (objective.ref_model is None) == precompute
    assert all(i.ref_chosen is not None for i in objective.eval_items) == precompute
    start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        got, _ = objective.loss(model, batch)
        want, r_c, r_r = plain_dpo(model, start, items, objective.dc)
    assert got.item() == pytest.approx(want.sum().item(), rel=1e-5, abs=1e-6)
    assert abs(r_c - r_r).max() > 1e-3


# ---------------------------------------------------------------- memory: one copy of the base weights

def tensor_storage_bytes(*roots) -> int:
    """Bytes of the distinct storages of every tensor reachable from `roots` (modules, objects, containers)."""
    seen, storages, stack = set(), {}, list(roots)
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, str, bytes)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip) or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return sum(storages.values())


def test_lora_dpo_holds_one_copy_of_the_base_weights(base, small, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.training.loop import Trainer

    sizes, adapter_bytes = {}, 0
    for name, sections in {"lora": {"adapter": LORA}, "full": {}}.items():
        trainer = Trainer(load_config(data=dpo_config(base, small[0], tmp_path / name, train={"max_steps": 1},
                                                      **sections)), say=lambda *a: None)
        trainer.run()  # setup and one step with the reference forward
        sizes[name] = tensor_storage_bytes(trainer.objective, trainer.module)
        if name == "lora":
            dtype = next(p for p in trainer.module.parameters() if not p.requires_grad).dtype
            adapter_bytes = sum(p.numel() * p.element_size() for p in trainer.module.parameters() if p.requires_grad)
    base_bytes = tensor_storage_bytes(AutoModelForCausalLM.from_pretrained(base, dtype=dtype))
    # one base, the adapter, and small buffers (rotary frequencies)
    assert sizes["lora"] < base_bytes + adapter_bytes + 0.05 * base_bytes, (sizes, base_bytes, adapter_bytes)
    # the check sees a second copy where there is one: full fine-tuning keeps a frozen reference
    assert sizes["full"] > 1.9 * base_bytes, (sizes, base_bytes)


# ---------------------------------------------------------------- learning

def test_dpo_lifts_heldout_preference_accuracy(base, split, prefs, tmp_path):
    """A brief SFT on the tasks, then LoRA DPO: on 40 held-out pairs the policy's log-ratio to the reference
    is larger for the chosen answer than for the rejected one in >= 90 % of pairs (it is 0 for all before)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.training.loop import Trainer, train

    train_items, _ = split
    sft_data = tasks.write_jsonl([tasks.to_alpaca(i) for i in train_items], tmp_path / "sft.jsonl")
    sft = train(load_config(data=config_dict(base, sft_data, tmp_path / "sft",
                                             train={"max_steps": 60, "lr": 3e-3, "micro_batch_size": 16})),
                say=lambda *a: None)
    cfg = dpo_config(sft, prefs[0], tmp_path / "dpo", eval_path=prefs[1], adapter={**LORA, "r": 16, "alpha": 32},
                     train={"max_steps": 60, "lr": 1e-3, "micro_batch_size": 16, "scheduler": "constant"})
    trainer = Trainer(load_config(data=cfg), say=lambda *a: None)
    final = trainer.run()
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval_accuracy"] >= 0.9, logged[-1]
    # independently: the saved adapter, reloaded with PEFT, against the SFT model as the reference
    reference = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32), final).eval()
    wins = []
    with torch.no_grad():
        for item in trainer.objective.eval_items:
            chosen = plain_logps(policy, item.chosen_ids, item.chosen_labels) - plain_logps(
                reference, item.chosen_ids, item.chosen_labels)
            rejected = plain_logps(policy, item.rejected_ids, item.rejected_labels) - plain_logps(
                reference, item.rejected_ids, item.rejected_labels)
            wins.append(bool(chosen > rejected))
    assert len(wins) == 40
    assert sum(wins) / len(wins) >= 0.9
    assert sum(wins) / len(wins) == pytest.approx(logged[-1]["eval_accuracy"], abs=1 / 40 + 1e-9)


# ---------------------------------------------------------------- data

def test_pairs_share_the_prompt_tokens_and_label_only_the_reply(base, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    rows = [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Uppercase: apple"}],
         "chosen": [{"role": "assistant", "content": "APPLE"}], "rejected": "Apple"},
        {"chosen": "\n\nHuman: Reverse the word: stone\n\nAssistant: enots",
         "rejected": "\n\nHuman: Reverse the word: stone\n\nAssistant: enost"},
    ]
    path = tasks.write_jsonl(rows, tmp_path / "pairs.jsonl")
    objective, _ = build_objective(dpo_config(base, path, tmp_path / "run"))
    for row, item in zip(rows, objective.train_items):
        prompt = row.get("prompt", [{"role": "user", "content": "Reverse the word: stone"}])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        expected_prompt = [tok.bos_token_id] + tok.encode(
            tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        for ids, labels in ((item.chosen_ids, item.chosen_labels), (item.rejected_ids, item.rejected_labels)):
            n = len(expected_prompt)
            assert ids[:n] == expected_prompt
            assert all(label == -100 for label in labels[:n])
            assert labels[n:] == ids[n:]  # the reply, to its end-of-turn token, and nothing after it
            assert tok.decode(ids[n:]).endswith("<|im_end|>")
        assert tok.decode(item.chosen_ids[len(expected_prompt):]) == {0: "5", 1: "APPLE", 2: "enots"}[
            objective.train_items.index(item)] + "<|im_end|>"


def test_pairs_that_cannot_teach_are_dropped_and_reported(base, tmp_path, caplog):
    long_text = " ".join(tasks.WORDS) * 2
    hh = "\n\nHuman: Uppercase: river\n\nAssistant: RIVER"
    rows = [
        {"prompt": "Uppercase: apple", "chosen": "APPLE", "rejected": "Apple"},
        {"prompt": "Uppercase: stone", "chosen": "STONE", "rejected": "STONE"},
        {"prompt": "Uppercase: cloud", "chosen": "CLOUD", "rejected": "Cloud"},
        {"prompt": "Say it all.", "chosen": long_text, "rejected": "no"},  # a response longer than max_length
        {"chosen": hh, "rejected": hh + "  "},  # the same turns once parsed
        {"prompt": "Uppercase: green", "chosen": "GREEN", "rejected": "Green"},
    ]
    path = tasks.write_jsonl(rows, tmp_path / "pairs.jsonl")
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        objective, _ = build_objective(dpo_config(base, path, tmp_path / "run"))
    assert len(objective.train_items) == 3
    assert [i.where.rsplit(":", 1)[1] for i in objective.train_items] == ["1", "3", "6"]
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 3 of 6 preference pairs" in report
    assert f"2 with chosen identical to rejected ({path}:2, {path}:5)" in report
    assert f"1 whose response does not fit data.max_length=64 ({path}:4)" in report
    stats = objective.log_stats()
    assert stats["dropped_identical"] == 2 and stats["dropped_no_response"] == 1 and stats["pairs"] == 3

    # nothing usable left: the run stops before loading the model, with the same report
    from tunelab.training.loop import Trainer

    bad = tasks.write_jsonl([rows[1], rows[3]], tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match=r"no usable preference pairs: train data: dropped 2 of 2 preference pairs: "
                                        rf"1 with chosen identical to rejected \({bad}:1\); 1 whose response does "
                                        rf"not fit .*\({bad}:2\)\. Raise data.max_length"):
        Trainer(load_config(data=dpo_config(base, bad, tmp_path / "bad-run")), say=lambda *a: None).run()


def test_malformed_rows_and_wrong_settings_are_user_errors(base, small, tmp_path):
    broken = tasks.write_jsonl([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
                               tmp_path / "broken.jsonl")
    with pytest.raises(UserError, match=rf"{broken}:2: preference row needs 'rejected'"):
        build_objective(dpo_config(base, broken, tmp_path / "a"))
    objective, _ = build_objective(dpo_config(base, broken, tmp_path / "b", data={"skip_bad_rows": True}))
    assert len(objective.train_items) == 1 and objective.log_stats()["skipped_bad_rows"] == 1
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(UserError, match="method: dpo trains on format: preference rows"):
        build_objective(config_dict(base, alpaca, tmp_path / "c", method="dpo"))
    with pytest.raises(UserError, match="data.packing"):
        build_objective(dpo_config(base, small[0], tmp_path / "d", data={"packing": True}))
    with pytest.raises(UserError, match=r"label_smoothing \(cDPO\) needs dpo.label_smoothing > 0"):
        load_config(data=dpo_config(base, small[0], tmp_path / "e", dpo={"loss": "label_smoothing"}))


def test_example_config_runs(base, small, tmp_path):
    from tunelab.training.loop import train

    example = Path(__file__).resolve().parents[1] / "examples" / "dpo-lora.yaml"
    cfg = load_config(example, [f"model.path={base}", f"data.train=[{{path: {small[0]}, format: preference}}]",
                                f"data.eval=[{{path: {small[1]}, format: preference}}]", "train.max_steps=2",
                                "train.eval_every=null", f"output_dir={tmp_path / 'run'}"])
    assert cfg.method == "dpo" and cfg.adapter is not None
    final = train(cfg, say=lambda *a: None)
    assert (final / "adapter_config.json").is_file()
    assert "eval_accuracy" in (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("adapter", [LORA, None])
def test_padding_free_pairs_give_the_padded_loss_and_gradients(base, small, tmp_path, adapter):
    """data.padding_free: the 2B sequences of a batch end to end in one row, each attending only to itself, give the
    padded batch's per-pair log-probs, loss and gradients (LoRA: adapter-off reference; full: the frozen copy)."""
    extra = {"adapter": adapter} if adapter else {}
    results = []
    for padding_free in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation both times
        objective, model = build_objective(dpo_config(base, small[0], tmp_path / f"run{padding_free}",
                                                      data={"padding_free": padding_free}, **extra))
        with torch.no_grad():  # a policy that differs from its reference
            for name, p in model.named_parameters():
                if "lora_B" in name or (adapter is None and "q_proj" in name):
                    p.add_(torch.randn_like(p) * 0.05)
        objective.setup(model)
        batch = objective.collate(objective.train_items[:5])
        assert ("doc_bounds" in batch) == padding_free
        loss, metrics = objective.loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.item(), metrics["logps/chosen"].item(), metrics["logps/rejected"].item(), grads))
    (loss_pad, c_pad, r_pad, g_pad), (loss_pf, c_pf, r_pf, g_pf) = results
    assert loss_pf == pytest.approx(loss_pad, rel=1e-5)
    assert c_pf == pytest.approx(c_pad, rel=1e-5) and r_pf == pytest.approx(r_pad, rel=1e-5)
    assert g_pad.keys() == g_pf.keys() and g_pad
    for name, g in g_pad.items():
        assert (g_pf[name] - g).abs().max() <= 1e-4 * max(1.0, float(g.abs().max())), name
