"""Segments -> token ids and labels (-100 where no loss), SFT example building, and a readable preview."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Callable

from ..config import DataConfig, UserError
from .formats import Message, to_messages
from .readers import Row
from .templates import MARK_END, MARK_START, Segments, render

IGNORE = -100
UNLIMITED = 1 << 62  # a max_length that never cuts

# A special token from the data wrapped by mark_special_tokens; the second branch drops lone markers
_MARKED = re.compile(f"{MARK_START}([^{MARK_START}{MARK_END}]*){MARK_END}|[{MARK_START}{MARK_END}]")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    truncated: bool = False


def tokenize_example(segments: Segments, tokenizer, max_length: int, train_on_prompt: bool) -> Example:
    """Tokenize each segment separately (so a label boundary is always a token boundary), labels on the assistant
    segments (on all of them with train_on_prompt), right-truncated to max_length. Exactly one BOS when the
    tokenizer adds one: prepended unless the template wrote it (llama3, mistral, gemma, Jinja with bos_token).
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in segments:
        piece = encode(text, tokenizer, at_start=not ids)
        ids += piece
        labels += piece if is_assistant or train_on_prompt else [IGNORE] * len(piece)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and adds_bos(tokenizer):
        ids.insert(0, bos)
        labels.insert(0, IGNORE)
    return Example(ids[:max_length], labels[:max_length], truncated=len(ids) > max_length)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoding with BOS (Llama, Mistral, Gemma do; Qwen and GPT-2 do not)."""
    return tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]


def fit_prompt(prompt: list[Message], length: Callable[[list[Message]], int], max_length: int,
               tokenizer) -> list[Message] | None:
    """data.truncation keep_response: the prompt, shortened so that `length(prompt)` (the tokens of prompt plus
    the response) fits max_length, or None when even the shortest prompt leaves no room.

    The response is never touched. The prompt loses, in order: its oldest whole turns (the system message and
    the latest turns stay), then the start of its last message's text, then the start of the system text.
    Cutting whole turns and message text (not tokens of the rendered text) keeps the template's structure.
    """
    if length(prompt) <= max_length:
        return prompt
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = prompt[len(system):]
    starts = [i for i, m in enumerate(turns) if i and m["role"] == "user"]
    for i in starts:  # oldest first: the first that fits keeps the most
        if length(system + turns[i:]) <= max_length:
            return system + turns[i:]
    kept = system + turns[starts[-1]:] if starts else prompt
    for index in (len(kept) - 1, 0):  # the last message's text, then the system text
        kept = _cut_text(kept, index, length, max_length, tokenizer)
        if length(kept) <= max_length:
            return kept
    return None


def _cut_text(messages: list[Message], index: int, length, max_length: int, tokenizer) -> list[Message]:
    """messages with the start of messages[index]'s text cut until they fit (or the text is gone)."""
    ids = tokenizer.encode(messages[index]["content"], add_special_tokens=False)
    while True:
        over = length(messages) - max_length
        if over <= 0 or not ids:
            return messages
        ids = ids[over:]
        messages = [*messages[:index], {**messages[index], "content": tokenizer.decode(ids)}, *messages[index + 1:]]


