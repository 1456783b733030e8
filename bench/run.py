"""Throughput benchmark: tunelab's loop against TRL + PEFT on the same model, rows and hyper-parameters.

    python bench/run.py                       # every workload (what `make bench` runs), ~40 min on 2 cores
    python bench/run.py --workload sft-lora   # one workload
    python bench/run.py --workload sft-lora --reps 5 --rows 64
    python bench/run.py --ablations           # the technique measurements recorded in bench/README.md

Each measured run is its own process (`bench/systems.py`), so peak memory (ru_maxrss; max_memory_allocated on
CUDA) is that run's alone. Systems run interleaved (A B C, A B C, ...) and the table shows medians. Every system
trains one epoch over the same rows (the same token ids: tunelab's tokenisation, handed to TRL pre-tokenised),
so "real tokens" is the same work for all; only the timed training steps count (see systems.py).

Model FLOPs per token (EleutherAI "Transformer Math 101"; Kaplan et al. 2020): 6 N for full fine-tuning,
4 N for a frozen base (no weight gradients) + 6 N_lora, with N the decoder's matmul parameters; the LM head is
counted only on tokens that carry a label (no system computes it elsewhere); attention adds 6 * layers * T *
d_model per token of a T-token document (its own context, since documents never attend to each other).
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
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

NOMINAL_ROWS = 10_000  # "time per epoch" is for a dataset of this many rows like the benchmark's

# name -> (system, spec additions). tunelab variants differ only by config overrides / ablation patches.
SYSTEMS = {
    # tunelab's defaults: nothing set (data.padding_free: auto takes padding-free batches on these workloads)
    "tunelab": ("tunelab", {}),
    # the memory-saving mode: + gradient checkpointing (which on CPU also hands freed memory back, tunelab/modeling/memory.py)
    "tunelab-ckpt": ("tunelab", {"overrides": ["train.gradient_checkpointing=true"]}),
    "tunelab-grouped": ("tunelab", {"overrides": ["data.padding_free=false", "train.group_by_length=true"]}),
    "tunelab-grouped-ckpt": ("tunelab", {"overrides": ["data.padding_free=false", "train.group_by_length=true",
                                                       "train.gradient_checkpointing=true"]}),
    "tunelab-packed": ("tunelab", {"overrides": ["data.packing=true"]}),
    "tunelab-padded": ("tunelab", {"overrides": ["data.padding_free=false"]}),  # padded batches, shuffled order
    "trl": ("trl", {"packing": False}),  # TRL's defaults (gradient checkpointing on), no packing
    "trl-packed": ("trl", {"packing": True}),  # TRL's BFD packing (padding-free rows, position_ids)
    "trl-no-ckpt": ("trl", {"packing": False, "gradient_checkpointing": False}),
}

WORKLOADS = {
    # workload -> systems of the default run; ratios are against the first trl* system listed
    "sft-lora": ["tunelab", "tunelab-padded", "tunelab-ckpt", "trl", "trl-packed", "trl-no-ckpt"],
    "sft-full": ["tunelab", "trl", "trl-packed"],
    "qlora": ["tunelab", "trl", "trl-packed"],
    "dpo-lora": ["tunelab", "tunelab-grouped", "trl"],
    "fixed": ["tunelab-lora", "tunelab-full"],
}

# label -> (workload, systems): each technique against the shipped configuration, the first system listed
ABLATIONS = {
    "padding": ("sft-lora", ["tunelab", "tunelab-grouped", "tunelab-packed", "tunelab-padded"]),
    "cross-entropy": ("sft-full", ["tunelab-grouped", "tunelab-grouped+ce_checkpoint"]),
    "checkpointing": ("sft-lora", ["tunelab", "tunelab-ckpt"]),
    "adamw": ("sft-full", ["tunelab-grouped", "tunelab-grouped+adamw_foreach"]),
    "compile": ("sft-lora", ["tunelab", "tunelab+compile_layers"]),
    "lora-dropout": ("sft-lora", ["tunelab", "tunelab+no_lora_dropout"]),
    "malloc": ("sft-lora", ["tunelab-grouped-ckpt", "tunelab-grouped-ckpt+malloc_default", "tunelab-grouped",
                            "tunelab-grouped+malloc_fixed"]),
}

# ---------------------------------------------------------------- machine ceiling

def matmul_gflops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best-of-`reps` n^3 matmul rate in the precision the runs use (fp32 on CPU; bf16, 8192^3, on CUDA): the
    machine's dense-math ceiling in this process's thread setting."""
    import torch

    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else n
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------- model FLOPs

