"""Model cards: every final/ and merged dir carries a README.md whose metadata huggingface_hub parses as the Hub
does (ModelCard.load; ModelCard.validate would ask the Hub's server, which tests cannot reach), with the method,
data, hyperparameters, eval table and loading code in the body. `tunelab push` is checked only up to the
huggingface_hub calls (HfApi monkeypatched): an upload needs the network and a token."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from tiny import config_dict, make_base_model, write_task_data
from tunelab.config import load_config
from tunelab.modeling.merging import merge
from tunelab.modelcard import write_model_card
from tunelab.training.loop import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = make_base_model(root, warm_steps=0)
    data = write_task_data(root / "train.jsonl", n=16)
    cfg = load_config(data=config_dict(base, data, root / "run", adapter={"r": 4, "alpha": 8},
                                       train={"max_steps": 1}))
    return train(cfg, say=lambda *a: None), cfg


def test_final_dir_has_a_card_the_hub_parses(lora_run):
    final, cfg = lora_run
    card = ModelCard.load(final / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"tunelab", "sft", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local path is not a Hub id: named in the body instead
    for text in ("## Method", "LoRA r=4, alpha=8", "## Data", "train.jsonl", "## Hyperparameters", "| learning rate | 0.001 |",
                 "AutoPeftModelForCausalLM"):
        assert text in card.text


def test_card_names_hub_base_and_datasets_and_the_eval_table(lora_run, tmp_path):
    _, cfg = lora_run
    hub_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "Qwen/Qwen2.5-0.5B"}),
                                     "data": cfg.data.model_copy(update={"train": [
                                         cfg.data.train[0].model_copy(update={"path": "tatsu-lab/alpaca"})]})})
    (tmp_path / "eval.json").write_text(json.dumps({"rows": 12, "perplexity": {"perplexity": 3.5},
                                                    "generation": {"exact_match": 0.25, "by_family": {}}}))
    card = ModelCard.load(write_model_card(tmp_path, hub_cfg, kind="merged"))
    meta = card.data.to_dict()
    assert (meta["base_model"], meta["datasets"], meta["library_name"]) == (
        "Qwen/Qwen2.5-0.5B", ["tatsu-lab/alpaca"], "transformers")
    assert "| perplexity perplexity | 3.5 |" in card.text and "| generation exact_match | 0.25 |" in card.text


def test_eval_adds_its_table_to_the_final_card(lora_run):
    from tunelab.evaluation import run_eval

    final, cfg = lora_run
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "data": cfg.data.train, "max_rows": 4, "metrics": ["perplexity"]})})
    report = run_eval(cfg, say=lambda *a: None)
    card = ModelCard.load(final / "README.md")
    assert "## Evaluation" in card.text and f"| perplexity perplexity | {report['perplexity']['perplexity']:.4g} |" in card.text


def test_merged_dir_has_a_card(lora_run, tmp_path):
    final, _ = lora_run
    out = merge(str(final), str(tmp_path / "merged"))
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "with its tuned adapter merged in" in card.text


def test_push_calls_the_hub_with_the_final_dir(lora_run, monkeypatch):
    """Offline: only the huggingface_hub calls are checked (HfApi replaced), not an upload."""
    import huggingface_hub

    from tunelab.hub import push

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", folder_path, repo_id))
            return "https://huggingface.co/me/tiny/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    final, _ = lora_run
    push(final.parent, "me/tiny", private=True, say=lambda *a: None)
    assert calls == [("create_repo", "me/tiny", True, True), ("upload_folder", str(final), "me/tiny")]
