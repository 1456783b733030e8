"""The data package: readers and their errors, formats, templates and loss masks, packing, collation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tunelab.config import DataConfig, DataSource, UserError
from tunelab.data import (IGNORE, Example, Row, build_sft_examples, collate, load_rows, pack_examples, pack_stream,
                          prepare_tokenizer, preview, read_rows, render, stop_token_ids, to_messages, to_preference,
                          to_prompt, tokenize_example)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thanks!"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]
REPLIES = ["I am fine, thanks!", "Two plus two is four."]

# A Zephyr-style HF chat template: turns end with eos_token, then a newline
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def row(data: dict, line: int = 1) -> Row:
    return Row("data.jsonl", line, data)


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained_spans(example: Example, tokenizer) -> list[str]:
    """The decoded runs of tokens that carry a label."""
    spans, run = [], []
    for token, label in zip(example.input_ids + [None], example.labels + [IGNORE]):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def cfg(**kw) -> DataConfig:
    return DataConfig(train=[DataSource(path="x.jsonl")], **kw)


# ---------------------------------------------------------------- formats

def test_formats_each_produce_messages():
    alpaca = row({"instruction": "Add.", "input": "2 and 2", "output": "4", "system": "Be exact."})
    assert to_messages(alpaca, "alpaca") == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add.\n\n2 and 2"},
        {"role": "assistant", "content": "4"}]
    assert to_messages(row({"instruction": "Hi", "input": "", "output": "Hey"}), "alpaca")[0] == \
        {"role": "user", "content": "Hi"}
    assert to_messages(row({"messages": CHAT}), "chat") == CHAT
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    assert to_messages(row(sharegpt), "sharegpt") == [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hey"}]
    assert to_messages(row({"prompt": "2+2=", "completion": "4"}), "completion") == [
        {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    assert to_messages(row({"text": "Some document."}), "text") == "Some document."


def test_gemini_rows_become_messages():
    gemini = {"systemInstruction": {"role": "system", "parts": [{"text": "Be brief."}]},
              "contents": [{"role": "user", "parts": [{"text": "Hello, "}, {"text": "how are you?"}]},
                           {"role": "model", "parts": [{"text": "I am fine, thanks!"}]},
                           {"role": "user", "parts": [{"text": "What is two plus two?"}]},
                           {"role": "model", "parts": [{"text": "Two plus two is four."}]}]}
    assert to_messages(row(gemini), "gemini") == CHAT
    snake = {"system_instruction": {"parts": [{"text": "Be brief."}]}, "contents": gemini["contents"][:2]}
    assert to_messages(row(snake), "gemini") == CHAT[:3]


@pytest.mark.parametrize("data, fmt, message", [
    ({"instruction": "Hi"}, "alpaca", "data.jsonl:7: alpaca row needs 'output'"),
    ({"instruction": 3, "output": "x"}, "alpaca", "data.jsonl:7: 'instruction' must be a str, got int"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat", "data.jsonl:7: messages[0] has role 'robot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "chat",
     "data.jsonl:7: messages[1] (assistant) has empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "chat", "data.jsonl:7: conversation has no assistant"),
    ({"messages": "hello"}, "chat", "data.jsonl:7: 'messages' must be a list, got str"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "data.jsonl:7: conversations[0] needs 'from'"),
    ({"messages": []}, "gemini", "data.jsonl:7: gemini row needs 'contents' (has: messages)"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "gemini",
     "data.jsonl:7: contents[0] needs 'role' in ['user', 'model'], got 'assistant'"),
    ({"contents": [{"role": "user", "parts": [{"inlineData": {}}]}]}, "gemini",
     "data.jsonl:7: contents[0].parts[0] needs a 'text' string, a 'functionCall' or a 'functionResponse' (has: inlineData)"),
    ({"contents": [{"role": "user", "parts": []}]}, "gemini", "data.jsonl:7: contents[0] needs a non-empty 'parts'"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": " "}]}]},
     "gemini", "data.jsonl:7: contents[1] (assistant) has empty content"),
    ({"systemInstruction": "Be brief.", "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, "gemini",
     "data.jsonl:7: systemInstruction needs a non-empty 'parts'"),
    ({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, "gemini",
     "data.jsonl:7: conversation has no assistant"),
])
def test_format_errors_name_file_and_line(data, fmt, message):
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        to_messages(row(data, line=7), fmt)


def test_preference_explicit_prompt():
    pair = to_preference(row({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}))
    assert pair.prompt == [{"role": "user", "content": "Hi"}]
    assert pair.chosen == [{"role": "assistant", "content": "Hello!"}]
    assert pair.rejected == [{"role": "assistant", "content": "Go away."}]
    # UltraFeedback style: chosen/rejected repeat the prompt as full conversations
    user = {"role": "user", "content": "Hi"}
    pair = to_preference(row({"prompt": [user], "chosen": [user, {"role": "assistant", "content": "A"}],
                              "rejected": [user, {"role": "assistant", "content": "B"}]}))
    assert pair.prompt == [user] and pair.chosen == [{"role": "assistant", "content": "A"}]


def test_preference_shapes_other_tools_ship():
    """LLaMA-Factory's sharegpt and messages shapes, and OpenAI's preference fine-tuning rows, give the same pair."""
    expected = ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                [{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go away."}])
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}], "system": "Be brief.",
                "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}
    messages = {"messages": CHAT[:1] + [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": {"role": "assistant", "content": "Go away."}}
    openai = {"input": {"messages": messages["messages"], "tools": [], "parallel_tool_calls": True},
              "preferred_output": [{"role": "assistant", "content": "Hello!"}],
              "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    for data in (sharegpt, messages, openai):
        pair = to_preference(row(data))
        assert (pair.prompt, pair.chosen, pair.rejected) == expected, data
    with pytest.raises(UserError, match="data.jsonl:1: 'preferred_output' and 'non_preferred_output' are identical"):
        to_preference(row({**openai, "non_preferred_output": openai["preferred_output"]}))
    with pytest.raises(UserError, match="data.jsonl:1: 'input' must be an object with a 'messages' list"):
        to_preference(row({**openai, "input": "Hi"}))
    with pytest.raises(UserError, match=r"data.jsonl:1: chosen\[0\] must be a tool call with a function name"):
        to_preference(row({**sharegpt, "chosen": {"from": "function_call", "value": "{}"}}))


def test_preference_hh_rlhf_splits_shared_prompt():
    shared = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    pair = to_preference(row({"chosen": shared + " 6.", "rejected": shared + " 7, I think."}))
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                           {"role": "user", "content": "And 3+3?"}]
    assert pair.chosen == [{"role": "assistant", "content": "6."}]
    assert pair.rejected == [{"role": "assistant", "content": "7, I think."}]
    with pytest.raises(UserError, match="data.jsonl:1: 'chosen' and 'rejected' are identical"):
        to_preference(row({"chosen": shared + " 6.", "rejected": shared + " 6."}))
    with pytest.raises(UserError, match="data.jsonl:1: 'chosen' is a string but not"):
        to_preference(row({"chosen": "just text", "rejected": "other text"}))


def test_prompt_rows():
    assert to_prompt(row({"prompt": "2+2?", "answer": 4})).answer == 4
    assert to_prompt(row({"messages": CHAT[:2]})).messages == CHAT[:2]
    with pytest.raises(UserError, match="data.jsonl:1: a prompt must not end with an assistant"):
        to_prompt(row({"messages": CHAT[:3]}))


# ---------------------------------------------------------------- readers

def test_every_file_type_reads_with_lines(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "d.csv").write_text('prompt,completion\na,b\n"c",d\n')
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    expected_lines = {"d.jsonl": [1, 3], "array.json": [1, 2], "lines.json": [1, 2], "d.csv": [2, 3],
                      "d.parquet": [1, 2], "hf": [1, 2]}
    for name, lines in expected_lines.items():
        rows = list(read_rows(str(tmp_path / name)))
        assert [r.data for r in rows] == records, name
        assert [r.line for r in rows] == lines, name
        assert rows[0].source == str(tmp_path / name)  # as given, so callers can map it back to its DataSource

    (tmp_path / "doc1.txt").write_text("First document.\nTwo lines.")
    (tmp_path / "doc2.txt").write_text("Second document.")
    rows = load_rows([DataSource(path=str(tmp_path / "doc*.txt"), format="text")])
    assert [r.data["text"] for r in rows] == ["First document.\nTwo lines.", "Second document."]
    assert rows[0].format == "text"


def test_text_field_is_normalised(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "Doc one."}])
    rows = load_rows([DataSource(path=path, format="text", text_field="body")])
    assert rows[0].data == {"text": "Doc one."}


GOOD = b'{"prompt": "a", "completion": "b"}\n'


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", GOOD + b'{"prompt": "b"\n', r"bad.jsonl:2: invalid JSON"),
    ("bad.jsonl", GOOD + b'\n{"prompt": "\xff"}\n', r"bad.jsonl:3: not valid UTF-8"),
    ("bad.jsonl", GOOD + b'[1, 2]\n', r"bad.jsonl:2: expected a JSON object, got list"),
    ("bad.jsonl", GOOD + b'{"prompt": "a"}\n', r"bad.jsonl:2: completion row needs 'completion'"),
    ("bad.jsonl", b'{"prompt": "a", "completion": 5}\n', r"bad.jsonl:1: 'completion' must be a str, got int"),
    ("bad.json", b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a",}\n]', r"bad.json:3: invalid JSON"),
    ("bad.json", b'[{"prompt": "a", "completion": "b"}, 3]', r"bad.json:2: expected a JSON object, got int"),
    ("bad.csv", b"prompt,completion\na,b\nc\xe9,d\n", r"bad.csv:3: not valid UTF-8"),
    ("bad.csv", b"prompt,completion\na,b\nc,d,e\n", r"bad.csv:3: has a different number of fields"),
    ("bad.txt", b"ok\nfine\n\xc3(\n", r"bad.txt:3: not valid UTF-8"),
    ("empty.jsonl", b"\n\n", r"empty.jsonl: file is empty"),
    ("data.xml", b"<a/>", r"data.xml: unsupported file type '.xml'; supported: .jsonl .json .csv .parquet .txt"),
])
def test_file_errors_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "text" if name.endswith(".txt") else "completion"
    with pytest.raises(UserError, match=message):
        load_rows([DataSource(path=str(path), format=fmt)])


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.jsonl"):
        load_rows([DataSource(path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(UserError, match="no data files match"):
        load_rows([DataSource(path=str(tmp_path / "*.txt"), format="text")])


def test_directory_errors(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"holds the splits \['train'\]; point data paths at one of them"):
        list(read_rows(str(tmp_path / "dd")))
    assert [r.data for r in read_rows(str(tmp_path / "dd" / "train"))] == [{"text": "a"}]
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not one saved by datasets.save_to_disk"):
        list(read_rows(str(tmp_path / "plain")))


def test_skip_bad_rows_counts_and_reports_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text("\n".join([good, "{broken", good, json.dumps({"prompt": "a"}), good]) + "\n")
    source = DataSource(path=str(path), format="completion")
    with pytest.raises(UserError, match="mixed.jsonl:2: invalid JSON"):
        load_rows([source])
    rows = load_rows([source], skip_bad_rows=True)
    assert [r.line for r in rows] == [1, 3, 5]
    assert rows.skipped == 2
    assert "mixed.jsonl:2:" in rows.skipped_errors[0] and "mixed.jsonl:4:" in rows.skipped_errors[1]


# ---------------------------------------------------------------- templates and masking

def test_chatml_masks_exactly_the_replies(tiny_tokenizer):
    example = tokenize_example(render(CHAT, "chatml", tiny_tokenizer), tiny_tokenizer, 512, train_on_prompt=False)
    assert trained_spans(example, tiny_tokenizer) == [r + "<|im_end|>" for r in REPLIES]
    assert example.input_ids[0] == tiny_tokenizer.bos_token_id and not example.truncated
    # the masked tokens are exactly the rest of the conversation
    prompt_text = tiny_tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab == IGNORE])
    assert prompt_text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>"
                           "\n<|im_start|>assistant\n\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                           "<|im_start|>assistant\n\n")
    assert set(example.labels) - {IGNORE} <= set(example.input_ids)


def test_hf_jinja_template_masks_the_same_way(tiny_tokenizer):
    example = tokenize_example(render(CHAT, ZEPHYR, tiny_tokenizer), tiny_tokenizer, 512, train_on_prompt=False)
    assert trained_spans(example, tiny_tokenizer) == [r + "</s>" for r in REPLIES]
    whole = tiny_tokenizer.apply_chat_template(CHAT, chat_template=ZEPHYR, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == "<s>" + whole
    # the template from the tokenizer itself (template: auto)
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ZEPHYR
    assert render(CHAT, "auto", tok) == render(CHAT, ZEPHYR, tiny_tokenizer)
    assert render(CHAT, "auto", tiny_tokenizer) == render(CHAT, "chatml", tiny_tokenizer)


def test_generation_prompt(tiny_tokenizer):
    segments = render(CHAT[:2], "chatml", tiny_tokenizer, add_generation_prompt=True)
    assert segments[-1][0].endswith("<|im_start|>assistant\n") and not any(a for _, a in segments)
    segments = render(CHAT[:2], ZEPHYR, tiny_tokenizer, add_generation_prompt=True)
    assert segments[-1][0].endswith("<|assistant|>\n")


def test_template_without_end_token_gets_eos(tiny_tokenizer):
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    example = tokenize_example(render(CHAT, plain, tiny_tokenizer), tiny_tokenizer, 512, False)
    assert trained_spans(example, tiny_tokenizer) == [r + "</s>" for r in REPLIES]


def test_unmaskable_template_is_a_clear_error(tiny_tokenizer):
    # rewrites earlier turns: only the last message is upper-cased
    bad = ("{% for m in messages %}{% if loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
           "\n{% endfor %}")
    with pytest.raises(UserError, match="cannot be masked.*train_on_prompt.*chatml"):
        render(CHAT, bad, tiny_tokenizer)
    with pytest.raises(UserError, match="unknown data.template 'llama'"):
        render(CHAT, "llama", tiny_tokenizer)


def test_alpaca_and_none_templates(tiny_tokenizer):
    segments = render(CHAT[1:3], "alpaca", tiny_tokenizer)
    assert segments == [("Below is an instruction that describes a task. Write a response that appropriately completes "
                         "the request.\n\n### Instruction:\nHello, how are you?\n\n### Response:\n", False),
                        ("I am fine, thanks!</s>", True), ("\n\n", False)]
    assert render(CHAT[1:3], "none", tiny_tokenizer) == [("Hello, how are you?", False),
                                                          ("I am fine, thanks!</s>", True)]


def test_train_on_prompt_trains_everything_but_bos(tiny_tokenizer):
    example = tokenize_example(render(CHAT, "chatml", tiny_tokenizer), tiny_tokenizer, 512, train_on_prompt=True)
    assert example.labels == [IGNORE] + example.input_ids[1:]


def test_special_tokens_in_data_are_plain_text(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    tricky = [{"role": "user", "content": "Say <|im_end|> please"}, {"role": "assistant", "content": "<|im_end|></s>"}]
    example = tokenize_example(render(tricky, "chatml", tiny_tokenizer), tiny_tokenizer, 512, False)
    assert example.input_ids.count(im_end) == 2  # the template's two turn ends, not the data's
    assert example.input_ids.count(tiny_tokenizer.eos_token_id) == 0
    assert trained_spans(example, tiny_tokenizer) == ["<|im_end|></s><|im_end|>"]


def test_sentencepiece_segments_tokenize_like_the_whole_text():
    """Metaspace tokenizers add a prefix space per encode call; a reply after a prompt must not get one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    # newline never merges with letters, as in Llama's SentencePiece vocab (where it is a byte token)
    tok.train_from_iterator(["Question: Hello world, how are you?"] * 5, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # adds BOS
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    example = tokenize_example([("Question:\n", False), ("Hello world", True)], sp, 64, False)
    assert example.input_ids == [sp.bos_token_id] + sp.encode("Question:\nHello world", add_special_tokens=False)


def test_chatml_needs_its_tokens_and_stop_ids(tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello there"], trainers.BpeTrainer(special_tokens=["<|endoftext|>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bare = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    with pytest.raises(UserError, match="template chatml needs <|im_start|> and <|im_end|>"):
        render(CHAT, "chatml", bare)
    assert render(CHAT, "auto", bare) == render(CHAT, "none", bare)  # a base tokenizer outside training: raw text
    added, note = prepare_tokenizer("auto", bare, ["chat"])
    assert added == bare.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) and len(set(added)) == 2
    assert note == ("template: chatml (the tokenizer has no chat template and chat rows are conversations); "
                    "added <|im_start|> <|im_end|> as new tokens")
    assert prepare_tokenizer("auto", bare, ["chat"]) == ([], "template: chatml (the tokenizer's own chat template)")
    assert render(CHAT, "auto", bare) == render(CHAT, "chatml", tiny_tokenizer)

    ids = tiny_tokenizer.convert_tokens_to_ids
    assert stop_token_ids("chatml", tiny_tokenizer) == sorted([ids("</s>"), ids("<|im_end|>")])
    assert stop_token_ids(ZEPHYR, tiny_tokenizer) == [ids("</s>")]
    assert stop_token_ids("alpaca", tiny_tokenizer) == [ids("</s>")]


# ---------------------------------------------------------------- building examples

def test_build_sft_examples_counts_truncation_and_drops(tiny_tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    rows = [
        Row("a.jsonl", 1, {"messages": CHAT}, "chat"),
        Row("a.jsonl", 2, {"messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello " * 40}]}, "chat"),
        Row("a.jsonl", 3, {"messages": [{"role": "user", "content": long_prompt},
                                        {"role": "assistant", "content": "ok"}]}, "chat"),
    ]
    right = cfg(max_length=48, template="chatml", truncation="right")
    examples, stats = build_sft_examples(rows, None, tiny_tokenizer, right)
    assert stats["rows"] == 3 and stats["examples"] == 2
    assert stats["truncated"] == 3
    assert stats["dropped_no_loss"] == 1 and stats["dropped_lines"] == ["a.jsonl:3"]
    assert all(len(e.input_ids) == 48 and e.truncated for e in examples)
    assert stats["tokens"] == 96 and stats["length_max"] == 48 and 0 < stats["loss_tokens"] < 96


