"""Scheduler overhead per job: what `tunelab serve` adds to a training run, on each backend, against running
`tunelab train` directly.

    python bench/scheduler.py                 # local backend; plus Slurm when its packages are installed (root),
                                              # and Ray when tunelab[ray] is installed
    python bench/scheduler.py --jobs 3 --steps 20

Work: the tests' tiny model (tests/tiny.py), a LoRA SFT config of `--steps` steps, run `--jobs` times each way:
- direct: `tunelab train CONFIG` as a process; start = the process starts.
- local / slurm / ray: POST /v1/tuningJobs to a `tunelab serve --backend B` started once (Slurm: the tests' one-node
  cluster, tests/slurm_cluster.py; Ray: the tests' local head, tests/ray_cluster.py); start = the POST.
For each run: start -> first step (the first row in metrics.jsonl, polled every 10 ms) and last step -> done (the
process exits / the job reads SUCCEEDED, polled every 20 ms). The overhead is the difference of the medians from the
direct run's. The server polls its jobs every 0.5 s (ServeSettings.poll_seconds), which bounds "last step -> done".
Prints a table and writes bench/results/scheduler.json.
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

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from service_util import Server  # noqa: E402
from ray_cluster import start_head, stop_head  # noqa: E402
from slurm_cluster import SlurmCluster, _missing  # noqa: E402
from tiny import make_base_model, write_task_data  # noqa: E402


def config(steps: int) -> dict:
    return {"model": {"path": "base"}, "adapter": {"r": 4},
            "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}], "max_length": 64},
            "train": {"max_steps": steps, "micro_batch_size": 4, "eval_every": None, "save_every": None},
            "log": {"tensorboard": False, "plot": False}}


def wait(predicate, poll: float) -> float:
    while not predicate():
        time.sleep(poll)
    return time.perf_counter()


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def direct(root: Path, base: Path, data: Path, steps: int, i: int) -> tuple[float, float]:
    cfg = config(steps)
    cfg["model"]["path"], cfg["data"]["train"][0]["path"] = str(base), str(data)
    cfg["output_dir"] = str(root / f"direct-{i}")
    path = root / f"direct-{i}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    metrics = root / f"direct-{i}" / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = wait(lambda: lines(metrics) >= 1, 0.01)
    last = wait(lambda: lines(metrics) >= steps, 0.01)
    done = wait(lambda: proc.poll() is not None, 0.02)
    assert proc.returncode == 0
    return first - t0, done - last


def through(server: Server, steps: int, gpus: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    job = httpx.post(server.url + "/v1/tuningJobs", json={"config": config(steps), "compute": {"gpus": gpus}},
                     timeout=60).json()
    metrics = server.home / "runs" / job["id"] / "metrics.jsonl"
    first = wait(lambda: lines(metrics) >= 1, 0.01)
    last = wait(lambda: lines(metrics) >= steps, 0.01)
    state = lambda: httpx.get(f"{server.url}/v1/tuningJobs/{job['id']}").json()["state"]  # noqa: E731
    done = wait(lambda: state() in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"), 0.02)
    assert state() == "JOB_STATE_SUCCEEDED"
    return first - t0, done - last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tunelab-bench-sched-"))
    base = make_base_model(root / "base", warm_steps=0)
    data = write_task_data(root / "data" / "train.jsonl", n=32)
    common = ("--data-root", str(root / "data"), "--model", f"base={base}")
    results = {"direct": [direct(root, base, data, args.steps, i) for i in range(args.jobs)]}
    server = Server(root / "home-local", *common, "--gpus", "none").start()
    try:
        results["local"] = [through(server, args.steps, 0) for _ in range(args.jobs)]
    finally:
        server.stop()
    if _missing() is None:
        cluster = SlurmCluster().start()
        os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
        try:
            server = Server(root / "home-slurm", *common, "--backend", "slurm").start()
            try:
                results["slurm"] = [through(server, args.steps, 0) for _ in range(args.jobs)]
            finally:
                server.stop()
        finally:
            cluster.stop()
    try:
        import ray  # noqa: F401
    except ImportError:
        ray = None
    if ray is not None:
        head = start_head()
        try:
            server = Server(root / "home-ray", *common, "--backend", "ray", "--ray-address", head.address).start()
            try:
                results["ray"] = [through(server, args.steps, 0) for _ in range(args.jobs)]
            finally:
                server.stop()
        finally:
            stop_head(head)
    table = {}
    ref = [statistics.median(x) for x in zip(*results["direct"])]
    print(f"{'way':<8} {'start->first step':>18} {'last step->done':>16}   overhead (vs direct)")
    for way, runs in results.items():
        first, done = (statistics.median(x) for x in zip(*runs))
        table[way] = {"start_to_first_step_s": round(first, 3), "last_step_to_done_s": round(done, 3),
                      "overhead_start_s": round(first - ref[0], 3), "overhead_end_s": round(done - ref[1], 3),
                      "runs": runs}
        print(f"{way:<8} {first:>17.2f}s {done:>15.2f}s   {first - ref[0]:+.2f}s / {done - ref[1]:+.2f}s")
    (HERE / "results").mkdir(exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = {"jobs": args.jobs, "steps": args.steps, "time": when, "load_average": os.getloadavg(), **table}
    (HERE / "results" / "scheduler.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