def split_response(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """(prompt, response): the response is everything after the last user message."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1], messages[last_user + 1:]


def encode(text: str, tokenizer, at_start: bool = True) -> list[int]:
    """Token ids of `text` without special tokens added; special tokens marked by render() become plain text."""
    ids: list[int] = []
    for i, part in enumerate(_MARKED.split(text)):
        if part:  # None for a lone marker
            ids += _encode_piece(part, tokenizer, at_start=at_start and not ids, as_text=i % 2 == 1)
    return ids


def _encode_piece(text: str, tokenizer, at_start: bool, as_text: bool) -> list[int]:
    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False, split_special_tokens=as_text)

    if at_start:
        return enc(text)
    # SentencePiece-style tokenizers add a prefix space to every encode call; encoding after a newline and
    # dropping it gives the tokens this text gets mid-sequence (byte-level BPE is unaffected)
    newline = enc("\n")
    ids = enc("\n" + text)
    return ids[len(newline):] if ids[: len(newline)] == newline else enc(text)


def num_loss_tokens(labels: list[int]) -> int:
    """Label tokens that carry loss after the causal shift (the first position predicts nothing)."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def build_sft_examples(rows: list[Row], fmt_of: Callable[[Row], str] | str | None, tokenizer,
                       data_cfg: DataConfig) -> tuple[list[Example], dict]:
    """Render and tokenize rows for supervised training.

    fmt_of: a format for all rows, a function of the row, or None for each row's own source format (Row.format,
    set by load_rows). Completion rows use template "none"; text rows train on the whole text + EOS. Examples
    left with no loss token (e.g. the reply was truncated away) are dropped and counted.

    stats: rows, examples, truncated (rows cut to data.max_length), dropped_too_long and too_long_lines (rows
    whose response alone exceeds it, data.truncation keep_response), dropped_no_loss, dropped_lines (first 5
    file:line), tokens, loss_tokens, length_min/p50/p95/max.
    """
    examples, dropped, too_long, truncated = [], [], [], 0
    for row in rows:
        fmt = fmt_of(row) if callable(fmt_of) else fmt_of or row.format
        if fmt is None:
            raise UserError(f"{row.where}: no format known for this row")
        template = "none" if fmt == "completion" else data_cfg.template
        try:
            example = tokenize_conversation(to_messages(row, fmt), template, tokenizer, data_cfg)
        except UserError as e:
            raise UserError(f"{row.where}: {e}") from None
        if example is None:
            too_long.append(row.where)
            continue
        truncated += example.truncated
        if num_loss_tokens(example.labels) == 0:
            dropped.append(row.where)
            continue
        examples.append(example)
    stats = {"rows": len(rows), "examples": len(examples), "truncated": truncated,
             "dropped_too_long": len(too_long), "too_long_lines": too_long[:5], "dropped_no_loss": len(dropped),
             "dropped_lines": dropped[:5], **length_stats(examples)}
    return examples, stats


def tokenize_conversation(conversation: list[Message] | str, template: str, tokenizer,
                          data_cfg: DataConfig) -> Example | None:
    """A conversation rendered and tokenized within data.max_length, by data.truncation: `keep_response` cuts
    the prompt (fit_prompt) and returns None when the response alone cannot fit; `right` cuts the tokens'
    end. Text documents (a str) are always cut at the end."""
    tools = getattr(conversation, "tools", None)

    def tokens(messages) -> Example:
        segments = render(messages, template, tokenizer, tools=tools)
        return tokenize_example(segments, tokenizer, UNLIMITED, data_cfg.train_on_prompt)

    max_length = data_cfg.max_length
    if data_cfg.truncation == "right" or isinstance(conversation, str):
        example = tokens(conversation)
        return Example(example.input_ids[:max_length], example.labels[:max_length], len(example.input_ids) > max_length)
    prompt, response = split_response(conversation)
    fitted = fit_prompt(prompt, lambda p: len(tokens(p + response).input_ids), max_length, tokenizer)
    if fitted is None:
        return None
    example = tokens(fitted + response)
    example.truncated = fitted is not prompt
    return example


def length_stats(examples: list) -> dict:
    """Token counts of Examples (or Packed blocks)."""
    lengths = sorted(len(e.input_ids) for e in examples) or [0]
    return {
        "tokens": sum(lengths),
        "loss_tokens": sum(num_loss_tokens(e.labels) for e in examples),
        "length_min": lengths[0],
        "length_p50": statistics.median_low(lengths),
        "length_p95": lengths[math.ceil(0.95 * len(lengths)) - 1],
        "length_max": lengths[-1],
    }


def preview(examples: list, tokenizer, n: int = 3) -> str:
    """The first n examples as text with loss-carrying tokens wrapped in [[ ]], then length statistics."""
    out = []
    for k, example in enumerate(examples[:n], start=1):
        note = ", truncated" if getattr(example, "truncated", False) else ""
        out.append(f"--- example {k}: {len(example.input_ids)} tokens, "
                   f"{num_loss_tokens(example.labels)} with loss{note}")
        out.append(_marked_text(example, tokenizer))
    s = length_stats(examples)
    truncated = sum(getattr(e, "truncated", False) for e in examples)
    share = s["loss_tokens"] / s["tokens"] if s["tokens"] else 0.0
    out.append(f"--- {len(examples)} examples: length min {s['length_min']} / median {s['length_p50']} / "
               f"p95 {s['length_p95']} / max {s['length_max']} tokens; {truncated} truncated; "
               f"{share:.1%} of tokens carry loss")
    return "\n".join(out)


def _marked_text(example, tokenizer) -> str:
    text, run, trained = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        if (label != IGNORE) != trained and run:
            text.append(_span(run, trained, tokenizer))
            run = []
        run.append(token)
        trained = label != IGNORE
    if run:
        text.append(_span(run, trained, tokenizer))
    return "".join(text)


def _span(ids: list[int], trained: bool, tokenizer) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[[{text}]]" if trained else text
