"""Configs from the tools people arrive with: axolotl and LLaMA-Factory YAML files, recognised by their keys and
mapped onto a tunelab config (one note per key mapped differently; what cannot be honoured is refused, named).

`load(path, overrides, say)` reads any of the three; `convert_to_yaml(path)` writes the tunelab YAML for good."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from ..config import Config, UserError, load_config
from .common import Mapping


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return {}  # load_config reports the YAML error with its line
    return data if isinstance(data, dict) else {}


def tool_of(data: dict) -> str | None:
    """'axolotl', 'LLaMA-Factory' or None (a tunelab config), from the file's keys."""
    from . import axolotl, llamafactory

    if "model" in data and isinstance(data.get("model"), dict):
        return None
    if axolotl.looks_like(data):
        return "axolotl"
    if llamafactory.looks_like(data):
        return "LLaMA-Factory"
    return None


def convert(data: dict, where: str) -> Mapping | None:
    from . import axolotl, llamafactory

    tool = tool_of(data)
    if tool is None:
        return None
    return (axolotl if tool == "axolotl" else llamafactory).convert(data, where)


def load(path: str | Path, overrides: list[str] | None = None, say: Callable[[str], None] = print) -> Config:
    """A tunelab, axolotl or LLaMA-Factory config file -> a validated Config; `say` gets one line per key that
    maps differently. Overrides use tunelab's keys."""
    mapping = convert(read_yaml(path), str(path))
    if mapping is None:
        return load_config(path, overrides)
    article = "an" if mapping.tool[0] in "aeiou" else "a"
    say(f"{path}: read as {article} {mapping.tool} config ({len(mapping.notes)} keys map differently; "
        f"`tunelab convert {path}` writes the tunelab YAML)")
    for line in mapping.notes:
        say(f"  {line}")
    return load_config(overrides=overrides, data=mapping.config, source=f"{path} (converted from {mapping.tool})")


def convert_to_yaml(path: str | Path) -> str:
    """The tunelab YAML equivalent of an axolotl / LLaMA-Factory file, each value commented with its source keys,
    and the keys mapped differently listed at the end."""
    from .emit import commented_yaml

    mapping = convert(read_yaml(path), str(path))
    if mapping is None:
        raise UserError(f"{path}: not an axolotl or LLaMA-Factory config (axolotl has base_model and datasets; "
                        "LLaMA-Factory has model_name_or_path and stage)")
    load_config(data=mapping.config, source=f"{path} (converted from {mapping.tool})")  # refuse before printing
    head = f"# tunelab config converted from {mapping.tool}: {path}\n"
    tail = "".join(f"# {line}\n" for line in mapping.notes)
    body = commented_yaml(mapping.config, mapping.origin)
    same = [f"{k}: {v}" for k, v in mapping.source.items() if f"# {k}" not in body and f"; {k}" not in body
            and not any(line.startswith(f"{mapping.tool} {k}:") for line in mapping.notes) and v not in (None, "")]
    quiet = f"# read, tunelab's default already: {'; '.join(same)}\n" if same else ""
    return head + body + ("# mapped differently:\n" + tail if tail else "") + quiet
