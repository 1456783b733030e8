"""method: orpo and method: kto: each objective's loss against losses.orpo_loss / kto_loss on log-probs from plain HF
forwards of one unpadded sequence at a time (so padding and the KL rows' construction are checked), with LoRA and
full fine-tuning; then both through `tunelab train`. (The losses themselves are checked against TRL in
test_losses.py.)"""

from __future__ import annotations

import pytest
import torch
from test_dpo import LORA, AdapterOff, build_objective, n_response, plain_logps
from tiny import config_dict, make_base_model

from tunelab import tasks
from tunelab.objectives.losses import kto_loss, orpo_loss


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)


@pytest.fixture(scope="module")
def items():
    return tasks.split_items(48, 4, seed=2, families=["upper", "sort"])[0][:12]


def kto_rows(items) -> list[dict]:
    """LLaMA-Factory's kto shape: a conversation and a label; the right answer is desirable, the wrong one not."""
    return [{"messages": [{"role": "user", "content": i["prompt"]},
                          {"role": "assistant", "content": i["answer"] if k % 3 else i["wrong"]}], "label": bool(k % 3)}
            for k, i in enumerate(items)]


def config(base, path, out, method, fmt, **sections):
    data = {"train": [{"path": str(path), "format": fmt}], **sections.pop("data", {})}
    return config_dict(base, path, out, method=method, data=data, **sections)


def perturb(model, lora: bool):
    torch.manual_seed(0)
    with torch.no_grad():  # a trained policy: differs from the reference
        for name, p in model.named_parameters():
            if not lora or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)


def test_orpo_loss_equals_plain_forward_padded_and_padding_free(base, items, tmp_path):
    from tunelab.objectives.preference import collate_pairs

    path = tasks.write_jsonl([tasks.to_preference(i) for i in items], tmp_path / "pairs.jsonl")
    objective, model = build_objective(config(base, path, tmp_path / "run", "orpo", "preference", adapter=LORA,
                                              orpo={"beta": 0.3}, data={"padding_free": True}))
    perturb(model, lora=True)
    model.eval()
    pairs = objective.train_items[:5]
    assert len({len(p.chosen_ids) for p in pairs}) > 1  # padded rows really differ in length
    with torch.no_grad():
        avg_c = torch.stack([plain_logps(model, p.chosen_ids, p.chosen_labels) / n_response(p.chosen_labels)
                             for p in pairs])
        avg_r = torch.stack([plain_logps(model, p.rejected_ids, p.rejected_labels) / n_response(p.rejected_labels)
                             for p in pairs])
        want = orpo_loss(avg_c, avg_r, beta=0.3)[0].sum()
        for batch in (collate_pairs(pairs, objective.tokenizer.pad_token_id), objective.collate(pairs)):
            got, metrics = objective.loss(model, batch)
            assert got.item() == pytest.approx(want.item(), rel=1e-5)
            assert metrics["nll"].item() == pytest.approx(-avg_c.sum().item(), rel=1e-5)
    assert "doc_bounds" in batch and "doc_bounds" not in collate_pairs(pairs, 0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kto_loss_equals_plain_forward(base, items, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    path = tasks.write_jsonl(kto_rows(items), tmp_path / "kto.jsonl")
    kto = {"beta": 0.5, "desirable_weight": 1.2, "undesirable_weight": 0.8}
    objective, model = build_objective(config(base, path, tmp_path / "run", "kto", "kto", kto=kto,
                                              **({"adapter": LORA} if lora else {})))
    objective.setup(model)
    assert (objective.ref_model is None) == lora
    perturb(model, lora)
    model.eval()
    batch_items = objective.train_items[:5]
    reference = AdapterOff(model) if lora else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def logps(m, rows):
        return torch.stack([plain_logps(m, ids, labels) for ids, labels in rows])

    main = [(i.prompt_ids + i.completion_ids, [-100] * len(i.prompt_ids) + i.completion_labels) for i in batch_items]
    # the KL rows: prompt i with the completion of item i - 1 (TRL's rotation)
    mismatched = [(i.prompt_ids + k.completion_ids, [-100] * len(i.prompt_ids) + k.completion_labels)
                  for i, k in zip(batch_items, batch_items[-1:] + batch_items[:-1])]
    with torch.no_grad():
        got, metrics = objective.loss(model, objective.collate(batch_items))
        kl = (logps(model, mismatched) - logps(reference, mismatched)).mean().clamp(min=0)
        desirable = torch.tensor([i.desirable for i in batch_items])
        want, _ = kto_loss(logps(model, main), logps(reference, main), desirable, kl, **kto)
    assert desirable.any() and not desirable.all()
    assert got.item() == pytest.approx(want.sum().item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(5 * kl.item(), rel=1e-4, abs=1e-6)
    assert abs(want - want.mean()).max() > 1e-4  # the perturbation gives the examples different losses


def test_orpo_and_kto_train_through_the_cli(base, items, tmp_path, capsys):
    import yaml

    from tunelab.cli import main as cli_main

    pairs = tasks.write_jsonl([tasks.to_preference(i) for i in items[:8]], tmp_path / "pairs.jsonl")
    unpaired = tasks.write_jsonl(kto_rows(items[:8]), tmp_path / "kto.jsonl")
    runs = {"orpo": config(base, pairs, tmp_path / "orpo", "orpo", "preference", adapter=LORA),
            "kto": config(base, unpaired, tmp_path / "kto", "kto", "kto")}
    runs["kto"]["data"]["train"].append({"path": str(pairs), "format": "preference"})  # pairs, unpaired
    for method, cfg in runs.items():
        cfg["train"].update(max_steps=2, eval_every=None)
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert cli_main(["train", str(path)]) == 0, capsys.readouterr().err
        assert (tmp_path / method / "final").is_dir()
    assert "data: 24 training" in capsys.readouterr().out  # 8 kto rows + 8 pairs unpaired into 16
    assert '"kl"' in (tmp_path / "kto" / "metrics.jsonl").read_text()
