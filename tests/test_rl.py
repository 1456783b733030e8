"""PPO and GRPO: rollouts against independent recomputation, GAE / group advantages against policy_losses.py,
reward sources (function, reward model, judge) against direct model calls, learning, resume."""

from __future__ import annotations

import shutil
import statistics

import pytest
import torch
from tiny import config_dict, make_base_model

import rl_rewards
from tunelab import tasks
from tunelab.config import UserError, load_config
from tunelab.objectives import losses as L
from tunelab.objectives import policy_losses as PL
from tunelab.training.loop import Trainer

REWARD = "rl_rewards:target_fraction"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("rl-base"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    train, test = tasks.split_items(64, 8, seed=3)
    root = tmp_path_factory.mktemp("rl-data")
    tasks.write_jsonl([tasks.to_prompt(i) for i in test], root / "eval.jsonl")
    return tasks.write_jsonl([tasks.to_prompt(i) for i in train], root / "prompts.jsonl")


def rl_config(base, prompts, out, method: str, section: dict | None = None, **sections) -> dict:
    rc = {"reward_function": REWARD, "max_new_tokens": 8, **(section or {})}
    data = {"train": [{"path": str(prompts), "format": "prompt"}], "max_length": 64, **sections.pop("data", {})}
    return config_dict(base, prompts, out, method=method, data=data, **{method: rc}, **sections)


def trainer_for(cfg: dict) -> Trainer:
    trainer = Trainer(load_config(data=cfg), say=lambda *a: None)
    trainer.setup()
    return trainer


def run(cfg: dict, resume: bool = False) -> Trainer:
    trainer = Trainer(load_config(data=cfg), resume=resume, say=lambda *a: None)
    trainer.run()
    return trainer


def metrics(run_dir):
    from tunelab.training.tracking import read_metrics

    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "reward" in m]


def reward_rose(rewards: list[float], k: int = 5, factor: float = 2.0, margin: float = 0.1) -> bool:
    """The mean reward of the last k rollouts is at least `factor` x and `margin` above that of the first k."""
    first, last = statistics.mean(rewards[:k]), statistics.mean(rewards[-k:])
    return last >= factor * first and last >= first + margin


def test_reward_rose_rejects_flat_and_noisy_curves():
    # the check the learning tests rely on must be able to fail
    assert not reward_rose([0.08] * 30)
    assert not reward_rose([0.05, 0.12, 0.07, 0.1, 0.06] * 6)
    assert not reward_rose([0.1] * 25 + [0.18] * 5)  # +0.08: below the margin
    assert reward_rose([0.08] * 5 + [0.2] * 20 + [0.4] * 5)


# ---------------------------------------------------------------- learning

def test_ppo_raises_reward_with_bounded_kl(base, prompts, tmp_path):
    """Full fine-tuning (a LoRA adapter on this 64-wide frozen base barely moves its outputs, see test_core),
    reward = fraction of the response's characters that are 'e' (about 8 % at the start)."""
    cfg = rl_config(base, prompts, tmp_path / "ppo", "ppo",
                    {"kl_coef": 0.1, "minibatches": 2, "ppo_epochs": 4},
                    train={"max_steps": 30, "micro_batch_size": 32, "lr": 3e-3, "scheduler": "constant"})
    run(cfg)
    ms = metrics(tmp_path / "ppo")
    rewards, kls = [m["reward"] for m in ms], [m["kl"] for m in ms]
    assert reward_rose(rewards), rewards
    assert 0 < statistics.mean(kls[-5:]) < 15, kls  # moved away from the reference, but held near it
    for key in ("entropy", "clipfrac", "vf_loss", "response_length", "approx_kl", "pg_loss", "kl_coef"):
        assert all(key in m for m in ms), key
    assert ms[0]["updates"] == 8  # 4 epochs x 2 minibatches per rollout batch


