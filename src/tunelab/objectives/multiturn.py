"""Multi-turn rollouts: the policy calls an environment's tools, their results are appended, generation goes on.

The environment contract follows TRL's `environment_factory` so that its environments port unchanged:
- a class named by `grpo.environment: module:Class`, instantiated with no arguments, one instance per sampled
  response (their interactions stay apart);
- `reset(**row) -> str | None` is called with the data row's fields before the response; a string it returns is
  appended to the last user message;
- every other public method is a tool. Its JSON schema comes from its signature and docstring (transformers'
  get_json_schema, as TRL does: type hints and an `Args:` section), and the schemas go into the prompt in the
  template's tool format (data/tools.py), unless `grpo.tools_in_prompt` is false;
- `get_reward() -> float`, when defined, scores the finished episode from the environment's state, as one more
  reward source of weight 1 named after the class (TRL's convention); the text reward sources score the last
  assistant turn.
What differs from TRL: `reset` gets the row's fields as keyword arguments here too, but no `environment` field
chooses among several environments, and tools run one at a time (no async tools).

A rollout is at most `max_turns` assistant turns and `max_new_tokens` tokens in all (tool results included).
After each turn the tool calls it wrote (parse_tool_calls) run, and the tool results are rendered as the
template renders a tool turn, followed by the next assistant prompt: those tokens are part of the response
sequence the policy is scored on, but `tool_mask` is 0 on them, so they never carry loss. A turn without tool
calls, or one cut by the token budget, ends the episode.
"""

from __future__ import annotations

import importlib
import inspect
import json

import torch

from tunelab.config import UserError


