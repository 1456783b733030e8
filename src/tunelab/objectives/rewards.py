"""Reward sources for ppo and grpo: a Python function, a reward model, or a judge model.

Each source is a callable `(items, responses) -> tensor [N]` of float32 scores, one per response, where
`items` are the PromptItems the responses answer and `responses` the decoded response texts (special
tokens dropped, so the end-of-turn token is not part of the text).

- `reward_function: module:function`: programmatic feedback. The module named by the user is imported
  (nothing is ever eval'ed) and the function is called once per response as
  `f(prompt=..., response=..., answer=...) -> float`; `prompt` is the user's text when the prompt is one
  user message, else the list of messages; `answer` is the row's `answer` field (None when absent). A function
  that takes `row` / `tools` (or **kwargs) also gets the data row and the environment's tool schemas, and a
  grpo.rewards entry's `args` are its keyword options (tunelab.verifiers has ready-made ones).
- `reward_model: DIR`: an `AutoModelForSequenceClassification` with one output (a run dir, a normal HF dir,
  or a LoRA adapter dir whose adapter carries the score head, as `method: reward` writes). Prompt and
  response are rendered as one conversation exactly as reward training rendered its pairs (the reward
  run's template), and the head's value at the reply's end-of-turn token is the score.
- `judge: {path, template, yes, no}`: AI feedback (RLAIF). `template` is the question to the judge, with
  `{prompt}`, `{response}` and `{answer}` replaced by the texts; it is sent as one user message through the
  judge's chat template (raw text if it has none), and the score is P(yes) / (P(yes) + P(no)) from the
  judge's next-token distribution: a number in [0, 1], smooth in the judge's confidence, with no sampling
  and no parsing failures. `yes`/`no` default to "Yes"/"No"; the first tokens of the word with and
  without a leading space are counted (a first token both words share, e.g. a lone space, is not).
- `grader: {...}` / `grpo.graders`: an OpenAI grader (tunelab.graders). score_model / label_model graders ask
  the judge model at `grpo.judge_endpoint` (any OpenAI-compatible server) over HTTP.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tunelab.config import UserError


@dataclass
class PromptItem:
    """One `format: prompt` row, tokenized with the generation prompt."""

    input_ids: list[int]
    messages: list[dict]
    answer: Any | None
    where: str = ""
    row: dict = field(default_factory=dict)  # the data row as read: graders' {{item.*}} templates look into it

    @property
    def prompt(self):
        """What reward functions receive as `prompt`: the text of a lone user message, else the messages."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            return self.messages[0]["content"]
        return self.messages

    @property
    def prompt_text(self) -> str:
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


# ---------------------------------------------------------------- reward function

def load_function(spec: str, key: str) -> Callable:
    """Import `module:function` (dotted attribute paths allowed); every failure is a UserError naming `key`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise UserError(f"{key}: {spec!r} is not of the form module:function "
                        "(e.g. tunelab.tasks:correctness_reward)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # a rewards.py next to the config is importable, as users expect
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserError(f"{key}: no module named {e.name!r} (from {spec!r}); it must be importable: "
                            "installed, on PYTHONPATH, or a .py file in the current directory") from None
        raise UserError(f"{key}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UserError(f"{key}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(fn) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean {module_name}:{close[0]}?" if close else ""
            raise UserError(f"{key}: module {module_name!r} has no attribute {attr!r}{hint}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"{key}: {spec!r} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(prompt="", response="", answer=None)
    except TypeError:
        raise UserError(f"{key}: {spec!r} must accept the keyword arguments prompt, response and answer "
                        "(add **kwargs to ignore the ones it does not need)") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): find out at the first call
    return fn


CALL_ARGUMENTS = ("prompt", "response", "answer", "row", "tools")


def function_options(fn: Callable, spec: str, args: dict, key: str) -> dict:
    """`args` checked against the function's keyword parameters: a name it does not take is refused with the
    closest one it does, and a value is validated against the parameter's annotation (pydantic), so a typo or a
    bad value stops the run before any model loads."""
    from pydantic import TypeAdapter, ValidationError

    if not args:
        return {}
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except (NameError, TypeError, ValueError):  # an annotation that does not evaluate: names are still checked
        params = inspect.signature(fn).parameters
    options = {name: p for name, p in params.items() if name not in CALL_ARGUMENTS and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    out = {}
    for name, value in args.items():
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            takes = f"its options: {', '.join(options)}" if options else "it takes no options"
            raise UserError(f"{key}.args: {spec} has no option {name!r}{hint} ({takes})")
        annotation = options[name].annotation
        if isinstance(annotation, str) or annotation is inspect.Parameter.empty:
            out[name] = value
            continue
        try:
            out[name] = TypeAdapter(annotation).validate_python(value)
        except ValidationError as e:
            raise UserError(f"{key}.args.{name}: {e.errors()[0]['msg']} (got {value!r})") from None
    return out


def accepted(fn: Callable, names: tuple[str, ...]) -> set[str]:
    """Which of `names` the function takes, by name or through **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except ValueError:
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


