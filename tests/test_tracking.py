"""The loss plot: an SVG whose points sit where the axes say (closed-form positions), written without a plotting
library."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tunelab.training.tracking import plot_loss

SVG = "{http://www.w3.org/2000/svg}"


def _points(root, name):
    line = next(p for p in root.iter(f"{SVG}polyline") if p.get("class") == name)
    return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def test_loss_svg_puts_each_point_on_its_step_and_loss(tmp_path):
    train = [(1, 4.0), (2, 3.0), (3, float("nan")), (4, 2.0), (5, 1.0)]
    rows = [{"step": s, "loss": v} for s, v in train] + [{"step": 5, "eval_loss": 2.5}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_loss(metrics, tmp_path / "loss.svg")
    root = ET.parse(out).getroot()  # well-formed XML
    # The plot area is where the drawn axes are, and their labels say which steps and losses its edges stand for.
    lines = list(root.iter(f"{SVG}line"))
    x_axis = next(a for a in lines if a.get("y1") == a.get("y2"))
    y_axis = next(a for a in lines if a.get("x1") == a.get("x2"))
    left, right = float(x_axis.get("x1")), float(x_axis.get("x2"))
    top, bottom = float(y_axis.get("y1")), float(y_axis.get("y2"))
    assert float(x_axis.get("y1")) == bottom and float(y_axis.get("x1")) == left  # the axes meet at the origin
    assert [t.text for t in root.iter(f"{SVG}text")][:4] == ["4", "1", "1", "5"]  # loss top, bottom; step left, right
    pts = _points(root, "train")
    assert len(pts) == 4  # the NaN step is left out
    for (step, loss), (x, y) in zip([p for p in train if p[1] == p[1]], pts):
        assert x == pytest.approx(left + (step - 1) / 4 * (right - left), abs=0.06)
        assert y == pytest.approx(top + (4.0 - loss) / 3.0 * (bottom - top), abs=0.06)
    (ex, ey), = _points(root, "eval")
    assert ex == pytest.approx(right, abs=0.06)
    assert ey == pytest.approx(top + (4.0 - 2.5) / 3.0 * (bottom - top), abs=0.06)
    assert len(list(root.iter(f"{SVG}circle"))) == 1  # eval points are marked


def test_no_plot_without_a_training_loss(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "eval_loss": 1.0}) + "\n")
    assert plot_loss(metrics, tmp_path / "loss.svg") is None and not (tmp_path / "loss.svg").exists()
