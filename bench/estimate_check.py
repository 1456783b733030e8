"""`tunelab estimate` against the runs it estimates: the bench's SFT LoRA workload on the default path (padding-free)
and the padded one, each run measured in its own process (`bench/systems.py`, as `bench/run.py` runs it).

    python bench/estimate_check.py              # what `make bench-estimate` runs: 64 rows, 3 runs each (medians)
    python bench/estimate_check.py --rows 8 --reps 1 --tiny   # smoke-tests the script in a minute

Compared: the estimate's total on CPU (peak tensor bytes + the process baseline) with the run's peak RSS, and its
time per epoch with the run's timed training steps (one epoch over the same rows; start-up, data and saving are
outside both). The estimate reads the same config the run trains with, so it tokenizes the same rows with the
model's tokenizer and forms the same micro-batches. Issue 11's targets: peak within +-15 %, epoch time within
+-25 %. The estimate measures this machine's matmul rate when it runs, so a loaded machine moves both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
import run  # noqa: E402
import systems  # noqa: E402

WORKLOAD = "sft-lora"
PATHS = {"tunelab": "default (padding-free)", "tunelab-padded": "padded"}
TARGETS = {"peak": 0.15, "time": 0.25}


def estimated(spec: dict) -> dict:
    from tunelab.estimate import GIB, estimate

    with tempfile.TemporaryDirectory() as d:
        cfg = systems._tunelab_config(spec, Path(d))  # the run's own config: same rows, model, tokenizer
        est = estimate(cfg, device="cpu", suggest=False)
    return {"total_gib": est.total_bytes / GIB, "peak_gib": est.peak_bytes / GIB, "seconds": est.seconds_per_epoch,
            "tokens": est.tokens_per_epoch, "padding_free": est.padding_free, "tokens_source": est.tokens_source}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="rows of the epoch (64: issue 11's figures)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the 2-layer stand-in model: smoke-tests the script only")
    args = p.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.device, args.seq, args.fixed_rows = "cpu", 256, 32  # what run.spec_for reads
    assets.model_dir(args.tiny), assets.rows(args.rows)
    out, lines = [], []
    for name, label in PATHS.items():
        spec = run.spec_for(WORKLOAD, name, args)
        est = estimated(spec)
        runs = [run.run_child(spec) for _ in range(args.reps)]
        rss = statistics.median(r["peak_rss_mb"] for r in runs) / 1024
        seconds = statistics.median(r["seconds"] for r in runs)
        row = {"path": label, "system": name, "estimate": est, "peak_rss_gib": rss, "seconds": seconds,
               "real_tokens": runs[0]["real_tokens"], "runs": runs,
               "peak_ratio": est["total_gib"] / rss, "time_ratio": est["seconds"] / seconds}
        out.append(row)
        lines.append(f"| {label} | {est['total_gib']:.2f} | {rss:.2f} | {row['peak_ratio']:.2f} | "
                     f"{est['seconds']:.1f} | {seconds:.1f} | {row['time_ratio']:.2f} | "
                     f"{est['tokens']:,} / {row['real_tokens']:,} |")
    head = ("| sft-lora, path | estimate GiB | peak RSS GiB | ratio | estimate s/epoch | measured s | ratio "
            "| tokens estimated / trained |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    met = all(abs(r["peak_ratio"] - 1) <= TARGETS["peak"] and abs(r["time_ratio"] - 1) <= TARGETS["time"]
              for r in out)
    note = (f"({args.rows} rows, median of {args.reps}{', tiny model: numbers mean nothing' if args.tiny else ''}; "
            f"targets: peak within +-15 %, time within +-25 %: {'met' if met else 'NOT met'}; "
            f"load average {os.getloadavg()[0]:.2f})")
    text = head + "\n" + "\n".join(lines) + "\n" + note
    print(text)
    run.RESULTS.mkdir(exist_ok=True)
    (run.RESULTS / "estimate-check-cpu.json").write_text(json.dumps(
        {"rows": args.rows, "reps": args.reps, "tiny": args.tiny, "table": out, "markdown": text,
         "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