class FunctionReward:
    """A Python function per response: prompt, response and answer always; `row` (the data row) and `tools` (the
    environment's tool schemas, None without one) when it takes them; the entry's `args` as keyword arguments."""

    def __init__(self, spec: str, key: str, args: dict | None = None, tools: list | None = None):
        self.spec, self.key, self.tools = spec, key, tools
        self.fn = load_function(spec, key)
        self.options = function_options(self.fn, spec, args or {}, key)
        self.extra = accepted(self.fn, ("row", "tools"))

    def __call__(self, items: list[PromptItem], responses: list[str]) -> torch.Tensor:
        scores = []
        for item, response in zip(items, responses):
            extra = {"row": item.row, "tools": self.tools}
            try:
                value = self.fn(prompt=item.prompt, response=response, answer=item.answer,
                                **{k: v for k, v in extra.items() if k in self.extra}, **self.options)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{self.key}: {self.spec} raised {type(e).__name__}: {e} "
                                f"(prompt from {item.where or 'the data'}, response {response[:80]!r})") from e
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{self.key}: {self.spec} must return a number, got {type(value).__name__} "
                                f"{value!r}") from None
            if not math.isfinite(value):
                raise UserError(f"{self.key}: {self.spec} returned {value} for response {response[:80]!r}")
            scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)


# ---------------------------------------------------------------- reward model

def _conversation_ids(messages: list[dict], template: str, tokenizer, generation_prompt: bool) -> list[int]:
    from tunelab.data import render, tokenize_example

    segments = render(messages, template, tokenizer, add_generation_prompt=generation_prompt)
    return tokenize_example(segments, tokenizer, max_length=10**9, train_on_prompt=True).input_ids


def _right_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, mask


class ModelReward:
    """The scalar head of a reward model (method: reward's output), read as reward training reads it:
    tunelab.objectives.reward.load_reward_model / score render prompt + response with the template the
    reward model was trained with (its run's config.yaml) and read the head at the reply's last token."""

    def __init__(self, path: str, key: str, device: torch.device, batch_size: int = 16):
        from tunelab.objectives.reward import load_reward_model

        self.key, self.batch_size = key, batch_size
        try:
            self.model, self.tokenizer, self.data_cfg = load_reward_model(path, device=device)
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
        self.model.requires_grad_(False)
        labels = self.model.config.num_labels
        if labels != 1:
            raise UserError(f"{key}: {path} has {labels} output labels; a reward model has one scalar head "
                            "(num_labels: 1), as method: reward trains")

    @torch.no_grad()
    def __call__(self, items: list[PromptItem], responses: list[str]) -> torch.Tensor:
        from tunelab.objectives.reward import score

        # an empty reply still renders its end-of-turn token, where the head is read
        return score(self.model, self.tokenizer, self.data_cfg, [item.messages for item in items],
                     [r or " " for r in responses], self.batch_size).float().cpu()


# ---------------------------------------------------------------- judge

JUDGE_KEYS = ("path", "template", "yes", "no")


def _first_token_ids(word: str, tokenizer) -> set[int]:
    ids = set()
    for variant in (word, " " + word):
        enc = tokenizer.encode(variant, add_special_tokens=False)
        if enc:
            ids.add(enc[0])
    return ids


