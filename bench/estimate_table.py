"""The README's "what fits where" table, computed by tunelab.estimate from model shapes alone.

    python bench/estimate_table.py        # prints a markdown table
"""

from __future__ import annotations

from tunelab.config import Config
from tunelab.estimate import GIB, estimate

MODELS = ["llama-7b", "llama-3-8b", "llama-3-70b"]
METHODS = {"full": "full", "lora": "LoRA r=16", "qlora": "QLoRA r=16"}
CARDS = [24, 48, 80]  # GiB


def config(model: str, method: str, micro_batch: int, max_length: int, checkpointing: bool) -> Config:
    data = {
        "model": {"path": model},
        "data": {"train": [{"path": "train.jsonl"}], "max_length": max_length},
        "train": {"micro_batch_size": micro_batch, "grad_accum": 8, "gradient_checkpointing": checkpointing},
    }
    if method != "full":
        data["adapter"] = {"r": 16, "target_modules": "all-linear"}
    if method == "qlora":
        data["model"]["quantize"] = "nf4"
    return Config.model_validate(data)


def gib(cfg: Config) -> float:
    return estimate(cfg, "h100", tokens=0, suggest=False).total_bytes / GIB


def main() -> None:
    rows = [
        "| model | method | trainable | GiB, 1 x 2048, ckpt | " + " | ".join(f"{c} GiB" for c in CARDS)
        + " | GiB, 4 x 2048, no ckpt | H100 hours / 100M tokens |",
        "|---|---|---:|---:|" + ":-:|" * len(CARDS) + "---:|---:|",
    ]
    for model in MODELS:
        for method, label in METHODS.items():
            small = config(model, method, 1, 2048, True)
            est = estimate(small, "h100", tokens=100_000_000, suggest=False)
            total = est.total_bytes / GIB
            marks = " | ".join("yes" if total <= c else "no" for c in CARDS)
            big = gib(config(model, method, 4, 2048, False))
            rows.append(f"| {est.shape.name} | {label} | {est.trainable / 1e6:,.0f} M | {total:.1f} | {marks} "
                        f"| {big:.1f} | {est.seconds_per_epoch / 3600:.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
