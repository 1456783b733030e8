"""axolotl and LLaMA-Factory configs: the peers' own example files (tests/data/peer_configs, with their licences)
convert, map as the peers document their keys, refuse what tunelab cannot honour, and train on the tiny model with
each example's dataset replaced by a local file of the same format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tiny import make_base_model, run_cli
from tunelab.config import UserError, load_config
from tunelab.interop import convert_to_yaml, load

PEERS = Path(__file__).parent / "data" / "peer_configs"
AXOLOTL = sorted(p.name for p in (PEERS / "axolotl").glob("*.y*ml"))
LLAMAFACTORY = sorted(p.name for p in (PEERS / "llamafactory").glob("*.yaml"))
# What each refused example asks for that tunelab cannot do, and the key the refusal must name.
REFUSED = {"tiny-llama__pretrain.yml": "pretraining_dataset",  # a streamed Hub dataset
           "train_lora__qwen3vl_lora_sft.yaml": "image_max_pixels",  # a vision-language model
           "train_lora__qwen3_lora_sft_ray.yaml": "dataset"}  # dataset_dir REMOTE:... (a Hub repo)
# Trained for one step: every example that converts, except fft-8b (its paged_adamw_8bit is CUDA only) and the gptq
# one (it needs a GPTQ checkpoint; its keys and data are qwen3_lora_sft's, which trains).
TRAINED = {"llama-3__lora-1b.yml", "llama-3__qlora-1b.yml", "llama-3__instruct-lora-8b.yml", "gemma2__qlora.yml",
           "llama-3__instruct-dpo-lora-8b.yml", "mistral__orpo__mistral-qlora-orpo.yml", "llama-3__qlora-1b-kto.yaml",
           "gemma2__reward-model.yaml", "mistral__lora.yml", "mistral__qlora.yml", "mistral__dpo__mistral-dpo-qlora.yml",
           "train_lora__qwen3_lora_sft.yaml", "train_lora__qwen3_lora_dpo.yaml", "train_lora__qwen3_lora_kto.yaml",
           "train_lora__qwen3_lora_pretrain.yaml", "train_lora__qwen3_lora_sft_ds3.yaml",
           "train_qlora__qwen3_lora_sft_otfq.yaml", "train_qlora__qwen3_lora_sft_bnb_npu.yaml",
           "train_lora__qwen3_lora_reward.yaml", "train_full__qwen3_full_sft.yaml"}


def say_nothing(line: str) -> None:
    pass


@pytest.fixture
def lf_dir(tmp_path, monkeypatch):
    """LLaMA-Factory reads dataset_dir (default data/) from the working directory."""
    (tmp_path / "data").mkdir()
    shutil.copy(PEERS / "llamafactory" / "dataset_info.json", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", AXOLOTL)
def test_axolotl_examples_convert(name, tmp_path):
    _converts_or_refused(PEERS / "axolotl" / name, "axolotl")


@pytest.mark.parametrize("name", LLAMAFACTORY)
def test_llamafactory_examples_convert(name, lf_dir):
    _converts_or_refused(PEERS / "llamafactory" / name, "LLaMA-Factory")


def _converts_or_refused(path: Path, tool: str) -> None:
    """A file listed in REFUSED is refused naming its key; any other: `tunelab convert` writes YAML that loads to the
    config `tunelab train` would use, one comment per source key."""
    if path.name in REFUSED:
        with pytest.raises(UserError, match=f"{tool} key '{REFUSED[path.name]}'"):
            load(path, say=say_nothing)
        return
    notes = []
    direct = load(path, say=notes.append)
    text = convert_to_yaml(path)
    assert load_config(data=yaml.safe_load(text)) == direct
    source = yaml.safe_load(path.read_text())
    mentioned = [k for k in source if f"# {k}" in text or f"; {k}" in text or f" {k}:" in text or f" {k} unset" in text]
    assert set(source) - set(mentioned) <= {k for k, v in source.items() if v in (None, False, "", [], {})}
    assert notes[0].startswith(f"{path}: read as a")


def test_axolotl_keys_map_as_axolotl_documents_them():
    """Values from the files, defaults from axolotl's schema (src/axolotl/utils/schemas/: lora_dropout 0.0,
    micro_batch_size 1, num_epochs 1.0; lora_target_linear -> every linear layer; load_in_4bit / adapter qlora ->
    NF4 (its bnb config); adamw_bnb_8bit -> bitsandbytes AdamW8bit)."""
    qlora = load(PEERS / "axolotl" / "llama-3__qlora-1b.yml", say=say_nothing)
    assert (qlora.model.path, qlora.model.quantize) == ("NousResearch/Llama-3.2-1B", "nf4")
    assert (qlora.adapter.r, qlora.adapter.alpha, qlora.adapter.dropout) == (32, 16, 0.05)
    assert qlora.adapter.target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert qlora.data.train[0].format == "alpaca"
    assert (qlora.data.max_length, qlora.data.packing, qlora.data.eval_fraction) == (2048, True, 0.1)
    assert (qlora.train.micro_batch_size, qlora.train.grad_accum, qlora.train.epochs) == (2, 4, 1)
    assert (qlora.train.optimizer, qlora.train.scheduler, qlora.train.lr, qlora.train.warmup_ratio) == (
        "adamw_8bit", "cosine", 2e-4, 0.1)
    assert qlora.train.gradient_checkpointing and qlora.output_dir == "./outputs/qlora-out"
    assert qlora.data.template == "alpaca"  # type: alpaca renders Alpaca's prompt, whatever the tokenizer has

    dpo = load(PEERS / "axolotl" / "llama-3__instruct-dpo-lora-8b.yml", say=say_nothing)
    assert (dpo.method, dpo.adapter.target_modules, dpo.data.template) == ("dpo", "all-linear", "llama3")
    assert dpo.data.train[0].format == "preference" and dpo.data.train[0].columns == {"messages": "conversation"}
    assert dpo.model.quantize is None  # load_in_8bit: no 8-bit base in tunelab (noted)

    gemma = load(PEERS / "axolotl" / "gemma2__qlora.yml", say=say_nothing)
    source = gemma.data.train[0]
    assert (source.format, source.columns, source.message_keys) == (
        "chat", {"messages": "conversations"}, {"role": "from", "content": "value"})
    assert source.roles["human"] == "user" and source.roles["gpt"] == "assistant"  # axolotl's default roles

    kto = load(PEERS / "axolotl" / "llama-3__qlora-1b-kto.yaml", say=say_nothing)
    assert (kto.method, kto.kto.beta, kto.kto.desirable_weight) == ("kto", 0.5, 0.2)
    orpo = load(PEERS / "axolotl" / "mistral__orpo__mistral-qlora-orpo.yml", say=say_nothing)
    assert (orpo.method, orpo.orpo.beta, orpo.data.template) == ("orpo", 0.1, "chatml")
    reward = load(PEERS / "axolotl" / "gemma2__reward-model.yaml", say=say_nothing)
    assert (reward.method, reward.adapter, reward.train.precision) == ("reward", None, "bf16")


def test_llamafactory_keys_map_as_llamafactory_documents_them(lf_dir):
    """LLaMA-Factory's defaults (src/llamafactory/hparams/finetuning_args.py: lora_alpha None -> 2 x lora_rank,
    lora_dropout 0, lora_target all; pref_beta 0.1) and the dataset_info.json entries' formats."""
    sft = load(PEERS / "llamafactory" / "train_lora__qwen3_lora_sft.yaml", say=say_nothing)
    assert (sft.adapter.r, sft.adapter.alpha, sft.adapter.dropout, sft.adapter.target_modules) == (8, 16, 0, "all-linear")
    assert [(s.path, s.format) for s in sft.data.train] == [("data/identity.json", "alpaca"),
                                                          ("data/alpaca_en_demo.json", "alpaca")]
    assert (sft.data.template, sft.data.max_length, sft.data.packing) == ("chatml", 2048, False)
    assert (sft.train.micro_batch_size, sft.train.grad_accum, sft.train.lr, sft.train.epochs) == (1, 8, 1e-4, 3)
    assert (sft.train.scheduler, sft.train.warmup_ratio, sft.train.precision) == ("cosine", 0.1, "bf16")
    assert sft.train.gradient_checkpointing  # LLaMA-Factory checkpoints unless disable_gradient_checkpointing

    dpo = load(PEERS / "llamafactory" / "train_lora__qwen3_lora_dpo.yaml", say=say_nothing)
    assert (dpo.method, dpo.dpo.loss, dpo.dpo.beta, dpo.train.lr) == ("dpo", "sigmoid", 0.1, 5e-6)
    assert dpo.data.train[0].format == "preference"
    kto = load(PEERS / "llamafactory" / "train_lora__qwen3_lora_kto.yaml", say=say_nothing)
    assert kto.data.train[0].format == "kto" and kto.data.train[0].message_keys == {"from": "role", "value": "content"}
    assert (kto.train.micro_batch_size, kto.train.grad_accum) == (2, 4)  # the same 8 rows per step
    pretrain = load(PEERS / "llamafactory" / "train_lora__qwen3_lora_pretrain.yaml", say=say_nothing)
    assert (pretrain.method, pretrain.data.train[0].format, pretrain.data.packing) == ("pretrain", "text", True)
    reward = load(PEERS / "llamafactory" / "train_lora__qwen3_lora_reward.yaml", say=say_nothing)
    assert reward.method == "reward"
    qlora = load(PEERS / "llamafactory" / "train_qlora__qwen3_lora_sft_bnb_npu.yaml", say=say_nothing)
    assert (qlora.model.quantize, qlora.model.double_quant) == ("nf4", False)
    full = load(PEERS / "llamafactory" / "train_full__qwen3_full_sft.yaml", say=say_nothing)
    assert (full.adapter, full.train.distributed) == (None, "fsdp")  # deepspeed ZeRO-3 -> FSDP (noted)


