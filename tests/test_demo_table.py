"""The README's demo table is what examples/demo_table.py writes: parsed back, it is written again character for
character, and the seed line under it parses back and agrees with itself. No training: the README is the input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo_table():
    spec = importlib.util.spec_from_file_location("demo_table", REPO / "examples/demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_demo_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## The embedded demo")
    return text[start:text.index("\n## ", start + 1)]


def _readme_table(section: str) -> str:
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| stage |"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[first:end])


def test_readme_table_is_the_scripts_output():
    demo_table = _demo_table()
    table = _readme_table(_readme_demo_section())
    parsed = demo_table.parse_table(table)
    assert [row["stage"] for row in parsed["stages"]] == ["base", "sft", "dpo", "grpo", "student"]
    assert demo_table.markdown_table(parsed) == table


def test_readme_seed_line_parses_and_adds_up():
    demo_table = _demo_table()
    seeds = demo_table.parse_seed_line(_readme_demo_section())
    assert len(seeds["seeds"]) == len(seeds["runs"]) >= 2
    mean = sum(seeds["runs"]) / len(seeds["runs"])
    assert seeds["mean"] == pytest.approx(mean, abs=0.051)  # each run is shown to 0.1 point
    assert seeds["spread"] == pytest.approx(max(abs(r - mean) for r in seeds["runs"]), abs=0.11)
    # and the script writes the line the README shows
    runs = [{"seed": s, "exact_match": r / 100} for s, r in zip(seeds["seeds"], seeds["runs"])]
    line = demo_table.seed_line({"runs": runs, "mean": seeds["mean"] / 100, "spread": seeds["spread"] / 100})
    assert line in _readme_demo_section().replace("\n", " ")


def test_parse_table_refuses_another_layout():
    demo_table = _demo_table()
    with pytest.raises(ValueError, match="header"):
        demo_table.parse_table("| stage | all |\n|---|---|\n| sft | 68% |")
