"""Chat templates on a base model whose tokenizer has none (as Llama-2, Mistral-7B-v0.1 and the Llama-3 base models
ship): the defaults must just work, through the CLI (tunelab.cli.main in this process: argv in, exit code and
printed lines out; a subprocess per command would cost seconds of imports each).

The base here is a tiny Llama with untied embeddings (like the big ones) and a Llama-style tokenizer: <s> added on
encode, </s> EOS, no pad token, no chat template, no ChatML tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY_SHAPE, config_dict

from tunelab.cli import main as cli_main

WORDS = ("red", "green", "blue", "black", "white", "pink")
ALPACA = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in WORDS]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."},
                      {"role": "assistant", "content": f"{w}!"}]} for w in WORDS]
COMPLETION = [{"prompt": f"Say {w}:", "completion": f" {w}!"} for w in WORDS]
TEXT = [{"text": f"The colour is {w}."} for w in WORDS]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.modeling.scratch import save_tiny_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"Say {w}. {w}! The colour is {w}. Below is an instruction ### Response: Be brief." for w in WORDS]
    tok.train_from_iterator(text * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    return save_tiny_model(tmp_path_factory.mktemp("plain") / "base", fast,
                           TINY_SHAPE.model_copy(update={"tie_embeddings": False}))


def _config(tmp: Path, base: Path, fmt: str, rows: list[dict], **sections) -> Path:
    cfg = config_dict(base, _jsonl(tmp / f"{fmt}.jsonl", rows), tmp / f"run-{fmt}",
                      adapter={"r": 4, "alpha": 8, "dropout": 0.0}, **sections)
    cfg["data"]["train"][0]["format"] = fmt
    cfg["data"]["max_length"] = 256  # alpaca's preamble is long in a 300-token vocabulary
    path = tmp / f"{fmt}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("fmt, line", [
    ("completion+text", "template: none (completion/text rows are plain text)"),
    ("alpaca", "template: alpaca (the tokenizer has no chat template and the rows are alpaca)"),
])
def test_base_model_defaults_train_completion_text_and_alpaca(plain_base, tmp_path, capsys, fmt, line):
    """No chat template, LoRA, template auto: these rows train as they are, no tokens are added, and the run says
    which template it used. Alpaca runs save the alpaca template with their tokenizer, for generate/chat/merge."""
    from transformers import AutoTokenizer

    from tunelab.data.templates import JINJA

    if fmt == "alpaca":
        cfg = _config(tmp_path, plain_base, "alpaca", ALPACA)
    else:  # one run, two sources
        cfg = _config(tmp_path, plain_base, "completion", COMPLETION)
        data = yaml.safe_load(cfg.read_text())
        data["data"]["train"].append({"path": str(_jsonl(tmp_path / "text.jsonl", TEXT)), "format": "text"})
        cfg.write_text(yaml.safe_dump(data))
    code = cli_main(["train", str(cfg), "train.max_steps=1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert line in out.out.splitlines()
    saved = AutoTokenizer.from_pretrained(next(tmp_path.glob("run-*")) / "final")
    assert len(saved) == len(AutoTokenizer.from_pretrained(plain_base))
    assert saved.chat_template == (JINJA["alpaca"] if fmt == "alpaca" else None)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(path.glob("*.safetensors")))


def test_chat_rows_on_a_base_model_add_chatml_and_train_only_its_new_rows(plain_base, tmp_path, capsys):
    """Chat rows, LoRA, template auto: ChatML's two tokens are added, their embedding and output rows start at the
    mean row and are the only rows trained (PEFT trainable tokens), the adapter holds just those rows, and the
    adapter dir (PeftModel.from_pretrained on the grown base) and `tunelab merge` give the same model, and
    `tunelab generate` runs on the run dir."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.templates import JINJA
    from tunelab.modeling.load import grow_to_tokenizer

    cfg = _config(tmp_path, plain_base, "chat", CHAT, train={"max_steps": 2, "lr": 3e-2},
                  data={"padding_free": False})
    assert cli_main(["train", str(cfg)]) == 0, capsys.readouterr().err
    assert ("template: chatml (the tokenizer has no chat template and chat rows are conversations); added "
            "<|im_start|> <|im_end|> as new tokens") in capsys.readouterr().out.splitlines()

    final = tmp_path / "run-chat" / "final"
    tokenizer, base_tokenizer = AutoTokenizer.from_pretrained(final), AutoTokenizer.from_pretrained(plain_base)
    new = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert new == [len(base_tokenizer), len(base_tokenizer) + 1] and tokenizer.chat_template == JINJA["chatml"]
    saved = _weights(final)
    assert {tuple(v.shape) for k, v in saved.items() if "trainable_tokens" in k} == {(2, TINY_SHAPE.hidden_size)}
    assert sum("trainable_tokens" in k for k in saved) == 2  # embed_tokens and the untied lm_head
    assert all(v.shape[0] != len(tokenizer) for v in saved.values())  # no whole embedding matrix

    base = AutoModelForCausalLM.from_pretrained(plain_base)
    old = len(base_tokenizer)
    peft = PeftModel.from_pretrained(grow_to_tokenizer(AutoModelForCausalLM.from_pretrained(plain_base), tokenizer),
                                     final).eval()
    assert cli_main(["merge", str(tmp_path / "run-chat"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == old + 2
    for get in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base, get)().weight, getattr(merged, get)().weight
        assert after.shape[0] == old + 2
        assert torch.equal(after[:old], before[:old])  # only the new rows were trained
        mean = before.mean(0)
        assert all(not torch.allclose(after[i], mean, atol=1e-4) for i in new)  # ... and they were
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Say red."}],
                                                      add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "run-chat"), "--prompt", "Say red.", "--max-new-tokens", "4"]) == 0
    # plain transformers generate on the merged model, prompted with the saved tokenizer's own chat template
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "Say red."}], tokenize=False,
                                                     add_generation_prompt=True), return_tensors="pt").input_ids
    out = merged.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                          eos_token_id=[tokenizer.eos_token_id, new[1]], pad_token_id=tokenizer.eos_token_id)
    assert capsys.readouterr().out == tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() + "\n"


