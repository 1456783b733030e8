"""POST /v1/fine_tuning/alpha/graders/{validate,run}: the routes call tunelab.graders and answer bad graders in
OpenAI's error shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tunelab.serve.registry import Registry

STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}


@pytest.fixture
def client(tmp_path):
    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    return TestClient(create_app(ServeSettings(home=tmp_path / "home")), base_url="http://127.0.0.1:8321")  # no lifespan: no scheduler needed


def test_run_and_validate_a_string_check_grader(client):
    ok = client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": STRING_CHECK})
    assert ok.status_code == 200 and ok.json() == {"grader": STRING_CHECK}
    for sample, reward in (("42", 1.0), ("41", 0.0)):
        result = client.post("/v1/fine_tuning/alpha/graders/run",
                             json={"grader": STRING_CHECK, "model_sample": sample, "item": {"answer": "42"}}).json()
        assert result["reward"] == reward and {"metadata", "sub_rewards"} <= set(result)


def test_bad_graders_answer_in_openai_error_shape(client):
    bad = client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": {**STRING_CHECK, "operation": "eqq"}})
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "grader" and error["code"] == "invalid_grader"
    assert "operation" in error["message"]
    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    refused = client.post("/v1/fine_tuning/alpha/graders/run", json={"grader": python, "model_sample": "x"})
    assert refused.status_code == 400 and "--allow-code" in refused.json()["error"]["message"]
    missing = client.post("/v1/fine_tuning/alpha/graders/run", json={"grader": STRING_CHECK})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model_sample"


def _reinforcement_request(tmp_path):
    """A settings/store pair with one served base model and an uploaded reinforcement file of 12 rows."""
    import json

    from tunelab.serve.openai_spec import FineTuneRequest
    from tunelab.serve.settings import ServeSettings
    from tunelab.serve.store import SQLiteStore

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    rows = tmp_path / "rft.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(12)))
    settings = ServeSettings(home=tmp_path / "home", models={"base": base})
    store = SQLiteStore(tmp_path / "home" / "tunelab.db")
    store.add_file({"id": "file-r", "filename": "rft.jsonl", "path": str(rows), "bytes": 1, "rows": 12,
                    "format": "prompt", "created_at": 0.0, "purpose": "fine-tune"})
    req = FineTuneRequest.model_validate({"model": "base", "training_file": "file-r", "seed": 1, "method": {
        "type": "reinforcement", "reinforcement": {"grader": STRING_CHECK, "hyperparameters": {"batch_size": 4}}}})
    return req, settings, store


def test_reinforcement_maps_to_grpo_with_the_grader(client, tmp_path, monkeypatch):
    """The config a reinforcement job asks for, before tunelab's config validation: method grpo, the grader as
    grpo.graders, the chosen hyperparameters."""
    from tunelab.serve import openai_spec

    req, settings, store = _reinforcement_request(tmp_path)
    seen = {}
    monkeypatch.setattr(openai_spec, "_config", lambda raw, merge_from: seen.setdefault("raw", raw) and None)
    monkeypatch.setattr(openai_spec, "code_keys", lambda cfg: [])
    monkeypatch.setattr(openai_spec, "with_judge", lambda cfg, settings, registry: cfg)
    _, record = openai_spec.build_openai_config(req, settings, store, tmp_path / "run", "ftjob-x",
                                                Registry(settings, store))
    raw = seen["raw"]
    assert raw["method"] == "grpo" and raw["grpo"] == {"group_size": 4, "graders": [STRING_CHECK], "max_new_tokens": 64}
    assert raw["data"]["train"][0]["format"] == "prompt"
    assert raw["train"]["grad_accum"] * raw["train"]["micro_batch_size"] == 4
    assert raw["train"]["epochs"] == 9 and raw["train"]["lr"] == 0.5 * 2e-4  # auto: ceil(100 / 12), 0.5 x 2e-4
    assert record["hyperparameters"] == {"n_epochs": 9, "batch_size": 4, "learning_rate_multiplier": 0.5,
                                         "compute_multiplier": 1.0, "eval_interval": 3, "eval_samples": 1,
                                         "reasoning_effort": "default"}


def test_reinforcement_config_validates(client, tmp_path):
    from tunelab.serve import openai_spec

    req, settings, store = _reinforcement_request(tmp_path)
    cfg, _ = openai_spec.build_openai_config(req, settings, store, tmp_path / "run", "ftjob-x",
                                             Registry(settings, store))
    assert cfg.method == "grpo" and cfg.grpo.graders == [STRING_CHECK]