def test_grpo_raises_reward_with_bounded_kl(base, prompts, tmp_path):
    cfg = rl_config(base, prompts, tmp_path / "grpo", "grpo", {"kl_coef": 0.2, "group_size": 8},
                    train={"max_steps": 30, "micro_batch_size": 4, "lr": 2e-3, "scheduler": "constant"},
                    data={"eval": [{"path": str(prompts.parent / "eval.jsonl"), "format": "prompt"}]})
    run(cfg)
    ms = metrics(tmp_path / "grpo")
    rewards, kls = [m["reward"] for m in ms], [m["kl"] for m in ms]
    assert reward_rose(rewards), rewards
    assert 0 < statistics.mean(kls[-5:]) < 20, kls
    assert all("kl_k3" in m and "entropy" in m for m in ms)
    assert "eval_reward" in ms[-1] and ms[-1]["eval_loss"] == pytest.approx(-ms[-1]["eval_reward"])


# ---------------------------------------------------------------- rollouts against independent recomputation

def _perturb_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _single_logp(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of `response` after `prompt`, one unpadded sequence, through the model's own forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_ppo_rollout_and_advantages_match_an_independent_recomputation(base, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = rl_config(base, prompts, tmp_path / "roll", "ppo",
                    {"kl_coef": 0.1, "missing_eos_penalty": 0.5, "gamma": 0.9, "lam": 0.8, "temperature": 0.7,
                     "max_new_tokens": 6, "ppo_epochs": 2, "minibatches": 2},
                    adapter={"r": 4, "alpha": 8, "dropout": 0.1}, train={"micro_batch_size": 3, "grad_accum": 2})
    trainer = trainer_for(cfg)
    obj, model = trainer.objective, trainer.module.model
    _perturb_lora(model)
    with torch.no_grad():
        torch.nn.init.normal_(obj.value_head.weight, std=0.3)  # non-zero values, so GAE has something to use
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # ratio 1 at the start
    batches = [trainer._collate(list(range(i, i + 3)), trainer.train_items) for i in (0, 3)]
    torch.manual_seed(1)
    roll = obj.rollout(model, batches)
    n, m = len(roll["texts"]), roll["response_mask"]
    assert n == 6 and roll["prompt_ids"].shape[0] == 6

    # the adapter-disabled base, loaded afresh
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    stop = set(obj.stop_ids)
    for i in range(n):
        prompt = roll["prompt_ids"][i][roll["prompt_mask"][i].bool()].tolist()
        length = int(m[i].sum())
        response = roll["response"][i, :length].tolist()
        assert prompt == trainer.train_items[i].input_ids  # left padding removed gives the prompt back
        assert not stop & set(response[:-1]) and (response[-1] in stop) == bool(roll["eos"][i])
        assert roll["texts"][i] == obj.tokenizer.decode(response, skip_special_tokens=True).strip()
        assert float(roll["scores"][i]) == pytest.approx(rl_rewards.target_fraction("", roll["texts"][i]))
        torch.testing.assert_close(roll["logp"][i, :length], _single_logp(model, prompt, response, 0.7),
                                   atol=2e-5, rtol=0)
        torch.testing.assert_close(roll["ref_logp"][i, :length], _single_logp(reference, prompt, response, 0.7),
                                   atol=2e-5, rtol=0)
    assert (roll["logp"] - roll["ref_logp"]).abs().max() > 1e-3  # the perturbed adapter differs from its base

    # per-token rewards -> GAE exactly as losses.gae computes it on the same tensors
    adv = obj.advantages(roll)
    rewards = -0.1 * (roll["logp"] - roll["ref_logp"]) * m
    for i in range(n):
        rewards[i, int(m[i].sum()) - 1] += float(roll["scores"][i]) - (0.0 if roll["eos"][i] else 0.5)
    expected_adv, expected_ret = PL.gae(rewards, roll["values"], m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv["rewards"], rewards)
    torch.testing.assert_close(adv["advantages_raw"], expected_adv)
    torch.testing.assert_close(adv["returns"], expected_ret)
    torch.testing.assert_close(adv["advantages"], L.whiten(expected_adv, m))
    assert roll["values"].abs().max() > 0

    # 2 epochs x 2 minibatches; each epoch covers every response once; the first update sees ratio 1
    updates = list(obj.plan(roll))
    assert len(updates) == 4
    for epoch in (updates[:2], updates[2:]):
        assert sum(int(mb["response_mask"].shape[0]) for u in epoch for mb in u) == n
    for mb in updates[0]:
        with torch.no_grad():
            loss, met = obj.loss(model, mb)
        tokens = mb["response_mask"].sum()
        assert float(met["approx_kl"]) / tokens < 1e-6 and float(met["clipfrac"]) == 0
        assert float(met["reward"] / tokens) == pytest.approx(float(roll["scores"].mean()))
        assert torch.isfinite(loss)