def model_flops(docs: list[list[int]], full: bool, tiny: bool = False, dpo: bool = False) -> float:
    """Model FLOPs of one pass over `docs` ([length, loss tokens] each). DPO adds the reference model's forward
    (2 N per token, head on the loss tokens)."""
    s = assets.shape(tiny)
    d, layers, ff, vocab = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], assets.VOCAB
    body = layers * (4 * d * d + 3 * d * ff)
    r = 16
    lora = layers * r * (4 * (d + d) + 2 * (d + ff) + (ff + d))
    total = 0.0
    for length, loss_tokens in docs:
        if full:
            total += 6 * body * length + 6 * d * vocab * loss_tokens
        else:
            total += (4 * body + 6 * lora) * length + 4 * d * vocab * loss_tokens
        total += 6 * layers * d * length * length
        if dpo:
            total += 2 * body * length + 2 * d * vocab * loss_tokens + 2 * layers * d * length * length
    return total


# ---------------------------------------------------------------- runs

def spec_for(workload: str, name: str, args) -> dict:
    if workload == "fixed":
        full = name.endswith("full")
        system, extra = "tunelab", {}
        spec = {"workload": "fixed", "full": full, "seq": args.seq, "rows": args.fixed_rows}
    else:
        base, *patches = name.split("+")  # "tunelab+ce_checkpoint": a variant with ablations.py patches
        system, extra = SYSTEMS[base]
        extra = {**extra, "patches": patches} if patches else extra
        spec = {"workload": workload, "rows": args.rows}
    spec.update({"system": system, "name": name, "micro_batch": 8, "device": args.device, "tiny": args.tiny, **extra})
    return spec


