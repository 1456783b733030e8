"""The GRPO family in the loop: no reference at kl_coef 0, weighted rewards and graders logged apart, truncated
completions masked, DAPO's overlong penalty against TRL's, kept sampling log-probs across updates, dynamic
sampling, reward scaling, config errors, and per loss type a run that raises the reward.
(The losses themselves are checked against TRL in tests/test_policy_losses.py.)"""

from __future__ import annotations

import statistics

import pytest
import torch
from test_rl import metrics, reward_rose, rl_config, run, trainer_for
from tiny import make_base_model

import rl_rewards
from tunelab import tasks
from tunelab.config import UserError, load_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("grpo-base"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    train, _ = tasks.split_items(64, 8, seed=3)
    return tasks.write_jsonl([tasks.to_prompt(i) for i in train], tmp_path_factory.mktemp("grpo-data") / "p.jsonl")


def grpo(base, prompts, out, section: dict, **train) -> dict:
    return rl_config(base, prompts, out, "grpo", {"group_size": 4, "max_new_tokens": 6, **section},
                     train={"micro_batch_size": 2, "grad_accum": 1, **train})


def first_rollout(trainer, rows=(0, 1)):
    return trainer.objective.rollout(trainer.module.model, [trainer._collate(list(rows), trainer.train_items)])


def test_kl_coef_zero_loads_no_reference(base, prompts, tmp_path, monkeypatch):
    trainer = trainer_for(grpo(base, prompts, tmp_path / "g", {"kl_coef": 0.0}))
    obj = trainer.objective
    assert obj.ref_model is None and not obj.needs_reference()
    monkeypatch.setattr(obj, "reference_logp", lambda *a: pytest.fail("a reference forward pass at kl_coef 0"))
    roll = first_rollout(trainer)
    assert "ref_logp" not in roll and "logp" not in roll  # one update per rollout: pi_old is the policy itself
    [update] = list(obj.plan(roll))
    loss, m = obj.loss(trainer.module.model, update[0])
    assert torch.isfinite(loss) and "kl_k3" not in m and "kl" not in m
    # and with kl_coef > 0 a full fine-tune holds a frozen copy
    assert trainer_for(grpo(base, prompts, tmp_path / "k", {"kl_coef": 0.1})).objective.ref_model is not None


def test_weighted_rewards_are_summed_and_logged_apart(base, prompts, tmp_path):
    rewards = [{"function": "rl_rewards:target_fraction", "weight": 2.0},
               {"function": "rl_rewards:response_chars", "weight": -0.5, "name": "length"}]
    trainer = trainer_for(grpo(base, prompts, tmp_path / "w", {"reward_function": None, "rewards": rewards}))
    roll = first_rollout(trainer)
    items, texts = roll["items"], roll["texts"]
    tf = torch.tensor([rl_rewards.target_fraction(i.prompt, t) for i, t in zip(items, texts)])
    chars = torch.tensor([rl_rewards.response_chars(i.prompt, t) for i, t in zip(items, texts)])
    torch.testing.assert_close(roll["scores"].cpu(), 2.0 * tf - 0.5 * chars)
    [update] = list(trainer.objective.plan(roll))
    stats = update[0]["stats"]
    assert stats["rewards/target_fraction/mean"] == pytest.approx(float(tf.mean()))
    assert stats["rewards/length/std"] == pytest.approx(float(chars.std()))
    zero = [statistics.pstdev(g) == 0 for g in (2.0 * tf - 0.5 * chars).view(-1, 4).tolist()]
    assert stats["frac_reward_zero_std"] == pytest.approx(sum(zero) / len(zero))


def test_graders_are_rewards_of_weight_one(base, prompts, tmp_path):
    check = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    trainer = trainer_for(grpo(base, prompts, tmp_path / "gr", {"graders": [check]}))
    items = [trainer.train_items[i] for i in (0, 0, 1, 1)]
    texts = [items[0].answer, "no", "eeee", items[2].answer]
    part = {"items": items, "texts": texts}
    scores = trainer.objective.score(part)
    expected = [rl_rewards.target_fraction(i.prompt, t) + (t == i.answer) for i, t in zip(items, texts)]
    torch.testing.assert_close(scores.cpu(), torch.tensor(expected))
    assert part["reward/exact"].tolist() == [1.0, 0.0, 0.0, 1.0]
    bad = dict(check, operation="approximately")
    with pytest.raises(UserError, match=r"grpo.graders\[0\]"):
        trainer_for(grpo(base, prompts, tmp_path / "bad", {"graders": [bad]}))


def test_truncated_completions_masked_and_overlong_penalty_as_trl(base, prompts, tmp_path):
    from trl.rewards import get_soft_overlong_punishment

    section = {"max_new_tokens": 3, "mask_truncated_completions": True, "overlong_buffer": 2, "kl_coef": 0.0}
    trainer = trainer_for(grpo(base, prompts, tmp_path / "t", section))
    roll = first_rollout(trainer, rows=(0, 1, 2, 3))
    lengths = roll["response_mask"].sum(-1)
    trl = get_soft_overlong_punishment(max_completion_len=3, soft_punish_cache=2)([[0] * int(n) for n in lengths])
    torch.testing.assert_close(roll["reward/overlong"].cpu(), torch.tensor(trl))
    tf = [rl_rewards.target_fraction(i.prompt, t) for i, t in zip(roll["items"], roll["texts"])]
    torch.testing.assert_close(roll["scores"].cpu(), torch.tensor(tf) + torch.tensor(trl))
    [update] = list(trainer.objective.plan(roll))
    assert (~roll["eos"]).any()
    for row in range(len(lengths)):
        expected = roll["response_mask"][row] if roll["eos"][row] else torch.zeros_like(roll["response_mask"][row])
        assert torch.equal(roll["loss_mask"][row], expected)
    # dapo's units are the tokens that carry loss: truncated responses add none
    assert sum(trainer.objective.units(b) for b in update) == int(roll["loss_mask"].sum())


def test_sampling_logprobs_kept_across_epochs_and_updates(base, prompts, tmp_path):
    cfg = grpo(base, prompts, tmp_path / "e", {"ppo_epochs": 2, "steps_per_generation": 2, "kl_coef": 0.0},
               micro_batch_size=4, max_steps=1, lr=1e-3)
    trainer = trainer_for(cfg)
    obj, model = trainer.objective, trainer.module.model
    roll = first_rollout(trainer, rows=(0, 1, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(roll["logp"], obj.forward(model, roll)["logp"] * roll["response_mask"])
    updates = list(obj.plan(roll))
    # 2 epochs x 2 updates, each half of the 16 responses in micro-batches of 4
    assert len(updates) == 4 and all(sum(b["response"].shape[0] for b in u) == 8 for u in updates)
    assert all("old_logp" in b for u in updates for b in u)
    run(cfg)
    assert metrics(tmp_path / "e")[0]["updates"] == 4


def test_dynamic_sampling_replaces_groups_without_signal(base, prompts, tmp_path):
    cfg = grpo(base, prompts, tmp_path / "d", {"reward_function": "rl_rewards:flat_for_odd_prompts",
                                               "dynamic_sampling_rounds": 3, "kl_coef": 0.0}, micro_batch_size=4)
    trainer = trainer_for(cfg)
    odd = [i for i, item in enumerate(trainer.train_items) if len(item.prompt) % 2][:2]
    even = [i for i, item in enumerate(trainer.train_items) if not len(item.prompt) % 2][:2]
    torch.manual_seed(0)
    roll = first_rollout(trainer, rows=odd + even)
    assert roll["frac_reward_zero_std"] >= 0.5 and roll["sampling_rounds"] >= 1
    groups = roll["scores"].view(-1, 4)
    assert 1 <= groups.shape[0] <= 4 and (groups.std(1) > 0).all()
    assert all(len(roll["items"][g * 4].prompt) % 2 == 0 for g in range(groups.shape[0]))


def test_batch_reward_scaling_as_trl(base, prompts, tmp_path):
    from trl.trainer.utils import nanstd

    trainer = trainer_for(grpo(base, prompts, tmp_path / "b", {"scale_rewards": "batch", "kl_coef": 0.0}))
    roll = first_rollout(trainer)
    list(trainer.objective.plan(roll))
    r = roll["scores"].cpu()
    mean = r.view(-1, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(roll["advantages"].cpu(), (r - mean) / (nanstd(r) + 1e-4))


def test_config_errors(base, prompts, tmp_path):
    def check(section, match, **drop):
        cfg = grpo(base, prompts, tmp_path / "c", section)
        with pytest.raises(UserError, match=match):
            load_config(data=cfg)

    check({"overlong_buffer": 7}, "overlong_buffer")
    check({"rewards": [{"function": "rl_rewards:target_fraction", "grader": {"type": "string_check"}}]},
          "exactly one of function, model, judge or grader")
    check({"reward_function": None}, "needs a reward")
    check({"loss_type": "ppo"}, "loss_type")
    check({"importance_sampling_level": "tokens"}, "importance_sampling_level")


# ---------------------------------------------------------------- learning, per loss type

@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "token"), ("bnpo", "token"),
                                             ("dr_grpo", "token"), ("cispo", "token"), ("grpo", "sequence")])
def test_each_loss_type_raises_the_reward(base, prompts, tmp_path, loss_type, level):
    """Reward = fraction of 'e' in the response (about 5 % at the start), full fine-tuning, fixed seed, 8 steps.
    Two updates per rollout (steps_per_generation 2), so the second is off-policy: on-policy (ratio 1) cispo's
    gradient is dapo's and the sequence-level ratio's is the token-level one's, and only the second update tells
    them apart."""
    section = {"loss_type": loss_type, "importance_sampling_level": level, "kl_coef": 0.0, "group_size": 8,
               "max_new_tokens": 8, "steps_per_generation": 2,
               **({"clip_range_high": 4.0} if loss_type == "cispo" else {})}
    cfg = grpo(base, prompts, tmp_path / "l", section, micro_batch_size=2, max_steps=8, lr=1e-2, scheduler="constant")
    run(cfg)
    ms = metrics(tmp_path / "l")
    rewards = [m["reward"] for m in ms]
    assert reward_rose(rewards, k=3), rewards
    assert all(m["updates"] == 2 for m in ms)


# ---------------------------------------------------------------- every completion truncated

def _truncate_all(monkeypatch, when=lambda roll: True):
    """Every completion of the rollouts `when` picks ends as if cut at max_new_tokens (eos False)."""
    from tunelab.objectives.grpo import GRPO

    plan = GRPO.plan

    def truncated(self, roll):
        if when(roll):
            roll["eos"] = torch.zeros_like(roll["eos"])
        return plan(self, roll)

    monkeypatch.setattr(GRPO, "plan", truncated)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "cispo"])
