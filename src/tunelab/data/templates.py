"""Chat templates: messages -> text segments, each flagged as assistant (trainable) or not.

The end-of-turn rule: every assistant segment ends with ONE stop token, which carries loss, and generation stops on
it (`stop_token_ids`).
  - the built-in templates (builtin_templates.py) end a turn with their family's end-of-turn token: <|im_end|>
    (chatml, no EOS after it, as Qwen), <|eot_id|> (llama3), </s> (mistral), <end_of_turn> (gemma), <|end|> (phi3);
    alpaca and none end a turn with the tokenizer's EOS.
  - Jinja templates end a turn with whatever special token the template writes after the reply (<|eot_id|>,
    </s>, <end_of_turn>, ...); a template that writes none gets EOS appended to each reply.

Which template a run uses: `choose_template` (data.template, or for "auto" the tokenizer's own, else one that
fits the rows), and `prepare_tokenizer` installs it as the tokenizer's chat template, so that "auto" renders the
same everywhere afterwards, the saved tokenizer included.

Special tokens that appear in the data itself (a "</s>" or "<|im_end|>" inside a message or a text document) are
encoded as plain text, never as control tokens: only the template writes control tokens. render() wraps them in
private-use marker characters, which tokenize_example and `encode` understand: tokenize rendered text with those,
not with tokenizer() directly.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from ..config import UserError
from .builtin_templates import CONTROL_TOKENS, JINJA, RENDER
from .formats import Message
from .tools import as_text, has_tools, template_handles_tools

BUILTIN = ("auto", "none", *RENDER)
CHATML_TOKENS = CONTROL_TOKENS["chatml"]
PLAIN_FORMATS = ("completion", "text")  # rendered without a chat template whatever data.template says

# Wrap special tokens found in the data (same private-use code points as transformers' sanitize_control_tokens)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

Segments = list[tuple[str, bool]]


def render(messages: list[Message] | str, template: str, tokenizer, *, add_generation_prompt: bool = False,
           tools: list | None = None) -> Segments:
    """Render a conversation as (text, is_assistant) segments; a plain string (format text) is one trainable
    segment ending with EOS. Tool calls, tool results and `tools` (JSON schemas): see tools.py.

    template: "auto" (see resolve_template), a built-in name (BUILTIN), "none" (plain concatenation, for
    completion data) or a Jinja chat template string.
    """
    eos = _eos(tokenizer)
    if isinstance(messages, str):
        return [(mark_special_tokens(messages, tokenizer) + eos, True)]
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if has_tools(messages, tools) and not template_handles_tools(resolve_template(template, tokenizer)):
        messages, tools = as_text(messages, tools), None
    messages = [{**m, "content": mark_special_tokens(m["content"], tokenizer)} for m in messages]
    template = resolve_template(template, tokenizer)
    if template in RENDER:
        _check_control_tokens(template, tokenizer)
        segments = RENDER[template](messages, tokenizer.bos_token or "", eos, add_generation_prompt)
    elif template == "none":
        segments = [(m["content"] + eos, True) if m["role"] == "assistant" else (m["content"], False) for m in messages]
    else:
        segments = _jinja(messages, template, tokenizer, add_generation_prompt, tools)
    return _merge(_apply_weights(segments, weights))


def _apply_weights(segments: Segments, weights: list[int]) -> Segments:
    """Every renderer emits one assistant segment per assistant message, in order: a message with weight 0 keeps
    its text but loses its loss."""
    if all(weights):
        return segments
    replies = [i for i, (_, is_assistant) in enumerate(segments) if is_assistant]
    if len(replies) != len(weights):
        raise UserError("this chat template does not render one reply per assistant message, so per-message "
                        "'weight' cannot be applied; remove the weights or use data.template: chatml")
    out = list(segments)
    for i, weight in zip(replies, weights):
        if not weight:
            out[i] = (out[i][0], False)
    return out


def resolve_template(template: str, tokenizer) -> str:
    """A built-in name or a Jinja string for `template`; check names.

    "auto" means the tokenizer's chat template (by its built-in name when it is one of JINJA: prepare_tokenizer
    installs those), else chatml when the tokenizer has its tokens, else "none": raw text, as a base model reads."""
    if template == "auto":
        own = tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else None
        if own:
            return next((name for name, jinja in JINJA.items() if jinja == own), own)
        return "chatml" if set(CHATML_TOKENS) <= set(special_tokens(tokenizer)) else "none"
    if template in BUILTIN or "{%" in template or "{{" in template:
        return template
    raise UserError(f"unknown data.template {template!r}: use one of {', '.join(BUILTIN)} or a Jinja chat template")


def choose_template(template: str, tokenizer, formats: Iterable[str]) -> tuple[str, str]:
    """The template a run whose rows have `formats` renders with, and why (one line for the console).

    Completion/text rows only: none (they never need a template). Otherwise data.template, and for "auto" the
    tokenizer's own chat template if it has one, else alpaca for alpaca rows and chatml for conversations (chat,
    sharegpt, gemini, preference, prompt)."""
    chat_formats = sorted(set(formats) - set(PLAIN_FORMATS))
    if not chat_formats:
        return "none", "completion/text rows are plain text"
    if template != "auto":
        return resolve_template(template, tokenizer), "set by data.template"
    if getattr(tokenizer, "chat_template", None):
        return resolve_template("auto", tokenizer), "the tokenizer's own chat template"
    if chat_formats == ["alpaca"]:
        return "alpaca", "the tokenizer has no chat template and the rows are alpaca"
    return "chatml", f"the tokenizer has no chat template and {'/'.join(chat_formats)} rows are conversations"


def prepare_tokenizer(template: str, tokenizer, formats: Iterable[str] = ("chat",)) -> tuple[list[int], str]:
    """Ready the tokenizer for the run's template: pick it (choose_template), add the tokens it needs as special
    tokens (chatml: <|im_start|>, <|im_end|>) and install it as the tokenizer's chat template, so everything that
    renders "auto" with this tokenizer, now or after it is saved, renders what training rendered.

    Returns (ids of the tokens added: the model needs embedding rows for them, one line saying what was picked).
    """
    chosen, why = choose_template(template, tokenizer, formats)
    if chosen in RENDER and chosen != "chatml":
        _check_control_tokens(chosen, tokenizer)
    new_tokens = [t for t in CHATML_TOKENS if t not in special_tokens(tokenizer)] if chosen == "chatml" else []
    if new_tokens:
        tokenizer.add_tokens(new_tokens, special_tokens=True)
    if chosen in JINJA:
        tokenizer.chat_template = JINJA[chosen]
    elif chosen != "none":
        tokenizer.chat_template = chosen  # a Jinja string
    name = chosen if chosen in BUILTIN else "Jinja chat template"
    note = f"template: {name} ({why})"
    if new_tokens:
        note += f"; added {' '.join(new_tokens)} as new tokens"
    return tokenizer.convert_tokens_to_ids(new_tokens), note


def stop_token_ids(template: str, tokenizer) -> list[int]:
    """The token ids generation must stop on: EOS and the template's end-of-turn token."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reply = [text for text, is_assistant in render(probe, template, tokenizer) if is_assistant][-1]
    last = tokenizer.encode(reply, add_special_tokens=False)[-1]
    return sorted({tokenizer.eos_token_id, last})


