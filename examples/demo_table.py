#!/usr/bin/env python
"""The demo's results table: work/demo/results.json (examples/demo.py) and, when there, work/demo/seeds.json
(examples/demo_seeds.py) as the markdown the README shows.

    python examples/demo_table.py                      # prints the table (and the seed line) for README.md
    python examples/demo_table.py --results R.json --seeds S.json

examples/demo.py prints and writes the same table; tests/test_demo_table.py parses the README's table back with
`parse_table` and checks that this script would write it the same way.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FAMILIES = ["add", "lookup", "reverse", "sort", "upper"]
HEAD = ["stage", "train s", "params", *FAMILIES, "all", "pref acc", "ppl docs", "ppl answers"]
PENDING = "pending: "
SEED_LINE = re.compile(r"SFT held-out exact match over seeds (?P<seeds>[\d, ]+): mean (?P<mean>[\d.]+) % "
                       r"± (?P<spread>[\d.]+) points \((?P<runs>[^)]*)\)")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: dict) -> str:
    """One row per stage of results["stages"] (examples/demo.py's summarize)."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in results["stages"]:
        if "pending" in row:
            lines.append("| " + " | ".join([row["stage"], PENDING + row["pending"]] + [""] * (len(HEAD) - 2)) + " |")
            continue
        fam = row["exact_match_by_family"]
        cells = [row["stage"], f"{row['train_seconds']:.0f}", f"{row['params'] / 1e6:.2f}M",
                 *(_fmt(fam.get(f), ".0%") for f in FAMILIES), _fmt(row["exact_match"], ".0%"),
                 _fmt(row["preference_accuracy"], ".0%"), _fmt(row["perplexity_text"], ".2f"),
                 _fmt(row["perplexity_answers"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> dict:
    """The inverse of markdown_table, to the precision the table shows: {"stages": [row, ...]}."""
    lines = [line.strip() for line in text.strip().splitlines()]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    if cells(lines[0]) != HEAD:
        raise ValueError(f"table header {cells(lines[0])} is not {HEAD}")
    if lines[1] != "|" + "---|" * len(HEAD):
        raise ValueError(f"table rule {lines[1]!r} does not have {len(HEAD)} columns")
    num = lambda s, parse: None if s == "-" else parse(s)  # noqa: E731
    pct = lambda s: num(s, lambda v: int(v.removesuffix("%")) / 100)  # noqa: E731
    stages = []
    for line in lines[2:]:
        c = cells(line)
        if len(c) != len(HEAD):
            raise ValueError(f"table row {line!r} has {len(c)} cells, not {len(HEAD)}")
        if c[1].startswith(PENDING):
            stages.append({"stage": c[0], "pending": c[1].removeprefix(PENDING)})
            continue
        if not c[2].endswith("M"):
            raise ValueError(f"params {c[2]!r} is not in millions (e.g. 0.89M)")
        stages.append({
            "stage": c[0], "train_seconds": int(c[1]), "params": float(c[2][:-1]) * 1e6,
            "exact_match_by_family": {f: pct(v) for f, v in zip(FAMILIES, c[3:8])}, "exact_match": pct(c[8]),
            "preference_accuracy": pct(c[9]), "perplexity_text": num(c[10], float),
            "perplexity_answers": num(c[11], float)})
    return {"stages": stages}


def seed_line(seeds: dict) -> str:
    """One line for work/demo/seeds.json: the seeds, mean and largest deviation from the mean, each run."""
    runs = seeds["runs"]
    each = ", ".join(f"seed {r['seed']}: {100 * r['exact_match']:.1f} %" for r in runs)
    return (f"SFT held-out exact match over seeds {', '.join(str(r['seed']) for r in runs)}: "
            f"mean {100 * seeds['mean']:.1f} % ± {100 * seeds['spread']:.1f} points "
            f"({each})")


def parse_seed_line(text: str) -> dict:
    """The inverse of seed_line: {"seeds", "mean", "spread", "runs"} in percent as shown; ValueError if absent."""
    m = SEED_LINE.search(text)
    if not m:
        raise ValueError("no line 'SFT held-out exact match over seeds ...' found")
    runs = [float(v) for v in re.findall(r"seed \d+: ([\d.]+) %", m["runs"])]
    return {"seeds": [int(s) for s in m["seeds"].split(",")], "mean": float(m["mean"]),
            "spread": float(m["spread"]), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="work/demo/results.json")
    parser.add_argument("--seeds", default="work/demo/seeds.json", help="left out of the output if the file is absent")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    print(markdown_table(results))
    if Path(args.seeds).is_file():
        print("\n" + seed_line(json.loads(Path(args.seeds).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