def test_grpo_group_advantages_and_frozen_reference(base, prompts, tmp_path):
    cfg = rl_config(base, prompts, tmp_path / "g", "grpo", {"group_size": 4, "max_new_tokens": 6},
                    train={"micro_batch_size": 2, "grad_accum": 1})
    trainer = trainer_for(cfg)
    obj, model = trainer.objective, trainer.module.model
    assert obj.ref_model is not None and not any(p.requires_grad for p in obj.ref_model.parameters())
    roll = obj.rollout(model, [trainer._collate([0, 1], trainer.train_items)])
    assert len(roll["texts"]) == 8
    assert [it.input_ids for it in roll["items"]] == [trainer.train_items[i].input_ids for i in (0,) * 4 + (1,) * 4]
    # the full-fine-tuning reference is a frozen copy: identical to the policy before any update
    torch.testing.assert_close(roll["ref_logp"], obj.forward(model, roll)["logp"].detach())
    updates = list(obj.plan(roll))
    scores = roll["scores"].view(2, 4)
    expected = ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(roll["advantages"], expected)
    assert len(updates) == 1 and sum(mb["response_mask"].shape[0] for mb in updates[0]) == 8


# ---------------------------------------------------------------- reward sources

def test_reward_function_loading_errors(base, prompts, tmp_path):
    from tunelab.objectives import make_objective
    from tunelab.objectives.rewards import FunctionReward, PromptItem, load_function

    cases = {
        "rl_rewards.target_fraction": "is not of the form module:function",
        "no_such_module_zq:f": "no module named 'no_such_module_zq'",
        "rl_rewards:nope": "module 'rl_rewards' has no attribute 'nope'",
        "rl_rewards:target_fractoin": "did you mean rl_rewards:target_fraction",
        "rl_rewards:NOT_A_FUNCTION": "is a int, not a function",
        "rl_rewards:wrong_signature": "must accept the keyword arguments prompt, response and answer",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match="ppo.reward_function: .*" + message):
            load_function(spec, "ppo.reward_function")
    assert load_function("tunelab.tasks:correctness_reward", "k") is tasks.correctness_reward
    # the objective checks the function as soon as it exists, before any model is loaded
    cfg = load_config(data=rl_config(base, prompts, tmp_path / "bad", "grpo", {"reward_function": "rl_rewards:nope"}))
    with pytest.raises(UserError, match="grpo.reward_function: module 'rl_rewards' has no attribute"):
        make_objective(cfg, tokenizer=_tokenizer(base))
    item = PromptItem([1], [{"role": "user", "content": "2+2?"}], "4")
    with pytest.raises(UserError, match="must return a number, got str"):
        FunctionReward("rl_rewards:returns_text", "ppo.reward_function")([item], ["4"])
    assert FunctionReward("tunelab.tasks:correctness_reward", "k")([item] * 2, ["4", "it is 4"]).tolist() == \
        pytest.approx([1.0, 0.3])


