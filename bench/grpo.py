"""GRPO step time and peak memory: tunelab against TRL's GRPOTrainer on the same work, in one interleaved run.

    python bench/grpo.py                  # 3 interleaved rounds of 4 steps each (the first one warm-up)
    python bench/grpo.py --smoke          # the tiny model, 2 steps, one round: checks the harness only

Both tools train the benchmark's 34M Llama (bench/assets.py, full fine-tuning, fp32) with the same prompts (the
chatml rendering of each, all `--prompt-tokens` long, so no step carries more padding than another), the same
reward (bench/peers/grpo_reward.py), group size, completion length, batch, lr, kl_coef and loss. TRL runs in its
own venv (bench/peers.py's ~/.cache/tunelab/bench-peers/trl, installed on first use), each run its own process,
tunelab and TRL alternating. bench/peers/step_clock.py times both the same way: a step is the time between two
optimizer steps, "generation" the time inside transformers' `generate` in it, "update" the rest. It also sets
`min_new_tokens` to the completion length on every generate call, so every completion is exactly that long and
both tools generate, score and train on the same number of tokens (checked from the counts each side reports).
Peak RSS is the process's own high-water mark (os.wait4), start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
import peers  # noqa: E402

# TRL 1.16 as in the main venv (the tests' oracle), in its own venv so the timing sees only TRL's own stack
TRL_INSTALL = ["torch==2.13.0", "trl==1.16.0", "transformers==5.25.0", "accelerate==1.16.0", "datasets==5.2.0"]
# Settings where the two tools' defaults differ, set on both sides (README table lists them)
SETTINGS = {"group_size": 8, "kl_coef": 0.04, "lr": 1e-6, "prompts_per_step": 2, "micro_batch": 2, "seed": 42}


def prompts(tok, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """n user prompts whose chatml rendering (with the assistant header) is exactly `length` tokens: the raw
    prompts (tunelab's rows) and the rendered token ids (what TRL is given, as text, and must reproduce)."""
    from tunelab.data import render, tokenize_example

    text = assets.Text(seed=7)
    raw, ids, words = [], [], 4
    while len(raw) < n:
        prompt = text.sentence(words)
        segments = render([{"role": "user", "content": prompt}], assets.TEMPLATE, tok, add_generation_prompt=True)
        got = tokenize_example(segments, tok, max_length=10**9, train_on_prompt=True).input_ids
        if len(got) == length:
            raw.append(prompt)
            ids.append(list(got))
        else:  # too long: fewer words next time; too short: more
            words = max(1, words + (1 if len(got) < length else -1))
    return raw, ids


def tunelab_config(spec: dict, rows: Path) -> dict:
    return {"method": "grpo", "model": {"path": spec["model"]}, "output_dir": spec["out"],
            "data": {"train": [{"path": str(rows), "format": "prompt"}], "template": assets.TEMPLATE,
                     "max_length": spec["prompt_tokens"] + spec["max_new_tokens"]},
            "grpo": {"group_size": spec["group_size"], "max_new_tokens": spec["max_new_tokens"],
                     "kl_coef": spec["kl_coef"], "reward_function": "grpo_reward:tunelab_reward"},
            "train": {"max_steps": spec["steps"], "micro_batch_size": spec["prompts_per_step"], "grad_accum": 1,
                      "lr": spec["lr"], "scheduler": "constant", "seed": spec["seed"], "eval_every": None,
                      "save_every": None, "progress": False},
            "log": {"tensorboard": False, "plot": False}}


def tunelab_child(spec_path: str) -> None:
    """tunelab's side, in its own process: step_clock installed, then `tunelab train` in-process."""
    sys.path.insert(0, str(HERE / "peers"))
    from step_clock import StepClock

    spec = json.loads(Path(spec_path).read_text())
    if spec["micro_batch"] != spec["prompts_per_step"]:
        raise SystemExit("tunelab's micro-batch is the rollout's prompts: set micro_batch = prompts_per_step")
    clock = StepClock(spec["max_new_tokens"])
    clock.install()
    from tunelab.cli import main
    from tunelab.config import load_config

    work = Path(spec["out"])
    rows = assets.write_jsonl([{"prompt": p} for p in spec["raw_prompts"]], work / "prompts.jsonl")
    (work / "config.json").write_text(json.dumps(tunelab_config(spec, rows)))
    cfg = load_config(data=tunelab_config(spec, rows))
    rc = main(["train", str(work / "config.json")])
    if rc:
        raise SystemExit(rc)
    clock.write(spec["result"], loss_type=cfg.grpo.loss_type, scale_rewards=cfg.grpo.scale_rewards,
                epsilon=cfg.grpo.clip_range, num_iterations=cfg.grpo.ppo_epochs,
                steps_per_generation=cfg.grpo.steps_per_generation, optim="adamw fused")


def run_one(system: str, spec: dict, work: Path, timeout: float) -> dict:
    out = work / system
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out / "run"), "result": str(out / "result.json")}
    (out / "spec.json").write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    env = {**os.environ, **peers.QUIET, "PYTHONPATH": os.pathsep.join([str(HERE / "peers"), str(HERE.parent / "src")])}
    if system == "tunelab":
        cmd = [sys.executable, str(HERE / "grpo.py"), "--child", str(out / "spec.json")]
    else:  # TRL's venv sees only bench/peers (the driver and its reward), never our tree
        env["PYTHONPATH"] = str(HERE / "peers")
        cmd = [str(peers.ensure_venv("trl", requirements=TRL_INSTALL) / "python"), str(HERE / "peers" / "trl_grpo.py"),
               str(out / "spec.json")]
    start = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        try:
            status, usage = peers.wait_with_usage(proc, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 or not Path(spec["result"]).is_file():
        tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{system} failed (exit {rc}), {out / 'log.txt'}:\n" + "\n".join(tail))
    result = json.loads(Path(spec["result"]).read_text())
    return {**result, "system": system, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": usage.ru_maxrss / 1024, "load": os.getloadavg()[0]}


def check_equal_work(runs: list[dict], spec: dict) -> None:
    """Every step of every run generated the same tokens from the same prompt tokens, none stopping early."""
    sequences = spec["prompts_per_step"] * spec["group_size"]
    want = {"sequences": sequences, "generated_tokens": sequences * spec["max_new_tokens"],
            "prompt_tokens": sequences * spec["prompt_tokens"], "stopped_early": 0}
    for r in runs:
        if len(r["steps"]) != spec["steps"]:
            raise SystemExit(f"{r['system']}: {len(r['steps'])} optimizer steps, expected {spec['steps']}")
        for i, step in enumerate(r["steps"]):
            got = {k: step[k] for k in want}
            if got != want:
                raise SystemExit(f"{r['system']} step {i + 1}: {got}, expected {want}: not the same work")


def summary(runs: list[dict], warmup: int) -> dict:
    """Per system: min / median / max over the post-warm-up steps of all its runs, and its runs' peak RSS."""
    out = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        steps = [s for r in mine for s in r["steps"][warmup:]]
        out[system] = {k: [f(s[k] for s in steps) for f in (min, statistics.median, max)]
                       for k in ("generate_s", "update_s", "step_s", "generate_cpu_s", "update_cpu_s", "step_cpu_s")}
        rss = [r["peak_rss_mb"] for r in mine]
        out[system]["peak_rss_mb"] = [min(rss), statistics.median(rss), max(rss)]
        out[system]["steps"], out[system]["runs"] = len(steps), len(mine)
    return out


def table(s: dict) -> str:
    def cell(v, fmt):
        return f"{fmt.format(v[1])} ({fmt.format(v[0])}–{fmt.format(v[2])})"

    keys = ("generate_s", "update_s", "step_s", "generate_cpu_s", "update_cpu_s", "step_cpu_s", "peak_rss_mb")
    lines = ["| system | generation s/step | update s/step | total s/step | generation CPU s | update CPU s | "
             "total CPU s | peak RSS MB | steps (runs) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        cells = [cell(r[k], "{:.0f}" if k == "peak_rss_mb" else "{:.2f}") for k in keys]
        lines.append(f"| {name} | {' | '.join(cells)} | {r['steps']} ({r['runs']}) |")
    if {"tunelab", "trl"} <= set(s):
        a, b = s["tunelab"], s["trl"]
        for i, what in ((1, "medians"), (0, "fastest steps, least disturbed by other load")):
            ratio = " | ".join(f"{b[k][i] / a[k][i]:.2f}×" for k in keys)
            lines.append(f"| TRL / tunelab ({what}) | {ratio} | |")
    lines.append("median (min–max) over the steps after warm-up; CPU s: the process's CPU time, all threads")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps, 1 round: the harness, not speed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first --warmup not counted")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--completion-tokens", type=int, default=32)
    ap.add_argument("--systems", default="tunelab,trl")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "grpo.json")
    args = ap.parse_args(argv)
    if args.child:
        return tunelab_child(args.child)
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.prompt_tokens, args.completion_tokens = 1, 2, 0, 24, 8
    tok = assets.tokenizer()
    raw, ids = prompts(tok, 16, args.prompt_tokens)
    spec = {**SETTINGS, "model": str(assets.model_dir(tiny=args.smoke)), "raw_prompts": raw, "prompt_ids": ids,
            "prompts": [tok.decode(i[1:] if i[:1] == [tok.bos_token_id] else i) for i in ids],  # TRL adds the BOS
            "prompt_tokens": args.prompt_tokens,
            "max_new_tokens": args.completion_tokens, "steps": args.steps}
    work = HERE / "results" / ("grpo-smoke" if args.smoke else "grpo-work")
    runs = []
    for rnd in range(args.rounds):
        for system in args.systems.split(","):  # interleaved: tunelab, TRL, tunelab, TRL, ...
            r = run_one(system, spec, work, args.timeout)
            runs.append(r)
            steps = ", ".join(f"{s['generate_s']:.2f}+{s['update_s']:.2f}" for s in r["steps"])
            print(f"[round {rnd + 1}] {system:8s} gen+update s: {steps}  peak {r['peak_rss_mb']:.0f} MB  "
                  f"load {r['load']:.1f}", flush=True)
    check_equal_work(runs, spec)
    s = summary(runs, args.warmup)
    print(table(s))
    settings = {k: {r["system"]: r[k] for r in runs} for k in ("loss_type", "scale_rewards", "epsilon",
                                                                 "num_iterations", "steps_per_generation",
                                                                 "optim", "dtype")}
    print("per-tool settings as run:", json.dumps(settings))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "spec": {
        k: v for k, v in spec.items() if k not in ("raw_prompts", "prompts", "prompt_ids")}, "settings": settings,
        "summary": s, "table": table(s), "runs": runs}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