@pytest.mark.parametrize("key, value, named", [
    ("rl", "grpo", "rl"), ("adapter", "ia3", "adapter"), ("optimizer", "lion_8bit", "optimizer"),
    ("chat_template", "cohere", "chat_template"), ("relora", True, "relora"), ("made_up_key", 3, "made_up_key"),
])
def test_axolotl_refuses_what_it_cannot_honour(tmp_path, key, value, named):
    data = yaml.safe_load((PEERS / "axolotl" / "llama-3__lora-1b.yml").read_text()) | {key: value}
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("train", str(path))
    assert result.returncode == 2 and f"axolotl key '{named}'" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- training on local files of the same format

def rows(kind: str, n: int = 8) -> list[dict]:
    """Rows in the shape of each example's dataset (its Hub dataset card / LLaMA-Factory's data/ demo files)."""
    qa = [(f"What is {i} plus {i}?", f"{2 * i}") for i in range(n)]
    if kind == "alpaca":  # tatsu-lab/alpaca, teknium/GPT4-LLM-Cleaned, LLaMA-Factory alpaca_en_demo / identity
        return [{"instruction": q, "input": "", "output": a} for q, a in qa]
    if kind == "messages":  # fozziethebeat/alpaca_messages_2k_test
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
    if kind == "conversations":  # cgato/SlimOrcaDedupCleaned
        return [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q},
                                   {"from": "gpt", "value": a}]} for q, a in qa]
    if kind == "dpo_messages":  # fozziethebeat/alpaca_messages_2k_dpo_test
        return [{"conversation": [{"role": "user", "content": q}], "chosen": {"role": "assistant", "content": a},
                 "rejected": {"role": "assistant", "content": a + "0"}} for q, a in qa]
    if kind == "argilla":  # argilla/ultrafeedback-binarized-preferences-cleaned
        return [{"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                 "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": a + "0"}]}
                for q, a in qa]
    if kind == "kto_ultra":  # argilla/ultrafeedback-binarized-preferences-cleaned-kto
        return [{"prompt": q, "completion": a if i % 2 else a + "0", "label": bool(i % 2)} for i, (q, a) in enumerate(qa)]
    if kind == "intel":  # argilla/distilabel-intel-orca-dpo-pairs
        return [{"system": "Be brief.", "input": q, "chosen": a, "rejected": a + "0"} for q, a in qa]
    if kind == "lf_dpo":  # LLaMA-Factory data/dpo_en_demo.json
        return [{"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": a},
                 "rejected": {"from": "gpt", "value": a + "0"}} for q, a in qa]
    if kind == "lf_kto":  # LLaMA-Factory data/kto_en_demo.json
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                 "label": bool(i % 2)} for i, (q, a) in enumerate(qa)]
    if kind == "text":  # LLaMA-Factory data/c4_demo.jsonl
        return [{"text": f"{q} It is {a}."} for q, a in qa]
    raise ValueError(kind)


