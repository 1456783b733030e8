"""OpenAI's fine-tuning API on `tunelab serve`, driven by the official `openai` client with only base_url changed.

One server, one tiny base model. References: the same job run uninterrupted (pause/resume), PEFT's merge of the
adapter a job continues from, the step metrics the trainer wrote, OpenAI's documented object shapes and error shape."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from service_util import Server, wait_for  # noqa: E402
from tiny import make_base_model  # noqa: E402

from tunelab import tasks  # noqa: E402

ENDED = ("succeeded", "failed", "cancelled")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-ft")
    base = make_base_model(tmp_path_factory.mktemp("base"), warm_steps=0)
    warm = make_base_model(tmp_path_factory.mktemp("warm"))  # trained a little: a LoRA can move its outputs
    items, _ = tasks.split_items(24, 0, seed=3)
    chat = write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": i["prompt"]},
                                                            {"role": "assistant", "content": i["answer"]}]}
                                             for i in items])
    prefs = write_jsonl(root / "prefs.jsonl", [{"input": {"messages": [{"role": "user", "content": i["prompt"]}]},
                                                "preferred_output": [{"role": "assistant", "content": i["answer"]}],
                                                "non_preferred_output": [{"role": "assistant", "content": i["wrong"]}]}
                                               for i in items[:12]])
    server = Server(root / "home", "--model", f"base={base}", "--model", f"warm={warm}").start()
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0)
    yield {"server": server, "client": client, "root": root, "base": base, "chat": chat, "prefs": prefs}
    server.stop()


def migration_script(client, path: Path, model: str, method: dict, suffix: str, validation: Path | None = None):
    """What OpenAI's docs show, unchanged: upload, create, poll, events, checkpoints, chat with the tuned model."""
    training_file = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    extra = {"validation_file": client.files.create(file=open(validation, "rb"), purpose="fine-tune").id} \
        if validation else {}
    job = client.fine_tuning.jobs.create(model=model, training_file=training_file.id, method=method, suffix=suffix,
                                         seed=7, **extra)
    while job.status not in ENDED:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=50)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(fine_tuning_job_id=job.id)
    reply = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "What is 12 + 30?"}])
    return job, events, checkpoints, reply


def sft_method(**hp):
    return {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 1,
                                                                    "learning_rate_multiplier": 10, **hp}}}


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / "adapter_model.safetensors")


def run_dir(env, job_id: str) -> Path:
    return env["server"].home / "runs" / job_id


