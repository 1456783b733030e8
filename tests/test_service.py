"""The tuning service end to end: the managed-service client workflow against a `tunelab serve` process, cancel,
and bad requests (each a 4xx with a one-line message while a job keeps running and then finishes)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server, wait_for  # noqa: E402
from tiny import make_base_model, write_task_data  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    data = root / "data"
    base = make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)
    shutil.copytree(base, data / "models" / "tiny")  # a model dir clients may name by path (inside --data-root)
    write_task_data(data / "tasks-train.jsonl", n=32)
    write_task_data(data / "tasks-val.jsonl", n=8, seed=1)
    server = Server(root / "home", "--data-root", str(data), "--model", f"base={base}", "--max-retries", "1").start()
    yield {"server": server, "data": data, "root": root, "base": base}
    server.stop()


def api(env, method, path, **kw):
    return httpx.request(method, env["server"].url + path, timeout=60, **kw)


def assert_error(response, status, *words):
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    return message


def test_client_workflow_and_bad_requests(env):
    import tunelab
    from tunelab.client.tuning import sft

    tunelab.init(url=env["server"].url, api_key=None)
    job = sft.train(source_model="models/tiny", train_dataset="tasks-train.jsonl", validation_dataset="tasks-val.jsonl",
                    tuned_model_display_name="tiny-tasks-v1", epochs=2, batch_size=8)
    assert job.to_dict()["state"] == "JOB_STATE_PENDING" and job.to_dict()["progress"]["total_steps"] == 8
    bad_requests(env)  # while the job is queued or running: the server must keep serving it
    job.wait(poll=0.5, timeout=600)
    assert job.state == "JOB_STATE_SUCCEEDED", job.to_dict()
    assert job.has_ended and job.tuned_model_endpoint_name == "endpoints/tiny-tasks-v1"
    data = job.to_dict()
    assert data["progress"]["step"] == data["progress"]["total_steps"] == 8
    assert data["tuned_model"]["adapter"] and (Path(data["tuned_model"]["path"]) / "adapter_config.json").is_file()
    rows = api(env, "GET", f"/v1/tuningJobs/{job.id}/metrics").json()["metrics"]
    assert [r["step"] for r in rows] == list(range(1, 9)) and data["latest_metrics"]["loss"] == rows[-1]["loss"]
    # the trainer evaluated at the last step; `tunelab eval` ran after it and wrote eval.json
    assert data["best_metrics"]["eval_loss"] == rows[-1]["eval_loss"] == data["final_metrics"]["eval_loss"]
    report = json.loads((Path(data["tuned_model"]["path"]).parent / "eval.json").read_text())
    assert data["final_metrics"]["eval_exact_match"] == report["generation"]["score"]
    assert data["final_metrics"]["eval_perplexity"] == report["perplexity"]["perplexity"]
    endpoints = api(env, "GET", "/v1/endpoints").json()["endpoints"]
    assert [e["name"] for e in endpoints] == ["endpoints/tiny-tasks-v1"] and endpoints[0]["job_id"] == job.id
    events = api(env, "GET", f"/v1/tuningJobs/{job.id}/events").text  # ended: the stream replays and closes
    assert "event: metrics" in events and "JOB_STATE_RUNNING" in events and "JOB_STATE_SUCCEEDED" in events
    log = api(env, "GET", f"/v1/tuningJobs/{job.id}/logs", params={"tail": 30}).text
    assert "done at step 8/8" in log and log.rstrip().endswith("eval.json")  # training, then `tunelab eval`
    assert_error(api(env, "POST", f"/v1/tuningJobs/{job.id}:cancel"), 409, "already ended")
    with pytest.raises(tunelab.ServiceError, match="already used"):  # the endpoint name is taken
        sft.train(source_model="base", train_dataset="tasks-train.jsonl", tuned_model_display_name="tiny-tasks-v1")
    if importlib.util.find_spec("tunelab.serve.openai_api") is not None:  # service-serving's routes
        model = tunelab.GenerativeModel(job.tuned_model_endpoint_name)
        assert isinstance(model.generate_content("What is 12 + 30?", max_tokens=8).text, str)


def bad_requests(env):
    data, root = env["data"], env["root"]
    good = {"source_model": "base", "train_dataset": "tasks-train.jsonl"}
    cfg = {"model": {"path": "base"}, "data": {"train": [{"path": "tasks-train.jsonl", "format": "alpaca"}]}}
    (data / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                                    '{"instruction": "e"}\n')
    (root / "secret.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (data / "link.jsonl").symlink_to(root / "secret.jsonl")
    post = lambda body: api(env, "POST", "/v1/tuningJobs", json=body)  # noqa: E731
    before = len(api(env, "GET", "/v1/tuningJobs").json()["tuning_jobs"])

    assert_error(api(env, "POST", "/v1/tuningJobs", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "not valid JSON")
    assert_error(api(env, "POST", "/v1/tuningJobs", json=[1, 2]), 400, "JSON object")
    assert_error(post({**good, "epochs": 3}), 400, "unknown field 'epochs'")
    assert_error(post({"config": {**cfg, "train": {"lrr": 1}}}), 400, "unknown config key 'train.lrr'", "train.lr")
    assert_error(post({"config": {**cfg, "method": "sftt"}}), 400, "method")
    assert_error(post({**good, "train_dataset": "bad.jsonl"}), 400, "bad.jsonl:3", "output")
    assert_error(post({**good, "train_dataset": "../secret.jsonl"}), 400, "'..'")
    assert_error(post({**good, "train_dataset": "link.jsonl"}), 400, "outside")
    assert_error(post({**good, "train_dataset": str(root / "secret.jsonl")}), 400, "outside")
    assert_error(post({**good, "train_dataset": "nope.jsonl"}), 400, "not found")
    assert_error(post({**good, "source_model": "no-such-model"}), 400, "source_model", "not found")
    assert_error(post({**good, "source_model": "tasks-train.jsonl"}), 400, "not a model dir")
    assert_error(post({"train_dataset": "tasks-train.jsonl"}), 400, "source_model")
    assert_error(post({**good, "config": cfg}), 400, "either")
    assert_error(post({**good, "hyperparameters": {"epoch_count": -1}}), 400, "epoch_count")
    assert_error(post({**good, "hyperparameters": {"learning_rate_multiplier": "fast"}}), 400, "learning_rate_multiplier")
    assert_error(post({**good, "hyperparameters": {"adapter_size": 0}}), 400, "adapter_size")
    assert_error(post({**good, "hyperparameters": {"warmup": 3}}), 400, "unknown field", "warmup")
    assert_error(post({**good, "tuned_model_display_name": "no spaces/here"}), 400, "tuned_model_display_name")
    assert_error(post({**good, "train_dataset": "file-doesnotexist"}), 404, "file-doesnotexist")
    grpo = {"model": {"path": "base"}, "method": "grpo", "grpo": {"reward_function": "os:system"},
            "data": {"train": [{"path": "tasks-train.jsonl", "format": "prompt"}]}}
    assert_error(post({"config": grpo}), 403, "grpo.reward_function", "--allow-code")
    assert_error(post({"config": {**cfg, "model": {"path": "base", "trust_remote_code": True}}}), 403,
                 "trust_remote_code")
    assert_error(post({"config": {**cfg, "eval": {"scorer": "os:getcwd"}}}), 403, "eval.scorer")
    assert_error(post({"config": {**cfg, "output_dir": "/tmp/elsewhere"}}), 400, "output_dir", "outside")
    assert_error(api(env, "GET", "/v1/tuningJobs/job-nope"), 404, "job-nope")
    assert_error(api(env, "POST", "/v1/tuningJobs/job-nope:cancel"), 404, "job-nope")
    assert_error(api(env, "GET", "/v1/tuningJobs", params={"state": "DONE"}), 400, "unknown state", "JOB_STATE_")
    assert_error(api(env, "GET", "/v1/tuningJobs", params={"page_token": "garbage!"}), 400, "page_token")
    assert_error(api(env, "GET", "/v1/tuningJobs", params={"page_size": 0}), 400, "page_size")
    upload = lambda name, body, **kw: api(env, "POST", "/v1/files", files={"file": (name, body)}, **kw)  # noqa: E731
    assert_error(upload("rows.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                      b'{"role": "assistant", "content": "yo"}]}\n{"messages": []}\n'), 400,
                 "rows.jsonl:2", "empty")
    assert_error(upload("rows.exe", b"MZ"), 400, "unsupported file type")
    assert_error(upload("rows.jsonl", b'{"x": 1}\n'), 400, "cannot tell the data format")
    assert_error(api(env, "GET", "/v1/files/file-nope"), 404, "file-nope")

    # nothing above created a job; good requests still work
    assert len(api(env, "GET", "/v1/tuningJobs").json()["tuning_jobs"]) == before
    record = upload("ok.jsonl", (data / "tasks-train.jsonl").read_bytes()).json()
    assert record["format"] == "alpaca" and record["rows"] == 32
    assert api(env, "GET", "/v1/files").json()["data"][-1]["id"] == record["id"]
    gemini = upload("gemini.jsonl", gemini_rows(data / "tasks-train.jsonl")).json()  # the managed service's rows
    assert gemini["format"] == "gemini" and gemini["rows"] == 32 and gemini["id"].startswith("file-")
    env["gemini_file"] = gemini["id"]
    bad_turn = b'{"contents": [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "bot", "parts": [{"text": "x"}]}]}\n'
    two = b"".join(gemini_rows(data / "tasks-train.jsonl").splitlines(keepends=True)[:2])
    assert_error(upload("g.jsonl", two + bad_turn), 400, "g.jsonl:3", "contents[1]")
    page = api(env, "GET", "/v1/tuningJobs", params={"state": "JOB_STATE_PENDING", "page_size": 1}).json()
    assert len(page["tuning_jobs"]) <= 1


def gemini_rows(alpaca: Path) -> bytes:
    rows = [json.loads(line) for line in alpaca.read_text().splitlines()]
    return b"".join(json.dumps({
        "systemInstruction": {"role": "system", "parts": [{"text": "Answer briefly."}]},
        "contents": [{"role": "user", "parts": [{"text": r["instruction"]}]},
                     {"role": "model", "parts": [{"text": r["output"]}]}]}).encode() + b"\n" for r in rows)


def test_cancel_mid_job(env):
    cfg = {"model": {"path": "base"}, "adapter": {"r": 4},  # the uploaded gemini file, its format from the upload
           "data": {"train": [{"path": env["gemini_file"]}], "max_length": 64},
           "train": {"max_steps": 200, "micro_batch_size": 4, "grad_accum": 1, "eval_every": None, "save_every": None},
           "log": {"tensorboard": False, "plot": False}}
    job = api(env, "POST", "/v1/tuningJobs", json={"config": cfg}).json()
    with httpx.stream("GET", env["server"].url + f"/v1/tuningJobs/{job['id']}/events", timeout=900) as live:
        kinds = (line.removeprefix("event: ") for line in live.iter_lines() if line.startswith("event: "))
        assert "metrics" in kinds  # the live stream delivered the first step's metrics
    assert api(env, "POST", f"/v1/tuningJobs/{job['id']}:cancel").json()["state"] in (
        "JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED")
    done = wait_for(lambda: (j := api(env, "GET", f"/v1/tuningJobs/{job['id']}").json())["state"] in (
        "JOB_STATE_CANCELLED", "JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED") and j, what="the cancel")
    assert done["state"] == "JOB_STATE_CANCELLED" and done["tuned_model"] is None, done
    run_dir = Path(done["tuned_model"] or env["server"].home / "runs" / job["id"])
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "manifest.json").is_file()  # the trainer saved on SIGTERM
    assert 1 <= int(checkpoints[-1].name.split("-")[1]) < 200
    states = [json.loads(line.split("data: ", 1)[1])["state"] for line in
              api(env, "GET", f"/v1/tuningJobs/{job['id']}/events").text.splitlines()
              if line.startswith("data: ") and '"state": "JOB_STATE_' in line and '"name"' in line]
    assert states[-2:] == ["JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED"]


def test_child_that_dies_fails_with_its_error_or_retries(env):
    models = env["data"] / "models"
    for name, weights in (("pickled", "pytorch_model.bin"), ("broken", "model.safetensors")):
        shutil.copytree(models / "tiny", models / name, ignore=shutil.ignore_patterns("*.safetensors"))
        (models / name / weights).write_bytes(b"not weights")
    jobs = [api(env, "POST", "/v1/tuningJobs", json={"source_model": f"models/{name}",
                                                      "train_dataset": "tasks-train.jsonl"}).json()
            for name in ("pickled", "broken")]
    pickled, broken = (wait_for(lambda: (j := api(env, "GET", f"/v1/tuningJobs/{job['id']}").json())["state"] in (
        "JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED") and j, what="the failing job") for job in jobs)
    # a user error (exit 2) fails the same way again: no retry; its one error line is the job's error
    assert pickled["state"] == "JOB_STATE_FAILED" and pickled["attempt"] == 1
    assert pickled["error"]["message"].startswith("error: ") and "pickle" in pickled["error"]["message"]
    # any other death is retried (--max-retries 1) and then reported with the process's last line
    assert broken["state"] == "JOB_STATE_FAILED" and broken["attempt"] == 2, broken
    assert "exited with code" in broken["error"]["message"] and "\n" not in broken["error"]["message"]


def test_jobs_command_line(env, capsys, tmp_path):
    from tunelab.cli import main

    url = ["--url", env["server"].url]
    assert main(["jobs", *url, "list"]) == 0
    listed = capsys.readouterr().out
    assert "SUCCEEDED" in listed and "tiny-tasks-v1" in listed
    job_id = next(line.split()[0] for line in listed.splitlines() if "tiny-tasks-v1" in line)
    assert main(["jobs", *url, "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id
    assert main(["jobs", *url, "logs", job_id, "--tail", "1"]) == 0
    assert capsys.readouterr().out.startswith("written: ")
    request = tmp_path / "req.yaml"
    request.write_text("source_model: base\ntrain_dataset: nope.jsonl\n")
    assert main(["jobs", *url, "submit", str(request)]) == 2
    assert "train_dataset: not found: nope.jsonl" in capsys.readouterr().err
    assert main(["jobs", *url, "cancel", "job-nope"]) == 2 and "no tuning job" in capsys.readouterr().err
    assert main(["jobs", "--url", "http://127.0.0.1:9", "list"]) == 2 and "cannot reach" in capsys.readouterr().err


def test_api_key_and_size_limits(tmp_path):
    from fastapi.testclient import TestClient

    from tunelab.serve.app import create_app
    from tunelab.serve.settings import ServeSettings

    app = create_app(ServeSettings(home=tmp_path / "home", api_key="s3cret", max_body_mb=0.001, max_upload_mb=0.002))
    client = TestClient(app, base_url="http://127.0.0.1:8321")  # no lifespan: no scheduler needed for these
    assert_error(client.get("/v1/tuningJobs"), 401, "missing API key")
    assert_error(client.get("/v1/tuningJobs", headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
    assert_error(client.get("/v1/endpoints", headers={"X-API-Key": "s3cre"}), 401, "invalid API key")
    assert client.get("/v1/tuningJobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/files", headers={"X-API-Key": "s3cret"}).status_code == 200
    client.cookies.set("tunelab_api_key", "s3cret")
    assert client.get("/v1/endpoints").status_code == 200
    assert TestClient(app, base_url="http://localhost").get("/healthz").status_code == 200  # no data behind it
    big = {"source_model": "x" * 2000, "train_dataset": "y"}
    assert_error(client.post("/v1/tuningJobs", json=big), 413, "limit of 0.001 MB")
    chunks = (b'{"source_model": "' + b"x" * 600 for _ in range(3))  # no Content-Length: counted as it arrives
    assert_error(client.post("/v1/tuningJobs", content=chunks, headers={"content-type": "application/json"}), 413)
    rows = b'{"text": "' + b"a" * 3000 + b'"}\n'
    assert_error(client.post("/v1/files", files={"file": ("big.jsonl", rows)}), 413, "0.002 MB")
    assert client.app.state.registry.resolve("no-such-model") is None


def test_serve_refuses_public_host_without_key(tmp_path, capsys):
    from tunelab.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--home", str(tmp_path / "h")]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--max-jobs", "0", "--home", str(tmp_path / "h")]) == 2
    assert "--max-jobs must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", "justaname", "--home", str(tmp_path / "h")]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
