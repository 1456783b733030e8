"""POST /v1/fine_tuning/alpha/graders/{validate,run}: the routes call tunelab.graders (GRADERS_API.md) and answer
bad graders in OpenAI's error shape.

Until the graders package is merged, `StubGradersForRouteTests` stands in for it (a string_check eq grader and the
python-needs---allow-code rule, enough to exercise the routes); with the real package installed the same tests run
against it."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
from fastapi.testclient import TestClient

from tunelab.config import UserError

STRING_CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}", "operation": "eq"}


def _stub_graders_for_route_tests() -> types.ModuleType:
    stub = types.ModuleType("tunelab.graders")
    stub.__doc__ = "StubGradersForRouteTests: NOT the graders package; only what the route tests need."

    class GraderError(UserError):
        pass

    def validate(grader, *, allow_code=False):
        if grader.get("type") not in ("string_check", "python"):
            raise GraderError(f"grader.type: unknown grader type {grader.get('type')!r}")
        if grader["type"] == "python" and not allow_code:
            raise GraderError("grader.source: a python grader runs code; it needs the operator's --allow-code")
        if grader["type"] == "string_check" and grader.get("operation") not in ("eq", "ne", "like", "ilike"):
            raise GraderError(f"grader.operation: unknown operation {grader.get('operation')!r}")

    def run(grader, sample, item, *, allow_code=False, judge=None):
        validate(grader, allow_code=allow_code)
        reference = item[grader["reference"].removeprefix("{{item.").removesuffix("}}")]
        reward = float(sample["output_text"] == reference)
        return {"reward": reward, "metadata": {}, "sub_rewards": {}, "model_grader_token_usage_per_model": {}}

    stub.GraderError, stub.validate, stub.run = GraderError, validate, run
    return stub


@pytest.fixture
def client(tmp_path, monkeypatch):
    if importlib.util.find_spec("tunelab.graders") is None:
        import tunelab

        stub = _stub_graders_for_route_tests()
        monkeypatch.setitem(sys.modules, "tunelab.graders", stub)
        monkeypatch.setattr(tunelab, "graders", stub, raising=False)
    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    return TestClient(create_app(ServeSettings(home=tmp_path / "home")))  # no lifespan: no scheduler needed


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