def test_supervised_migration_checkpoints_results_and_delete(env):
    client = env["client"]
    job, events, checkpoints, reply = migration_script(client, env["chat"], "base", sft_method(), "tasks",
                                                       validation=env["chat"])
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:base:tasks:{job.id}" and job.seed == 7
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 1
    assert isinstance(reply.choices[0].message.content, str) and reply.model == job.fine_tuned_model
    metrics = [json.loads(line) for line in (run_dir(env, job.id) / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events.data if e.type == "metrics"]
    assert [e.data["step"] for e in steps] == [r["step"] for r in metrics][::-1][:len(steps)]  # newest first
    assert steps[0].data["train_loss"] == pytest.approx(metrics[-1]["loss"])
    assert job.trained_tokens == sum(r["tokens"] for r in metrics)
    # one checkpoint per epoch (24 rows, batch 1), the last three kept, each with its step's loss
    assert [c.step_number for c in checkpoints.data] == [72, 48, 24]
    by_step = {r["step"]: r for r in metrics}
    assert all(c.metrics.train_loss == pytest.approx(by_step[c.step_number]["loss"]) for c in checkpoints.data)
    # token accuracies (the trainer's token_accuracy / eval_token_accuracy; test_token_accuracy.py checks those
    # against full-logits argmax): the step's, and the last evaluation's (one per epoch with a validation file)
    for c in checkpoints.data:
        row = by_step[c.step_number]
        assert c.metrics.train_mean_token_accuracy == pytest.approx(row["token_accuracy"])
        assert c.metrics.valid_mean_token_accuracy == pytest.approx(row["eval_token_accuracy"])
        assert 0 <= c.metrics.train_mean_token_accuracy <= 1 and 0 <= c.metrics.valid_mean_token_accuracy <= 1
        assert c.metrics.valid_loss == pytest.approx(row["eval_loss"])
    assert steps[0].data["train_mean_token_accuracy"] == pytest.approx(metrics[-1]["token_accuracy"])
    names = {m.id for m in client.models.list().data}
    early = checkpoints.data[-1].fine_tuned_model_checkpoint
    assert early == f"{job.fine_tuned_model}:ckpt-step-24" and {early, job.fine_tuned_model} <= names
    # the step-24 checkpoint differs from the final weights, and so do its greedy answers
    final = adapter_weights(run_dir(env, job.id) / "final")
    prompts = [i["prompt"] for i in tasks.split_items(24, 0, seed=3)[0][:6]]

    def answers(model):
        return [client.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": p}]).choices[0].message.content for p in prompts]

    at_end = answers(job.fine_tuned_model)
    assert answers(f"{job.fine_tuned_model}:ckpt-step-72") == at_end  # the last checkpoint is the final model
    exported = adapter_weights(run_dir(env, job.id) / "models" / "ckpt-step-72")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert answers(early) != at_end
    text = client.completions.create(model=early, prompt="Reverse the word: apple", max_tokens=4, temperature=0)
    assert isinstance(text.choices[0].text, str)
    # the step metrics CSV is a result file; the job is the same one /v1/tuningJobs shows
    csv_rows = client.files.content(job.result_files[0]).text.strip().splitlines()
    assert csv_rows[0].startswith("step,train_loss") and len(csv_rows) == 1 + len(metrics)
    same = httpx.get(f"{env['server'].url}/v1/tuningJobs/{job.id}").json()
    assert same["state"] == "JOB_STATE_SUCCEEDED"
    assert same["tuned_model_endpoint_name"] == f"endpoints/{job.fine_tuned_model}"
    env["sft_job"] = job
    # deleting a checkpoint, then the model: gone from /v1/models and from disk; a base model cannot be deleted
    assert client.models.delete(early).deleted
    assert not (run_dir(env, job.id) / "checkpoints" / "step-00000024").exists()
    assert early not in {m.id for m in client.models.list().data}
    assert answers(f"{job.fine_tuned_model}:ckpt-step-48")  # the engine let go of the deleted adapter's files
    with pytest.raises(Exception) as e:
        client.models.delete("base")
    assert e.value.status_code == 403 and e.value.body["code"] == "model_not_deletable"


def test_pause_resume_equals_uninterrupted(env):
    """The same job (seed, data, hyperparameters) paused mid-run and resumed ends with the uninterrupted weights."""
    client = env["client"]
    reference = env.get("sft_job") or pytest.skip("needs the supervised job")
    training_file = client.files.create(file=open(env["chat"], "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=training_file.id, method=sft_method(),
                                         suffix="tasks", seed=7)
    with pytest.raises(Exception) as e:
        client.fine_tuning.jobs.resume(job.id)  # not paused
    assert e.value.status_code == 409 and "not paused" in e.value.body["message"]
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 300, "running")
    wait_for(lambda: (run_dir(env, job.id) / "metrics.jsonl").exists(), 300, "first step")
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j, 300, "paused")
    steps = [int(p.name[5:]) for p in (run_dir(env, job.id) / "checkpoints").glob("step-*")]
    assert paused.fine_tuned_model is None and 0 < max(steps) < 72  # stopped mid-run, at a checkpoint
    with pytest.raises(Exception) as e:  # its training file is in use by a live (paused) job
        client.files.delete(training_file.id)
    assert e.value.status_code == 409
    client.fine_tuning.jobs.resume(job.id)
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ENDED and j, 600, "end")
    assert done.status == "succeeded", done.error
    ours = adapter_weights(run_dir(env, job.id) / "final")
    theirs = adapter_weights(run_dir(env, reference.id) / "final")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    assert client.files.delete(training_file.id).deleted


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (make test installs it as root)")
def test_dashboard_lists_checkpoints_and_chats_with_one(env):
    """The job page lists the kept checkpoints with their losses; Chat points the playground at one, whose streamed
    greedy reply equals the API's for that checkpoint."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    job = env.get("sft_job") or pytest.skip("needs the supervised job")
    checkpoint = f"{job.fine_tuned_model}:ckpt-step-48"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{env['server'].url}/jobs/{job.id}")
        rows = page.get_by_test_id("checkpoint-row")
        playwright.expect(rows).to_have_count(2)  # steps 72 and 48; step 24 was deleted
        row = rows.filter(has_text="ckpt-step-48")
        loss = next(c.metrics.train_loss for c in env["client"].fine_tuning.jobs.checkpoints.list(job.id).data
                    if c.step_number == 48)
        playwright.expect(row.locator("td").nth(1)).to_have_text(str(float(f"{loss:.4g}")))
        row.get_by_role("button", name="Chat").click()
        playwright.expect(page.get_by_test_id("chat-model")).to_have_text(checkpoint)
        page.get_by_label("Message").fill("Reverse the word: apple")
        page.get_by_label("Max tokens").fill("8")
        page.get_by_role("button", name="Send").click()
        reply = page.get_by_test_id("chat-reply")
        playwright.expect(reply).to_be_visible(timeout=60_000)
        streamed = reply.locator(".bubble-text").text_content()
        browser.close()
    greedy = env["client"].chat.completions.create(model=checkpoint, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": "Reverse the word: apple"}]).choices[0].message.content
    assert streamed == greedy and errors == []


def test_dpo_continues_from_the_fine_tuned_model(env):
    client = env["client"]
    sft = env.get("sft_job") or pytest.skip("needs the supervised job")
    method = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": "auto"}}}
    job, events, checkpoints, reply = migration_script(client, env["prefs"], sft.fine_tuned_model, method, "pref")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:base:pref:{job.id}" and job.method.dpo.hyperparameters.beta == 0.1
    assert job.method.dpo.hyperparameters.learning_rate_multiplier == 0.25  # auto for dpo
    assert isinstance(reply.choices[0].message.content, str) and checkpoints.data[0].step_number == 3
    # the job started from the supervised model: its start model is PEFT's merge of that adapter
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]),
                                       run_dir(env, sft.id) / "final").merge_and_unload().state_dict()
    start = load_file(run_dir(env, job.id) / "start-model" / "model.safetensors")
    assert max((start[k] - merged[k]).abs().max().item() for k in start) <= 1e-6
    # delete: gone from /v1/models, its files freed
    assert client.models.delete(job.fine_tuned_model).deleted
    assert job.fine_tuned_model not in {m.id for m in client.models.list().data}
    assert not (run_dir(env, job.id) / "final").exists() and not (run_dir(env, job.id) / "checkpoints").exists()


def rendered_length(tokenizer, messages, **kw) -> int:
    """The reference count: the tokenizer's own chat template and encoding (with its special tokens)."""
    return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, **kw)).input_ids)


