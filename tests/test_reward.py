"""method: reward end to end: the objective's loss against the Bradley-Terry loss of plain HF forwards, learning a
separable preference, and the saved model (LoRA adapter with its score head) reloaded the ways PPO and users
load it: PEFT, tunelab's load_reward_model / score, and `tunelab merge`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny import config_dict, make_base_model

from tunelab import tasks
from tunelab.config import load_config
from tunelab.objectives.losses import bradley_terry_loss

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"))


def separable_rows(n: int, seed: int) -> list[dict]:
    """Task prompts answered with three 'good' words (chosen) or three 'bad' ones (rejected): a preference any
    bag-of-words reward separates, with word combinations and prompts the held-out rows do not share."""
    rng = random.Random(seed)
    good, bad = tasks.WORDS[:30], tasks.WORDS[30:]
    return [{"prompt": item["prompt"], "chosen": " ".join(rng.sample(good, 3)),
             "rejected": " ".join(rng.sample(bad, 3))} for item in tasks.make_items(n, seed)]


def reward_config(base, train_path, out, eval_path=None, **sections):
    data = {"train": [{"path": str(train_path), "format": "preference"}]}
    if eval_path is not None:
        data["eval"] = [{"path": str(eval_path), "format": "preference"}]
    return config_dict(base, train_path, out, method="reward", data=data, **sections)


def scalar(model, ids: list[int]) -> float:
    """The HF model's own output for ONE unpadded sequence (its pooling: the last token)."""
    return model(input_ids=torch.tensor([ids], device=next(model.parameters()).device)).logits[0, 0].float().cpu()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_objective_loss_equals_bradley_terry_of_plain_forward(base, tmp_path, mode):
    from tunelab.modeling.build import build
    from tunelab.objectives import make_objective

    rows = separable_rows(6, seed=3)
    rows[1]["margin"] = 2.0  # a row's own margin wins over reward.margin
    rows[2]["chosen"] += " and a much longer answer than the others"  # padding inside the batch
    path = tasks.write_jsonl(rows, tmp_path / "pairs.jsonl")
    cfg = load_config(data=reward_config(base, path, tmp_path / "run", reward={"margin": 0.5},
                                         **({"adapter": LORA} if mode == "lora" else {})))
    model, tokenizer = build(cfg, "sequence_classification", torch.device("cpu"))
    assert type(model).__name__ == ("PeftModelForSequenceClassification" if mode == "lora"
                                    else "LlamaForSequenceClassification")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(std=0.3)
    objective = make_objective(cfg, tokenizer)
    items, _ = objective.datasets()
    model.eval()
    batch = objective.collate(items)
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # padded rows
    with torch.no_grad():
        got, metrics = objective.loss(model, batch)
        r_c = torch.stack([scalar(model, i.chosen_ids) for i in items])
        r_r = torch.stack([scalar(model, i.rejected_ids) for i in items])
    margins = torch.tensor([2.0 if k == 1 else 0.5 for k in range(len(items))])
    want = bradley_terry_loss(r_c, r_r, margins)
    assert got.item() == pytest.approx(want.sum().item(), rel=1e-5)
    assert metrics["accuracy"].item() == (r_c > r_r).sum().item()
    assert metrics["margin"].item() == pytest.approx((r_c - r_r).sum().item(), rel=1e-5, abs=1e-5)
    assert (r_c - r_r).abs().max() > 1e-2


def test_reward_model_separates_heldout_pairs_and_reloads_for_ppo(base, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from tunelab.modeling.merging import merge
    from tunelab.objectives.reward import load_reward_model, score
    from tunelab.training.loop import Trainer

    train_path = tasks.write_jsonl(separable_rows(96, seed=1), tmp_path / "train.jsonl")
    test_rows = separable_rows(40, seed=101)
    test_path = tasks.write_jsonl(test_rows, tmp_path / "test.jsonl")
    cfg = reward_config(base, train_path, tmp_path / "rm", eval_path=test_path, adapter=LORA,
                        train={"max_steps": 40, "lr": 2e-3, "micro_batch_size": 16, "scheduler": "constant"})
    trainer = Trainer(load_config(data=cfg), say=lambda *a: None)
    final = trainer.run()
    logged = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval_accuracy"] >= 0.9, logged[-1]
    assert logged[-1]["eval_margin"] > 0

    # the adapter carries the trained score head
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        assert any(key.endswith("score.weight") for key in f.keys()), list(f.keys())
    items = trainer.objective.eval_items
    in_memory = trainer.module.model.eval()
    with torch.no_grad():
        trained = torch.stack([scalar(in_memory, i.chosen_ids) for i in items] +
                              [scalar(in_memory, i.rejected_ids) for i in items])
        # 1. plain PEFT on a scalar-head base
        peft = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32), final).eval()
        reloaded = torch.stack([scalar(peft, i.chosen_ids) for i in items] +
                               [scalar(peft, i.rejected_ids) for i in items])
    tol = 1e-5 if next(in_memory.parameters()).dtype == torch.float32 else 0.1  # bf16 on GPUs
    assert torch.allclose(reloaded, trained, atol=tol)
    n = len(items)
    assert (reloaded[:n] > reloaded[n:]).float().mean() >= 0.9

    # 2. what PPO calls (ppo.reward_model: the run dir): prompt + response rendered as in training
    model, tokenizer, data_cfg = load_reward_model(str(tmp_path / "rm"))
    prompts = [r["prompt"] for r in test_rows] * 2
    responses = [r["chosen"] for r in test_rows] + [r["rejected"] for r in test_rows]
    assert torch.allclose(score(model, tokenizer, data_cfg, prompts, responses, batch_size=7).cpu(), trained, atol=tol)

    # 3. tunelab merge: a standalone scalar-head model dir
    merged_dir = merge(str(tmp_path / "rm"), str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        merged_scores = torch.stack([scalar(merged, i.chosen_ids) for i in items] +
                                    [scalar(merged, i.rejected_ids) for i in items])
    assert torch.allclose(merged_scores, trained, atol=max(tol, 1e-4))


def test_example_config_runs(base, tmp_path):
    from tunelab.training.loop import train

    train_path = tasks.write_jsonl(separable_rows(16, seed=1), tmp_path / "train.jsonl")
    example = Path(__file__).resolve().parents[1] / "examples" / "reward.yaml"
    cfg = load_config(example, [f"model.path={base}", f"data.train=[{{path: {train_path}, format: preference}}]",
                                f"data.eval=[{{path: {train_path}, format: preference}}]", "train.max_steps=2",
                                "train.eval_every=null", f"output_dir={tmp_path / 'run'}"])
    assert cfg.method == "reward"
    final = train(cfg, say=lambda *a: None)
    assert (final / "adapter_config.json").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