class JudgeReward:
    """P(yes) / (P(yes) + P(no)) of a causal LM asked `template` about each response."""

    def __init__(self, spec: dict, key: str, device: torch.device, batch_size: int = 16):
        from tunelab.modeling.load import load_pretrained

        unknown = sorted(set(spec) - set(JUDGE_KEYS))
        if unknown:
            raise UserError(f"{key}: unknown key {unknown[0]!r}; a judge takes {', '.join(JUDGE_KEYS)}")
        for name in ("path", "template"):
            if not isinstance(spec.get(name), str) or not spec[name].strip():
                raise UserError(f"{key}.{name}: required, a string "
                                f"(judge: {{path: DIR, template: '... {{response}} ...'}})")
        if "{response}" not in spec["template"]:
            raise UserError(f"{key}.template: must contain {{response}} (and may use {{prompt}} and {{answer}})")
        self.key, self.template, self.batch_size, self.device = key, spec["template"], batch_size, device
        try:
            self.model, self.tokenizer = load_pretrained(spec["path"], device=device, kind="causal_lm")
        except UserError as e:
            raise UserError(f"{key}.path: {e}") from None
        self.model.requires_grad_(False)
        yes, no = (_first_token_ids(str(spec.get(w, d)), self.tokenizer) for w, d in (("yes", "Yes"), ("no", "No")))
        self.yes, self.no = sorted(yes - no), sorted(no - yes)  # a shared first token (a lone space) tells nothing
        if not self.yes or not self.no:
            raise UserError(f"{key}: the yes and no words must start with different tokens in the judge's tokenizer "
                            f"(yes -> {self.yes}, no -> {self.no}); set {key}.yes / {key}.no")
        self.chat = "auto" if getattr(self.tokenizer, "chat_template", None) else "none"

    def question(self, item: PromptItem, response: str) -> str:
        answer = "" if item.answer is None else str(item.answer)
        return (self.template.replace("{prompt}", item.prompt_text).replace("{answer}", answer)
                .replace("{response}", response))

    def input_ids(self, item: PromptItem, response: str) -> list[int]:
        return _conversation_ids([{"role": "user", "content": self.question(item, response)}], self.chat,
                                 self.tokenizer, True)

    @torch.no_grad()
    def __call__(self, items: list[PromptItem], responses: list[str]) -> torch.Tensor:
        rows = [self.input_ids(item, r) for item, r in zip(items, responses)]
        out = []
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s:s + self.batch_size]
            ids, mask = _right_pad(chunk, self.tokenizer.pad_token_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            last = torch.tensor([len(r) - 1 for r in chunk], device=self.device)
            p = torch.softmax(logits[torch.arange(len(chunk), device=self.device), last].float(), -1)
            yes, no = p[:, self.yes].sum(-1), p[:, self.no].sum(-1)
            out.append((yes / (yes + no).clamp(min=1e-12)).cpu())
        return torch.cat(out)


# ---------------------------------------------------------------- grader

def grader_sample(response: str) -> dict:
    """OpenAI's grader sample for a response: its text, the JSON it parses as (None if it does not), its tool calls."""
    from tunelab.data.tools import parse_tool_calls

    try:
        output_json = json.loads(response)
    except ValueError:
        output_json = None
    return {"output_text": response, "output_json": output_json, "output_tools": parse_tool_calls(response)[1]}


class GraderReward:
    """An OpenAI grader as a reward. Python graders run here unchecked: the training process is the operator's,
    and the service refuses them in jobs unless started with --allow-code (serve/jobspec.code_keys). Model graders
    ask the judge at grpo.judge_endpoint, all of a rollout's samples at once (a serving engine batches them)."""

    def __init__(self, grader: dict, key: str, endpoint=None):
        from tunelab.graders import GraderError, build, judge_models

        self.key = key
        needs_judge = bool(judge_models(grader))
        self.workers = JUDGE_REQUESTS if needs_judge else 1
        try:
            self.grader = build(grader, allow_code=True, judge=make_judge(endpoint, key) if needs_judge else None)
        except GraderError as e:
            raise UserError(f"{key}: {e}") from None

    def __call__(self, items: list[PromptItem], responses: list[str]) -> torch.Tensor:
        def score(pair) -> float:
            item, response = pair
            return float(self.grader(grader_sample(response), item.row))

        if self.workers == 1:
            scores = [score(pair) for pair in zip(items, responses)]
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                scores = list(pool.map(score, zip(items, responses)))
        return torch.tensor(scores, dtype=torch.float32)


JUDGE_REQUESTS = 16  # a judge's requests in flight at once


def make_judge(endpoint, key: str):
    """The HTTP judge of grpo.judge_endpoint; UserError when there is none or its API key variable is unset."""
    from tunelab.graders import HttpJudge

    if endpoint is None:
        raise UserError(f"{key}: a score_model / label_model grader asks a judge model; set grpo.judge_endpoint."
                        "base_url to an OpenAI-compatible server that serves it (e.g. http://HOST:8321/v1)")
    api_key = None
    if endpoint.api_key_env is not None:
        api_key = os.environ.get(endpoint.api_key_env)
        if api_key is None:
            raise UserError(f"grpo.judge_endpoint.api_key_env: the environment variable {endpoint.api_key_env} "
                            "is not set (it holds the judge's API key)")
    return HttpJudge(endpoint.base_url, api_key, endpoint.timeout_s)


# ---------------------------------------------------------------- choosing and combining sources

def make_reward(section, key: str, device: torch.device):
    """The configured source of `section` (a PPOConfig / GRPOConfig); `key` is its config path (ppo, grpo)."""
    if section.reward_function is not None:
        return FunctionReward(section.reward_function, f"{key}.reward_function")
    if section.reward_model is not None:
        return ModelReward(section.reward_model, f"{key}.reward_model", device)
    return JudgeReward(dict(section.judge), f"{key}.judge", device)


def _source(spec, key: str, device: torch.device, grader_key: str | None = None, tools: list | None = None,
            endpoint=None):
    if spec.function is not None:
        return FunctionReward(spec.function, f"{key}.function", spec.args, tools)
    if spec.model is not None:
        return ModelReward(spec.model, f"{key}.model", device)
    if spec.judge is not None:
        return JudgeReward(dict(spec.judge), f"{key}.judge", device)
    return GraderReward(dict(spec.grader), grader_key or f"{key}.grader", endpoint)


def _default_name(spec, i: int) -> str:
    if spec.name:
        return spec.name
    if spec.function is not None:
        return spec.function.rpartition(":")[2]
    if spec.grader is not None and isinstance(spec.grader.get("name"), str) and spec.grader["name"]:
        return spec.grader["name"]
    return f"{'model' if spec.model is not None else 'judge' if spec.judge is not None else 'grader'}{i}"


class WeightedRewards:
    """Several reward sources with weights: `(items, responses) -> ({name: scores [N]}, weighted sum [N])`."""

    def __init__(self, named: list[tuple[str, float, Callable]]):
        self.named = named

    def __call__(self, items: list[PromptItem], responses: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts = {name: fn(items, responses).float() for name, _, fn in self.named}
        total = sum(weight * parts[name] for name, weight, _ in self.named)
        return parts, total


def make_rewards(section, key: str, device: torch.device, tools: list | None = None) -> WeightedRewards:
    """GRPO's reward sources: the single-source keys (weight 1), grpo.rewards and grpo.graders (weight 1 each).
    `tools`: the environment's tool schemas, which function rewards that take `tools` receive."""
    from tunelab.config import RewardSpec

    named: list[tuple[str, float, Callable]] = []
    if any(getattr(section, k) is not None for k in ("reward_function", "reward_model", "judge")):
        source = make_reward(section, key, device)
        spec = section.reward_function or ("reward_model" if section.reward_model is not None else "judge")
        named.append((spec.rpartition(":")[2], 1.0, source))
    for i, spec in enumerate(section.rewards):
        named.append((_default_name(spec, i), spec.weight,
                      _source(spec, f"{key}.rewards[{i}]", device, tools=tools, endpoint=section.judge_endpoint)))
    for i, grader in enumerate(section.graders):
        spec = RewardSpec(grader=grader)
        named.append((_default_name(spec, i), 1.0,
                      _source(spec, "", device, f"{key}.graders[{i}]", endpoint=section.judge_endpoint)))
    seen: dict[str, int] = {}
    for j, (name, weight, fn) in enumerate(named):  # two sources of one name are logged apart
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            named[j] = (f"{name}_{seen[name]}", weight, fn)
    return WeightedRewards(named)
