"""One measured training run per process: tunelab's loop or TRL's trainers, on the same weights and token ids.

`run(spec)` is what a child process executes; it returns a dict with the timed region's real tokens, seconds and
the process's peak memory. The timed region is the training steps only (collation included), after one untimed
warm-up forward/backward on the first micro-batch; model loading, data preparation and saving are outside it, for
every system alike.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import assets

LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
LR = 2e-4
SEED = 42


def _peak_memory_mb(device) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # minor page faults: what returning memory to the OS costs (each page touched again is faulted and zeroed)
    out = {"peak_rss_mb": usage.ru_maxrss / 1024, "minor_faults": usage.ru_minflt}
    if device == "cuda":
        import torch

        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- data shared by both systems

def sft_examples(spec: dict):
    """tunelab's tokenisation of the benchmark rows: the token ids and labels every system trains on."""
    from tunelab.config import DataConfig, DataSource
    from tunelab.data import build_sft_examples
    from tunelab.data.readers import Row

    tok = assets.tokenizer()
    if spec["workload"] == "fixed":
        rows = [{"text": assets.Text(seed=300 + i).sentence(spec["seq"])} for i in range(spec["rows"])]
        dc = DataConfig(train=[DataSource(path="-", format="text")], template=assets.TEMPLATE, max_length=spec["seq"])
        examples, _ = build_sft_examples([Row("bench", i, r, "text") for i, r in enumerate(rows)], "text", tok, dc)
        return examples
    dc = DataConfig(train=[DataSource(path="-", format="alpaca")], template=assets.TEMPLATE, max_length=assets.CAP)
    rows = assets.rows(spec["rows"])
    examples, _ = build_sft_examples([Row("bench", i, r, "alpaca") for i, r in enumerate(rows)], "alpaca", tok, dc)
    return examples


def data_file(spec: dict, tmp: Path) -> tuple[Path, str]:
    if spec["workload"] == "fixed":
        rows = [{"text": assets.Text(seed=300 + i).sentence(spec["seq"])} for i in range(spec["rows"])]
        return assets.write_jsonl(rows, tmp / "rows.jsonl"), "text"
    if spec["workload"] == "dpo-lora":
        return assets.write_jsonl(assets.preference_rows(spec["rows"]), tmp / "rows.jsonl"), "preference"
    return assets.write_jsonl(assets.rows(spec["rows"]), tmp / "rows.jsonl"), "alpaca"


# ---------------------------------------------------------------- tunelab

def _tunelab_config(spec: dict, tmp: Path):
    from tunelab.config import load_config

    path, fmt = data_file(spec, tmp)
    wl = spec["workload"]
    cfg = {
        "model": {"path": str(assets.model_dir(spec.get("tiny", False))), "dtype": "float32"},
        "data": {"train": [{"path": str(path), "format": fmt}], "template": assets.TEMPLATE,
                 "max_length": spec.get("seq", assets.CAP)},
        "train": {"epochs": 1, "micro_batch_size": spec["micro_batch"], "grad_accum": 1, "lr": LR,
                  "scheduler": "constant", "eval_every": None, "save_every": None, "progress": False,
                  "precision": "fp32" if spec["device"] == "cpu" else "bf16", "seed": SEED},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(tmp / "run"),
    }
    if wl != "sft-full" and not (wl == "fixed" and spec.get("full")):
        cfg["adapter"] = dict(LORA)
    if wl == "qlora":
        cfg["model"]["quantize"] = "nf4"
    if wl == "dpo-lora":
        cfg["method"] = "dpo"
    return load_config(data=cfg, overrides=list(spec.get("overrides", [])))


def run_tunelab(spec: dict) -> dict:
    import torch

    from tunelab.objectives.base import real_tokens
    from tunelab.training.loop import Trainer

    for patch in spec.get("patches", []):
        import ablations

        getattr(ablations, patch)()

    class BenchTrainer(Trainer):
        t_start = t_end = None
        tokens = padded = 0

        def setup(self):
            super().setup()
            t = time.perf_counter()
            batch = self._collate(list(range(min(len(self.train_items), self.cfg.train.micro_batch_size))),
                                  self.train_items)
            with self.autocast():
                loss, _ = self.wrapped(batch)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
            _sync(self.device.type)
            self.warmup_s = time.perf_counter() - t
            self.t_start = None

        def _collate(self, indices, items):
            if self.t_start is None:
                _sync(self.device.type)
                self.t_start = time.perf_counter()
            return super()._collate(indices, items)

        def _step(self, batches):
            out = super()._step(batches)
            self.first_step_at = getattr(self, "first_step_at", None) or time.time()
            for b in batches:
                self.tokens += real_tokens(b) if "input_ids" in b else 0
                self.padded += int(b["input_ids"].numel()) if "input_ids" in b else 0
            _sync(self.device.type)
            self.t_end = time.perf_counter()
            return out

        def _finish(self):
            return self.run_dir

    with tempfile.TemporaryDirectory() as d:
        cfg = _tunelab_config(spec, Path(d))
        trainer = BenchTrainer(cfg, say=lambda *a: None)
        trainer.run()
        tokens = sum(len(e.input_ids) for e in _items_docs(trainer.train_items))
        out = {"seconds": trainer.t_end - trainer.t_start, "steps": trainer.state.step,
               "micro_batches": trainer.state.step * cfg.train.grad_accum, "real_tokens": tokens,
               "batch_tokens": trainer.padded, "docs": _doc_lengths(trainer.train_items),
               "threads": torch.get_num_threads(), "warmup_s": trainer.warmup_s,
               "first_step_at": trainer.first_step_at}
    return out


