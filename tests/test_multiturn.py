"""Multi-turn GRPO rollouts: the environment contract, tool outputs masked from the loss exactly as SFT masks a
tool conversation, an environment that owns its reward (TRL's get_reward), refusals."""

from __future__ import annotations

import pytest
import torch
from test_rl import metrics, rl_config, run, trainer_for
from tiny import make_base_model

from tunelab import tasks
from tunelab.config import UserError, load_config
from tunelab.data import render, tokenize_example
from tunelab.data.tokenize import encode
from tunelab.environments import Calculator, GuessTheNumber, calculator_call, tool_conversation
from tunelab.objectives.multiturn import run_tool, tool_schemas


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("mt-base"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    train, _ = tasks.split_items(16, 4, seed=3, families=["add"])
    return tasks.write_jsonl([tasks.to_prompt(i) for i in train], tmp_path_factory.mktemp("mt-data") / "p.jsonl")


def env_config(base, prompts, out, section: dict, **train) -> dict:
    return rl_config(base, prompts, out, "grpo", {"group_size": 2, "max_new_tokens": 160, "kl_coef": 0.0,
                                                 "environment": "tunelab.environments:Calculator",
                                                 "reward_function": "tunelab.tasks:correctness_reward", **section},
                     train={"micro_batch_size": 1, "grad_accum": 1, **train}, data={"max_length": 256})


def test_environment_contract():
    names = [s["function"]["name"] for s in tool_schemas(Calculator, "k")]
    assert names == ["add", "lookup", "reverse", "sort_numbers", "uppercase"]  # public methods but reset
    add = tool_schemas(Calculator, "k")[0]["function"]["parameters"]
    assert add["required"] == ["a", "b"] and add["properties"]["a"]["type"] == "integer"
    env = Calculator()
    env.reset(prompt="What is 2 + 3?", answer="5")
    assert run_tool(env, {"name": "add", "arguments": {"a": 2, "b": 3}}) == "5"
    assert run_tool(env, {"name": "lookup", "arguments": {"facts": "a=1, b=7", "key": "b"}}) == "7"
    assert run_tool(env, {"name": "reset", "arguments": {}}).startswith("error: no tool")
    assert run_tool(env, {"name": "add", "arguments": {"a": 2}}).startswith("error: TypeError")
    game = GuessTheNumber()
    assert "1 to 100" in game.reset(answer="42")
    assert [game.guess(n) for n in (50, 40, 42)] == ["lower", "higher", "correct"]
    assert game.get_reward() == pytest.approx(0.8)


def test_calculator_answers_every_task_family_by_the_tasks_checker():
    """The call calculator_call reads out of each family's prompt, run by the Calculator, gives the answer the
    task generator computed (tasks.exact_match); tool_conversation is that trajectory in the chat format."""
    for item in tasks.make_items(50, seed=11):
        call = calculator_call(item["prompt"])
        conversation = tool_conversation(item["prompt"], call)
        assert tasks.exact_match(conversation[-1]["content"], item["answer"]) == 1.0, item
        assert tasks.exact_reward(item["prompt"], conversation[-1]["content"], item["answer"]) == 1.0
        assert conversation[1]["tool_calls"][0]["function"] == call and conversation[2]["role"] == "tool"
    assert calculator_call("Tell me a story") is None
    assert tasks.exact_reward("p", "The answer is 5.", "5") == 0.0
    assert tasks.correctness_reward("p", "The answer is 5.", "5") == 0.3


def test_tools_in_prompt_false_leaves_the_schemas_out(base, prompts, tmp_path):
    with_schemas = trainer_for(env_config(base, prompts, tmp_path / "s", {})).objective
    without = trainer_for(env_config(base, prompts, tmp_path / "n", {
        "tools_in_prompt": False, "rewards": [{"function": "tunelab.verifiers:tool_call_validity"}]})).objective
    item = without.datasets()[0][0]
    long, short = with_schemas.sampler._start(item).prompt_ids, without.sampler._start(item).prompt_ids
    tok = without.tokenizer
    assert "<tools>" in tok.decode(long) and "<tools>" not in tok.decode(short)
    assert len(short) < len(long) // 5, (len(short), len(long))  # the five schemas are most of the prompt
    assert without.sampler.prompt_tools is None and len(with_schemas.sampler.prompt_tools) == 5
    # the tools still run, so rewards that check calls against their schemas still get them
    rewards = without.reward_source().named
    assert [fn.tools for name, _, fn in rewards if name == "tool_call_validity"] == [with_schemas.sampler.tools]


def test_tools_in_prompt_false_without_an_environment_is_refused(base, prompts, tmp_path):
    cfg = env_config(base, prompts, tmp_path, {"tools_in_prompt": False})
    cfg["grpo"].pop("environment")
    with pytest.raises(UserError, match="grpo.tools_in_prompt: false needs grpo.environment"):
        load_config(data=cfg)


def test_tool_outputs_masked_exactly_as_sft(base, prompts, tmp_path, monkeypatch):
    """A scripted policy writes the assistant turns of a tool conversation; the rollout's tokens must be the SFT
    tokenization of that conversation, and the tokens that carry loss exactly SFT's labelled ones."""
    trainer = trainer_for(env_config(base, prompts, tmp_path / "m", {}))
    obj, tok = trainer.objective, trainer.objective.tokenizer
    item = trainer.train_items[0]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    conversation = item.messages + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                    {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]
    segments = render(conversation, obj.cfg.data.template, tok, tools=obj.sampler.prompt_tools)
    sft = tokenize_example(segments, tok, max_length=10**9, train_on_prompt=False)
    turns = [encode(text, tok, at_start=False) for text, is_assistant in segments if is_assistant]
    assert len(turns) == 2

    def scripted(model, batch, repeat=1, greedy=False, max_new_tokens=None):
        k = scripted.calls
        scripted.calls += 1
        rows = [turns[k]] * batch["prompt_ids"].shape[0]
        return {"response": torch.tensor(rows), "response_mask": torch.ones(len(rows), len(turns[k]), dtype=torch.long)}

    scripted.calls = 0
    monkeypatch.setattr(obj, "generate", scripted)
    roll = obj.sampler.generate(trainer.module.model, trainer._collate([0], trainer.train_items), repeat=1)
    P = int(roll["prompt_mask"].sum())
    ids = roll["prompt_ids"][0, -P:].tolist() + roll["response"][0].tolist()
    # the template's text after the last end-of-turn (chatml's newline) is no part of a response
    end = len(sft.input_ids) - (0 if segments[-1][1] else len(encode(segments[-1][0], tok, at_start=False)))
    assert ids == sft.input_ids[:end]
    labelled = [int(label != -100) for label in sft.labels[P:end]]
    assert roll["tool_mask"][0].tolist() == labelled and 0 in labelled
    assert roll["texts"] == ["5"] and bool(roll["eos"][0])
    assert "<tool_response>" in tok.decode([t for t, m in zip(roll["response"][0].tolist(), labelled) if not m])
    # and the update's loss covers exactly those tokens
    roll["scores"] = obj.score(roll)
    roll.update({"rollout_s": 0.0, "frac_reward_zero_std": 1.0, "sampling_rounds": 0})
    roll["items"] = roll["items"] * 2  # a group of two copies, as group_size asks
    roll = {k: (v.repeat(2, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v) for k, v in roll.items()}
    roll["environments"] = roll["environments"] * 2
    [update] = list(obj.plan(roll))
    assert roll["loss_mask"][0].tolist() == labelled
    assert sum(obj.units(b) for b in update) == 2 * sum(labelled)


def test_environment_reward_and_a_short_run(base, prompts, tmp_path):
    section = {"environment": "tunelab.environments:GuessTheNumber", "reward_function": None, "max_new_tokens": 16}
    cfg = env_config(base, prompts, tmp_path / "g", section, max_steps=2, micro_batch_size=2)
    run(cfg)
    ms = metrics(tmp_path / "g")
    assert len(ms) == 2 and all("rewards/GuessTheNumber/mean" in m for m in ms)
    # an environment without get_reward needs another reward source
    bad = env_config(base, prompts, tmp_path / "b", {"reward_function": None})
    with pytest.raises(UserError, match="get_reward"):
        trainer_for(bad)
    with pytest.raises(UserError, match="module:Class"):
        trainer_for(env_config(base, prompts, tmp_path / "c", {"environment": "Calculator"}))
    from tunelab.serve.jobspec import code_keys

    assert "grpo.environment" in code_keys(load_config(data=cfg))
