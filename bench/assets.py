"""The benchmark's model, tokenizer and rows: built locally from fixed seeds, cached under bench/results/assets.

- Tokenizer: byte-level BPE (vocab 8192) trained by tunelab.modeling.scratch on synthetic text.
- Model: a 34M-parameter Llama built from a config (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8192,
  untied head), seeded, saved once, so every system loads exactly the same weights.
- Rows: alpaca instruction rows whose rendered token lengths follow a log-normal (median 180, sigma 0.75, capped at
  1024). The lengths are the distribution's quantiles at (i + 0.5) / n, not random draws, so a small sample still
  spans the whole distribution (its longest row sits in the long tail, where the peak memory is); the rows are then
  shuffled with a fixed seed.
- Preference rows (for DPO): the same prompts with two completions each.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "assets"
VERSION = "v1"
VOCAB = 8192
SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
             intermediate_size=1376, max_position_embeddings=1024)
# --tiny: a stand-in for smoke-testing the harness in seconds (its numbers mean nothing)
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=128, max_position_embeddings=1024)
MEDIAN, SIGMA, CAP = 180, 0.75, 1024
PROMPT_SHARE = 0.3  # of a row's words that are instruction (no loss); the rest is the reply
TEMPLATE = "chatml"  # the tokenizer has <|im_start|> / <|im_end|> as special tokens


def _lexicon(rng: random.Random, n: int = 6000) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, .8, .2, .15, .1, .07]
    words = set()
    while len(words) < n:
        k = max(1, min(12, int(rng.gauss(5, 2))))
        words.add("".join(rng.choices(letters, weights, k=k)))
    return sorted(words)


class Text:
    """Zipf-distributed words over a fixed lexicon, with some punctuation and digits."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.words = _lexicon(self.rng)
        self.weights = [1 / (i + 1) ** 1.05 for i in range(len(self.words))]

    def sentence(self, n_words: int) -> str:
        out = self.rng.choices(self.words, self.weights, k=n_words)
        for i in range(0, n_words, 11):
            out[i] = out[i].capitalize()
        text = " ".join(out)
        cut = [i for i, c in enumerate(text) if c == " "]
        for i in self.rng.sample(cut, min(len(cut), n_words // 9)):
            text = text[:i] + self.rng.choice([",", ".", ";", ":", " 42", " 2024,", "!"]) + text[i:]
        return text + "."


def lognormal_lengths(n: int) -> list[int]:
    z = [statistics.NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)]
    return [min(CAP, max(16, round(MEDIAN * math.exp(SIGMA * q)))) for q in z]


def _tokenizer(root: Path):
    from tunelab.config import load_config
    from tunelab.modeling.scratch import train_tokenizer

    text = Text(seed=1)
    corpus = root / "tokenizer-corpus.jsonl"
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        with corpus.open("w") as f:
            for _ in range(6000):
                f.write(json.dumps({"text": text.sentence(80)}) + "\n")
    cfg = load_config(data={"model": {"init": {}}, "tokenizer": {"train": True, "vocab_size": VOCAB},
                            "data": {"train": [{"path": str(corpus), "format": "text"}]}, "output_dir": str(root)})
    return train_tokenizer(cfg)  # reloads root/tokenizer when present


def shape(tiny: bool = False) -> dict:
    return TINY_SHAPE if tiny else SHAPE


def _model(root: Path, tokenizer, tiny: bool = False) -> Path:
    out = root / ("model-tiny" if tiny else "model")
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape(tiny))
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _fit_row(text: Text, target: int, count) -> dict:
    """An alpaca row whose rendered length is close to `target` tokens."""
    n = max(4, round(target / 1.45))
    for _ in range(6):
        n_prompt = max(2, round(n * PROMPT_SHARE))
        rng_state = text.rng.getstate()
        row = {"instruction": text.sentence(n_prompt), "input": "", "output": text.sentence(max(2, n - n_prompt))}
        got = count(row)
        if abs(got - target) <= max(2, target // 50):
            return row
        text.rng.setstate(rng_state)
        n = max(4, round(n * target / got))
    return row


def rows(n: int, seed: int = 0) -> list[dict]:
    """n alpaca rows with stratified log-normal token lengths (under the chatml template), shuffled."""
    path = ROOT / VERSION / f"rows-{n}-{seed}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    tok = tokenizer()
    from tunelab.config import DataConfig, DataSource
    from tunelab.data import build_sft_examples
    from tunelab.data.readers import Row

    # room above the cap: a first guess past it must be counted, not dropped (data.truncation keep_response)
    dc = DataConfig(train=[DataSource(path="-", format="alpaca")], template=TEMPLATE, max_length=4 * CAP)

    def count(row):
        ex, _ = build_sft_examples([Row("bench", 0, row, "alpaca")], "alpaca", tok, dc)
        return len(ex[0].input_ids) if ex else 0

    text = Text(seed=100 + seed)
    out = [_fit_row(text, t, count) for t in lognormal_lengths(n)]
    random.Random(seed).shuffle(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """n preference rows {prompt, chosen, rejected}: prompts and replies sized like the SFT rows."""
    path = ROOT / VERSION / f"pref-{n}-{seed}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    base = rows(n, seed)
    text = Text(seed=200 + seed)
    out = []
    for r in base:
        words = len(r["output"].split())
        out.append({"prompt": r["instruction"], "chosen": r["output"],
                    "rejected": text.sentence(max(2, int(words * text.rng.uniform(0.7, 1.3))))})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def write_jsonl(items: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def tokenizer():
    root = ROOT / VERSION
    root.mkdir(parents=True, exist_ok=True)
    return _tokenizer(root)


def model_dir(tiny: bool = False) -> Path:
    root = ROOT / VERSION
    return _model(root, tokenizer(), tiny)


if __name__ == "__main__":
    import time

    t = time.time()
    path = model_dir()
    lengths = lognormal_lengths(64)
    r = rows(64)
    print(path, f"{time.time() - t:.1f}s", "target lengths median", statistics.median(lengths), "max", max(lengths),
          "sum", sum(lengths))
