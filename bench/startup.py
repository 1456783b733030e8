"""Where the start-up of `tunelab train` goes: from the command to the end of its first optimizer step.

    python bench/startup.py                  # the sft-lora workload's default config, 3 interleaved cold/warm runs
    python bench/startup.py --reps 5
    python bench/startup.py --baseline /tmp/old/src   # also another checkout's tunelab, interleaved, for the ratio

Each run is `python -m tunelab train CONFIG train.max_steps=1` in its own process, with `-X importtime`. The child
stamps the phases (wrapping the functions the trainer calls, nothing else changes): interpreter + `tunelab.cli`,
config, the trainer's imports (torch ...), tokenizer, data (the tokenized-data cache cold or warm), model (load,
adapter, attention probe), the rest of setup (optimizer), the first step. From the import log: the
cumulative import time of each heavy package, whichever phase imported it. Medians of the runs, with the load
average, as a markdown table (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "tensorboard", "matplotlib",
            "safetensors", "tokenizers", "numpy", "pydantic", "yaml", "tunelab")

# The child: wraps the trainer's steps with time stamps, then runs the CLI exactly as `python -m tunelab` does.
CHILD = r"""
import json, sys, time
stamps = {"cli_imported": None}
import tunelab.cli as cli
stamps["cli_imported"] = time.time()
import tunelab.config as config
_load = config.load_config
def load_config(*a, **k):
    out = _load(*a, **k); stamps.setdefault("config", time.time()); return out
config.load_config = load_config
_train = None
def stamp_after(module, name, key):
    fn = getattr(module, name)
    def wrapped(*a, **k):
        out = fn(*a, **k); stamps[key] = time.time(); return out
    setattr(module, name, wrapped)
import tunelab.training.loop as trainer
stamps["trainer_imported"] = time.time()
import tunelab.modeling.build as model
stamp_after(model, "build_tokenizer", "tokenizer")
stamp_after(model, "build_model", "model")
import tunelab.objectives as objectives
_make = objectives.make_objective
def make_objective(*a, **k):
    obj = _make(*a, **k)
    datasets = obj.datasets
    def timed():
        out = datasets(); stamps["data"] = time.time(); return out
    obj.datasets = timed
    return obj
objectives.make_objective = make_objective
_setup, _step = trainer.Trainer.setup, trainer.Trainer._step
def setup(self):
    _setup(self); stamps["setup"] = time.time()
def step(self, batches):
    out = _step(self, batches); stamps.setdefault("first_step", time.time()); return out
trainer.Trainer.setup, trainer.Trainer._step = setup, step
code = cli.main(sys.argv[1:])
print("STAMPS " + json.dumps(stamps), flush=True)
raise SystemExit(code)
"""

PHASES = [  # (label, stamp that ends it); each phase starts where the previous one ended
    ("interpreter + `import tunelab.cli`", "cli_imported"),
    ("trainer imports (torch, ...)", "trainer_imported"),
    ("config", "config"),
    ("tokenizer", "tokenizer"),
    ("data (read, tokenize or cache hit)", "data"),
    ("model (load, adapter, attention)", "model"),
    ("rest of setup (optimizer, ...)", "setup"),
    ("first step (forward, backward, update)", "first_step"),
]


def config_file(tmp: Path) -> Path:
    import yaml

    import assets

    rows = assets.write_jsonl(assets.rows(32), tmp / "rows.jsonl")
    cfg = {"model": {"path": str(assets.model_dir(False))}, "adapter": {"r": 16, "alpha": 32},
           "data": {"train": [{"path": str(rows), "format": "alpaca"}], "template": assets.TEMPLATE},
           "train": {"micro_batch_size": 8, "grad_accum": 1, "progress": False}, "output_dir": str(tmp / "run")}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_once(cfg: Path, cache: Path, out: Path, src: Path = HERE.parent / "src") -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD, "train", str(cfg), "train.max_steps=1",
                           f"output_dir={out}"], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    stamps = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("STAMPS ")), None)
    if proc.returncode or stamps is None:
        raise RuntimeError(f"startup run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases, previous = {}, t0
    for label, key in PHASES:
        phases[label] = stamps[key] - previous
        previous = stamps[key]
    return {"phases": phases, "to_first_step": stamps["first_step"] - t0, "process": wall, "load": load,
            "imports": import_times(proc.stderr), "lines": [l for l in proc.stdout.splitlines() if "padding_free" in l]}


def import_times(log: str) -> dict[str, float]:
    """Cumulative seconds of each top-level package's first import (python -X importtime's log)."""
    out = {}
    for line in log.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2].strip()
        if name in PACKAGES:  # its first import, wherever it happened; cumulative covers its submodules
            out[name] = out.get(name, 0.0) + int(parts[1]) / 1e6
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="another checkout's src/ (e.g. an older commit's): timed too")
    args = p.parse_args(argv)
    trees = {"": HERE.parent / "src", **({", baseline": args.baseline} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = config_file(tmp)
        runs = {f"{label}{tree}": [] for tree in trees for label in ("cold cache", "warm cache")}
        for rep in range(args.reps):
            for tree, src in trees.items():
                cache = tmp / f"cache{tree}"
                shutil.rmtree(cache, ignore_errors=True)
                for label in ("cold cache", "warm cache"):  # cold (empty token cache), then warm (what cold wrote)
                    r = run_once(cfg, cache, tmp / "run", src)
                    runs[label + tree].append(r)
                    print(f"  [{rep + 1}/{args.reps}] {label}{tree}: first step at {r['to_first_step']:.1f}s, "
                          f"process {r['process']:.1f}s (load {r['load']:.1f})", flush=True)
    print(table(runs))
    return 0


def table(runs: dict) -> str:
    med = statistics.median
    labels = list(runs)
    lines = ["| phase | " + " | ".join(f"{l} (s)" for l in labels) + " |", "|---|" + "---|" * len(labels)]
    for phase, _ in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{med(r['phases'][phase] for r in runs[l]):.2f}" for l in labels)
                     + " |")
    lines.append("| **to the first optimizer step** | " + " | ".join(
        f"**{med(r['to_first_step'] for r in runs[l]):.2f}**" for l in labels) + " |")
    lines.append("| whole process (1 step, saving) | " + " | ".join(
        f"{med(r['process'] for r in runs[l]):.2f}" for l in labels) + " |")
    pkgs = sorted({k for l in labels for r in runs[l] for k in r["imports"]},
                  key=lambda k: -med(r["imports"].get(k, 0.0) for r in runs[labels[-1]]))
    for k in pkgs:
        lines.append(f"| import {k} (within the phases above) | " + " | ".join(
            f"{med(r['imports'].get(k, 0.0) for r in runs[l]):.2f}" for l in labels) + " |")
    loads = [r["load"] for l in labels for r in runs[l]]
    lines.append(f"\n(medians of {len(runs[labels[0]])} interleaved runs each; load average {med(loads):.1f} "
                 f"(range {min(loads):.1f}-{max(loads):.1f}); " + "; ".join(sorted({x for l in labels for r in runs[l]
                                                                              for x in r['lines']})) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
