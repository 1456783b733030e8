"""Whole-process race: tunelab's default config against every peer fine-tuning tool, LoRA SFT on the same rows.

    python bench/peers.py                          # install missing peer venvs, then one interleaved round
    python bench/peers.py --reps 2 --rows 64
    python bench/peers.py --systems tunelab,torchtune --install-only

Each peer lives in its own venv under ~/.cache/tunelab/bench-peers/<name> (their pins conflict with ours and with
each other), created with the pinned installs below when its `.ok` marker is missing. Every system trains one epoch
of the same 34M Llama (bench/assets.py) on the same alpaca rows: LoRA r16 alpha 32 dropout 0 on all seven linear
layers, fp32, micro-batch 8, prompt masked, lr 2e-4, telemetry off. Each run is one process, timed from start to
exit (imports, loading, data preparation and saving included: what a user waits for); peak RSS is the largest
resident set of the process or any child it waited for (os.wait4's ru_maxrss).
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

CACHE = Path.home() / ".cache" / "tunelab" / "bench-peers"
DRIVERS = HERE / "peers"

# name -> pip requirements (versions that train on this CPU: /work/shared/PEERS.md). LLaMA-Factory and unsloth
# need torchvision, which pulls a CUDA torch build; that build trains on CPU.
INSTALL = {
    "torchtune": ["torch==2.13.0", "torchtune==0.6.1", "torchao==0.14.1"],
    "llamafactory": ["llamafactory==0.9.5", "transformers==5.6.0", "peft==0.18.1", "trl==0.24.0", "torchvision",
                     "torchaudio"],
    "litgpt": ["torch==2.13.0", "litgpt==0.5.13", "lightning==2.6.6", "requests"],
    "axolotl": ["torch==2.13.0", "axolotl==0.19.0", "transformers==5.16.1", "peft==0.20.0", "trl==1.9.0"],
    "unsloth": ["unsloth==2026.10.9", "trl==1.15.0", "peft==0.21.2", "torchvision"],
}
PEERS = list(INSTALL)
QUIET = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
         "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
         "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
         "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONUNBUFFERED": "1"}


def ensure_venv(name: str, say=print, requirements: list[str] | None = None) -> Path:
    """The peer's venv, installed with `requirements` (default: INSTALL[name]) when its `.ok` marker is missing."""
    venv = CACHE / name
    if not (venv / ".ok").is_file():
        say(f"installing {name} into {venv} (takes a while)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + (requirements or INSTALL[name]), check=True)
        (venv / ".ok").touch()
    return venv / "bin"


def prepare(work: Path, n_rows: int) -> dict:
    """The shared inputs: the model dir, the rows (alpaca jsonl) and the rows' real token count."""
    model = assets.model_dir()
    rows = assets.rows(n_rows)
    work.mkdir(parents=True, exist_ok=True)
    path = assets.write_jsonl(rows, work / "rows.jsonl")
    (work / "dataset_info.json").write_text(json.dumps(  # LLaMA-Factory's data registry
        {"bench": {"file_name": "rows.jsonl", "columns": {"prompt": "instruction", "query": "input",
                                                          "response": "output"}}}))
    tok = assets.tokenizer()
    tokens = sum(len(tok(r["instruction"], add_special_tokens=False).input_ids)
                 + len(tok(" " + r["output"], add_special_tokens=False).input_ids) + 1 for r in rows)
    return {"model": str(model), "rows": str(path), "work": str(work), "tokens": tokens,
            "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


def _config(peer: str, ctx: dict, out: Path) -> Path:
    text = (DRIVERS / f"{peer}.yaml").read_text().format(out=out, **ctx)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(text)
    return out / "config.yaml"


def command(name: str, ctx: dict, out: Path) -> tuple[list[str], dict]:
    """The command line and extra environment of one whole-process run."""
    if name == "tunelab":  # the default config: nothing but the workload
        cfg = {"model": {"path": ctx["model"]}, "data": {"train": [{"path": ctx["rows"], "format": "alpaca"}]},
               "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
               "train": {"epochs": 1, "micro_batch_size": 8, "lr": 2e-4},
               "output_dir": str(out / "run")}
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg))
        return [sys.executable, "-m", "tunelab", "train", str(out / "config.json")], {}
    if name == "trl":  # the existing bench system (TRL + PEFT defaults, main venv), run as a whole process
        spec = {"workload": "sft-lora", "system": "trl", "name": "trl", "rows": ctx["n_rows"], "micro_batch": 8,
                "device": "cpu", "tiny": False, "packing": False}
        return [sys.executable, str(HERE / "systems.py"), json.dumps(spec)], {
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
    bin_ = ensure_venv(name)
    py = str(bin_ / "python")
    if name == "torchtune":
        return [str(bin_ / "tune"), "run", "lora_finetune_single_device", "--config", str(_config(name, ctx, out))], \
            {"PYTHONPATH": str(DRIVERS)}
    if name == "llamafactory":
        return [str(bin_ / "llamafactory-cli"), "train", str(_config(name, ctx, out))], {}
    if name == "axolotl":
        return [str(bin_ / "axolotl"), "train", str(_config(name, ctx, out)), "--launcher", "python"], {}
    if name == "litgpt":
        return [py, str(DRIVERS / "litgpt_lora.py"), ctx["model"], ctx["rows"], str(out)], {}
    if name == "unsloth":
        return [py, str(DRIVERS / "unsloth_sft.py"), ctx["model"], ctx["rows"], str(out)], {}
    raise SystemExit(f"unknown system {name!r}: use tunelab, trl or one of {', '.join(PEERS)}")


def wait_with_usage(proc: subprocess.Popen, timeout: float) -> tuple[int, os.struct_rusage]:
    """(wait status, resource usage: ru_maxrss is the peak RSS) of `proc`, killed past `timeout` seconds (<= 0:
    no limit), with its process group when it leads one."""
    deadline = time.perf_counter() + timeout if timeout > 0 else float("inf")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage
        if time.perf_counter() > deadline:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, 9)
            else:
                proc.kill()
            return os.wait4(proc.pid, 0)[1:]
        time.sleep(0.05)


