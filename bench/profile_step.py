"""Where a training step of a bench workload goes: time, operators, and what autograd keeps.

    python bench/profile_step.py                          # sft-lora, default config: time 4 steps, twice
    python bench/profile_step.py --mode ops               # torch.profiler table of the same 4 steps
    python bench/profile_step.py --mode saved             # saved-tensor bytes of one forward, by source line
    python bench/profile_step.py --workload sft-full data.padding_free=false   # any workload, any overrides

The model, rows and config are bench/run.py's (bench/systems.py), in this process: Trainer.setup, the first four
micro-batches of the epoch in order, one untimed step first. The figures in bench/README.md's "second round"
section came from these modes.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="sft-lora", choices=["sft-lora", "sft-full", "qlora"])
    p.add_argument("--mode", default="time", choices=["time", "ops", "saved"])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args()

    import torch

    import systems
    from tunelab.training.loop import Trainer

    spec = {"workload": args.workload, "rows": args.rows, "micro_batch": 8, "device": "cpu",
            "overrides": args.overrides}
    trainer = Trainer(systems._tunelab_config(spec, Path(tempfile.mkdtemp())), say=lambda *a: None)
    trainer.setup()
    mb = trainer.cfg.train.micro_batch_size
    batches = [trainer._collate(list(range(i, i + mb)), trainer.train_items) for i in range(0, 4 * mb, mb)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def step(batch):
        loss, _ = trainer.wrapped(batch)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    if args.mode == "time":
        for _ in range(2):
            faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for b in batches:
                step(b)
            seconds = time.perf_counter() - t
            usage = resource.getrusage(resource.RUSAGE_SELF)
            print(f"4 steps, {tokens} tokens: {seconds:.2f} s ({tokens / seconds:.0f} tok/s), "
                  f"{usage.ru_minflt - faults} page faults, peak RSS {usage.ru_maxrss >> 10} MB")
    elif args.mode == "ops":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                step(b)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        kept, where = {}, collections.Counter()

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in kept:  # views of one storage (q/k/v per document, shared inputs) count once
                kept[key] = t.untyped_storage().nbytes()
                frame = [f for f in traceback.extract_stack()[:-1] if "torch/" not in f.filename][-1]
                where[(f"{Path(frame.filename).name}:{frame.lineno}", tuple(t.shape), str(t.dtype))] += kept[key]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = trainer.wrapped(batches[1])
        for (line, shape, dtype), n in where.most_common(25):
            print(f"{n / 2**20:8.1f} MB  {line:28s} {shape} {dtype}")
        weights = sum(p.untyped_storage().nbytes() for p in trainer.module.parameters())
        print(f"{sum(kept.values()) / 2**20:.1f} MB kept for backward on {int(batches[1]['input_ids'].numel())} tokens "
              f"(frozen weights the matmuls keep count too: all parameters are {weights / 2**20:.1f} MB)")
        loss.backward()


if __name__ == "__main__":
    main()
