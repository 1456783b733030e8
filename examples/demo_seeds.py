#!/usr/bin/env python
"""How much the demo's SFT result depends on the seed: the SFT stage of examples/demo.py again, from the same base
model and data, once per seed, each evaluated on the same held-out prompts.

    python examples/demo.py                     # writes the base model and data under work/ first
    python examples/demo_seeds.py               # seeds 1 2 3 -> work/demo/seeds.json (mean and spread)
    python examples/demo_seeds.py --seeds 1 2 3 train.lr=1e-3    # the same with a changed SFT setting
    python examples/demo_seeds.py --seeds 1 2 --demo-run         # seeds 1, 2 and the demo's own run (seed 42)

The seed sets the adapter's initialisation and the order of the training rows (train.seed). Each run costs what
the demo's SFT stage costs (a few minutes on two cores), so this is a separate measurement, not part of `make demo`.
examples/demo_table.py puts the result under the demo's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def scores(seed: int, eval_json: Path, seconds: float | None = None) -> dict:
    generation = json.loads(eval_json.read_text())["generation"]
    return {"seed": seed, "exact_match": generation["score"], "seconds": seconds, "eval": str(eval_json),
            "exact_match_by_family": {f: v["score"] for f, v in generation["by_family"].items()}}


def run_seed(root: Path, seed: int, overrides: list[str], threads: int | None, reuse: bool) -> dict:
    """Train and evaluate one seed; the runs go to work/runs/sft-seed<SEED>, the evaluation to work/demo/seeds/."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    run_dir, out = f"work/runs/sft-seed{seed}", f"work/demo/seeds/eval-seed{seed}.json"
    if reuse and (root / out).is_file():
        return scores(seed, root / out)
    (root / "work/demo/seeds").mkdir(parents=True, exist_ok=True)
    log = (root / f"work/demo/seeds/seed{seed}.log").open("w")
    commands = [["train", str(REPO / "examples/sft-lora.yaml"), f"output_dir={run_dir}", f"train.seed={seed}",
                 *overrides],
                ["eval", str(REPO / "examples/demo/eval.yaml"), "--model", run_dir, "--out", out]]
    started = time.time()
    for args in commands:
        print(f"$ tunelab {' '.join(args)}", file=log, flush=True)
        if subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=root, env=env, stdout=log,
                          stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"demo_seeds: seed {seed}: `tunelab {' '.join(args)}` failed; see {log.name}")
    return scores(seed, root / out, round(time.time() - started, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="key=value overrides of examples/sft-lora.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", default=str(REPO), help="where work/ is (default: the repository root)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at the same time (one thread each)")
    parser.add_argument("--demo-run", action="store_true",
                        help="count the demo's own SFT run (work/demo/eval-sft.json, the config's train.seed) as one "
                             "more seed: the same base, data and config")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a seed's evaluation already in work/demo/seeds/ instead of training it again")
    parser.add_argument("--out", default="work/demo/seeds.json", help="where the summary goes, under --root")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not (root / "work/models/tiny/config.json").is_file():
        raise SystemExit(f"demo_seeds: no base model at {root / 'work/models/tiny'}: run examples/demo.py first")
    if args.demo_run and args.overrides:
        raise SystemExit("demo_seeds: --demo-run compares with the demo's own SFT run: leave the overrides out")
    demo_eval = root / "work/demo/eval-sft.json"
    if args.demo_run and not demo_eval.is_file():
        raise SystemExit(f"demo_seeds: --demo-run: no {demo_eval}; run examples/demo.py to the end first")
    threads = 1 if args.jobs > 1 else None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda s: run_seed(root, s, args.overrides, threads, args.reuse), args.seeds))
    if args.demo_run:
        from tunelab.config import load_config

        runs.insert(0, scores(load_config(REPO / "examples/sft-lora.yaml").train.seed, demo_eval))
    matches = [r["exact_match"] for r in runs]
    mean = sum(matches) / len(matches)
    summary = {"overrides": args.overrides, "runs": runs, "mean": mean,
               "spread": max(abs(m - mean) for m in matches), "range": [min(matches), max(matches)]}
    (root / args.out).parent.mkdir(parents=True, exist_ok=True)
    (root / args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for r in runs:
        print(f"seed {r['seed']}: exact match {r['exact_match']:.1%} "
              + " ".join(f"{f} {v:.0%}" for f, v in r["exact_match_by_family"].items()))
    print(f"mean {mean:.1%} ± {summary['spread']:.1%} (max deviation from the mean); written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
