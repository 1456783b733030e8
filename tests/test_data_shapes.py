"""Data shapes other tools ship, through the real CLI: the managed service's gemini rows, and what each renders to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import config_dict, make_base_model

from tunelab.cli import main as cli_main


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)


def run(tmp: Path, command: str, cfg: dict, capsys) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = cli_main([command, str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def config(base: Path, tmp: Path, rows: list, fmt: str, **sections) -> dict:
    data = tmp / "train.jsonl"
    data.write_text(jsonl(rows))
    cfg = config_dict(base, data, tmp / "out", train={"max_steps": 1}, **sections)
    cfg["data"]["train"][0]["format"] = fmt
    return cfg


GEMINI = [{"systemInstruction": {"role": "system", "parts": [{"text": "Be brief."}]},
           "contents": [{"role": "user", "parts": [{"text": f"Say {w}"}, {"text": "."}]},
                        {"role": "model", "parts": [{"text": f"{w}!"}]}]} for w in ("red", "green", "blue", "black")]


def test_gemini_rows_preprocess_and_train(base, tmp_path, capsys):
    cfg = config(base, tmp_path, GEMINI, "gemini", data={"template": "chatml"})
    shown = run(tmp_path, "preprocess", cfg, capsys)
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n" \
           "[[red!<|im_end|>]]" in shown
    run(tmp_path, "train", cfg, capsys)
    assert (tmp_path / "out" / "final").is_dir()


def test_preference_shapes_train_dpo(base, tmp_path, capsys):
    """LLaMA-Factory's sharegpt pairs (once: "'chosen' must be a str or list, got dict") and OpenAI's preference
    rows, two sources of one run, train with method: dpo."""
    words = ("red", "green", "blue", "black")
    sharegpt = [{"conversations": [{"from": "human", "value": f"Say {w}."}], "chosen": {"from": "gpt", "value": f"{w}!"},
                 "rejected": {"from": "gpt", "value": "No."}} for w in words]
    openai = [{"input": {"messages": [{"role": "user", "content": f"Say {w}."}]},
               "preferred_output": [{"role": "assistant", "content": f"{w}!"}],
               "non_preferred_output": [{"role": "assistant", "content": "No."}]} for w in words]
    cfg = config(base, tmp_path, sharegpt, "preference", method="dpo", adapter={"r": 4})
    (tmp_path / "openai.jsonl").write_text(jsonl(openai))
    cfg["data"]["train"].append({"path": str(tmp_path / "openai.jsonl"), "format": "preference"})
    out = run(tmp_path, "preprocess", cfg, capsys)
    assert "train items: 8" in out and "[[red!" in out
    run(tmp_path, "train", cfg, capsys)
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()
