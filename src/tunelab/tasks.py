"""Small verifiable task families the demo, tests and benchmarks generate: no downloads, exact answers.

Each family makes (instruction, answer) pairs from a seeded RNG and a plausibly wrong answer for
preference data, so SFT, DPO and RL runs can all be scored by exact match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

WORDS = (
    "apple river stone cloud green music paper light table window garden silver orange summer winter "
    "yellow planet forest bridge castle dragon engine flower guitar harbor island jacket kitten lemon "
    "market needle ocean pencil rabbit sunset tiger violin wizard zebra anchor basket candle desert "
    "feather glacier hammer insect jungle ladder marble nectar oyster pepper quartz rocket saddle tunnel"
).split()


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice([-10, -1, 1, 10])
    return f"What is {a} + {b}?", str(a + b), str(max(wrong, 0) if wrong != a + b else a + b + 1)


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    right = word[::-1]
    wrong = right[:-2] + right[-1] + right[-2] if len(word) > 2 else word
    return f"Reverse the word: {word}", right, wrong if wrong != right else word


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(10), 4)
    right = sorted(nums)
    wrong = right[:]
    wrong[1], wrong[2] = wrong[2], wrong[1]
    join = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"Sort these numbers: {join(nums)}", join(right), join(wrong)


def _lookup(rng: random.Random) -> tuple[str, str, str]:
    keys = rng.sample("abcdefgh", 3)
    values = rng.sample(range(10), 3)
    target = rng.randrange(3)
    facts = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    wrong = values[(target + 1) % 3]
    return f"Given {facts}. What is {keys[target]}?", str(values[target]), str(wrong)


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Uppercase: {word}", word.upper(), word.capitalize()


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add, "reverse": _reverse, "sort": _sort, "lookup": _lookup, "upper": _upper,
}


def make_items(n: int, seed: int, families: list[str] | None = None) -> list[dict]:
    """n items cycling through the families: {family, prompt, answer, wrong}."""
    rng = random.Random(seed)
    names = families or list(FAMILIES)
    items = []
    for i in range(n):
        family = names[i % len(names)]
        prompt, answer, wrong = FAMILIES[family](rng)
        items.append({"family": family, "prompt": prompt, "answer": answer, "wrong": wrong})
    return items


def unique_prompts(items: list[dict]) -> list[dict]:
    """The items in order, keeping the first of each prompt (so no prompt can be in two splits)."""
    seen: set[str] = set()
    return [item for item in items if not (item["prompt"] in seen or seen.add(item["prompt"]))]


def split_items(n_train: int, n_test: int, seed: int, families: list[str] | None = None) -> tuple[list, list]:
    """Train and held-out test items with no prompt in both."""
    unique = unique_prompts(make_items(3 * (n_train + n_test), seed, families))
    if len(unique) < n_train + n_test:
        raise ValueError("not enough distinct items for this split; lower the counts")
    return unique[:n_train], unique[n_train:n_train + n_test]


def to_alpaca(item: dict) -> dict:
    return {"instruction": item["prompt"], "input": "", "output": item["answer"], "family": item["family"]}


def to_preference(item: dict) -> dict:
    return {"prompt": item["prompt"], "chosen": item["answer"], "rejected": item["wrong"], "family": item["family"]}


def to_prompt(item: dict) -> dict:
    return {"prompt": item["prompt"], "answer": item["answer"], "family": item["family"]}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def exact_match(prediction: str, answer: str) -> float:
    return float(prediction.strip() == str(answer).strip())


def correctness_reward(prompt: str, response: str, answer: str | None = None, **_) -> float:
    """Programmatic feedback for PPO/GRPO: 1 for the exact answer, partial credit for containing it."""
    if answer is None:
        return 0.0
    response = response.strip()
    if response == answer:
        return 1.0
    return 0.3 if answer in response else 0.0


def exact_reward(prompt: str, response: str, answer: str | None = None, **_) -> float:
    """A verifiable reward for PPO/GRPO: 1 for the exact answer (surrounding whitespace aside), else 0. Unlike
    correctness_reward, a reply that merely contains the answer earns nothing."""
    return 0.0 if answer is None else exact_match(response, answer)