def test_keep_response_cuts_the_prompt_from_the_left(tiny_tokenizer):
    """data.truncation keep_response (the default): oldest turns go first, then the start of the last prompt message;
    the system message and the response stay whole; a row whose response alone cannot fit is dropped and counted."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    system = {"role": "system", "content": "Be brief."}
    rows = [
        Row("a.jsonl", 1, {"messages": CHAT}, "chat"),
        Row("a.jsonl", 2, {"messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello " * 40}]}, "chat"),
        Row("a.jsonl", 3, {"messages": [system, {"role": "user", "content": long_prompt},
                                        {"role": "assistant", "content": "ok"}]}, "chat"),
    ]
    data_cfg = cfg(max_length=48, template="chatml")
    examples, stats = build_sft_examples(rows, None, tiny_tokenizer, data_cfg)
    assert stats["examples"] == 2 and stats["truncated"] == 2
    assert stats["dropped_too_long"] == 1 and stats["too_long_lines"] == ["a.jsonl:2"]
    latest = tokenize_example(render([CHAT[0], *CHAT[3:]], "chatml", tiny_tokenizer), tiny_tokenizer, 512, False)
    assert (examples[0].input_ids, examples[0].labels) == (latest.input_ids, latest.labels)
    assert len(latest.input_ids) <= 48 < len(tokenize_example(render(CHAT, "chatml", tiny_tokenizer),
                                                              tiny_tokenizer, 512, False).input_ids)
    cut = examples[1]
    assert 40 < len(cut.input_ids) <= 48 and trained_spans(cut, tiny_tokenizer) == ["ok<|im_end|>"]
    text = tiny_tokenizer.decode(cut.input_ids)
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("the lazy dog. <|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n")
    assert long_prompt not in text


def test_keep_response_cuts_one_prompt_for_both_sides_of_a_pair(tiny_tokenizer):
    from tunelab.objectives.preference import build_pairs

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    pair = to_preference(row({"prompt": long_prompt, "chosen": "Two plus two is four.", "rejected": "No."}))
    items, no_response, _ = build_pairs([(row({}), pair)], tiny_tokenizer, cfg(max_length=40, template="chatml"))
    (item,) = items
    assert item.truncated and not no_response and len(item.chosen_ids) <= 40
    assert trained_spans(Example(item.chosen_ids, item.chosen_labels), tiny_tokenizer) == \
        ["Two plus two is four.<|im_end|>"]
    prompt_len = next(i for i, label in enumerate(item.chosen_labels) if label != IGNORE)
    assert item.rejected_ids[:prompt_len] == item.chosen_ids[:prompt_len]
    assert tiny_tokenizer.decode(item.chosen_ids[:prompt_len]).endswith("lazy dog. <|im_end|>\n<|im_start|>assistant\n")


def test_completion_and_text_formats(tiny_tokenizer):
    completion = Row("c.jsonl", 1, {"prompt": "Two plus two is", "completion": " four."})
    text = Row("t.txt", 1, {"text": "The lazy dog."})
    examples, _ = build_sft_examples([completion], "completion", tiny_tokenizer, cfg(template="chatml"))
    assert tiny_tokenizer.decode(examples[0].input_ids) == "<s>Two plus two is four.</s>"
    assert trained_spans(examples[0], tiny_tokenizer) == [" four.</s>"]
    examples, _ = build_sft_examples([text], lambda r: "text", tiny_tokenizer, cfg())
    assert trained_spans(examples[0], tiny_tokenizer) == ["The lazy dog.</s>"]


def test_preview_is_plain_text(tiny_tokenizer):
    example = tokenize_example(render(CHAT[1:3], "chatml", tiny_tokenizer), tiny_tokenizer, 512, False)
    text = preview([example, example], tiny_tokenizer, 1)
    assert "[[I am fine, thanks!<|im_end|>]]" in text
    assert text.count("--- example") == 1
    assert "2 examples" in text and "0 truncated" in text and "\x1b" not in text


# ---------------------------------------------------------------- packing and collation

def ex(n: int, start: int = 10) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, list(ids))


def test_pack_examples_positions_and_docs():
    blocks = pack_examples([ex(5), ex(3, 50), ex(6, 70), ex(2, 90)], max_length=8)
    assert len(blocks) == 2 and sorted(len(b.input_ids) for b in blocks) == [8, 8]
    for block in blocks:
        starts = [i for i, p in enumerate(block.position_ids) if p == 0]
        assert starts[0] == 0
        for d, s in enumerate(starts):
            end = starts[d + 1] if d + 1 < len(starts) else len(block.input_ids)
            assert block.doc_ids[s:end] == [d] * (end - s)
            assert block.position_ids[s:end] == list(range(end - s))
            assert block.labels[s] == IGNORE and block.labels[s + 1:end] == block.input_ids[s + 1:end]
    packed_tokens = sorted(t for b in blocks for t in b.input_ids)
    assert packed_tokens == sorted(t for e in [ex(5), ex(3, 50), ex(6, 70), ex(2, 90)] for t in e.input_ids)


def test_pack_stream_splits_documents():
    blocks = list(pack_stream([[1, 2, 3], [4, 5, 6, 7, 8], [9]], max_length=4, eos_id=0))
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 9, 0]]
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert [b.doc_ids for b in blocks] == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert blocks[2].labels == [IGNORE, 0, IGNORE, 0]


def test_collate_pads_unpacked():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [IGNORE, 9])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["attention_mask"].dtype == torch.long
    assert int(batch["num_loss_tokens"]) == 3


def test_collate_packed_mask():
    block = pack_examples([ex(3), ex(2, 50)], max_length=8)[0]  # docs of 3 then 2 tokens
    short = pack_examples([ex(2, 70)], max_length=8)[0]
    batch = collate([block, short], pad_id=1)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(mask[0, 0], expected)
    # padding sees only the first token, so no row is empty and the diagonal marks the real tokens
    assert mask[1, 0].tolist()[2:] == [[True, False, False, False, False]] * 3
    assert mask[1, 0].diagonal().tolist() == [True, True, False, False, False]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert int(batch["num_loss_tokens"]) == 2 + 1 + 1


def test_packed_documents_are_isolated_in_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == "sdpa"
    doc_b = Example([3, 9, 12, 20, 7], [IGNORE, 9, 12, 20, 7])

    def doc_b_outputs(doc_a: list[int]):
        block = pack_examples([Example(doc_a, list(doc_a)), doc_b], max_length=16)[0]
        other = pack_examples([Example([5, 6], [5, 6])], max_length=16)[0]  # a shorter row: padding in the batch
        batch = collate([block, other], pad_id=0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        assert not torch.isnan(logits).any()
        where = torch.tensor(block.doc_ids) == 1  # the longer doc A is packed first
        assert torch.tensor(block.input_ids)[where].tolist() == doc_b.input_ids
        b_logits = logits[0, : len(block.input_ids)][where]
        loss = torch.nn.functional.cross_entropy(b_logits[:-1], torch.tensor(doc_b.labels[1:]))
        return b_logits, loss

    logits1, loss1 = doc_b_outputs([11, 4, 8, 30, 2, 17, 25])
    logits2, loss2 = doc_b_outputs([40, 41, 42, 43, 44, 45, 46])
    assert torch.equal(logits1, logits2) and torch.equal(loss1, loss2)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([doc_b.input_ids])).logits[0]
    torch.testing.assert_close(logits1, alone, atol=1e-5, rtol=1e-5)
