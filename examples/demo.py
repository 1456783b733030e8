#!/usr/bin/env python
"""The embedded demo: a tiny language model's whole life, offline, on a laptop CPU, in about ten minutes.

    make demo                          # = HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py
    python examples/demo.py --smoke    # the same pipeline at toy size, in about a minute

Every step is a `tunelab` command a user would type; each is printed before it runs:
  1. pretrain   a tiny Llama and its byte-level BPE tokenizer from scratch on the Python documentation that ships
                with the interpreter (pydoc_data.topics) plus the task prompts  -> work/models/tiny
  2. sft        LoRA (r16, all linear layers) on verifiable tasks (tunelab.tasks: add, lookup, reverse, sort,
                upper), then `tunelab merge` and `tunelab generate` on a held-out prompt  -> work/runs/sft-lora
  3. dpo        preference pairs: the correct answer vs a plausibly wrong one  -> work/runs/dpo
     grpo       on-policy RL with the programmatic reward tunelab.tasks:correctness_reward  -> work/runs/grpo
  4. distill    a student with under a quarter of the parameters learns the tuned teacher  -> work/runs/distill
  5. eval       `tunelab eval` on held-out prompts for every model: exact match per task family, preference
                accuracy, perplexity; one table -> work/demo/results.{json,md}
  6. serve      `tunelab serve`, one short LoRA SFT job submitted through the Python client (tunelab.tuning.sft)
                and one through OpenAI's fine-tuning API (the `openai` client: files, jobs, events, checkpoints),
                and the tuned endpoint called through the official `openai` client  -> work/service
Everything is written under work/ (git-ignored). A stage whose training method is not available in this
checkout is kept in the table as "pending", never faked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(EXAMPLES))

from demo_table import FAMILIES, markdown_table  # noqa: E402  (examples/demo_table.py)
from tunelab import tasks  # noqa: E402

WORD_FAMILIES = ("reverse", "upper")  # only len(tasks.WORDS) distinct prompts exist: hold out a fifth of the words

# Sizes: the real run (about ten minutes on two idle cores) and the smoke test (seconds of training).
SIZES = {
    "real": {"train_per_family": 2000, "test_per_family": 40, "text_test_fraction": 0.05, "word_repeat": 20},
    "smoke": {"train_per_family": 8, "test_per_family": 2, "text_test_fraction": 0.05, "word_repeat": 1},
}
# Smoke-size overrides per stage (the real run uses the YAML files as they are).
SMOKE = {
    "pretrain": ["model.init.hidden_size=32", "model.init.layers=1", "model.init.heads=2", "model.init.kv_heads=2",
                 "model.init.max_position=256", "tokenizer.vocab_size=300", "data.max_length=64", "train.max_steps=2",
                 "train.micro_batch_size=4"],
    "sft": ["train.max_steps=2", "train.micro_batch_size=4", "adapter.r=4"],
    "dpo": ["train.max_steps=2", "train.micro_batch_size=4", "adapter.r=4"],
    "grpo": ["train.max_steps=1", "train.micro_batch_size=2", "grpo.group_size=2", "grpo.max_new_tokens=4", "adapter.r=4"],
    "distill": ["model.init.hidden_size=8", "model.init.layers=1", "model.init.heads=2", "model.init.kv_heads=2",
                "model.init.intermediate_size=16", "train.max_steps=2", "train.micro_batch_size=4"],
    "eval": ["eval.max_new_tokens=4"],
}


# ---------------------------------------------------------------- data

def python_docs() -> list[str]:
    """The Python documentation shipped with the interpreter, cut into documents of about 800 characters at
    paragraph boundaries."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        chunk = ""
        for para in topics[name].split("\n\n"):
            if chunk and len(chunk) + len(para) > 800:
                docs.append(chunk.strip())
                chunk = ""
            chunk += para + "\n\n"
        if chunk.strip():
            docs.append(chunk.strip())
    return docs