def load_environment(spec: str, key: str) -> type:
    """Import `module:Class`; every failure is a UserError naming `key`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key}: {spec!r} is not of the form module:Class (e.g. tunelab.environments:Calculator)")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{key}: cannot load {spec!r}: {e}") from None
    if not inspect.isclass(cls) or not callable(getattr(cls, "reset", None)):
        raise UserError(f"{key}: {spec!r} must be a class with a reset(**row) method (TRL's environment contract)")
    return cls


def tool_methods(cls: type) -> list[str]:
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]


def tool_schemas(cls: type, key: str) -> list[dict]:
    from transformers.utils import get_json_schema

    schemas = []
    for name in tool_methods(cls):
        try:
            schemas.append(get_json_schema(getattr(cls, name)))
        except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a bad docstring
            raise UserError(f"{key}: tool {cls.__name__}.{name} needs type hints and a docstring with an Args: "
                            f"section for its JSON schema ({e})") from None
    for schema in schemas:  # get_json_schema describes the unbound method: `self` is not an argument
        schema["function"]["parameters"].get("properties", {}).pop("self", None)
        required = schema["function"]["parameters"].get("required")
        if required and "self" in required:
            required.remove("self")
    return schemas


def run_tool(env, call: dict) -> str:
    """A tool call's result as text; a bad call's error is the result, so the policy can see and learn from it."""
    name, args = call.get("name"), call.get("arguments")
    if name not in tool_methods(type(env)):
        return f"error: no tool named {name!r}"
    if not isinstance(args, dict):
        return "error: arguments must be a JSON object"
    try:
        result = getattr(env, name)(**args)
    except Exception as e:  # noqa: BLE001 - the environment's error is the observation
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result)


class Episode:
    """One response being written: its tokens, which of them the policy wrote, the conversation so far."""

    def __init__(self, env, messages: list[dict], prompt_ids: list[int]):
        self.env, self.messages, self.prompt_ids = env, messages, prompt_ids
        self.response: list[int] = []
        self.tool_mask: list[int] = []
        self.done, self.stopped, self.text, self.turns = False, False, "", 0


class MultiTurnSampler:
    """Samples multi-turn responses for GRPO (`generate`'s output plus `tool_mask`)."""

    def __init__(self, obj, spec: str):
        self.obj, self.key = obj, "grpo.environment"
        self.cls = load_environment(spec, self.key)
        self.tools = tool_schemas(self.cls, self.key)  # what rewards that take `tools` check calls against
        # tools_in_prompt false: a policy fine-tuned on these tools (or data whose system message names them) needs
        # no schemas in every prompt, which for a small model or a short context are most of its tokens
        self.prompt_tools = self.tools if obj.rc.tools_in_prompt else None

    def _encode(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        from tunelab.data import render, tokenize_example

        segments = render(messages, self.obj.cfg.data.template, self.obj.tokenizer,
                          add_generation_prompt=generation_prompt, tools=self.prompt_tools)
        return tokenize_example(segments, self.obj.tokenizer, max_length=10**9, train_on_prompt=True).input_ids

    def _start(self, item) -> Episode:
        env = self.cls()
        observation = env.reset(**item.row)
        messages = [dict(m) for m in item.messages]
        if observation:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{observation}"
        return Episode(env, messages, self._encode(messages, True))

    def _tool_suffix(self, ep: Episode, content: str, calls: list[dict]) -> list[int]:
        """The tokens of the tool turn and the next assistant prompt, as the template renders them after this
        assistant turn (render's segments end at token boundaries, so the suffix is their difference)."""
        from tunelab.data import render
        from tunelab.data.tokenize import encode

        call_msgs = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        ep.messages = ep.messages + [{"role": "assistant", "content": content, "tool_calls": call_msgs}]
        ep.messages += [{"role": "tool", "content": run_tool(ep.env, c)} for c in calls]
        segments = render(ep.messages, self.obj.cfg.data.template, self.obj.tokenizer, add_generation_prompt=True,
                          tools=self.prompt_tools)
        last = max(i for i, (_, is_assistant) in enumerate(segments) if is_assistant)
        return [t for text, _ in segments[last + 1:] for t in encode(text, self.obj.tokenizer, at_start=False)]

    def _turn(self, model, episodes: list[Episode], greedy: bool) -> None:
        from tunelab.data.tools import parse_tool_calls

        obj, budget = self.obj, self.obj.rc.max_new_tokens
        active = [ep for ep in episodes if not ep.done]
        contexts = [ep.prompt_ids + ep.response for ep in active]
        width = max(map(len, contexts))
        pad = obj.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=obj.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=obj.device)
        left = max(budget - len(ep.response) for ep in active)
        out = obj.generate(model, {"prompt_ids": ids, "prompt_mask": mask, "items": active}, greedy=greedy,
                           max_new_tokens=left)
        for row, ep in enumerate(active):
            new = out["response"][row][out["response_mask"][row].bool()].tolist()[:budget - len(ep.response)]
            stopped = bool(new) and new[-1] in obj.stop_ids
            ep.response += new
            ep.tool_mask += [1] * len(new)
            ep.turns += 1
            text = obj.tokenizer.decode(new, skip_special_tokens=True).strip()
            content, calls = parse_tool_calls(text)
            ep.text, ep.stopped = text, stopped
            if not stopped or not calls or ep.turns >= obj.rc.max_turns:
                ep.done = True
                continue
            suffix = self._tool_suffix(ep, content, calls)
            if len(ep.response) + len(suffix) >= budget:  # no room left to answer: the episode is cut
                ep.done, ep.stopped = True, False
                continue
            ep.response += suffix
            ep.tool_mask += [0] * len(suffix)

    @torch.no_grad()
    def generate(self, model, batch: dict, repeat: int = 1, greedy: bool = False) -> dict:
        items = [item for item in batch["items"] for _ in range(repeat)]
        episodes = [self._start(item) for item in items]
        while not all(ep.done for ep in episodes):
            self._turn(model, episodes, greedy)
        obj = self.obj
        P, R = max(len(ep.prompt_ids) for ep in episodes), max(max(len(ep.response) for ep in episodes), 1)
        pad = obj.tokenizer.pad_token_id

        def tensor(rows):
            return torch.tensor(rows, dtype=torch.long, device=obj.device)

        return {
            "prompt_ids": tensor([[pad] * (P - len(ep.prompt_ids)) + ep.prompt_ids for ep in episodes]),
            "prompt_mask": tensor([[0] * (P - len(ep.prompt_ids)) + [1] * len(ep.prompt_ids) for ep in episodes]),
            "response": tensor([ep.response + [pad] * (R - len(ep.response)) for ep in episodes]),
            "response_mask": tensor([[1] * len(ep.response) + [0] * (R - len(ep.response)) for ep in episodes]),
            "tool_mask": tensor([ep.tool_mask + [0] * (R - len(ep.tool_mask)) for ep in episodes]),
            "eos": torch.tensor([ep.stopped for ep in episodes], device=obj.device),
            "items": items, "texts": [ep.text for ep in episodes], "environments": [ep.env for ep in episodes],
        }