def _items_docs(items):
    """Per-document (input_ids, labels) views of SFT items, packed or not."""
    from types import SimpleNamespace

    for item in items:
        if hasattr(item, "doc_ids"):
            starts = [i for i, d in enumerate(item.doc_ids) if i == 0 or item.doc_ids[i - 1] != d] + [len(item.doc_ids)]
            for a, b in zip(starts, starts[1:]):
                yield SimpleNamespace(input_ids=item.input_ids[a:b], labels=item.labels[a:b])
        elif hasattr(item, "input_ids"):
            yield item
        else:  # preference items: chosen and rejected sequences
            for seq in item_sequences(item):
                yield seq


def item_sequences(item):
    from types import SimpleNamespace

    for side in ("chosen", "rejected"):
        ids = getattr(item, f"{side}_ids", None) or getattr(item, f"{side}_input_ids", None)
        labels = getattr(item, f"{side}_labels", None)
        if ids is not None:
            yield SimpleNamespace(input_ids=ids, labels=labels if labels is not None else ids)


def _doc_lengths(items) -> list[list[int]]:
    """[length, loss tokens] per document, for the FLOP count."""
    return [[len(d.input_ids), sum(1 for y in d.labels[1:] if y != -100)] for d in _items_docs(items)]


# ---------------------------------------------------------------- TRL

def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from tunelab.modeling.load import quiet_imports

    quiet_imports()
    tok = assets.tokenizer()
    wl = spec["workload"]
    kwargs = {"dtype": torch.float32}
    if wl == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir(spec.get("tiny", False)), **kwargs)
    full = wl == "sft-full" or (wl == "fixed" and spec.get("full"))
    peft_config = None if full else LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=LORA["target_modules"], task_type="CAUSAL_LM")

    class Timer(TrainerCallback):
        t_start = t_end = None
        steps = 0

        def on_train_begin(self, args, state, control, **kw):
            _sync(spec["device"])
            self.t_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(spec["device"])
            self.t_end = time.perf_counter()
            self.first_step_at = getattr(self, "first_step_at", None) or time.time()
            self.steps += 1

    timer = Timer()
    common = dict(per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=1, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  num_train_epochs=1, save_strategy="no", report_to="none", seed=SEED, data_seed=SEED,
                  use_cpu=spec["device"] == "cpu", bf16=spec["device"] == "cuda", fp16=False,
                  gradient_checkpointing=spec.get("gradient_checkpointing", True), disable_tqdm=True,
                  dataloader_num_workers=0)
    with tempfile.TemporaryDirectory() as d:
        if wl == "dpo-lora":
            from trl import DPOConfig, DPOTrainer

            rows = assets.preference_rows(spec["rows"])
            ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
            args = DPOConfig(output_dir=d, max_length=assets.CAP, beta=0.1, padding_free=spec.get("packing", False),
                             **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft_config, callbacks=[timer])
        else:
            from trl import SFTConfig, SFTTrainer

            examples = sft_examples(spec)
            ds = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                    "labels": [e.labels for e in examples]})
            args = SFTConfig(output_dir=d, max_length=spec.get("seq", assets.CAP), packing=spec.get("packing", False),
                             **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft_config, callbacks=[timer])
        # untimed warm-up: one forward/backward of the first micro-batch, like tunelab's
        loader = trainer.get_train_dataloader()
        batch = trainer._prepare_inputs(next(iter(loader)))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)
        trainer.train()
        if wl == "dpo-lora":
            tokens, docs = _dpo_tokens(trainer), []
        else:
            tokens = sum(len(e.input_ids) for e in examples)
            docs = [[len(e.input_ids), sum(1 for y in e.labels[1:] if y != -100)] for e in examples]
        out = {"seconds": timer.t_end - timer.t_start, "steps": timer.steps, "micro_batches": timer.steps,
               "real_tokens": tokens, "docs": docs, "threads": torch.get_num_threads(),
               "first_step_at": timer.first_step_at}
    return out


def _dpo_tokens(trainer) -> int:
    ds = trainer.train_dataset
    total = 0
    for row in ds:
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_input_ids", "chosen_input_ids",
                    "rejected_input_ids"):
            if key in row:
                total += len(row[key]) * (2 if key.startswith("prompt") else 1)
    return total


# ---------------------------------------------------------------- child entry point

def _probe_gflops(device: str) -> float:
    """A 1024^3 fp32 matmul rate, best of 3: how fast this machine was around this run (the CPU is shared with
    other virtual machines, whose load this one's load average does not show)."""
    import torch

    if device != "cpu":
        return float("nan")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


def child(spec: dict) -> dict:
    if spec["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    before = _probe_gflops(spec["device"])
    out = run_tunelab(spec) if spec["system"] == "tunelab" else run_trl(spec)
    out.update(_peak_memory_mb(spec["device"]))
    out["probe_gflop_s"] = [before, _probe_gflops(spec["device"])]
    out["wall_s"] = time.perf_counter() - started
    return out


if __name__ == "__main__":
    import sys

    result = child(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