AXOLOTL_DATA = {"llama-3__lora-1b.yml": "alpaca", "llama-3__qlora-1b.yml": "alpaca", "mistral__lora.yml": "alpaca",
                "mistral__qlora.yml": "alpaca", "llama-3__instruct-lora-8b.yml": "messages",
                "gemma2__qlora.yml": "conversations", "llama-3__instruct-dpo-lora-8b.yml": "dpo_messages",
                "mistral__dpo__mistral-dpo-qlora.yml": "dpo_messages", "mistral__orpo__mistral-qlora-orpo.yml": "argilla",
                "llama-3__qlora-1b-kto.yaml": "kto_ultra", "gemma2__reward-model.yaml": "intel"}
LF_DATA = {"identity.json": "alpaca", "alpaca_en_demo.json": "alpaca", "dpo_en_demo.json": "lf_dpo",
           "kto_en_demo.json": "lf_kto", "c4_demo.jsonl": "text"}


def write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items) if path.suffix == ".jsonl" else json.dumps(items))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)


@pytest.mark.parametrize("name", [n for n in AXOLOTL if n in TRAINED])
def test_axolotl_example_trains(name, base, tmp_path):
    data = yaml.safe_load((PEERS / "axolotl" / name).read_text())
    local = write(tmp_path / "data.jsonl", rows(AXOLOTL_DATA[name]))
    data["datasets"][0]["path"] = str(local)
    _train(data, base, tmp_path, {"base_model": str(base), "sequence_len": 256, "max_steps": 1, "micro_batch_size": 2,
                                  "output_dir": str(tmp_path / "out"), "val_set_size": 0, "gradient_accumulation_steps": 1},
           "axolotl.yml")


