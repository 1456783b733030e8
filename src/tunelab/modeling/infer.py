"""generate and chat: greedy or sampled decoding with the run's chat template, stopping at the end of a turn."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import run_files


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    template: str = "auto"  # how a chat turn is rendered; "none" feeds the prompt as raw text


def run_template(model_dir: Path) -> str:
    """The template the model was trained with, when its run config is beside it."""
    import yaml

    for cfg_path in (model_dir / run_files.CONFIG, model_dir.parent / run_files.CONFIG):
        if cfg_path.is_file():
            data = yaml.safe_load(cfg_path.read_text()) or {}
            if isinstance(data.get("data"), dict) and "template" in data["data"]:
                return data["data"]["template"]
    return "auto"


def prompt_ids(tokenizer, messages: list[dict], template: str, tools: list | None = None) -> list[int]:
    """The prompt exactly as training tokenized it (same template, BOS and special-token handling, tools)."""
    from tunelab.data import render, tokenize_example

    segments = render(messages, template, tokenizer, add_generation_prompt=True, tools=tools)
    return tokenize_example(segments, tokenizer, max_length=10**9, train_on_prompt=True).input_ids


@torch.no_grad()
def generate_ids(model, tokenizer, ids: list[int], s: Sampling) -> list[int]:
    from tunelab.data import stop_token_ids

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    kwargs = dict(max_new_tokens=s.max_new_tokens, eos_token_id=stop_token_ids(s.template, tokenizer),
                  pad_token_id=tokenizer.pad_token_id)
    if s.temperature > 0:
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[0, len(ids):].tolist()


def decode_reply(tokenizer, new_ids: list[int]) -> str:
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def generate(model, tokenizer, prompt: str, s: Sampling, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return decode_reply(tokenizer, generate_ids(model, tokenizer, prompt_ids(tokenizer, messages, s.template), s))


def local_reply(model, tokenizer, s: Sampling, tools: list | None = None) -> Callable[[list[dict]], str]:
    """The reply function `chat` calls: the whole history through the template, decoded. With `tools` (JSON
    schemas), the reply is one JSON object {"content": text, "tool_calls": [{"name", "arguments"}]}, its calls
    parsed by data.tools.parse_tool_calls."""
    def reply(history):
        text = decode_reply(tokenizer, generate_ids(model, tokenizer, prompt_ids(tokenizer, history, s.template, tools), s))
        return tool_reply_json(text) if tools else text

    return reply


def tool_reply_json(reply: str) -> str:
    from tunelab.data.tools import parse_tool_calls

    content, calls = parse_tool_calls(reply)
    return json.dumps({"content": content, "tool_calls": calls}, ensure_ascii=False)


def chat(reply: Callable[[list[dict]], str], system: str | None = None, stdin=None, stdout=None) -> None:
    """A multi-turn session kept here, on the client side: `reply(history)` answers the whole history each turn
    (a local model, or a remote server through tunelab.serve.remote)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    print("chat: type a message; /reset clears the history, /exit or Ctrl-D quits", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}", file=stdout, flush=True)
