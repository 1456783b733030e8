"""Bad input through `tunelab train`: every case exits non-zero (or, with data.skip_bad_rows, skips and counts) with
ONE line naming the file and line / config key / path, no traceback, and leaves the output dir undamaged.

Most cases fail at config or data validation before any model is loaded, so they run in this process through
`tunelab.cli.main`; a few run as real subprocesses to prove the whole path (test_cli.py holds more of those).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import CASES as CONFIG_CASES  # the config mistakes `validate` catches: `train` must catch them too
from tiny import config_dict, make_base_model, run_cli

from tunelab.training import checkpoint
from tunelab.cli import main as cli_main

ALPACA = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("red", "green", "blue", "black")]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@dataclass
class Env:
    tmp: Path
    base: Path  # a tiny model dir with tokenizer
    bare_tokenizer: Path  # a tokenizer with no chat template and no <|im_start|>/<|im_end|>
    trained: Path  # a finished run dir with checkpoints (for --resume cases)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def data(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def cfg(self, path: Path | None = None, fmt: str = "alpaca", **sections) -> dict:
        cfg = config_dict(self.base, path or self.data("train.jsonl", jsonl(ALPACA)), self.out, **sections)
        cfg["data"]["train"][0]["format"] = fmt
        cfg["train"]["max_steps"] = 1
        return cfg

    def train(self, cfg: dict, *extra: str) -> list[str]:
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return ["train", str(path), *extra]

    def resume_with(self, change) -> list[str]:
        cfg = copy.deepcopy(yaml.safe_load((self.trained / "config.yaml").read_text()))
        change(cfg)
        return self.train(cfg, "--resume")


def _make_bare_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Say red. red! Say green. green!"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from tunelab.config import load_config
    from tunelab.training.loop import train

    root = tmp_path_factory.mktemp("shared")
    base = make_base_model(root, warm_steps=0)
    data = root / "train.jsonl"
    data.write_text(jsonl(ALPACA))
    cfg = config_dict(base, data, root / "trained", train={"max_steps": 2, "save_every": 1})
    train(load_config(data=cfg), say=lambda *a: None)
    return base, _make_bare_tokenizer(root / "bare-tokenizer"), root / "trained"


@pytest.fixture
def env(shared, tmp_path):
    return Env(tmp_path, *shared)


def _no_tokenizer(e: Env) -> Path:
    d = e.tmp / "no-tokenizer"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(e.base / f, d / f)
    return d


def _pickled(e: Env) -> Path:
    d = _no_tokenizer(e)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    return d


def _parquet(e: Env) -> Path:
    return e.data("train.parquet", b"PAR1 this is not a parquet file")


def _csv(e: Env) -> Path:
    return e.data("train.csv", 'instruction,output\n"Say red.","red!"\n"Say blue.","blue!",extra\n')


def _other_vocab_teacher(e: Env) -> Path:
    d = _no_tokenizer(e).rename(e.tmp / "teacher")
    for f in e.bare_tokenizer.iterdir():
        shutil.copy(f, d / f.name)
    return d


IDENTICAL = jsonl([{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"{w}!"} for w in ("red", "blue")])

# (id, argv builder, expected fragments of the one-line message; "{tmp}" is the test's dir)
CASES = [
    # -- config values, names and combinations (beyond test_cli's CONFIG_CASES, which run below too)
    ("unknown optimizer", lambda e: e.train(e.cfg(train={"optimizer": "adamw9"})), ["'train.optimizer'", "adamw9"]),
    ("unknown data format", lambda e: e.train(e.cfg(fmt="alpacca")), ["'data.train.0.format'", "alpacca"]),
    ("unknown template name", lambda e: e.train(e.cfg(data={"template": "chatmll"})),
     ["'data.template': unknown template 'chatmll'", "did you mean 'chatml'?"]),
    ("eval_fraction out of range", lambda e: e.train(e.cfg(data={"eval_fraction": 1.5})), ["'data.eval_fraction'"]),
    ("data.train not a list", lambda e: e.train({**e.cfg(), "data": {"train": "train.jsonl"}}), ["'data.train'"]),
    ("negative warmup", lambda e: e.train(e.cfg(train={"warmup_steps": -3})), ["'train.warmup_steps'"]),
    ("keep_checkpoints 0", lambda e: e.train(e.cfg(train={"keep_checkpoints": 0})), ["'train.keep_checkpoints'"]),
    ("unknown distributed", lambda e: e.train(e.cfg(train={"distributed": "deepspeed"})), ["'train.distributed'"]),
    ("fp16 on CPU", lambda e: e.train(e.cfg(train={"precision": "fp16"})), ["train.precision: fp16 needs a CUDA GPU"]),
    ("paged optimizer without CUDA", lambda e: e.train(e.cfg(train={"optimizer": "paged_adamw_8bit"})),
     ["train.optimizer: paged_adamw_8bit is CUDA only"]),
    ("fsdp with 4-bit", lambda e: e.train(e.cfg(model={"path": str(e.base), "quantize": "nf4"}, adapter={},
                                                 train={"distributed": "fsdp"})),
     ["train.distributed: fsdp cannot shard 4-bit"]),
    ("config file missing", lambda e: ["train", str(e.tmp / "nope.yaml")], ["config file not found: {tmp}/nope.yaml"]),
    ("config not YAML", lambda e: ["train", str(e.data("bad.yaml", "model: [unclosed\n"))], ["{tmp}/bad.yaml:2: not valid YAML: expected ',' or ']', but got '<stream end>'"]),
    ("override without =", lambda e: e.train(e.cfg(), "train.lr"), ["override 'train.lr' is not of the form key=value"]),
    # -- paths: model, tokenizer, output dir
    ("model path missing", lambda e: e.train(e.cfg(model={"path": str(e.tmp / "no-model")})),
     ["model path not found: {tmp}/no-model"]),
    ("model dir without config.json", lambda e: e.train(e.cfg(model={"path": str(e.tmp)})),
     ["{tmp}: not a model dir (no config.json)"]),
    ("model dir without tokenizer", lambda e: e.train(e.cfg(model={"path": str(_no_tokenizer(e))})),
     ["{tmp}/no-tokenizer: could not load a tokenizer"]),
    ("pickle-only weights", lambda e: e.train(e.cfg(model={"path": str(_pickled(e))})),
     ["{tmp}/no-tokenizer: holds only pickle weights", "model.allow_pickle: true"]),
    ("output_dir under a file", lambda e: e.train({**e.cfg(), "output_dir": str(e.data("file", "x") / "run")}),
     ["output_dir {tmp}/file/run is not writable: Not a directory"]),
    # -- data files
    ("malformed JSON line", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl(ALPACA[:1]) + '{"instruction": "x",\n'))),
     ["{tmp}/train.jsonl:2: invalid JSON"]),
    ("malformed JSON array", lambda e: e.train(e.cfg(e.data("train.json", '[\n{"instruction": "a", "output": "b"},\n{oops}\n]'))),
     ["{tmp}/train.json:3: invalid JSON"]),
    ("JSON array of non-objects", lambda e: e.train(e.cfg(e.data("train.json", '[1, 2]'))),
     ["{tmp}/train.json:1: expected a JSON object, got int"]),
    ("CSV row with extra field", lambda e: e.train(e.cfg(_csv(e))), ["{tmp}/train.csv:3: has a different number of fields"]),
    ("corrupt parquet", lambda e: e.train(e.cfg(_parquet(e))), ["{tmp}/train.parquet: cannot read as parquet"]),
    ("empty file", lambda e: e.train(e.cfg(e.data("train.jsonl", ""))), ["{tmp}/train.jsonl: file is empty"]),
    ("blank lines only", lambda e: e.train(e.cfg(e.data("train.jsonl", "\n\n  \n"))), ["{tmp}/train.jsonl: file is empty"]),
    ("missing field", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl([{"instruction": "hi"}])))),
     ["{tmp}/train.jsonl:1: alpaca row needs 'output'"]),
    ("mistyped field", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl([{"instruction": "hi", "output": 5}])))),
     ["{tmp}/train.jsonl:1: 'output' must be a str, got int"]),
    ("non-UTF-8 bytes", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl(ALPACA[:1]).encode() + b'{"instruction": "\xff"}\n'))),
     ["{tmp}/train.jsonl:2: not valid UTF-8 (byte 0xff)"]),
    ("unsupported file type", lambda e: e.train(e.cfg(e.data("train.xml", "<rows/>"))), ["{tmp}/train.xml: unsupported file type '.xml'"]),
    ("data file missing", lambda e: e.train(e.cfg(e.tmp / "gone.jsonl")), ["data file not found: {tmp}/gone.jsonl"]),
    ("glob matches nothing", lambda e: e.train(e.cfg(e.tmp / "none-*.jsonl")), ["no data files match {tmp}/none-*.jsonl"]),
    (".txt as chat data", lambda e: e.train(e.cfg(e.data("train.txt", "some text"), fmt="chat")), ["{tmp}/train.txt: .txt files"]),
    ("chat message with bad role", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl(
        [{"messages": [{"role": "bot", "content": "hi"}]}])), fmt="chat")), ["{tmp}/train.jsonl:1: messages[0] has role 'bot'"]),
    ("gemini turn with a chat role", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl(
        [{"contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "yo"}]}]},
         {"contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "assistant", "parts": [{"text": "yo"}]}]}])),
        fmt="gemini")), ["{tmp}/train.jsonl:2: contents[1] needs 'role' in ['user', 'model'], got 'assistant'"]),
    ("chat without assistant turn", lambda e: e.train(e.cfg(e.data("train.jsonl", jsonl(
        [{"messages": [{"role": "user", "content": "hi"}]}])), fmt="chat")),
     ["{tmp}/train.jsonl:1: conversation has no assistant message"]),
    ("no response fits max_length", lambda e: e.train(e.cfg(data={"max_length": 4})),
     ["no training examples left", "dropped 4 rows whose response alone exceeds data.max_length=4",
      "({tmp}/train.jsonl:1, {tmp}/train.jsonl:2, {tmp}/train.jsonl:3, {tmp}/train.jsonl:4)"]),
    ("no loss tokens left after truncation", lambda e: e.train(e.cfg(data={"max_length": 8, "truncation": "right"})),
     ["no training examples left", "dropped 4 rows with no loss tokens after masking/truncation",
      "{tmp}/train.jsonl:1, {tmp}/train.jsonl:2", "data.max_length"]),
    ("every row bad even when skipping", lambda e: e.train(e.cfg(e.data("train.jsonl", "{\n{\n"), data={"skip_bad_rows": True})),
     ["no usable rows in {tmp}/train.jsonl (2 bad rows skipped)"]),
    # -- method-specific data
    ("preference pairs all identical", lambda e: e.train(e.cfg(e.data("pref.jsonl", IDENTICAL), fmt="preference",
                                                               method="dpo", adapter={})),
     ["no usable preference pairs", "2 with chosen identical to rejected ({tmp}/pref.jsonl:1, {tmp}/pref.jsonl:2)"]),
    ("OpenAI preference row without input.messages", lambda e: e.train(e.cfg(e.data("pref.jsonl", jsonl(
        [{"input": {"text": "hi"}, "preferred_output": "a", "non_preferred_output": "b"}])), fmt="preference",
        method="dpo", adapter={})), ["{tmp}/pref.jsonl:1: 'input' must be an object with a 'messages' list"]),
    ("kto row with a string label", lambda e: e.train(e.cfg(e.data("kto.jsonl", jsonl(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "label": "yes"}])),
        fmt="kto", method="kto", adapter={})), ["{tmp}/kto.jsonl:1: kto row needs 'label': true (desirable) or false"]),
    ("kto with one row per micro-batch", lambda e: e.train(e.cfg(method="kto", train={"micro_batch_size": 1})),
     ["method: kto needs train.micro_batch_size >= 2"]),
    ("kto with padding_free", lambda e: e.train(e.cfg(method="kto", data={"padding_free": True})),
     ["data.padding_free is implemented for method: sft, dpo and orpo (got kto)"]),
    ("kto on alpaca rows", lambda e: e.train(e.cfg(method="kto")),
     ["has format: alpaca; method: kto trains on format: kto rows"]),
    ("teacher with another vocabulary", lambda e: e.train(e.cfg(method="distill", teacher={"path": str(_other_vocab_teacher(e))})),
     ["teacher.path {tmp}/teacher: the teacher's vocabulary differs from the student's"]),
    # -- resume
    ("--resume without checkpoint", lambda e: e.train(e.cfg(), "--resume"), ["--resume: no usable checkpoint in {tmp}/out/checkpoints"]),
    ("--resume after micro_batch_size change", lambda e: e.resume_with(lambda c: c["train"].update(micro_batch_size=2)),
     ["--resume: 'train.micro_batch_size' changed since", "(4 -> 2)"]),
    ("--resume after grad_accum change", lambda e: e.resume_with(lambda c: c["train"].update(grad_accum=2)),
     ["--resume: the global batch changed since", "(train.grad_accum x ranks: 1 x 1 -> 2 x 1)"]),
    ("--resume after adapter change", lambda e: e.resume_with(lambda c: c.update(adapter={"r": 4})), ["--resume: 'adapter' changed since"]),
    ("--resume after data change", lambda e: e.resume_with(lambda c: c["data"].update(max_length=32)), ["--resume: 'data' changed since"]),
    ("--resume with fsdp after ddp", lambda e: e.resume_with(lambda c: c["train"].update(distributed="fsdp")),
     ["--resume: 'train.distributed' changed since"]),
    ("checkpoints exist, no --resume", lambda e: e.resume_with(lambda c: None)[:-1], ["already holds checkpoints", "--resume"]),
]


def _expect(fragment: str, env: Env) -> str:
    return fragment.replace("{tmp}", str(env.tmp))


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.stat().st_size for p in sorted(run.rglob("*")) if p.is_file()}


def _check(env: Env, argv: list[str], fragments: list[str], capsys):
    before = _snapshot(env.trained)
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert _expect(fragment, env) in lines[0]
    assert not (env.out / "final").exists() and not checkpoint.list_steps(env.out / "checkpoints")
    assert _snapshot(env.trained) == before  # a refused --resume leaves the run as it was
    assert all(checkpoint.verify(checkpoint.step_dir(env.trained / "checkpoints", s)) is None
               for s in checkpoint.list_steps(env.trained / "checkpoints"))


@pytest.mark.parametrize("build,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(env, build, fragments, capsys):
    _check(env, build(env), fragments, capsys)


@pytest.mark.parametrize("desc,change,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_mistakes_stop_train_too(env, desc, change, fragment, capsys):
    cfg = env.cfg()
    change(cfg)
    _check(env, env.train(cfg), [fragment], capsys)


def test_skip_bad_rows_skips_and_counts(env, capsys):
    rows = jsonl(ALPACA[:2]) + '{"instruction": \n' + jsonl([{"instruction": "x"}]) + jsonl(ALPACA[2:])
    code = cli_main(env.train(env.cfg(env.data("train.jsonl", rows), data={"skip_bad_rows": True})))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert (f"data: 4 training / 0 eval examples; skipped 2 bad rows (data.skip_bad_rows), first: "
            f"{env.tmp}/train.jsonl:3: invalid JSON") in out.out
    assert (env.out / "final").is_dir()


def test_chat_data_falls_back_to_chatml_when_the_tokenizer_has_its_tokens(tiny_tokenizer):
    """No chat template, but <|im_start|>/<|im_end|> are special tokens: template auto means chatml, nothing added."""
    from tunelab.data import prepare_tokenizer, render, resolve_template

    assert not tiny_tokenizer.chat_template
    assert resolve_template("auto", tiny_tokenizer) == "chatml"
    assert prepare_tokenizer("auto", tiny_tokenizer, ["chat"])[0] == []
    text = "".join(t for t, _ in render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                        "auto", tiny_tokenizer))
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")


def test_bad_data_through_a_real_process(env):
    result = run_cli(*env.train(env.cfg(env.data("train.jsonl", jsonl(ALPACA[:1]) + "{oops\n"))))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {env.tmp}/train.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