def create_and_cancel(env, path: Path, model: str, method: dict) -> list:
    """The job's events right after create (it is cancelled at once: nothing trains)."""
    client = env["client"]
    training_file = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=model, training_file=training_file.id, method=method)
    client.fine_tuning.jobs.cancel(job.id)
    config = httpx.get(f"{env['server'].url}/v1/tuningJobs/{job.id}").json()["config"]
    return client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=50).data, config


def test_over_long_rows_are_reported_at_create(env):
    """OpenAI truncates examples over the model's limit rather than refusing the file: a job reports them at create
    (a warn event), counted as the tokenizer itself counts the rendered conversation, the reference: a row exactly
    at the limit passes, one token over does not."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env["base"])
    limit = AutoConfig.from_pretrained(env["base"]).max_position_embeddings  # below data.max_length's default 1024

    def chat(user, reply="ok"):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    sized = {rendered_length(tokenizer, chat("add " * n + tail)): chat("add " * n + tail)
             for n in range(100, 140) for tail in ("", "x")}
    rows = [chat("add 1 and 2", "3")] * 10
    rows[2], rows[4], rows[6] = sized[limit], sized[limit + 1], chat("hi", "add " * 140)  # lines 3, 5, 7
    assert rendered_length(tokenizer, rows[6]) > limit
    path = write_jsonl(env["root"] / "long.jsonl", [{"messages": m} for m in rows])
    events, config = create_and_cancel(env, path, "base", sft_method())
    warnings = [e.message for e in events if e.level == "warn"]
    assert warnings == [f"warning: training_file: 2 rows are over the job's limit of {limit} tokens (lines 5, 7): "
                        "1 cut to fit (the prompt cut from the left, oldest turns first); 1 left out of training "
                        "(the reply alone does not fit)"]
    capped = [e for e in events if "context window" in e.message]
    assert len(capped) == 1 and capped[0].level == "info" and f"to the model's context window, {limit}" in \
        capped[0].message
    assert config["data"]["max_length"] == limit


def test_over_long_prompts_and_pairs_are_reported_at_create(env):
    """Reinforcement: a prompt and its sampled reply share the limit, so a prompt with room for exactly
    grpo.max_new_tokens passes and one token more is left out (the reference: the tokenizer's own count of the
    prompt with the generation prompt). dpo: a pair whose reply alone is over the limit is left out."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env["base"])
    limit = AutoConfig.from_pretrained(env["base"]).max_position_embeddings
    room = limit - 16  # reasoning_effort low: grpo.max_new_tokens 16

    def prompt(text):
        return [{"role": "user", "content": text}]

    texts = ["add " * n + tail for n in range(90, 140) for tail in ("", "x")]
    sized = {rendered_length(tokenizer, prompt(t), add_generation_prompt=True): prompt(t) for t in texts}
    prompts = [prompt("add 1 and 2")] * 10
    prompts[1], prompts[3] = sized[room], sized[room + 1]  # lines 2 and 4
    path = write_jsonl(env["root"] / "long-rft.jsonl", [{"messages": m, "answer": "3"} for m in prompts])
    grader = {"type": "string_check", "name": "eq", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
              "operation": "eq"}
    method = {"type": "reinforcement", "reinforcement": {"grader": grader,
                                                        "hyperparameters": {"reasoning_effort": "low"}}}
    events, _ = create_and_cancel(env, path, "base", method)
    assert [e.message for e in events if e.level == "warn"] == [
        f"warning: training_file: 1 row is over the job's limit of {room} prompt tokens (data.max_length less "
        "grpo.max_new_tokens) (line 4): 1 left out of training (no room left for the sampled reply)"]

    pairs = [{"input": {"messages": prompt("add 1 and 2")}, "preferred_output": [{"role": "assistant", "content": "3"}],
              "non_preferred_output": [{"role": "assistant", "content": "4"}]}] * 10
    pairs[8] = {**pairs[8], "non_preferred_output": [{"role": "assistant", "content": "add " * 140}]}  # line 9
    path = write_jsonl(env["root"] / "long-prefs.jsonl", pairs)
    events, _ = create_and_cancel(env, path, "base", {"type": "dpo"})
    assert [e.message for e in events if e.level == "warn"] == [
        f"warning: training_file: 1 row is over the job's limit of {limit} tokens (line 9): 1 left out of "
        "training (the reply alone does not fit)"]


