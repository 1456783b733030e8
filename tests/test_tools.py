"""Tool calling in the data: OpenAI-style messages, sharegpt function_call/observation turns and Gemini function
parts become one conversation; the built-in tool format renders it exactly as Qwen 2.5's own chat template does (the
oracle: the template as TRL ships it); loss falls on the assistant's calls and replies, never on tool outputs; and
calls are parsed back out of generated text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl

from tunelab.config import DataConfig, DataSource, UserError
from tunelab.data import Row, build_sft_examples, render, to_messages, tokenize_example
from tunelab.data.tools import parse_tool_calls

from test_data import trained_spans

QWEN25 = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
OPENAI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"sky\": \"sunny\"}"},
    {"role": "assistant", "content": "Sunny."}], "tools": [WEATHER]}
# LLaMA-Factory's glaive_toolcall demo shape: tools as a JSON string of bare schemas
SHAREGPT = {"system": "Be brief.", "tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "{\"sky\": \"sunny\"}"},
    {"from": "gpt", "value": "Sunny."}]}
GEMINI = {"systemInstruction": {"parts": [{"text": "Be brief."}]},
          "tools": [{"functionDeclarations": [WEATHER["function"]]}], "contents": [
    {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
    {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
    {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}}}]},
    {"role": "model", "parts": [{"text": "Sunny."}]}]}


def conversation(data: dict, fmt: str):
    return to_messages(Row("t.jsonl", 3, data), fmt)


def test_every_shape_gives_the_same_conversation():
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "{\"sky\": \"sunny\"}"},
            {"role": "assistant", "content": "Sunny."}]
    for data, fmt in ((OPENAI, "chat"), (SHAREGPT, "sharegpt"), (GEMINI, "gemini")):
        conv = conversation(data, fmt)
        strip = [{k: v for k, v in m.items() if k not in ("tool_call_id", "name")} for m in conv]
        for m in strip:
            for c in m.get("tool_calls", []):
                c.pop("id", None)
        assert strip == want, fmt
        assert conv.tools == [WEATHER], fmt


def test_builtin_tool_format_renders_as_qwen25_and_masks_tool_outputs(tiny_tokenizer):
    conv = conversation(OPENAI, "chat")
    segments = render(conv, "chatml", tiny_tokenizer, tools=conv.tools)
    plain = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in conv]
    qwen = tiny_tokenizer.apply_chat_template(plain, chat_template=QWEN25, tools=conv.tools, tokenize=False)
    assert "".join(text for text, _ in segments) == qwen
    example = tokenize_example(segments, tiny_tokenizer, 4096, train_on_prompt=False)
    spans = trained_spans(example, tiny_tokenizer)
    assert spans == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                     "Sunny.<|im_end|>"]
    # the template's own tool support (the Jinja path, tools= as transformers passes them): the same masks
    native = tokenize_example(render(conv, QWEN25, tiny_tokenizer, tools=conv.tools), tiny_tokenizer, 4096, False)
    assert trained_spans(native, tiny_tokenizer) == spans
    assert "sunny" not in "".join(spans)


@pytest.mark.parametrize("data,fmt,message", [
    ({**SHAREGPT, "conversations": SHAREGPT["conversations"][:1] + [{"from": "function_call", "value": "{oops"}]},
     "sharegpt", "t.jsonl:3: conversations[1] (function_call) value is not JSON"),
    ({**SHAREGPT, "tools": "[{"}, "sharegpt", "t.jsonl:3: 'tools' is a string but not JSON"),
    ({**OPENAI, "tools": [{"description": "no name"}]}, "chat", "t.jsonl:3: tools[0] must be a function schema"),
    ({"messages": [OPENAI["messages"][1], {"role": "assistant", "tool_calls": [{"function": {"name": "f",
      "arguments": "[1"}}]}]}, "chat", "t.jsonl:3: messages[1].tool_calls[0] arguments are not JSON"),
    ({"messages": [OPENAI["messages"][1], {"role": "assistant", "tool_calls": []}]}, "chat",
     "t.jsonl:3: messages[1].tool_calls must be a non-empty list"),
])
def test_bad_tool_rows_name_file_and_line(data, fmt, message):
    with pytest.raises(UserError) as e:
        conversation(data, fmt)
    assert str(e.value).startswith(message)


def test_parse_tool_calls_reads_the_common_formats():
    args = {"city": "Paris"}
    assert parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                            '</tool_call>') == ("Let me check.", [{"name": "get_weather", "arguments": args}])
    assert parse_tool_calls('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]') == \
        ("", [{"name": "get_weather", "arguments": args}])
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}') == \
        ("", [{"name": "get_weather", "arguments": args}])
    assert parse_tool_calls("It is sunny.") == ("It is sunny.", [])
    assert parse_tool_calls("<tool_call>\n{not json}\n</tool_call>")[1] == []


def test_keep_response_cuts_before_the_tool_turns(tiny_tokenizer):
    """Over max_length the prompt loses its oldest turns; the response (tool call, tool output, reply) stays."""
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6},
                {"role": "assistant", "content": "Noted."}] + OPENAI["messages"][1:]
    row = Row("t.jsonl", 1, {"messages": messages, "tools": [WEATHER]}, "chat")
    full, _ = build_sft_examples([row], None, tiny_tokenizer,
                                 DataConfig(train=[DataSource(path="x")], template="chatml", max_length=4096))
    cut, stats = build_sft_examples([row], None, tiny_tokenizer, DataConfig(
        train=[DataSource(path="x")], template="chatml", max_length=len(full[0].input_ids) - 10))
    assert stats["truncated"] == 1
    assert trained_spans(cut[0], tiny_tokenizer)[-2:] == trained_spans(full[0], tiny_tokenizer)[-2:]
    assert "fox" not in tiny_tokenizer.decode(cut[0].input_ids) and "# Tools" in tiny_tokenizer.decode(cut[0].input_ids)