def family_split(family: str, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test items of one family; word families have only len(WORDS) prompts: 80/20 of those."""
    unique = tasks.unique_prompts(tasks.make_items(max(4 * (n_train + n_test), 400), seed, [family]))
    if len(unique) < n_train + n_test:
        n_test = min(n_test, max(1, len(unique) // 5))
        n_train = len(unique) - n_test
    return unique[:n_train], unique[n_train:n_train + n_test]


def make_data(work: Path, size: dict, seed: int = 0) -> dict[str, Path]:
    """work/data/: task rows (alpaca, preference, prompt) with held-out test splits, and the text corpus."""
    data = work / "data"
    train, test = [], []
    for k, family in enumerate(FAMILIES):
        tr, te = family_split(family, size["train_per_family"], size["test_per_family"], seed + k)
        train += tr
        test += te
    rng = random.Random(seed)
    rng.shuffle(train)
    docs = python_docs()
    rng.shuffle(docs)
    if size is SIZES["smoke"]:
        docs = docs[:40]
    n_test_docs = max(2, round(len(docs) * size["text_test_fraction"]))
    # The training split of the tasks joins the corpus as plain text ("prompt\nanswer", 10 to a document; the
    # word families, which have only a few dozen distinct prompts, repeated WORD_REPEAT times): pretraining is
    # where a model learns skills, SFT teaches it the chat format to use them in. No test prompt is in it.
    task_lines = [f"{i['prompt']}\n{i['answer']}" for i in train]
    task_lines += [f"{i['prompt']}\n{i['answer']}" for i in train if i["family"] in WORD_FAMILIES] * size["word_repeat"]
    rng.shuffle(task_lines)
    prompt_docs = ["\n\n".join(task_lines[i:i + 10]) for i in range(0, len(task_lines), 10)]
    corpus = [{"text": d} for d in docs[n_test_docs:] + prompt_docs]
    rng.shuffle(corpus)
    paths = {
        "text-train": tasks.write_jsonl(corpus, data / "text-train.jsonl"),
        "text-test": tasks.write_jsonl([{"text": d} for d in docs[:n_test_docs]], data / "text-test.jsonl"),
        "tasks-train": tasks.write_jsonl([tasks.to_alpaca(i) for i in train], data / "tasks-train.jsonl"),
        "tasks-test": tasks.write_jsonl([tasks.to_alpaca(i) for i in test], data / "tasks-test.jsonl"),
        "prefs-train": tasks.write_jsonl([tasks.to_preference(i) for i in train], data / "prefs-train.jsonl"),
        "prefs-test": tasks.write_jsonl([tasks.to_preference(i) for i in test], data / "prefs-test.jsonl"),
        "prompts-train": tasks.write_jsonl([tasks.to_prompt(i) for i in train], data / "prompts-train.jsonl"),
    }
    counts = {f: (sum(i["family"] == f for i in train), sum(i["family"] == f for i in test)) for f in FAMILIES}
    print(f"data: {len(corpus)} text documents ({len(docs) - n_test_docs} Python doc chunks + {len(prompt_docs)} of "
          f"task examples), {n_test_docs} held out; tasks train/test per family: "
          + ", ".join(f"{f} {a}/{b}" for f, (a, b) in counts.items()))
    return paths


# ---------------------------------------------------------------- running commands

class Runner:
    def __init__(self, root: Path, in_process: bool, log: Path):
        self.root, self.in_process, self.log = root, in_process, log
        self.cpu = 0.0

    def __call__(self, *args: str, check: bool = True) -> float:
        """Run `tunelab ARGS` in the demo root, printing the command; returns wall seconds (CPU seconds of the
        command are added to self.cpu)."""
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        print(f"\n$ tunelab {shown}", flush=True)
        t0, c0 = time.time(), _cpu_seconds()
        if self.in_process:
            from tunelab.cli import main

            cwd = os.getcwd()
            os.chdir(self.root)
            try:
                rc = main(list(args))
            finally:
                os.chdir(cwd)
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
            rc = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=self.root, env=env).returncode
        seconds, cpu = time.time() - t0, _cpu_seconds() - c0
        self.cpu += cpu
        with self.log.open("a") as f:
            f.write(json.dumps({"command": f"tunelab {shown}", "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                                "rc": rc}) + "\n")
        if rc != 0 and check:
            raise SystemExit(f"demo: `tunelab {shown}` failed with exit status {rc}")
        return seconds


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def available(method: str) -> bool:
    from tunelab.objectives import REGISTRY

    if method not in REGISTRY:
        return False
    import importlib

    module_name, _, class_name = REGISTRY[method].partition(":")
    try:
        return hasattr(importlib.import_module(module_name), class_name)
    except ImportError:
        return False


# ---------------------------------------------------------------- the pipeline

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, a few steps per stage (the test suite's)")
    parser.add_argument("--root", default=str(REPO), help="where work/ goes (default: the repository root)")
    parser.add_argument("--no-grpo", action="store_true", help="skip the GRPO stage")
    parser.add_argument("--in-process", action="store_true",
                        help="call the CLI in this process instead of a subprocess per command (faster start-up; "
                             "the default with --smoke)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mode = "smoke" if args.smoke else "real"
    root = Path(args.root).resolve()
    work = root / "work"
    demo_dir = work / "demo"
    for d in [demo_dir, work / "models/tiny", work / "models/tiny-sft",
              *(work / "runs" / r for r in ("pretrain", "sft-lora", "dpo", "grpo", "distill"))]:
        if d.exists():  # only what this demo writes: work/ may hold other runs
            shutil.rmtree(d)
    demo_dir.mkdir(parents=True)
    run = Runner(root, in_process=args.in_process or args.smoke, log=demo_dir / "commands.jsonl")
    smoke = (lambda stage: SMOKE[stage]) if args.smoke else (lambda stage: [])
    def cfg(name: str) -> str:  # as a user in `root` would type it
        path = EXAMPLES / name
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    started = time.time()

    print(f"tunelab demo ({mode}): everything goes under {work}")
    make_data(work, SIZES[mode])
    stages: dict[str, dict] = {}

    # 1. pretraining: tokenizer + weights from scratch
    print("\n== 1. pretrain a tiny Llama from scratch on the Python docs ==")
    over = smoke("pretrain")
    if not available("pretrain"):
        print("pending: method pretrain not available; training the same causal-LM loss with method: sft on "
              "format: text rows (train_on_prompt, packing)")
        over = ["method=sft", "data.train_on_prompt=true", "data.packing=true", *over]
    c = run.cpu
    t = run("train", cfg("demo/pretrain.yaml"), *over)
    shutil.copytree(root / "work/runs/pretrain/final", work / "models/tiny")
    print("$ cp -r work/runs/pretrain/final work/models/tiny    # the base model examples/sft-*.yaml start from")
    stages["base"] = {"time": t, "cpu": run.cpu - c, "model": "work/models/tiny", "method": "pretrain"}

    # 2. supervised fine-tuning with LoRA, merge, generate
    print("\n== 2. SFT with LoRA on the task families, merge, generate ==")
    c = run.cpu
    t = run("train", cfg("sft-lora.yaml"), "output_dir=work/runs/sft-lora", *smoke("sft"))
    t += run("merge", "work/runs/sft-lora", "--out", "work/models/tiny-sft")
    held_out = json.loads((work / "data/tasks-test.jsonl").read_text().splitlines()[0])
    run("generate", "work/models/tiny-sft", "--prompt", held_out["instruction"], "--max-new-tokens", "16")
    print(f"(expected: {held_out['output']})")
    stages["sft"] = {"time": t, "cpu": run.cpu - c, "model": "work/runs/sft-lora", "method": "sft"}

    def train_stage(name: str, method: str) -> None:
        """Train examples/demo/<method>.yaml into work/runs/<method>; "pending" where this checkout lacks it."""
        if not available(method):
            print(f"pending: method {method} not available")
            stages[name] = {"pending": f"method {method} not available", "method": method}
            return
        c = run.cpu
        t = run("train", cfg(f"demo/{method}.yaml"), *smoke(method))
        stages[name] = {"time": t, "cpu": run.cpu - c, "model": f"work/runs/{method}", "method": method}

    # 3. preference tuning
    print("\n== 3. preference tuning: DPO (+ RPO NLL term) on correct vs plausibly wrong answers ==")
    train_stage("dpo", "dpo")
    if not args.no_grpo:
        print("\n== 3b. GRPO with the programmatic reward tunelab.tasks:correctness_reward ==")
        train_stage("grpo", "grpo")

    # 4. distillation into a student of under a quarter of the parameters
    print("\n== 4. distill the SFT model into a small student ==")
    train_stage("student", "distill")

    # 5. evaluation of every model on the same held-out rows
    print("\n== 5. evaluate every model on held-out prompts, preference pairs and text ==")
    for name, stage in stages.items():
        if "pending" in stage:
            continue
        out = f"work/demo/eval-{name}.json"
        stage["eval_time"] = run("eval", cfg("demo/eval.yaml"), *smoke("eval"), "--model", stage["model"], "--out", out)
        stage["eval"] = json.loads((root / out).read_text())

    # 6. the tuning service: the same kind of job over HTTP, and its endpoint through the openai client
    print("\n== 6. the tuning service: submit a LoRA SFT job, wait for it, chat with the tuned endpoint ==")
    service = service_stage(root, work, args.smoke)

    results = summarize(stages, time.time() - started, mode)
    results["service"] = service
    results["cpu_seconds"] = round(_cpu_seconds(), 1)
    results["torch_threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    (demo_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (demo_dir / "results.md").write_text(table + "\n")
    print("\n== results ==\n" + table)
    print(f"\ntotal {results['total_seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU; written: work/demo/results.json, work/demo/results.md "
          f"(eval details: work/demo/eval-*.json)")
    return 0


# ---------------------------------------------------------------- the tuning service

def service_stage(root: Path, work: Path, smoke: bool) -> dict:
    """`tunelab serve` in the background, one tuning job through the Python client, one chat through `openai`.

    The job continues the merged SFT model (work/models/tiny-sft) on a small sample of the task rows, so its
    endpoint answers like the SFT model after seconds of training; the dashboard is at the printed URL meanwhile."""
    import openai

    import tunelab
    from tunelab.tuning import sft

    rows = (work / "data/tasks-train.jsonl").read_text().splitlines()[:8 if smoke else 64]
    (work / "data/service-train.jsonl").write_text("\n".join(rows) + "\n")
    shutil.rmtree(work / "service", ignore_errors=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--home", "work/service", "--data-root", "work/data",
            "--model", "tiny-sft=work/models/tiny-sft"]
    print(f"\n$ tunelab {' '.join(args)} &    # dashboard: {url}/")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    with open(work / "demo/serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=root, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_until_up(url, server, work / "demo/serve.log")
        up = time.time() - started
        held_out = json.loads((work / "data/tasks-test.jsonl").read_text().splitlines()[0])
        print(f"""(up after {up:.1f}s)
>>> import tunelab, openai
>>> from tunelab.tuning import sft
>>> tunelab.init(url="{url}")
>>> job = sft.train(source_model="tiny-sft", train_dataset="work/data/service-train.jsonl",
...                 tuned_model_display_name="tiny-tasks", epochs=1, batch_size=8)
>>> job.wait()
>>> client = openai.OpenAI(base_url="{url}/v1", api_key="unused")
>>> client.chat.completions.create(model=job.tuned_model_endpoint_name, max_tokens=16, temperature=0,
...     messages=[{{"role": "user", "content": {held_out['instruction']!r}}}]).choices[0].message.content""", flush=True)
        tunelab.init(url=url)
        t0 = time.time()
        job = sft.train(source_model="tiny-sft", train_dataset="work/data/service-train.jsonl",
                        tuned_model_display_name="tiny-tasks", epochs=1, batch_size=8)
        job.wait(poll=0.5, timeout=600)
        tuned = time.time() - t0
        if job.state != "JOB_STATE_SUCCEEDED":
            raise SystemExit(f"demo: tuning job {job.id} ended {job.state}: {job.error}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")  # the server has no key: any is fine
        t0 = time.time()
        reply = client.chat.completions.create(
            model=job.tuned_model_endpoint_name, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": held_out["instruction"]}]).choices[0].message.content
        first_reply = time.time() - t0
        openai_job = openai_flow(client, work, max(10, len(rows)), held_out)  # OpenAI asks for 10 rows at least
    finally:
        server.terminate()
        server.wait(timeout=30)
    steps = job.to_dict()["progress"]["step"]
    print(f"{reply!r}    (expected: {held_out['output']!r})")
    print(f"service: up in {up:.1f}s; job {job.id} ({steps} steps) SUCCEEDED in {tuned:.1f}s from submission; "
          f"first reply in {first_reply:.2f}s (loads the adapter); endpoint {job.tuned_model_endpoint_name}")
    return {"job": job.id, "state": job.state, "steps": steps, "endpoint": job.tuned_model_endpoint_name,
            "prompt": held_out["instruction"], "expected": held_out["output"], "reply": reply,
            "startup_seconds": round(up, 1), "job_seconds": round(tuned, 1), "first_reply_seconds": round(first_reply, 2),
            "openai_job": openai_job, "total_seconds": round(time.time() - started, 1)}


def openai_flow(client, work: Path, n_rows: int, held_out: dict) -> dict:
    """The same tuning the way OpenAI's fine-tuning docs show it, on the same server: upload chat rows, create a job,
    poll it, read its events and checkpoints, chat with the fine-tuned model."""
    chat = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in map(json.loads, (work / "data/tasks-train.jsonl").read_text().splitlines()[:n_rows])]
    path = work / "data/service-train-chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat))
    print(f"""
>>> training_file = client.files.create(file=open("{path.relative_to(work.parent)}", "rb"), purpose="fine-tune")
>>> job = client.fine_tuning.jobs.create(model="tiny-sft", training_file=training_file.id, suffix="demo",
...     method={{"type": "supervised", "supervised": {{"hyperparameters": {{"n_epochs": 1, "batch_size": 8}}}}}})
>>> while job.status not in ("succeeded", "failed", "cancelled"): job = client.fine_tuning.jobs.retrieve(job.id)
>>> client.fine_tuning.jobs.list_events(job.id).data[0].message; client.fine_tuning.jobs.checkpoints.list(job.id)""")
    training_file = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-sft", training_file=training_file.id, suffix="demo", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        raise SystemExit(f"demo: fine-tuning job {job.id} ended {job.status}: {job.error}")
    events = client.fine_tuning.jobs.list_events(job.id, limit=5).data
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": held_out["instruction"]}]).choices[0].message.content
    print(f"{events[0].message!r}; checkpoints {[c.fine_tuned_model_checkpoint for c in checkpoints]}")
    print(f"{job.fine_tuned_model}: {reply!r}    (expected: {held_out['output']!r})")
    return {"id": job.id, "status": job.status, "fine_tuned_model": job.fine_tuned_model, "reply": reply,
            "checkpoints": [c.step_number for c in checkpoints], "hyperparameters": job.hyperparameters.model_dump()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"demo: tunelab serve exited ({server.returncode}): {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"demo: tunelab serve did not answer within {timeout:.0f}s; see {log}") from None
            time.sleep(0.2)


# ---------------------------------------------------------------- the table

def summarize(stages: dict, total: float, mode: str) -> dict:
    rows = []
    for name, stage in stages.items():
        row = {"stage": name, "method": stage.get("method"), "train_seconds": round(stage.get("time", 0.0), 1),
               "train_cpu_seconds": round(stage.get("cpu", 0.0), 1)}
        if "pending" in stage:
            row["pending"] = stage["pending"]
            rows.append(row)
            continue
        e = stage["eval"]
        gen, pref, ppl = e.get("generation", {}), e.get("preference", {}), e.get("perplexity", {})
        row.update({
            "params": e["params"],
            "exact_match": gen.get("score"),
            "exact_match_by_family": {f: v["score"] for f, v in gen.get("by_family", {}).items()},
            "preference_accuracy": pref.get("accuracy"),
            "perplexity_text": _source_ppl(ppl, "text-test"),
            "perplexity_answers": _source_ppl(ppl, "tasks-test"),
            "eval_seconds": round(stage.get("eval_time", 0.0), 1),
        })
        rows.append(row)
    return {"mode": mode, "total_seconds": round(total, 1), "stages": rows}


def _source_ppl(ppl: dict, stem: str):
    for source, v in ppl.get("by_source", {}).items():
        if Path(source).stem == stem:
            return v["perplexity"]
    return None


if __name__ == "__main__":
    sys.exit(main())