@pytest.mark.parametrize("name", [n for n in LLAMAFACTORY if n in TRAINED])
def test_llamafactory_example_trains(name, base, tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(PEERS / "llamafactory" / "dataset_info.json", tmp_path / "data")
    for file, kind in LF_DATA.items():
        write(tmp_path / "data" / file, rows(kind))
    data = yaml.safe_load((PEERS / "llamafactory" / name).read_text())
    _train(data, base, tmp_path, {"model_name_or_path": str(base), "cutoff_len": 256, "max_steps": 1,
                                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                  "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"),
                                  "deepspeed": None}, "llamafactory.yaml")


def for_tiny(data: dict, replace: dict) -> dict:
    """A peer example with `replace` applied, made to run on the tiny CPU model: fp32, and family templates as
    chatml (the tiny tokenizer has ChatML's tokens but not llama3's / gemma's). Also used by test_interop_service."""
    template_key = "chat_template" if "base_model" in data else "template"
    if template_key in data:
        replace = {**replace, template_key: "chatml"}
    return {**data, **replace, "bf16": False, "fp16": False}


def _train(data: dict, base: Path, tmp_path: Path, replace: dict, file: str) -> None:
    """The example with its model, data, length and step count replaced, trained for one step (in this process:
    the CLI's own path, `tunelab.interop.load`, is what `tunelab train` calls)."""
    from tunelab.training.loop import train

    path = tmp_path / file
    path.write_text(yaml.safe_dump(for_tiny(data, replace), sort_keys=False))
    cfg = load(path, ["log.tensorboard=false", "log.plot=false", "train.progress=false", "train.eval_every=null",
                      "train.save_every=null"], say=say_nothing)
    final = train(cfg, say=say_nothing)
    assert final == tmp_path / "out" / "final" and final.is_dir()


def test_axolotl_drop_system_message_drops_the_leading_system_turn(base, tmp_path, capsys):
    """gemma2__qlora.yml sets drop_system_message on chat_template rows that open with a system turn. axolotl
    (prompt_strategies/chat_template.py, get_conversation_thread) drops turns[0] when it is a system one: the
    tokens must be those of the same rows with that turn removed by hand; without the key it is rendered."""
    from tunelab.cli import main as cli_main

    data = yaml.safe_load((PEERS / "axolotl" / "gemma2__qlora.yml").read_text())
    with_system = rows("conversations")
    by_hand = [{"conversations": r["conversations"][1:]} for r in with_system]
    shown = {}
    for name, items, drop in (("dropped", with_system, True), ("by_hand", by_hand, False),
                              ("kept", with_system, False)):
        entry = {**data["datasets"][0], "path": str(write(tmp_path / f"{name}.jsonl", items)),
                 "drop_system_message": drop}
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(for_tiny(data, {"base_model": str(base), "datasets": [entry],
                                                       "sample_packing": False, "output_dir": str(tmp_path / name)})))
        assert cli_main(["preprocess", str(path), "--show", "8", "--json"]) == 0
        shown[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(shown["dropped"]) == 8
    assert [s["input_ids"] for s in shown["dropped"]] == [s["input_ids"] for s in shown["by_hand"]]
    assert [s["labels"] for s in shown["dropped"]] == [s["labels"] for s in shown["by_hand"]]
    assert all("Be brief." not in s["text"] for s in shown["dropped"])
    assert all("<|im_start|>system\nBe brief.<|im_end|>" in s["text"] for s in shown["kept"])


def test_drop_system_follows_axolotl_for_a_system_column():
    """axolotl opens the conversation with the row's `system` field unless the first turn is a system one, then
    drops the opening system turn: no leading system message is left either way; a later one stays."""
    from tunelab.config import DataSource
    from tunelab.data.columns import remap

    source = DataSource(path="x.jsonl", format="sharegpt", drop_system=True)
    turns = [{"from": "human", "value": "hi"}, {"from": "system", "value": "later"}, {"from": "gpt", "value": "yo"}]
    assert remap({"system": "s", "conversations": turns}, source) == {"conversations": turns}
    opened = [{"from": "system", "value": "first"}, *turns]
    assert remap({"system": "s", "conversations": opened}, source) == {"conversations": turns}
    kept = source.model_copy(update={"drop_system": False})
    assert remap({"conversations": opened}, kept) == {"conversations": opened}
