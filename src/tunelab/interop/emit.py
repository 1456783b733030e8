"""YAML with a comment on each value naming the source keys it came from (`tunelab convert`)."""

from __future__ import annotations

import yaml


def commented_yaml(tree: dict, origin: dict[str, list[str]]) -> str:
    return "".join(_lines(tree, origin, "", 0))


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _comment(origin: dict[str, list[str]], dotted: str) -> str:
    keys = origin.get(dotted)
    return f"  # {'; '.join(keys)}" if keys else ""


def _lines(tree: dict, origin: dict, prefix: str, depth: int):
    pad = "  " * depth
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield f"{pad}{key}:{_comment(origin, dotted)}\n"
            yield from _lines(value, origin, dotted + ".", depth + 1)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{pad}{key}:{_comment(origin, dotted)}\n"
            for item in value:
                body = yaml.safe_dump(item, sort_keys=False, default_flow_style=False).splitlines()
                yield from (f"{pad}  {'- ' if i == 0 else '  '}{line}\n" for i, line in enumerate(body))
        else:
            yield f"{pad}{key}: {_scalar(value)}{_comment(origin, dotted)}\n"
