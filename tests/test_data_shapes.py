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
    sections["train"] = {"max_steps": 1, **sections.get("train", {})}
    cfg = config_dict(base, data, tmp / "out", **sections)
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


# A compact chat template with its own tool support (the Jinja path: tools= and tool_calls as transformers passes
# them), so that a tiny model's sequences stay short; test_tools.py checks the built-in tool format against Qwen 2.5's
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.tool_calls %}{{ m.tool_calls[0].function | tojson }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tool_calls_train_and_generate_parses_the_call(base, tmp_path, capsys):
    """LLaMA-Factory's sharegpt tool rows (once: "conversations[1] needs 'from' in ['human', 'gpt', 'system'], got
    'function_call'") train; preprocess shows loss on the call and the reply, not on the tool output; `generate
    --tools` prints each reply as JSON {content, tool_calls} (parsing itself: test_tools.py)."""
    weather = {"name": "get_weather"}
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    row = {"tools": json.dumps([weather]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    cfg = config(base, tmp_path, [row] * 4, "sharegpt", data={"template": TOOL_TEMPLATE, "max_length": 256},
                 train={"max_steps": 1})
    shown = run(tmp_path, "preprocess", cfg, capsys)
    assert '[[{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>' in shown
    assert "<|im_start|>tool\nsunny<|im_end|>" in shown and "[[Sunny.<|im_end|>" in shown
    assert "sunny<|im_end|>]]" not in shown and "[[sunny" not in shown
    run(tmp_path, "train", cfg, capsys)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": weather}]))
    code = cli_main(["generate", str(tmp_path / "out"), "--tools", str(tools), "--prompt", "Weather in Paris?",
                     "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert code == 0, out.err
    reply = json.loads(out.out.strip().splitlines()[-1])
    assert set(reply) == {"content", "tool_calls"} and isinstance(reply["tool_calls"], list)


def test_generate_tools_file_errors(base, tmp_path, capsys):
    bad = tmp_path / "tools.json"
    for content, message in (("[{", f"{bad}:1: invalid JSON"), ('{"name": "f"}', f"{bad}: 'tools' must be a list"),
                             ('[{"description": "x"}]', f"{bad}: tools[0] must be a function schema")):
        bad.write_text(content)
        assert cli_main(["generate", str(base), "--tools", str(bad), "--prompt", "hi"]) == 2
        assert message in capsys.readouterr().err
