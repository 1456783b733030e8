"""OpenAI's training-file features in the data layer: per-assistant-message `weight` (0 = no loss on that reply)."""

from __future__ import annotations

import pytest

from tunelab.config import DataConfig, UserError
from tunelab.data import IGNORE, Row, build_sft_examples

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, how are you today?"},
                {"role": "assistant", "content": "I am fine, thanks!"},
                {"role": "user", "content": "The quick brown fox?"},
                {"role": "assistant", "content": "jumps over the lazy dog."}]


def _example(tokenizer, messages, line=1):
    cfg = DataConfig(train=[{"path": "x.jsonl"}], template="chatml", max_length=512)
    examples, _ = build_sft_examples([Row("x.jsonl", line, {"messages": messages}, "chat")], "chat", tokenizer, cfg)
    return examples[0]


def _runs(labels):
    """The (start, end) spans of consecutive trained positions."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_weight_zero_masks_exactly_that_reply(tiny_tokenizer):
    full = _example(tiny_tokenizer, CONVERSATION)
    weighted = [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0}, CONVERSATION[3], {**CONVERSATION[4], "weight": 1}]
    masked = _example(tiny_tokenizer, weighted)
    assert masked.input_ids == full.input_ids  # the reply is still there as context
    first, second = _runs(full.labels)
    assert tiny_tokenizer.decode(full.input_ids[first[0]:first[1]]) == "I am fine, thanks!<|im_end|>"
    expected = [IGNORE if first[0] <= i < first[1] else label for i, label in enumerate(full.labels)]
    assert masked.labels == expected and _runs(masked.labels) == [second]


def test_weight_must_be_zero_or_one_on_an_assistant_message(tiny_tokenizer):
    with pytest.raises(UserError, match=r"x.jsonl:7: messages\[2\].weight must be 0 or 1, got 0.5"):
        _example(tiny_tokenizer, [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0.5}], line=7)
    with pytest.raises(UserError, match=r"messages\[1\].weight is allowed on assistant messages only"):
        _example(tiny_tokenizer, [CONVERSATION[0], {**CONVERSATION[1], "weight": 0}, CONVERSATION[2]])


def test_developer_messages_are_system_messages(tiny_tokenizer):
    """OpenAI's reinforcement rows open with a "developer" message: its newer name for the system message."""
    developer = [{"role": "developer", "content": "Be brief."}, *CONVERSATION[1:]]
    ours, reference = _example(tiny_tokenizer, developer), _example(tiny_tokenizer, CONVERSATION)
    assert (ours.input_ids, ours.labels) == (reference.input_ids, reference.labels)
