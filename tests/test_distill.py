"""method: distill against references: plain SFT cross-entropy (alpha = 0), a closed-form full-logits computation
of the mixed loss and its gradients, KL = 0 for teacher == student, a falling KL when training, the on-policy
rollouts' masks, and the vocabulary check through the real CLI."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny import run_cli, with_sections, write_task_data

from tunelab.config import InitConfig, load_config

TEACHER = InitConfig(hidden_size=48, layers=2, heads=4, kv_heads=2, intermediate_size=96, max_position=128,
                     tie_embeddings=False)
STUDENT = {"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "max_position": 128}


def _tokenizer(root, rows, vocab_size=300):
    from tunelab.modeling.scratch import train_tokenizer

    cfg = load_config(data={"model": {"init": TEACHER.model_dump()}, "tokenizer": {"train": True, "vocab_size": vocab_size},
                            "data": {"train": [{"path": str(rows), "format": "alpaca"}]}, "output_dir": str(root)})
    return train_tokenizer(cfg)


def _teacher(out, tokenizer, seed: int):
    """A random tiny Llama with sharpened output (an untied head scaled up: a confident teacher, logits well beyond init's ±0.3)."""
    from tunelab.modeling.scratch import build_model

    torch.manual_seed(seed)
    model = build_model(TEACHER, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(15)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = write_task_data(root / "train.jsonl", n=24)
    tok = _tokenizer(root / "tok", data)
    return {"root": root, "data": data, "tok": tok, "teacher": _teacher(root / "teacher", tok, 0),
            "other": _teacher(root / "other", tok, 1)}


def _cfg(s, out, student=None, **sections) -> dict:
    model = {"path": str(student)} if student is not None else {"init": STUDENT}
    cfg = {
        "model": model,
        "data": {"train": [{"path": str(s["data"]), "format": "alpaca"}], "max_length": 96},
        "method": "distill",
        "teacher": {"path": str(s["teacher"])},
        "distill": {"temperature": 1.0},
        "train": {"max_steps": 3, "micro_batch_size": 8, "grad_accum": 1, "lr": 1e-2, "eval_every": None,
                  "save_every": None, "progress": False, "scheduler": "constant"},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(out),
    }
    return with_sections(cfg, **sections)


def _objective(cfg_dict, student_model):
    from tunelab.modeling.build import load_run_tokenizer
    from tunelab.objectives import make_objective

    cfg = load_config(data=cfg_dict)
    tok = load_run_tokenizer(cfg)
    objective = make_objective(cfg, tok)
    objective.setup(student_model)
    return objective, objective.datasets()[0]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_alpha_zero_is_sft_and_the_mix_matches_full_logits(setup, tmp_path, monkeypatch):
    import torch.nn.functional as F

    from tunelab.objectives import distill as D
    from tunelab.objectives.losses import distill_loss
    from tunelab.objectives.sft import SFT

    student = _load(setup["other"])
    objective, items = _objective(_cfg(setup, tmp_path, setup["other"], distill={"alpha": 0.0}), student)
    batch = objective.collate(items[:6])
    sft = SFT(objective.cfg, objective.tokenizer)
    with torch.no_grad():
        ours, metrics = objective.loss(student, batch)
        ref, _ = sft.loss(student, batch)
    assert metrics["kl"] > 1.0  # a real divergence, weighted 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    # alpha = 0.3, reverse KL at temperature 2, several chunks: equals the full-logits formula, gradients too
    monkeypatch.setattr(D, "head_chunk_rows", lambda vocab, heads=1: 7)
    objective.dc = objective.dc.model_copy(update={"alpha": 0.3, "loss": "reverse_kl", "temperature": 2.0})
    student.zero_grad()
    ours, _ = objective.loss(student, batch)
    ours.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = objective.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    kl, n = distill_loss(logits, t_logits, keep, kind="reverse_kl", temperature=2.0)
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    ref = 0.3 * kl + 0.7 * ce
    ref.backward()
    assert n == batch["num_loss_tokens"] and n > 7 * 3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    for k, p in student.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_as_student_gives_zero_divergence(setup, tmp_path, kind):
    student = _load(setup["teacher"])
    cfg = _cfg(setup, tmp_path, setup["teacher"], distill={"loss": kind, "alpha": 0.5, "temperature": 1.5})
    objective, items = _objective(cfg, student)
    batch = objective.collate(items[:4])
    with torch.no_grad():
        total, metrics = objective.loss(student, batch)
    assert abs(metrics["kl"].item()) < 1e-4 * batch["num_loss_tokens"].item()
    torch.testing.assert_close(total, 0.5 * metrics["ce"], rtol=1e-5, atol=1e-4)


def test_distilling_into_a_smaller_new_student_lowers_the_kl(setup, tmp_path):
    """model.init with no tokenizer settings: the student takes the teacher's tokenizer. The teacher stays
    frozen, in eval mode and out of the trainable module and the checkpoint."""
    from tunelab.training import checkpoint
    from tunelab.training.run_state import trainable_state
    from tunelab.training.loop import Trainer
    from tunelab.training.tracking import read_metrics

    cfg = _cfg(setup, tmp_path / "run", distill={"alpha": 0.8}, data={"eval_fraction": 0.2},
               train={"max_steps": 12, "save_every": 12})
    trainer = Trainer(load_config(data=cfg), say=lambda *a: None)
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    kl = [r["kl"] for r in rows]
    assert kl[-1] < 0.7 * kl[0], kl
    assert "eval_kl" in rows[-1] and rows[-1]["eval_perplexity"] == pytest.approx(
        __import__("math").exp(rows[-1]["eval_ce"]))
    teacher = trainer.objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert trainer.tokenizer.get_vocab() == setup["tok"].get_vocab()
    saved, _ = checkpoint.load(checkpoint.step_dir(tmp_path / "run" / "checkpoints", 12))
    assert set(saved) == set(trainable_state(trainer.module))
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in trainer.module.model.parameters())
    student = _load(tmp_path / "run" / "final")
    assert student.config.hidden_size == 32 and student.config.vocab_size == len(setup["tok"])


def test_on_policy_rollouts_grade_the_students_samples(setup, tmp_path):
    from tunelab.objectives.forward import causal_lm_loss

    student = _load(setup["other"]).train()
    cfg = _cfg(setup, tmp_path, setup["other"], distill={"on_policy": True, "max_new_tokens": 6, "alpha": 0.5})
    objective, items = _objective(cfg, student)
    batches = [objective.collate(items[:3]), objective.collate(items[3:8])]
    torch.manual_seed(0)
    rolled = list(objective.stream(student, iter(batches)))
    assert student.training  # restored after sampling in eval mode
    n_gen = sum(int(r["num_loss_tokens"]) for r in rolled)
    n_ref = sum(int(b["num_loss_tokens"]) for b in batches)
    for r, b in zip(rolled, batches):
        assert r["reference"] is b and r["ce_scale"] == pytest.approx(n_gen / n_ref)
        for row in range(b["input_ids"].shape[0]):
            labels = b["labels"][row]
            prompt_len = int((labels != -100).nonzero()[0])  # alpaca: one reply; the prompt is all before it
            assert torch.equal(r["input_ids"][row, :prompt_len], b["input_ids"][row, :prompt_len])
            sampled = r["labels"][row] != -100
            assert not sampled[:prompt_len].any() and 1 <= sampled.sum() <= 6
            length = int(r["attention_mask"][row].sum())
            assert sampled[prompt_len:length].all() and not sampled[length:].any()
    # the loss: alpha * divergence on the samples + (1 - alpha) * CE on the data, each per its own tokens
    student.eval()  # no dropout in this tiny Llama anyway; eval makes the comparison exact by construction
    with torch.no_grad():
        parts = [objective.loss(student, r) for r in rolled]
        kl = sum(objective.terms(student, r)[0] for r in rolled) / n_gen
        ce = sum(causal_lm_loss(student, b)[0] for b in batches) / n_ref
    total = sum(p[0] for p in parts) / n_gen
    torch.testing.assert_close(total, 0.5 * kl + 0.5 * ce, rtol=1e-5, atol=1e-5)
    # and it trains in the loop
    from tunelab.training.loop import train

    train(load_config(data=_cfg(setup, tmp_path / "run", setup["other"],
                                distill={"on_policy": True, "max_new_tokens": 6}, train={"max_steps": 2})),
          say=lambda *a: None)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_vocabulary_mismatch_is_a_clear_error_through_the_cli(setup, tmp_path):
    from tunelab.modeling.scratch import save_tiny_model

    other_tok = _tokenizer(tmp_path / "tok2", setup["data"], vocab_size=280)
    student = save_tiny_model(tmp_path / "student", other_tok, TEACHER)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_cfg(setup, tmp_path / "out", student)))
    result = run_cli("train", str(path))
    assert result.returncode == 2, result.stderr
    assert "teacher.path" in result.stderr and "vocabulary differs" in result.stderr
    assert f"({len(other_tok)} vs {len(setup['tok'])} tokens" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
