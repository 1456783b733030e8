"""tunelab eval against values computed by hand on tiny local models: exact match / contains / a module:function
scorer, perplexity, preference accuracy and the implicit reward margin; eval.json; clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from tiny import TINY_SHAPE, run_cli

from tunelab import tasks
from tunelab.config import UserError, load_config
from tunelab.modeling.infer import Sampling, generate

MAX_NEW = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random tiny Llamas with untied heads (a tied random model only echoes its last input token) sharing one
    tokenizer trained on task text."""
    from tunelab.modeling.scratch import save_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("eval-models")
    data = tasks.write_jsonl([tasks.to_alpaca(i) for i in tasks.make_items(100, 3)], root / "tok.jsonl")
    cfg = load_config(data={"model": {"init": TINY_SHAPE.model_dump()}, "tokenizer": {"train": True, "vocab_size": 400},
                            "data": {"train": [{"path": str(data), "format": "alpaca"}]}, "output_dir": str(root / "tok")})
    tokenizer = train_tokenizer(cfg)
    shape = TINY_SHAPE.model_copy(update={"tie_embeddings": False})
    torch.manual_seed(0)
    policy = save_tiny_model(root / "policy", tokenizer, shape)
    torch.manual_seed(1)
    reference = save_tiny_model(root / "reference", tokenizer, shape)
    return policy, reference


def _load(path):
    from tunelab.modeling.load import load_pretrained

    return load_pretrained(str(path))


def _cfg(model, tmp_path, sources, **eval_section):
    return load_config(data={
        "model": {"path": str(model)},
        "data": {"train": [sources[0]], "template": "chatml", "max_length": 128},
        "eval": {"data": sources, "max_new_tokens": MAX_NEW, "batch_size": 3, **eval_section},
        "output_dir": str(tmp_path / "run"),
    })


def _reply(model, tokenizer, prompt):
    return generate(model, tokenizer, prompt, Sampling(max_new_tokens=MAX_NEW, template="chatml"))


def _logprob(model, tokenizer, prompt, reply):
    """log p(reply turn | prompt) with the full logits: an independent path from evaluate's chunked one."""
    from tunelab.data import render, tokenize_example

    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    ex = tokenize_example(render(messages, "chatml", tokenizer), tokenizer, 128, train_on_prompt=False)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    return float(logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum()), int(keep.sum())


@pytest.fixture(scope="module")
def items():
    return tasks.make_items(10, seed=7)


def test_generation_scores_match_hand_computed(models, items, tmp_path):
    """Half the rows' answers are the model's own greedy reply (computed one prompt at a time), the other half a
    reply it did not give: exact match is known exactly, per family too, and the batched left-padded generation
    must reproduce every unbatched reply."""
    from tunelab.evaluation import evaluate, eval_rows

    model, tokenizer = _load(models[0])
    rows, expected = [], {}
    for k, item in enumerate(items):
        reply = _reply(model, tokenizer, item["prompt"])
        assert reply, "the untied random model should say something"
        correct = k % 2 == 0
        answer = reply if correct else reply + "x"
        rows.append({"instruction": item["prompt"], "output": answer, "family": item["family"]})
        expected[item["prompt"]] = (reply, float(correct), float(answer in reply))
    data = tasks.write_jsonl(rows, tmp_path / "test.jsonl")
    cfg = _cfg(models[0], tmp_path, [{"path": str(data), "format": "alpaca"}], metrics=["generation"])
    result = evaluate(model, tokenizer, cfg, eval_rows(cfg))
    gen = result["generation"]
    for p in gen["predictions"]:
        assert p["prediction"] == expected[p["prompt"]][0]
    assert gen["score"] == pytest.approx(0.5)
    for family in {i["family"] for i in items}:
        want = [expected[i["prompt"]][1] for i in items if i["family"] == family]
        assert gen["by_family"][family] == {"score": pytest.approx(sum(want) / len(want)), "rows": len(want)}

    # contains: answer = reply + "x" is not contained in the reply, answer = reply is
    cfg = _cfg(models[0], tmp_path, [{"path": str(data), "format": "alpaca"}], metrics=["generation"], scorer="contains")
    assert evaluate(model, tokenizer, cfg, eval_rows(cfg))["generation"]["score"] == pytest.approx(0.5)

    # a module:function scorer, called like a reward function: correctness_reward gives 1 for exact, 0.3 for contains
    prompt_rows = [{"prompt": i["prompt"], "answer": expected[i["prompt"]][0][:2] if k % 2 else expected[i["prompt"]][0],
                    "family": i["family"]} for k, i in enumerate(items)]
    pdata = tasks.write_jsonl(prompt_rows, tmp_path / "prompts.jsonl")
    cfg = _cfg(models[0], tmp_path, [{"path": str(pdata), "format": "prompt"}],
               scorer="tunelab.tasks:correctness_reward")
    got = evaluate(model, tokenizer, cfg, eval_rows(cfg))
    want = [tasks.correctness_reward(r["prompt"], expected[r["prompt"]][0], r["answer"]) for r in prompt_rows]
    assert got["generation"]["score"] == pytest.approx(sum(want) / len(want))
    assert 0 < got["generation"]["score"] < 1
    assert "perplexity" not in got and "preference" not in got  # prompt rows have no reply to score