def run_one(name: str, ctx: dict, timeout: float) -> dict:
    out = Path(ctx["work"]) / name
    cmd, extra = command(name, ctx, out)
    env = {**os.environ, **QUIET, **extra}
    if "PYTHONPATH" not in extra and name in PEERS:
        env.pop("PYTHONPATH", None)  # a peer's venv must not see our tree
    log = out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=out, start_new_session=True)
        status, usage = wait_with_usage(proc, timeout)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    error = None
    if rc != 0:
        error = next((line.strip() for line in reversed(tail) if "Error" in line or "error" in line),
                     tail[-1] if tail else f"exit {rc}")[:300]
    return {"system": name, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1024**2, "rc": rc, "error": error,
            "tokens": ctx["tokens"], "load_before": load, "load_after": os.getloadavg(), "command": cmd,
            "log": str(log)}


def table(results: dict[str, list[dict]]) -> str:
    """Medians over each system's successful runs (wall time and peak RSS each their own median)."""
    def median(rs):
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            return None
        return {"wall_s": statistics.median(r["wall_s"] for r in ok), "n": len(ok), "tokens": ok[0]["tokens"],
                "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok),
                "load": statistics.median(r["load_before"][0] for r in ok)}

    base = median(results.get("tunelab", []))
    lines = ["| system | wall s | peak RSS GB | runs | tokens | tok/s | tunelab speed-up | RSS vs tunelab | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        r = median(rs)
        if r is None:
            lines.append(f"| {name} | failed | – | 0/{len(rs)} | – | – | – | – | {rs[-1]['load_before'][0]:.1f} |")
            continue
        speed = f"{r['wall_s'] / base['wall_s']:.2f}×" if base else "–"
        mem = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}×" if base else "–"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['n']}/{len(rs)} | {r['tokens']} | "
                     f"{r['tokens'] / r['wall_s']:.0f} | {speed} | {mem} | {r['load']:.1f} |")
    failed = [(n, next(r["error"] for r in rs if r["rc"] != 0)) for n, rs in results.items()
              if any(r["rc"] != 0 for r in rs)]
    lines += [f"\n{n} failed in {sum(r['rc'] != 0 for r in results[n])} run(s): {e}" for n, e in failed]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(["tunelab", *PEERS, "trl"]))
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run before it counts as failed")
    ap.add_argument("--install-only", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peers.json")
    args = ap.parse_args(argv)
    names = args.systems.split(",")
    for name in names:
        if name in PEERS:
            ensure_venv(name)
    if args.install_only:
        return
    ctx = {**prepare(HERE / "results" / "peers-work", args.rows), "n_rows": args.rows}
    results: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:  # interleaved: A B C, A B C
            r = run_one(name, ctx, args.timeout)
            results[name].append(r)
            status = "ok" if r["rc"] == 0 else f"FAILED: {r['error']}"
            print(f"[rep {rep + 1}] {name:13s} {r['wall_s']:7.1f} s  {r['peak_rss_gb']:5.2f} GB  load "
                  f"{r['load_before'][0]:.2f}  {status}", flush=True)
            save(args, ctx, results)  # after every run: an interrupted race keeps what it measured
    print(table(results))
    print(f"wrote {args.out}")


def save(args, ctx: dict, results: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {n: rs for n, rs in results.items() if rs}
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows,
                                    "tokens": ctx["tokens"], "runs": done, "table": table(done)}, indent=1))


if __name__ == "__main__":
    main()
