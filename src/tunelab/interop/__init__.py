"""Configs from the tools people arrive with: axolotl and LLaMA-Factory YAML files, recognised by their keys and
mapped onto a tunelab config (one note per key mapped differently; what cannot be honoured is refused, named).

`load(path_or_dict, overrides, say)` reads any of the three (the CLI and tunelab.api); `convert(data, where, locate)`
is the mapping alone, with its notes (`summary`), for the service, which resolves the paths it names; and
`convert_to_yaml(path)` writes the tunelab YAML for good."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from ..config import Config, UserError, load_config
from .common import Locate, Mapping, as_given


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


def convert(data: dict, where: str, locate: Locate = as_given) -> Mapping | None:
    """The mapping of a peer config (None for a tunelab one); `locate` resolves the paths it reads or names."""
    from . import axolotl, llamafactory

    tool = tool_of(data)
    if tool is None:
        return None
    return (axolotl if tool == "axolotl" else llamafactory).convert(data, where, locate)


def summary(mapping: Mapping, file: bool) -> list[str]:
    """What the CLI prints, the API says and the service returns: a first line naming the tool, then one line per
    key that maps differently."""
    article = "an" if mapping.tool[0] in "aeiou" else "a"
    hint = f"; `tunelab convert {mapping.where}` writes the tunelab YAML" if file else ""
    head = (f"{mapping.where}: read as {article} {mapping.tool} config ({len(mapping.notes)} keys map "
            f"differently{hint})")
    return [head, *(f"  {line}" for line in mapping.notes)]


def load(config: str | Path | dict, overrides: list[str] | None = None, say: Callable[[str], None] = print,
         where: str = "config") -> Config:
    """A tunelab, axolotl or LLaMA-Factory config (a file, or a dict named `where` in messages) -> a validated
    Config; `say` gets the summary lines of a peer config. Overrides use tunelab's keys."""
    is_file = not isinstance(config, dict)
    where = str(config) if is_file else where
    mapping = convert(read_yaml(config) if is_file else config, where)
    if mapping is None:
        return load_config(config, overrides) if is_file else load_config(data=config, overrides=overrides)
    for line in summary(mapping, is_file):
        say(line)
    return load_config(overrides=overrides, data=mapping.config, source=f"{where} (converted from {mapping.tool})")


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