def test_perplexity_and_preference_match_hand_computed(models, items, tmp_path):
    from tunelab.evaluation import evaluate, eval_rows

    model, tokenizer = _load(models[0])
    reference, _ = _load(models[1])
    alpaca = tasks.write_jsonl([tasks.to_alpaca(i) for i in items], tmp_path / "a.jsonl")
    pref = tasks.write_jsonl([tasks.to_preference(i) for i in items], tmp_path / "p.jsonl")
    cfg = _cfg(models[0], tmp_path, [{"path": str(alpaca), "format": "alpaca"},
                                     {"path": str(pref), "format": "preference"}],
               metrics=["perplexity", "preference"], reference=str(models[1]))
    result = evaluate(model, tokenizer, cfg, eval_rows(cfg), reference=reference)

    nll = tokens = 0
    for i in items:
        lp, n = _logprob(model, tokenizer, i["prompt"], i["answer"])
        nll, tokens = nll - lp, tokens + n
    assert result["perplexity"]["tokens"] == tokens
    assert result["perplexity"]["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)

    beta, wins, margins, rewards = cfg.dpo.beta, [], [], []
    for i in items:
        pc, pr = _logprob(model, tokenizer, i["prompt"], i["answer"])[0], _logprob(model, tokenizer, i["prompt"], i["wrong"])[0]
        rc, rr = (_logprob(reference, tokenizer, i["prompt"], i["answer"])[0],
                  _logprob(reference, tokenizer, i["prompt"], i["wrong"])[0])
        wins.append(float(pc > pr))
        margins.append(pc - pr)
        rewards.append(beta * ((pc - rc) - (pr - rr)))
    p = result["preference"]
    assert 0 < sum(wins) < len(wins), "a random model should get some pairs right and some wrong"
    assert p["accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert p["logp_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)
    assert p["reward_margin"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
    assert p["reward_accuracy"] == pytest.approx(sum(r > 0 for r in rewards) / len(rewards))
    assert "generation" not in result


def test_cli_writes_eval_json_and_prints_a_table(models, items, tmp_path):
    alpaca = tasks.write_jsonl([tasks.to_alpaca(i) for i in items], tmp_path / "a.jsonl")
    cfg = {"model": {"path": str(models[0])}, "output_dir": str(tmp_path / "run"),
           "data": {"train": [{"path": str(alpaca), "format": "alpaca"}], "eval": [{"path": str(alpaca), "format": "alpaca"}],
                    "template": "chatml"},
           "eval": {"max_new_tokens": MAX_NEW}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out" / "eval.json"
    result = run_cli("eval", str(path), "--model", str(models[0]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["generation"]["rows"] == len(items) and report["perplexity"]["rows"] == len(items)
    assert set(report["generation"]["by_family"]) == {i["family"] for i in items}
    assert "exact_match (n=10)" in result.stdout and "perplexity" in result.stdout
    # without --model the run dir is evaluated, and it must exist
    missing = run_cli("eval", str(path))
    assert missing.returncode == 2 and "--model" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("spec,fragment", [
    ("exact", "'eval.scorer': must be exact_match, contains or module:function"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("tunelab.tasks:correctness_rewrd", "did you mean tunelab.tasks:correctness_reward?"),
    ("tunelab.tasks:WORDS", "not a function"),
    ("tunelab.tasks:exact_match", "must accept the keyword arguments prompt, response and answer"),
])
def test_bad_scorer_gives_a_clear_error(models, items, tmp_path, spec, fragment):
    alpaca = tasks.write_jsonl([tasks.to_alpaca(i) for i in items[:2]], tmp_path / "a.jsonl")
    cfg = {"model": {"path": str(models[0])}, "output_dir": str(tmp_path / "run"),
           "data": {"train": [{"path": str(alpaca), "format": "alpaca"}], "template": "chatml"},
           "eval": {"data": [{"path": str(alpaca), "format": "alpaca"}], "scorer": spec}}
    if spec == "exact":  # caught when the config is read, before anything is loaded
        with pytest.raises(UserError, match="eval.scorer"):
            load_config(data=cfg)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = run_cli("eval", str(path), "--model", str(models[0]))
        assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
        return
    from tunelab.evaluation import load_scorer

    with pytest.raises(UserError, match="eval.scorer") as e:
        load_scorer(spec)
    assert fragment in str(e.value)


def test_no_eval_data_is_a_clear_error(models, tmp_path):
    from tunelab.evaluation import eval_rows

    data = tasks.write_jsonl([tasks.to_alpaca(i) for i in tasks.make_items(4, 0)], tmp_path / "a.jsonl")
    cfg = load_config(data={"model": {"path": str(models[0])}, "data": {"train": [{"path": str(data), "format": "alpaca"}]}})
    with pytest.raises(UserError, match="no eval data"):
        eval_rows(cfg)
    # data.eval_fraction: the same rows training held out
    held = eval_rows(cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_fraction": 0.5})}))
    assert len(held) == 2