def run_child(spec: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    launched = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "systems.py"), json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    process_s = time.time() - launched
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            # whole process, start-up and saving included; and from launch to the end of the first optimizer step
            out["process_s"] = process_s
            out["first_step_s"] = out.pop("first_step_at") - launched
            return out
    raise RuntimeError(f"{spec['name']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def measure(workload: str, names: list[str], args, say=print) -> dict:
    runs: dict[str, list[dict]] = {n: [] for n in names}
    loads = []
    for rep in range(args.reps):
        for name in names:  # interleaved: A B C, A B C, ...
            spec = spec_for(workload, name, args)
            loads.append(load_average())
            r = run_child(spec)
            r["load_before"] = loads[-1]
            runs[name].append(r)
            probe = "/".join(f"{g:.0f}" for g in r["probe_gflop_s"])
            say(f"  [{workload} rep {rep + 1}/{args.reps}] {name:16s} {r['real_tokens'] / r['seconds']:8.1f} real tok/s "
                f"{r['seconds']:6.1f}s  process {r['process_s']:5.1f}s (first step {r['first_step_s']:4.1f}s)  "
                f"rss {r['peak_rss_mb']:6.0f} MB  faults {r.get('minor_faults', 0) / 1e6:5.2f}M  (load {loads[-1]:.2f}, matmul probe before/after "
                f"{probe} GFLOP/s)", flush=True)
    return {"runs": runs, "load_average": loads}


def summarise(workload: str, names: list[str], measured: dict, ceiling: float, args) -> list[dict]:
    rows = []
    for name in names:
        rs = measured["runs"][name]
        tps = [r["real_tokens"] / r["seconds"] for r in rs]
        med = statistics.median(tps)
        full = workload == "sft-full" or name.endswith("full")
        docs = next((r["docs"] for n in names for r in measured["runs"][n] if r["docs"]), [])  # same rows for all
        flops = model_flops(docs, full, args.tiny, dpo=workload == "dpo-lora") if docs else float("nan")
        tokens = rs[0]["real_tokens"]
        epoch_tokens = tokens / args.rows * NOMINAL_ROWS if workload != "fixed" else float("nan")
        mem_key = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
        probes = [g for r in rs for g in r.get("probe_gflop_s", [])]
        row = {
            "system": name, "real_tok_s": med, "real_tok_s_runs": tps, "best_tok_s": max(tps),
            "probe_gflop_s": statistics.median(probes) if probes else None,
            "epoch_min": epoch_tokens / med / 60 if workload != "fixed" else None,
            "peak_mem_mb": statistics.median(r[mem_key] for r in rs),
            "process_s": statistics.median(r["process_s"] for r in rs),
            "first_step_s": statistics.median(r["first_step_s"] for r in rs),
            "padding_share": (1 - tokens / statistics.median(r["batch_tokens"] for r in rs))
            if "batch_tokens" in rs[0] else None,
            "model_gflop_s": flops / tokens * med / 1e9 if docs else None,
        }
        row["flop_ceiling_share"] = row["model_gflop_s"] / ceiling if row["model_gflop_s"] else None
        rows.append(row)
    base = rows[0]
    peers = [r for r in rows if r["system"].startswith("trl")]
    for r in rows:
        r["speedup_vs_trl"] = r["real_tok_s"] / peers[0]["real_tok_s"] if peers else None
        r["best_vs_trl_best"] = r["best_tok_s"] / peers[0]["best_tok_s"] if peers else None
        r["mem_vs_trl"] = r["peak_mem_mb"] / peers[0]["peak_mem_mb"] if peers else None
        r["process_vs_trl"] = peers[0]["process_s"] / r["process_s"] if peers else None  # > 1: faster than TRL
    if peers:
        fastest = max(peers, key=lambda r: r["real_tok_s"])
        base["speedup_vs_fastest_trl"] = base["real_tok_s"] / fastest["real_tok_s"]
        base["fastest_trl"] = fastest["system"]
    return rows


def table(workload: str, rows: list[dict], device: str) -> str:
    mem = "peak CUDA MB" if device == "cuda" else "peak RSS MB"
    head = (f"| {workload} | real tok/s (median) | vs trl | best run | best vs trl's best | process s | vs trl "
            f"| first step s | epoch* (min) | {mem} | vs trl | padding | model GFLOP/s | of ceiling | probe GFLOP/s |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        def f(v, fmt):
            return "–" if v is None else format(v, fmt)

        lines.append(f"| {r['system']} | {r['real_tok_s']:.0f} | {f(r['speedup_vs_trl'], '.2f')}× | "
                     f"{r['best_tok_s']:.0f} | {f(r['best_vs_trl_best'], '.2f')}× | "
                     f"{r['process_s']:.1f} | {f(r['process_vs_trl'], '.2f')}× | {r['first_step_s']:.1f} | "
                     f"{f(r['epoch_min'], '.0f')} | {r['peak_mem_mb']:.0f} | {f(r['mem_vs_trl'], '.2f')}× | "
                     f"{f(r['padding_share'], '.0%')} | {f(r['model_gflop_s'], '.1f')} | "
                     f"{f(r['flop_ceiling_share'], '.0%')} | {f(r['probe_gflop_s'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--systems", help="comma-separated systems (default: the workload's list)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=32, help="rows per run: one epoch over them (micro-batch 8)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of the fixed workload")
    p.add_argument("--fixed-rows", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer stand-in model: smoke-tests the harness only")
    p.add_argument("--ablations", nargs="?", const="all", help=f"technique measurements: all or some of "
                   f"data, {', '.join(ABLATIONS)}")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    assets.model_dir(args.tiny), assets.rows(args.rows)  # build (or load) the shared assets once, before any timing
    if args.ablations:
        jobs = [(label, wl, names) for label, (wl, names) in ABLATIONS.items()
                if args.ablations == "all" or label in args.ablations.split(",")]
    else:
        wls = list(WORKLOADS) if args.workload == "all" else [args.workload]
        jobs = [(wl, wl, args.systems.split(",") if args.systems else WORKLOADS[wl]) for wl in wls]
    import torch

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    ceiling = matmul_gflops(device=args.device)
    print(f"matmul ceiling ({'bf16 8192^3' if args.device == 'cuda' else 'fp32 2048^3'}): {ceiling:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads); "
          f"load average {load_average():.2f}")
    if args.ablations and (args.ablations == "all" or "data" in args.ablations.split(",")):
        import micro

        r = micro.data_path()
        print(micro.table(r), flush=True)
        (RESULTS / "data-path-cpu.json").write_text(json.dumps({**r, "markdown": micro.table(r)}, indent=1))
    for label, wl, names in jobs:
        t = time.time()
        measured = measure(wl, names, args)
        after = matmul_gflops(device=args.device)
        rows = summarise(wl, names, measured, max(ceiling, after), args)
        text = table(label, rows, args.device)
        note = (f"({time.time() - t:.0f}s; median of {args.reps}; {args.rows if wl != 'fixed' else args.fixed_rows} "
                f"rows; ceiling {max(ceiling, after):.0f} GFLOP/s; load average during runs "
                f"{statistics.median(measured['load_average']):.2f}; *epoch of {NOMINAL_ROWS:,} such rows, "
                "extrapolated from the measured steps)")
        print(text + "\n" + note, flush=True)
        out = {"workload": wl, "label": label, "device": args.device, "rows": args.rows, "reps": args.reps,
               "ceiling_gflop_s": max(ceiling, after), "table": rows, "raw": measured, "markdown": text, "note": note,
               "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        (RESULTS / f"{label}-{args.device}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
