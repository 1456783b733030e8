"""Model graders (score_model, label_model) and their judge.

- On `tunelab serve` the judge is the server's own engine: /v1/fine_tuning/alpha/graders/run must give the reward
  that the same rendered messages, sent to /v1/chat/completions, parse to (OpenAI's documented reading: the score
  clamped to the range; the label in passing_labels or not). The judge is a tiny model trained here to answer
  "0" for a fruit and "1" for anything else, so the rendered template decides the reward.
- A reinforcement job with a model grader runs end to end through the official `openai` client; the server hands
  its API key to the job, whose trainer asks the server over HTTP.
- The trainer's side against a recording fake OpenAI-compatible judge: the rendered template, the sampling
  params and the key reach it, and its scores are the logged rewards, step by step. An unreachable judge stops
  the run with one line; a model grader without grpo.judge_endpoint is refused before any model loads.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server, free_port  # noqa: E402
from test_openai_ft import migration_script, run_dir, write_jsonl  # noqa: E402
from tiny import config_dict, make_base_model, run_cli  # noqa: E402

from tunelab import tasks  # noqa: E402

KEY = "judge-test-key"
FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "lemon"]
SCORE = {"type": "score_model", "name": "not_fruit", "model": "judge", "range": [0, 1],
         "input": [{"role": "user", "content": "Is it a {{item.kind}}? {{sample.output_text}}"}],
         "sampling_params": {"temperature": 0, "max_completions_tokens": 4}}
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")


def train_judge(root: Path, base: Path) -> Path:
    """Full fine-tuning of the tiny base: "Is it a fruit? W" -> "0" for a fruit, "1" for task words."""
    from tunelab.config import load_config
    from tunelab.training.loop import train

    items, _ = tasks.split_items(48, 0, seed=11)
    words = [(w, "0") for w in FRUITS] * 6 + [(i["answer"], "1") for i in items] + [(i["prompt"], "1")
                                                                                  for i in items[:24]]
    data = write_jsonl(root / "judge.jsonl", [{"messages": [{"role": "user", "content": f"Is it a fruit? {w}"},
                                                            {"role": "assistant", "content": a}]} for w, a in words])
    cfg = config_dict(base, data, root / "judge-run", data={"train": [{"path": str(data), "format": "chat"}]},
                      train={"max_steps": 80, "lr": 3e-3, "micro_batch_size": 16})
    return train(load_config(data=cfg), say=lambda *a: None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    warm = make_base_model(tmp_path_factory.mktemp("warm"))
    judge = train_judge(root, warm)
    server = Server(root / "home", "--model", f"judge={judge}", "--model", f"warm={warm}", "--api-key", KEY).start()
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    yield {"server": server, "client": client, "root": root, "warm": warm}
    server.stop()


def chat_reference(client, grader: dict, sample: str, item: dict) -> str:
    """The judge's reply to the grader's messages rendered by hand, asked on /v1/chat/completions."""
    messages = [{"role": m["role"], "content": m["content"].replace("{{item.kind}}", item["kind"])
                 .replace("{{sample.output_text}}", sample)} for m in grader["input"]]
    params = grader.get("sampling_params", {})
    reply = client.chat.completions.create(model=grader["model"], messages=messages,
                                           temperature=params.get("temperature"), seed=params.get("seed"),
                                           max_completion_tokens=params.get("max_completions_tokens"))
    return reply.choices[0].message.content


def test_score_model_reward_is_the_judges_reply_on_chat_completions(served):
    client = served["client"]
    rewards = {}
    for sample in ("apple", "stone", "mango", "violin"):
        result = client.fine_tuning.alpha.graders.run(grader=SCORE, model_sample=sample, item={"kind": "fruit"})
        reply = chat_reference(client, SCORE, sample, {"kind": "fruit"})
        expected = min(max(float(NUMBER.findall(reply)[-1]), 0.0), 1.0)  # the last number, clamped to range
        assert result.reward == expected and not result.metadata.errors.model_grader_parse_error, (sample, reply)
        assert result.metadata.sampled_model_name == "judge"
        rewards[sample] = result.reward
    assert rewards == {"apple": 0.0, "stone": 1.0, "mango": 0.0, "violin": 1.0}  # the rendered sample decides
    # sampled, with a seed: the same seed on the chat route gives the same reply, so the same reward
    sampled = {**SCORE, "sampling_params": {"temperature": 1.0, "seed": 5, "max_completions_tokens": 6}}
    for sample in ("apple", "stone"):
        result = client.fine_tuning.alpha.graders.run(grader=sampled, model_sample=sample, item={"kind": "fruit"})
        numbers = NUMBER.findall(chat_reference(client, sampled, sample, {"kind": "fruit"}))
        assert result.reward == (min(max(float(numbers[-1]), 0.0), 1.0) if numbers else 0.0)


def test_label_model_passes_the_judges_label(served):
    client = served["client"]
    grader = {"type": "label_model", "name": "fruit", "model": "judge", "labels": ["0", "1"], "passing_labels": ["0"],
              "input": SCORE["input"], "sampling_params": {"temperature": 0, "max_completions_tokens": 4}}
    for sample in ("banana", "ratcen"):
        result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item={"kind": "fruit"})
        label = chat_reference(client, grader, sample, {"kind": "fruit"}).strip()
        assert result.reward == float(label in grader["passing_labels"]) and label in grader["labels"]
    assert client.fine_tuning.alpha.graders.validate(grader=grader).grader.model == "judge"


def test_unknown_judge_model_is_a_400_naming_the_field(served):
    client = served["client"]
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client.fine_tuning.alpha.graders.run(grader={**SCORE, "model": "gpt-4o"}, model_sample="x", item={"kind": "a"})
    assert e.value.body["param"] == "grader.model" and "gpt-4o" in e.value.body["message"]
    multi = {"type": "multi", "name": "m", "calculate_output": "0.5 * judged", "graders": {
        "judged": {**SCORE, "model": "nope"}}}
    with pytest.raises(BadRequestError) as e:
        client.fine_tuning.alpha.graders.validate(grader=multi)
    assert e.value.body["param"] == "grader.graders.judged.model"
    rows = write_jsonl(served["root"] / "bad-judge.jsonl", [{"messages": [{"role": "user", "content": f"{i}"}],
                                                            "kind": "fruit"} for i in range(10)])
    training_file = client.files.create(file=open(rows, "rb"), purpose="fine-tune")
    method = {"type": "reinforcement", "reinforcement": {"grader": {**SCORE, "model": "nope"}}}
    with pytest.raises(BadRequestError) as e:
        client.fine_tuning.jobs.create(model="warm", training_file=training_file.id, method=method)
    assert e.value.body["param"] == "method.reinforcement.grader.model"


def test_reinforcement_job_with_a_score_model_grader(served):
    """The whole path: the job gets this server as its judge and the server's key in its environment (a key it
    lacked would be a 401, failing the job); the judge answers 1 for anything but a fruit, so the rewards are 1
    where every sample was judged, and 0 where the judge was not reached or its reply did not parse."""
    items, _ = tasks.split_items(12, 0, seed=5)
    rows = write_jsonl(served["root"] / "rft-judge.jsonl", [{"messages": [{"role": "user", "content": i["prompt"]}],
                                                            "kind": "fruit"} for i in items])
    hp = {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 0.5, "reasoning_effort": "low"}
    method = {"type": "reinforcement", "reinforcement": {"grader": SCORE, "hyperparameters": hp}}
    job, events, _, _ = migration_script(served["client"], rows, "warm", method, "judged")
    assert job.status == "succeeded", job.error
    config = (run_dir(served, job.id) / "job.yaml").read_text()
    assert "judge_endpoint" in config and served["server"].url in config and KEY not in config
    rewards = [e.data["train_reward_mean"] for e in events.data if e.type == "metrics"]
    assert len(rewards) == 3 and sum(rewards) / 3 >= 0.75, rewards


def test_tuning_jobs_config_gets_this_server_as_judge(served):
    """A whole tunelab config on /v1/tuningJobs: its model grader's judge is this server; a judge_endpoint of the
    request's own would send the server's environment variable anywhere, so it needs --allow-code."""
    import httpx

    client, url = served["client"], served["server"].url
    rows = write_jsonl(served["root"] / "tj.jsonl", [{"messages": [{"role": "user", "content": f"{i}"}],
                                                     "kind": "fruit"} for i in range(10)])
    file_id = client.files.create(file=open(rows, "rb"), purpose="fine-tune").id
    config = {"model": {"path": "warm"}, "method": "grpo", "data": {"train": [{"path": file_id}]},
              "grpo": {"graders": [SCORE]}, "train": {"max_steps": 1}}
    headers = {"Authorization": f"Bearer {KEY}"}
    own = {**config, "grpo": {**config["grpo"], "judge_endpoint": {"base_url": "http://elsewhere:1/v1",
                                                                   "api_key_env": "HOME"}}}
    refused = httpx.post(f"{url}/v1/tuningJobs", json={"config": own}, headers=headers, timeout=60)
    assert refused.status_code == 403 and "grpo.judge_endpoint" in refused.json()["error"]["message"]
    unknown = {**config, "grpo": {"graders": [{**SCORE, "model": "nope"}]}}
    response = httpx.post(f"{url}/v1/tuningJobs", json={"config": unknown}, headers=headers, timeout=60)
    assert response.status_code == 400 and "grpo.graders[0].model" in response.json()["error"]["message"]
    job = httpx.post(f"{url}/v1/tuningJobs", json={"config": config}, headers=headers, timeout=60).json()
    httpx.post(f"{url}/v1/tuningJobs/{job['id']}:cancel", headers=headers, timeout=60)
    saved = yaml.safe_load((run_dir(served, job["id"]) / "job.yaml").read_text())
    assert saved["grpo"]["judge_endpoint"] == {"base_url": f"{url}/v1", "api_key_env": "TUNELAB_JUDGE_API_KEY",
                                               "timeout_s": 120.0}


# ---------------------------------------------------------------- the trainer's side, against a fake judge

class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible /v1/chat/completions that records each request and answers a score that depends on
    the rendered text: (its length mod 5) / 4."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @staticmethod
    def score(text: str) -> float:
        return (len(text) % 5) / 4


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        text = f"Score: {self.server.score(body['messages'][-1]['content'])}"
        out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def grpo_config(tmp_path: Path, judge_endpoint: dict | None) -> Path:
    items, _ = tasks.split_items(8, 0, seed=5)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": i["prompt"]}],
                                                  "answer": i["answer"]} for i in items])
    grader = {"type": "score_model", "name": "judged", "model": "any-judge", "range": [0, 1],
              "input": [{"role": "developer", "content": "Grade the reply."},
                        {"role": "user", "content": "<<{{sample.output_text}}>> vs {{item.answer}}"}],
              "sampling_params": {"temperature": 0.5, "seed": 3, "max_completions_tokens": 7,
                                  "reasoning_effort": "low"}}
    grpo = {"group_size": 2, "max_new_tokens": 8, "graders": [grader]}
    if judge_endpoint is not None:
        grpo["judge_endpoint"] = judge_endpoint
    cfg = config_dict(make_base_model(tmp_path / "warm"), rows, tmp_path / "run", method="grpo", grpo=grpo,
                      data={"train": [{"path": str(rows), "format": "prompt"}], "max_length": 64},
                      train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "log_every": 1})
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(cfg))
    return path


def test_trainer_rewards_are_the_judges_scores(tmp_path, monkeypatch):
    judge = FakeJudge()
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    try:
        config = grpo_config(tmp_path, {"base_url": f"http://127.0.0.1:{judge.server_address[1]}/v1",
                                        "api_key_env": "FAKE_JUDGE_KEY"})
        monkeypatch.setenv("FAKE_JUDGE_KEY", "s3cret")
        done = run_cli("train", str(config), timeout=600)
    finally:
        judge.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    answers = {json.loads(line)["answer"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()}
    asked = judge.requests
    assert len(asked) == 3 * 2 * 2  # steps x prompts x group_size
    for r in asked:
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer s3cret" and r["model"] == "any-judge"
        assert (r["temperature"], r["seed"], r["max_completion_tokens"]) == (0.5, 3, 7) and "reasoning_effort" not in r
        assert r["messages"][0] == {"role": "system", "content": "Grade the reply."}
        rendered = re.fullmatch(r"<<(.*)>> vs (.*)", r["messages"][1]["content"], re.S)
        assert rendered and rendered[2] in answers
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["rewards/judged/mean"] for row in logged if "rewards/judged/mean" in row]
    scores = [FakeJudge.score(r["messages"][1]["content"]) for r in asked]  # in arrival order: step by step
    assert steps == pytest.approx([sum(scores[i:i + 4]) / 4 for i in range(0, 12, 4)], abs=1e-6)
    assert len(set(scores)) > 1  # the judge's answers differ: the rewards follow them, not a constant


def test_unreachable_judge_stops_the_run_with_one_line(tmp_path):
    config = grpo_config(tmp_path, {"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 5})
    done = run_cli("train", str(config), timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "cannot reach the judge at http://127.0.0.1:" in last, last


def test_model_grader_without_a_judge_endpoint_is_refused_before_loading(tmp_path):
    done = run_cli("train", str(grpo_config(tmp_path, None)), timeout=300)
    assert done.returncode == 2 and "grpo.graders[0]" in done.stderr and "grpo.judge_endpoint.base_url" in done.stderr


def test_bad_judge_endpoints_are_refused_with_the_key_named(tmp_path, monkeypatch):
    from tunelab.config import UserError, load_config

    config = grpo_config(tmp_path, {"base_url": "ftp://judge/v1"})
    with pytest.raises(UserError, match="grpo.judge_endpoint.base_url"):
        load_config(config)
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    (tmp_path / "k").mkdir()
    config = grpo_config(tmp_path / "k", {"base_url": "http://127.0.0.1:1/v1", "api_key_env": "NO_SUCH_JUDGE_KEY"})
    done = run_cli("train", str(config), timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "grpo.judge_endpoint.api_key_env" in last and "NO_SUCH_JUDGE_KEY is not set" in last, last


def test_cluster_jobs_cannot_reach_a_loopback_judge(tmp_path):
    from tunelab.config import UserError
    from tunelab.serve.judge import own_url
    from tunelab.serve.settings import ServeSettings

    assert own_url(ServeSettings(home=tmp_path, port=9000)) == "http://127.0.0.1:9000/v1"
    assert own_url(ServeSettings(home=tmp_path, host="0.0.0.0", api_key="k", port=9000)) == "http://127.0.0.1:9000/v1"
    assert own_url(ServeSettings(home=tmp_path, host="10.1.2.3", port=9000, backend="slurm")) == "http://10.1.2.3:9000/v1"
    with pytest.raises(UserError, match="cannot reach it"):
        own_url(ServeSettings(home=tmp_path, port=9000, backend="slurm"))