def test_every_completion_masked_is_a_no_op_step(base, prompts, tmp_path, monkeypatch, loss_type):
    """No token carries loss: every loss type leaves weights and optimizer alone (with weight decay and one update
    per rollout, an optimizer step on zero gradients would still move them), counts the step, logs the rollout and
    says what happened rather than 'non-finite'."""
    from transformers import AutoModelForCausalLM

    from tunelab.training.loop import Trainer

    _truncate_all(monkeypatch)
    section = {"loss_type": loss_type, "mask_truncated_completions": True, "kl_coef": 0.0, "max_new_tokens": 4}
    cfg = grpo(base, prompts, tmp_path / "t", section, max_steps=2, lr=1e-2, weight_decay=0.1)
    said = []
    trainer = Trainer(load_config(data=cfg), say=said.append)
    trainer.run()
    ms = metrics(tmp_path / "t")
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert m["loss"] == 0.0 and m["grad_norm"] == 0.0 and m["updates_without_loss"] == 1
        assert m["masked_completions"] == 8 and "skipped_steps" not in m and 0.0 <= m["reward"] <= 1.0
    assert not any("non-finite" in s for s in said)
    assert [s for s in said if "no token" in s] == [
        f"step {n}: no token carried loss (e.g. every completion masked as truncated), so the weights did not change"
        for n in (1, 2)]
    reference = _weights(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    trained = _weights(trainer.module.model)
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    assert all(not s for s in trainer.optimizer.state.values())  # AdamW never stepped: no moments


def test_resume_is_exact_across_steps_without_loss(base, prompts, tmp_path, monkeypatch):
    import shutil

    # the rollouts whose first prompt has an even length are all cut: a mix of idle and real steps
    _truncate_all(monkeypatch, when=lambda roll: len(roll["items"][0].prompt) % 2 == 0)
    section = {"mask_truncated_completions": True, "kl_coef": 0.0, "max_new_tokens": 4, "steps_per_generation": 2}
    train = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, "lr": 1e-2, "weight_decay": 0.1}
    straight = run(grpo(base, prompts, tmp_path / "straight", section, **train))
    partial = tmp_path / "partial"
    run(grpo(base, prompts, partial, section, **train))
    shutil.rmtree(partial / "checkpoints" / "step-00000006")
    shutil.rmtree(partial / "final")
    resumed = run(grpo(base, prompts, partial, section, **train), resume=True)
    ms, mr = metrics(tmp_path / "straight"), metrics(partial)
    idle = [m.get("updates_without_loss", 0) for m in ms]
    assert 2 in idle[3:] and min(idle[3:]) < 2, idle  # after the checkpoint: a step without loss, one with some
    assert [m["step"] for m in mr] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "loss", "grad_norm", "masked_completions"):
        assert [m[key] for m in ms] == pytest.approx([m[key] for m in mr], abs=1e-6), key
    ws, wr = _weights(straight.module.model), _weights(resumed.module.model)
    assert max(float((ws[k] - wr[k]).abs().max()) for k in ws) < 1e-6


def test_a_verifying_reward_drives_learning(base, prompts, tmp_path):
    """tunelab.verifiers:format_match as a grpo.rewards entry with its options: 1 when the response holds at least
    three 'e's (rare at the start: about 5 % of characters are 'e'), else 0, so only a policy that learned to write
    more of them scores. Same run shape as the per-loss-type runs above."""
    rewards = [{"function": "tunelab.verifiers:format_match", "args": {"pattern": "(.*e){3}.*"}, "name": "eee"}]
    section = {"reward_function": None, "rewards": rewards, "kl_coef": 0.0, "group_size": 8, "max_new_tokens": 8,
               "steps_per_generation": 2}
    cfg = grpo(base, prompts, tmp_path / "v", section, micro_batch_size=2, max_steps=8, lr=1e-2, scheduler="constant")
    run(cfg)
    ms = metrics(tmp_path / "v")
    rewards = [m["rewards/eee/mean"] for m in ms]
    assert rewards == [m["reward"] for m in ms]  # the only reward source
    assert reward_rose(rewards, k=3), rewards