def mark_special_tokens(text: str, tokenizer) -> str:
    """Wrap the tokenizer's special tokens in `text` in markers, so they are encoded as plain text."""
    text = text.replace(MARK_START, "").replace(MARK_END, "")  # markers in the data could forge a wrapped token
    pattern = _special_pattern(special_tokens(tokenizer))
    return pattern.sub(f"{MARK_START}\\g<0>{MARK_END}", text) if pattern else text


def special_tokens(tokenizer) -> tuple[str, ...]:
    # Only special added tokens: non-special added tokens (e.g. Qwen's <tool_call>) are meant to be written in data
    return tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)


@lru_cache(maxsize=8)
def _special_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    longest_first = sorted(tokens, key=len, reverse=True)  # so a token wins over the tokens it contains
    return re.compile("|".join(map(re.escape, longest_first))) if tokens else None


def _eos(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no eos_token: it is needed to end assistant turns and documents")
    return tokenizer.eos_token


def _merge(segments: Segments) -> Segments:
    merged: Segments = []
    for text, is_assistant in segments:
        if not text:
            continue
        if merged and merged[-1][1] == is_assistant:
            merged[-1] = (merged[-1][0] + text, is_assistant)
        else:
            merged.append((text, is_assistant))
    return merged


def _check_control_tokens(template: str, tokenizer) -> None:
    vocabulary = set(tokenizer.added_tokens_encoder)
    missing = [t for t in CONTROL_TOKENS[template] if t not in vocabulary]
    if not missing:
        return
    if template == "chatml":
        raise UserError(f"template chatml needs {' and '.join(missing)} as special tokens in the tokenizer, so that a "
                        "turn ends with one token generation can stop on; they are added by prepare_tokenizer, or "
                        "use a model with a chat template (template: auto) or template: alpaca")
    raise UserError(f"data.template: {template} writes {', '.join(missing)}, which this tokenizer does not have as "
                    f"tokens: it is for {template} models (template: auto uses the tokenizer's own chat template, "
                    "or chatml)")


def _jinja(messages: list[Message], template: str, tokenizer, add_generation_prompt: bool,
           tools: list | None = None) -> Segments:
    """Find each reply by rendering prefixes: render(messages[:i], generation prompt) must be a prefix of
    render(messages[:i+1]), and the difference is reply i. Templates that rewrite earlier turns break this."""

    import jinja2

    def text(msgs, generation_prompt=False):
        if not msgs:
            return ""
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, tools=tools,
                                                 add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template failed on this conversation: {e}") from None

    segments, done = [], ""  # done: the rendered text consumed so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = text(messages[:i], generation_prompt=True), text(messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise _unmaskable(i)
        reply, used = _reply(full[len(prompt):], tokenizer)
        segments += [(prompt[len(done):], False), (reply, True)]
        done = prompt + full[len(prompt):][:used]
    end = text(messages, generation_prompt=add_generation_prompt)
    if not end.startswith(done):
        raise _unmaskable(len(messages))
    segments.append((end[len(done):], False))
    return segments


def _reply(span: str, tokenizer) -> tuple[str, int]:
    """Cut a rendered reply after its end-of-turn special token (what follows goes to the next prompt);
    with no such token, append EOS so the model still learns to stop. Returns (reply, chars of span used)."""
    reply = span.rstrip()
    if not any(reply.endswith(t) for t in special_tokens(tokenizer)):  # a marked token from the data ends in MARK_END
        return reply + tokenizer.eos_token, len(reply)
    return reply, len(reply)


def _unmaskable(i: int) -> UserError:
    return UserError(
        f"this chat template cannot be masked: rendering the first {i} messages is not a prefix of rendering more "
        "(the template rewrites earlier turns), so the assistant replies cannot be located. Set data.train_on_prompt: "
        "true to train on the whole text, or use data.template: chatml")