def test_auto_hyperparameters_are_reported(env):
    client = env["client"]
    training_file = client.files.create(file=open(env["chat"], "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=training_file.id, metadata={"team": "a"})
    assert job.status == "queued" and job.metadata == {"team": "a"}
    # 24 rows: ceil(100 / 24) = 5 epochs, batch ceil(0.2% of 24) = 1, multiplier 1.0
    assert job.hyperparameters.model_dump() == {"n_epochs": 5, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 5
    listed = client.fine_tuning.jobs.list(metadata={"team": "a"})
    assert [j.id for j in listed.data] == [job.id]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"


def test_reinforcement_migration_with_a_string_check_grader(env):
    """A verifiable task the tiny model can learn in a few steps: the answer is 'e', graded `like` (the reply
    contains it), about half of the 16-token replies at the start. The mean reward of the last steps must beat the
    first steps' (rewards from the job's metrics events, the grader's own numbers, checked against metrics.jsonl)."""
    items, _ = tasks.split_items(12, 0, seed=5)
    rows = write_jsonl(env["root"] / "rft.jsonl", [{"messages": [{"role": "user", "content": i["prompt"]}],
                                                    "answer": "e"} for i in items])
    grader = {"type": "string_check", "name": "has_e", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "like"}
    hp = {"n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 150, "reasoning_effort": "low"}
    method = {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}
    job, events, checkpoints, reply = migration_script(env["client"], rows, "warm", method, "rft")
    assert job.status == "succeeded", job.error
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 1.0 and checkpoints.data
    assert isinstance(reply.choices[0].message.content, str)
    steps = sorted((e.data for e in events.data if e.type == "metrics"), key=lambda d: d["step"])
    rewards = [d["train_reward_mean"] for d in steps]
    logged = [json.loads(line) for line in (run_dir(env, job.id) / "metrics.jsonl").read_text().splitlines()]
    assert rewards == [r["rewards/has_e/mean"] for r in logged if "reward" in r] and len(rewards) == 15
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5  # seed 7 on CPU: 0.58 -> 0.85
    assert last >= first + 0.15, rewards


def test_reinforcement_grader_errors(env):
    """Bad grader JSON, a python grader without --allow-code and a model grader whose judge this server does not
    serve are refused at create (400, param the grader or its model)."""
    url = env["server"].url
    def upload(path):
        with open(path, "rb") as f:
            response = httpx.post(f"{url}/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        return response.json()["id"]

    file_id = upload(env["chat"])
    items, _ = tasks.split_items(12, 0, seed=5)
    rows = write_jsonl(env["root"] / "rft-bad.jsonl", [{"messages": [{"role": "user", "content": i["prompt"]}]}
                                                       for i in items])
    rft_id = upload(rows)
    for grader in ({"type": "string_check", "operation": "eqq", "name": "x", "input": "a", "reference": "b"},
                   {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"},
                   {"type": "score_model", "name": "s", "model": "gpt-4o",
                    "input": [{"role": "user", "content": "Score {{sample.output_text}} from 0 to 1."}]}):
        body = {"model": "base", "training_file": rft_id, "method": {"type": "reinforcement",
                                                                     "reinforcement": {"grader": grader}}}
        response = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, timeout=60)
        param = "method.reinforcement.grader" + (".model" if grader["type"] == "score_model" else "")
        error = assert_openai_error(response, 400, param)
        expected = {"string_check": "operation", "python": "--allow-code", "score_model": "'gpt-4o' is not served"}
        assert expected[grader["type"]] in error["message"], error
    wrong = {"model": "base", "training_file": file_id, "method": {"type": "supervised", "supervised": {}}}
    wrong["method"]["supervised"]["grader"] = {"type": "string_check"}
    assert_openai_error(httpx.post(f"{url}/v1/fine_tuning/jobs", json=wrong), 400, "method.supervised.grader")


def assert_openai_error(response, status, param, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"] and all(w in error["message"] for w in words), error
    return error


def test_bad_requests_in_openai_error_shape(env):
    url = env["server"].url
    root = env["root"]

    def upload(path, purpose="fine-tune"):
        with open(path, "rb") as f:
            return httpx.post(f"{url}/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose})

    good = upload(env["chat"]).json()["id"]
    def create(**body):
        return httpx.post(f"{url}/v1/fine_tuning/jobs", json={"model": "base", "training_file": good, **body},
                          timeout=60)

    assert_openai_error(create(model="gpt-4o-mini"), 404, "model", "gpt-4o-mini")
    batch = upload(env["chat"], "batch").json()
    assert batch["purpose"] == "batch"
    assert_openai_error(create(training_file=batch["id"]), 400, "training_file", "purpose 'batch'")
    assert_openai_error(create(method={"type": "dpo"}), 400, "training_file", "preference rows")
    assert_openai_error(create(hyperparameters={"n_epochs": 0}), 400, "hyperparameters.n_epochs")
    assert_openai_error(create(method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}),
                        400, "method.supervised.hyperparameters.beta", "dpo jobs only")
    assert_openai_error(create(suffix="no spaces please"), 400, "suffix")
    few = write_jsonl(root / "few.jsonl", [json.loads(line) for line in env["chat"].read_text().splitlines()[:3]])
    assert_openai_error(create(training_file=upload(few).json()["id"]), 400, "training_file", "3 examples")
    rows = env["chat"].read_text().splitlines()
    bad = root / "bad.jsonl"
    bad.write_text("\n".join(rows[:2] + ['{"messages": [{"role": "robot", "content": "hi"}]}'] + rows[3:]) + "\n")
    response = upload(bad)
    assert response.status_code == 400 and "bad.jsonl:3" in response.json()["error"]["message"]
    assert "robot" in response.json()["error"]["message"]
    no_reply = root / "noreply.jsonl"
    no_reply.write_text("\n".join(rows[:4] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + rows[5:]) + "\n")
    message = upload(no_reply).json()["error"]["message"]
    assert "noreply.jsonl:5" in message and "assistant" in message
    unknown = httpx.post(f"{url}/v1/fine_tuning/jobs/ftjob-nope/resume")
    assert_openai_error(unknown, 404, "fine_tuning_job_id")
    assert_openai_error(upload(env["chat"], "wrong"), 400, None, "purpose")