def test_added_tokens_train_padding_free(plain_base, tmp_path, capsys):
    """The same with data.padding_free (one row of documents per micro-batch): the new rows are trained."""
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, plain_base, "chat", CHAT, train={"max_steps": 1, "lr": 3e-2}, data={"padding_free": True})
    assert cli_main(["train", str(cfg)]) == 0, capsys.readouterr().err
    mean = AutoModelForCausalLM.from_pretrained(plain_base).get_input_embeddings().weight.mean(0)
    rows = next(v for k, v in _weights(tmp_path / "run-chat" / "final").items() if "embed_tokens" in k)
    assert rows.shape == (2, TINY_SHAPE.hidden_size)
    assert all(not torch.allclose(row, mean, atol=1e-4) for row in rows)


def test_preprocess_json_shows_what_the_model_sees(plain_base, tmp_path, capsys):
    """`tunelab preprocess --show N --json`: N lines, each the example's ids, labels and text, the same as the
    library's rendering + tokenization; the loss on the reply and its end-of-turn token only."""
    from transformers import AutoTokenizer

    from tunelab.data import prepare_tokenizer, render, tokenize_example

    assert cli_main(["preprocess", str(_config(tmp_path, plain_base, "chat", CHAT)), "--show", "2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    tokenizer = AutoTokenizer.from_pretrained(plain_base)
    prepare_tokenizer("auto", tokenizer, ["chat"])
    for line, row in zip(lines, CHAT):
        shown = json.loads(line)
        expected = tokenize_example(render(row["messages"], "chatml", tokenizer), tokenizer, 256, False)
        assert (shown["input_ids"], shown["labels"]) == (expected.input_ids, expected.labels)
        assert shown["text"] == tokenizer.decode(expected.input_ids)
        assert shown["text"].startswith("<s><|im_start|>system\nBe brief.<|im_end|>")
        trained = [i for i, label in zip(shown["input_ids"], shown["labels"]) if label != -100]
        assert tokenizer.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>"


def test_padding_is_eos_and_never_carries_loss(plain_base):
    """A tokenizer without a pad token pads with EOS; padding is masked by position, so the EOS that ends a reply
    still carries loss next to it."""
    from tunelab.data import collate, render, tokenize_example
    from tunelab.modeling.load import load_tokenizer

    tokenizer = load_tokenizer(str(plain_base))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rows = [[{"role": "user", "content": "Say red."}, {"role": "assistant", "content": w}] for w in ("red!", "a b c d e")]
    examples = [tokenize_example(render(r, "alpaca", tokenizer), tokenizer, 256, False) for r in rows]
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    end = max(i for i, t in enumerate(examples[0].input_ids) if t == tokenizer.eos_token_id)  # the reply's EOS
    assert batch["labels"][0, end] == tokenizer.eos_token_id
    assert (batch["labels"][0, short:] == -100).all() and (batch["attention_mask"][0, short:] == 0).all()


def test_template_mistakes_are_one_line(plain_base, tmp_path, capsys):
    """A misspelt template name is refused by `validate` naming the closest; a family template on a tokenizer
    without its control tokens stops `train` before any weights load, naming them."""
    cfg = _config(tmp_path, plain_base, "chat", CHAT)
    assert cli_main(["validate", str(cfg), "data.template=llama-3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: invalid config {cfg}: 'data.template': unknown template 'llama-3': use one of auto, none, chatml, "
        "alpaca, llama3, mistral, mistral-v1, gemma, phi3 or a Jinja chat template; did you mean 'llama3'?"]
    assert cli_main(["train", str(cfg), "data.template=llama3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: data.template: llama3 writes <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>, "
        "which this tokenizer does not have as tokens: it is for llama3 models (template: auto uses the tokenizer's "
        "own chat template, or chatml)"]


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_preference_rows_on_a_base_model_train_with_chatml_added(plain_base, tmp_path, capsys, method):
    """DPO (the reference is the base with the adapter off: its new rows at their mean start) and a reward model
    (a scalar head, no output embedding) train on preference rows with ChatML's tokens added."""
    rows = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": "no"} for w in WORDS]
    cfg = _config(tmp_path, plain_base, "preference", rows, method=method)
    assert cli_main(["train", str(cfg), "train.max_steps=1"]) == 0, capsys.readouterr().err
    assert ("template: chatml (the tokenizer has no chat template and preference rows are conversations); added "
            "<|im_start|> <|im_end|> as new tokens") in capsys.readouterr().out.splitlines()
    assert sum("trainable_tokens" in k for k in _weights(tmp_path / "run-preference" / "final")) == \
        {"dpo": 2, "reward": 1}[method]
