"""OpenAI's grader templating: `{{ item.x }}`, `{{ sample.output_json.a.b }}`, `{{ item.list[0] }}`.

Two namespaces exist: `item` (the data row) and `sample` (the model's answer: output_text, output_json,
output_tools, choices). A reference the item lacks is the user's mistake (GraderError naming it); one the sample
lacks means the model's output did not have it (e.g. not JSON), which scores that sample 0 (sample_parse_error).
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from tunelab.graders.base import Failed, GraderError

PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")


def references(template: str, where: str) -> list[tuple[str, list[str | int]]]:
    """The (namespace, steps) of every placeholder; GraderError for one that is malformed or names no namespace."""
    found = []
    for match in PLACEHOLDER.finditer(template):
        text = match.group(1).strip()
        steps, pos = [], 0
        while pos < len(text):
            step = STEP.match(text, pos)
            if step is None or (pos == 0 and step.group(1) is None):
                raise GraderError(f"{where}: cannot read the template {{{{{text}}}}}: "
                                  "write {{item.field}} or {{sample.output_text}}, fields joined by '.' or [index]")
            steps.append(step.group(1) if step.group(1) is not None else int(step.group(2)))
            pos = step.end()
        namespace, rest = steps[0], steps[1:]
        if namespace not in ("item", "sample"):
            raise GraderError(f"{where}: {{{{{text}}}}}: the namespaces are 'item' and 'sample', not {namespace!r}")
        if namespace == "sample" and rest and rest[0] not in SAMPLE_FIELDS:
            close = difflib.get_close_matches(str(rest[0]), SAMPLE_FIELDS, n=1)
            raise GraderError(f"{where}: {{{{{text}}}}}: the sample has {', '.join(SAMPLE_FIELDS)}"
                              + (f"; did you mean 'sample.{close[0]}'?" if close else ""))
        found.append((namespace, rest))
    return found


def render(template: str, sample: dict, item: dict, where: str) -> str:
    """The template with every placeholder replaced: strings as they are, anything else as JSON."""
    refs = iter(references(template, where))

    def value(_match: re.Match) -> str:
        namespace, steps = next(refs)
        found = lookup(sample if namespace == "sample" else item, namespace, steps, where)
        return found if isinstance(found, str) else json.dumps(found)

    return PLACEHOLDER.sub(value, template)


def lookup(root: Any, namespace: str, steps: list[str | int], where: str) -> Any:
    node = root
    for depth, step in enumerate(steps):
        has = (isinstance(node, dict) and isinstance(step, str) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and step < len(node))
        if not has:
            path = namespace + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps[: depth + 1])
            if namespace == "sample":
                raise Failed({"sample_parse_error": True}, f"{where}: the sample has no {path}")
            raise GraderError(f"{where}: the item has no {path} (the data row's fields are "
                              f"{', '.join(map(str, root)) or 'none'})" if isinstance(root, dict) else
                              f"{where}: the item has no {path}")
        node = node[step]
    return node