def _tokenizer(path):
    from tunelab.modeling.load import load_tokenizer

    return load_tokenizer(str(path))


def _items(n: int = 3):
    from tunelab.objectives.rewards import PromptItem

    train, _ = tasks.split_items(n, 1, seed=5)
    return [PromptItem([1], [{"role": "user", "content": t["prompt"]}], t["answer"]) for t in train]


def test_reward_model_source_full_dir_and_adapter_dir(base, prompts, tmp_path):
    # ModelReward reads reward models through method: reward's load_reward_model / score (landing separately)
    pytest.importorskip("tunelab.objectives.reward")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tunelab.objectives.rewards import ModelReward

    def scalar_base():
        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)

    tok = _tokenizer(base)
    torch.manual_seed(0)
    full = scalar_base()
    torch.nn.init.normal_(full.score.weight, std=1.0)
    full.save_pretrained(tmp_path / "rm-full")
    tok.save_pretrained(tmp_path / "rm-full")
    peft_rm = get_peft_model(scalar_base(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_rm.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(std=0.5)
    peft_rm.save_pretrained(tmp_path / "rm-lora")
    tok.save_pretrained(tmp_path / "rm-lora")

    items, responses = _items(3), ["hello", "72", "a b c"]
    reloaded = {
        "rm-full": AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-full", dtype=torch.float32).eval(),
        "rm-lora": PeftModel.from_pretrained(scalar_base(), tmp_path / "rm-lora").eval(),
    }
    for name, model in reloaded.items():
        scores = ModelReward(str(tmp_path / name), "ppo.reward_model", torch.device("cpu"))(items, responses)
        expected = []
        for item, response in zip(items, responses):
            # the conversation as the chat template writes it, ending at the reply's end-of-turn token
            text = tok.apply_chat_template(item.messages + [{"role": "assistant", "content": response}],
                                           tokenize=False).removesuffix("\n")
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
            with torch.no_grad():
                expected.append(float(model(input_ids=ids).logits[0, 0]))
        assert scores.tolist() == pytest.approx(expected, abs=1e-4), name
        assert scores.std() > 1e-3
    # end to end: a PPO run scored by the adapter reward model
    cfg = rl_config(base, prompts, tmp_path / "ppo-rm", "ppo",
                    {"reward_function": None, "reward_model": str(tmp_path / "rm-lora")},
                    train={"max_steps": 2, "micro_batch_size": 4})
    run(cfg)
    ms = metrics(tmp_path / "ppo-rm")
    assert len(ms) == 2 and all(abs(m["reward"]) > 0 for m in ms)


def test_judge_source_scores_yes_probability(base):
    from transformers import AutoModelForCausalLM

    from tunelab.objectives.rewards import JudgeReward

    tok = _tokenizer(base)
    template = "Question: {prompt}\nExpected: {answer}\nAnswer: {response}\nIs the answer correct?"
    judge = JudgeReward({"path": str(base), "template": template}, "ppo.judge", torch.device("cpu"))
    items, responses = _items(3), ["72", "no idea", "x"]
    scores = judge(items, responses)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    yes, no = {tok.encode("Yes", add_special_tokens=False)[0]}, {tok.encode("No", add_special_tokens=False)[0]}
    for item, response, score in zip(items, responses, scores):
        question = (template.replace("{prompt}", item.messages[0]["content"]).replace("{answer}", item.answer)
                    .replace("{response}", response))
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        py, pn = p[list(yes)].sum(), p[list(no)].sum()
        assert float(score) == pytest.approx(float(py / (py + pn)), abs=1e-5)
    assert ((scores > 0) & (scores < 1)).all()
    for spec, message in [({"path": str(base)}, "ppo.judge.template: required"),
                          ({"path": str(base), "template": "no placeholder"}, "must contain {response}"),
                          ({"path": str(base), "template": "{response}", "temperature": 1},
                           "unknown key 'temperature'"),
                          ({"path": str(base), "template": "{response}", "yes": "No"}, "must start with different")]:
        with pytest.raises(UserError, match=message):
            JudgeReward(spec, "ppo.judge", torch.device("cpu"))


# ---------------------------------------------------------------- the loop: resume, examples

def test_ppo_resume_is_exact_with_value_head_and_adaptive_kl(base, prompts, tmp_path):
    section = {"adaptive_kl": True, "kl_target": 0.05, "kl_horizon": 10, "ppo_epochs": 2, "max_new_tokens": 6}
    train = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "micro_batch_size": 8, "lr": 5e-3}
    adapter = {"r": 4, "alpha": 8, "dropout": 0.1}
    straight = run(rl_config(base, prompts, tmp_path / "straight", "ppo", section, adapter=adapter, train=train))
    partial = tmp_path / "partial"
    run(rl_config(base, prompts, partial, "ppo", section, adapter=adapter, train=train))
    shutil.rmtree(partial / "checkpoints" / "step-00000004")
    shutil.rmtree(partial / "final")
    resumed = run(rl_config(base, prompts, partial, "ppo", section, adapter=adapter, train=train), resume=True)
    ws = {k: v.detach() for k, v in straight.module.named_parameters() if v.requires_grad}
    wr = {k: v.detach() for k, v in resumed.module.named_parameters() if v.requires_grad}
    assert "extra.value_head.weight" in ws and ws.keys() == wr.keys()
    assert max(float((ws[k] - wr[k]).abs().max()) for k in ws) < 1e-6
    assert float(ws["extra.value_head.weight"].abs().max()) > 0  # the value head trained and was checkpointed
    ms, mr = metrics(tmp_path / "straight"), metrics(partial)
    assert [m["step"] for m in mr] == [1, 2, 3, 4]
    coefs = [m["kl_coef"] for m in ms]
    assert coefs[3] != pytest.approx(coefs[0], rel=1e-3)  # the controller moved the coefficient ...
    for key in ("reward", "loss", "kl_coef", "kl"):  # ... and resume restored it with the RNG and weights
        assert [m[key] for m in ms] == pytest.approx([m[key] for m in mr], abs=1e-6), key
    assert straight.objective.kl_coef == pytest.approx(resumed.objective.kl_coef, rel=1e-9)


def test_qlora_rollouts_leave_the_4bit_layers_trainable(base, prompts, tmp_path):
    """bitsandbytes repacks a Linear4bit weight for a CPU inference kernel, which has no backward, at its first
    eval-mode forward on CPUs with AVX512-BF16 (rollouts are eval mode). The gradients of a loss after a
    rollout must equal those of the same loss on a policy that never generated."""
    cfg = rl_config(base, prompts, tmp_path / "q", "ppo", {"max_new_tokens": 6},
                    model={"path": str(base), "quantize": "nf4"}, adapter={"r": 4, "alpha": 8},
                    train={"micro_batch_size": 4})
    grads = []
    for generate_first in (True, False):
        trainer = trainer_for(cfg)
        obj, model = trainer.objective, trainer.module.model
        _perturb_lora(model)
        if generate_first:
            torch.manual_seed(0)
            roll = obj.rollout(model, [trainer._collate([0, 1, 2, 3], trainer.train_items)])
            batch = next(iter(obj.plan(roll)))[0]
        loss, _ = obj.loss(model, batch)  # the second trainer reuses the first one's rollout batch
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()
                  if hasattr(m, "support_avx512bf16_for_cpu")]
        assert packed and not any(packed)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_examples_validate(name):
    from pathlib import Path

    from tunelab.objectives.rewards import load_function

    cfg = load_config(Path(__file__).parent.parent / "examples" / f"{name}.yaml")
    assert cfg.method == name and cfg.data.train[0].format == "prompt"
    section = getattr(cfg, name)
    assert load_function(section.reward_function, f"{name}.reward_function") is tasks.correctness_reward
