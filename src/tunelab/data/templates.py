"""Chat templates: messages -> text segments, each flagged as assistant (trainable) or not.

The end-of-turn rule: every assistant segment ends with ONE stop token, and generation stops on it.
  - chatml ends a turn with <|im_end|>, which must be a special token of the tokenizer (prepare_tokenizer adds
    it); no EOS follows it, as in the chat models that use ChatML at inference (Qwen), so generation must treat
    <|im_end|> as a stop token: `stop_token_ids` gives the ids to stop on.
  - alpaca and none end a turn with the tokenizer's EOS.
  - Jinja templates end a turn with whatever special token the template writes after the reply (<|eot_id|>,
    </s>, <end_of_turn>, ...); a template that writes none gets EOS appended to each reply.

Special tokens that appear in the data itself (a "</s>" or "<|im_end|>" inside a message or a text document) are
encoded as plain text, never as control tokens: only the template writes control tokens. render() wraps them in
private-use marker characters, which tokenize_example and `encode` understand: tokenize rendered text with those,
not with tokenizer() directly.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..config import UserError
from .formats import Message

BUILTIN = ("auto", "chatml", "alpaca", "none")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")

# Wrap special tokens found in the data (same private-use code points as transformers' sanitize_control_tokens)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

Segments = list[tuple[str, bool]]


def render(messages: list[Message] | str, template: str, tokenizer, *, add_generation_prompt: bool = False) -> Segments:
    """Render a conversation as (text, is_assistant) segments; a plain string (format text) is one trainable
    segment ending with EOS.

    template: "auto" (the tokenizer's chat template, else chatml), "chatml", "alpaca", "none" (plain
    concatenation, for completion data) or a Jinja chat template string.
    """
    eos = _eos(tokenizer)
    if isinstance(messages, str):
        return [(mark_special_tokens(messages, tokenizer) + eos, True)]
    messages = [{"role": m["role"], "content": mark_special_tokens(m["content"], tokenizer)} for m in messages]
    template = resolve_template(template, tokenizer)
    if template == "chatml":
        segments = _chatml(messages, tokenizer, add_generation_prompt)
    elif template == "alpaca":
        segments = _alpaca(messages, eos, add_generation_prompt)
    elif template == "none":
        segments = [(m["content"] + eos, True) if m["role"] == "assistant" else (m["content"], False) for m in messages]
    else:
        segments = _jinja(messages, template, tokenizer, add_generation_prompt)
    return _merge(segments)


def resolve_template(template: str, tokenizer) -> str:
    """Map "auto" to the tokenizer's chat template (Jinja) if it has one, else to "chatml"; check names."""
    if template == "auto":
        return tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else "chatml"
    if template in BUILTIN or "{%" in template or "{{" in template:
        return template
    raise UserError(f"unknown data.template {template!r}: use one of {', '.join(BUILTIN)} or a Jinja chat template")


def prepare_tokenizer(template: str, tokenizer) -> int:
    """Add what the template needs to the tokenizer (chatml: <|im_start|>, <|im_end|> as special tokens).
    Returns the number of tokens added: if > 0 the caller must resize the model's embeddings."""
    if resolve_template(template, tokenizer) != "chatml":
        return 0
    return tokenizer.add_tokens(list(CHATML_TOKENS), special_tokens=True)


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


def _chatml(messages: list[Message], tokenizer, add_generation_prompt: bool) -> Segments:
    missing = [t for t in CHATML_TOKENS if t not in special_tokens(tokenizer)]
    if missing:
        raise UserError(f"template chatml needs {' and '.join(missing)} as special tokens in the tokenizer, so that a "
                        "turn ends with one token generation can stop on; they are added by prepare_tokenizer, or "
                        "use a model with a chat template (template: auto) or template: alpaca")
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n", False))
    return segments


def _alpaca(messages: list[Message], eos: str, add_generation_prompt: bool) -> Segments:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    segments = [((system or ALPACA_PREAMBLE) + "\n\n", False)]
    for m in messages:
        if m["role"] == "user":
            segments.append((f"### Instruction:\n{m['content']}\n\n", False))
        elif m["role"] == "assistant":
            segments += [("### Response:\n", False), (m["content"] + eos, True), ("\n\n", False)]
    if add_generation_prompt:
        segments.append(("### Response:\n", False))
    return segments


def _jinja(messages: list[Message], template: str, tokenizer, add_generation_prompt: bool) -> Segments:
    """Find each reply by rendering prefixes: render(messages[:i], generation prompt) must be a prefix of
    render(messages[:i+1]), and the difference is reply i. Templates that rewrite earlier turns break this."""

    import jinja2

    def text(msgs, generation_prompt=False):
        if not msgs:
            return ""
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
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
