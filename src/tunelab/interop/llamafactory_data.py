"""LLaMA-Factory's `dataset: a,b` names, looked up in `dataset_dir/dataset_info.json`, -> tunelab data sources.

An entry's `formatting` (alpaca | sharegpt | openai), `ranking`, `columns` and `tags` become the source's format and
its column, message-key and role renames. Every sharegpt-style conversation is renamed to sharegpt's own keys
(from/value, human/gpt/observation/function_call/system), which tunelab reads in every format, so tool calls and
tool results keep their meaning."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import UserError
from .common import Mapping

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value"}
SHAREGPT_ROLES = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                  "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}


def sources(m: Mapping, key: str, method: str) -> list[dict]:
    names = m.get(key)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    directory = Path(m.locate(str(m.get("dataset_dir", "data")), "LLaMA-Factory dataset_dir"))
    info_path = directory / "dataset_info.json"
    try:  # located too: a dataset_info.json may be a link out of the folder
        info = json.loads(Path(m.locate(str(info_path), "LLaMA-Factory dataset_dir")).read_text())
    except FileNotFoundError:
        raise m.refuse(key, f"{info_path} not found: set dataset_dir to the folder with dataset_info.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{info_path}: cannot read: {e}") from None
    out = []
    for name in names:
        if name not in info:
            raise m.refuse(key, f"{name!r} is not in {info_path}")
        out.append(_source(f"{info_path}: {name}", directory, info[name], method))
    return out


def _source(where: str, directory: Path, entry: dict, method: str) -> dict:
    if not entry.get("file_name"):
        hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                    if entry.get(k)), "file_name")
        raise UserError(f"{where}: {hub} cannot be honoured: tunelab reads local files; download the data and set "
                        "file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise UserError(f"{where}: formatting {formatting!r} cannot be honoured: use alpaca, sharegpt or openai")
    columns = dict(entry.get("columns") or {})
    for media in ("images", "videos", "audios", "history"):
        if media in columns:
            raise UserError(f"{where}: column '{media}' cannot be honoured: tunelab trains on text "
                            + ("(multi-turn alpaca history: convert the rows to sharegpt)" if media == "history" else ""))
    path = str(directory / entry["file_name"])
    if method == "pretrain":
        return {"path": path, "format": "text", "text_field": columns.get("prompt", "text")}
    if formatting == "alpaca":
        return {"path": path, **_alpaca(where, columns, method, entry.get("ranking", False))}
    return {"path": path, **_sharegpt(columns, entry.get("tags") or {}, formatting, method)}


def _alpaca(where: str, columns: dict, method: str, ranking: bool) -> dict:
    if method in ("dpo", "orpo", "reward") or ranking:
        if columns.get("query"):
            raise UserError(f"{where}: column 'query' cannot be honoured in ranking rows: merge it into the prompt")
        fields = {"prompt": columns.get("prompt", "instruction"), "chosen": columns.get("chosen", "chosen"),
                  "rejected": columns.get("rejected", "rejected"), "system": columns.get("system", "system")}
        return {"format": "preference", **_renames(fields)}
    if method == "kto":
        raise UserError(f"{where}: kto needs sharegpt-formatted rows with a kto_tag column")
    fields = {"instruction": columns.get("prompt", "instruction"), "input": columns.get("query", "input"),
              "output": columns.get("response", "output"), "system": columns.get("system", "system")}
    return {"format": "alpaca", **_renames(fields)}


def _sharegpt(columns: dict, tags: dict, formatting: str, method: str) -> dict:
    fields = {"conversations": columns.get("messages", "messages" if formatting == "openai" else "conversations"),
              "system": columns.get("system", "system"), "tools": columns.get("tools", "tools")}
    if method in ("dpo", "orpo", "reward"):
        fields.update(chosen=columns.get("chosen", "chosen"), rejected=columns.get("rejected", "rejected"))
        fmt = "preference"
    elif method == "kto":
        fields["label"] = columns.get("kto_tag", "label")
        fmt = "kto"
    else:
        fmt = "sharegpt"
    defaults = OPENAI_TAGS if formatting == "openai" else {**SHAREGPT_TAGS, **SHAREGPT_ROLES}
    theirs = {**defaults, **tags}
    message_keys = {ours: theirs[tag] for tag, ours in SHAREGPT_TAGS.items() if theirs[tag] != ours}
    roles = {theirs[tag]: ours for tag, ours in SHAREGPT_ROLES.items() if theirs[tag] != ours}
    out = {"format": fmt, **_renames(fields)}
    return {**out, **({"message_keys": message_keys} if message_keys else {}), **({"roles": roles} if roles else {})}


def _renames(fields: dict) -> dict:
    columns = {ours: theirs for ours, theirs in fields.items() if ours != theirs}
    return {"columns": columns} if columns else {}
