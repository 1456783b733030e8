"""One axolotl `datasets:` entry -> a tunelab data source (format plus column, message-key and role renames).

axolotl's default roles mapping (human -> user, gpt -> assistant, model -> assistant) is applied to chat_template
rows as axolotl does; `type` names a prompt strategy, of which tunelab has: alpaca, chat_template, sharegpt,
completion, the preference transforms (`<template>.<dataset>`, e.g. chatml.ultra, llama3.argilla) and
bradley_terry.chat_template for reward models."""

from __future__ import annotations

from pathlib import Path

from ..config import UserError
from .common import Mapping

DEFAULT_ROLES = {"human": "user", "gpt": "assistant", "model": "assistant"}
KNOWN = {"path", "type", "split", "data_files", "ds_type", "name", "field_messages", "message_property_mappings",
         "message_field_role", "message_field_content", "roles", "field_chosen", "field_rejected", "field",
         "field_instruction", "field_input", "field_output", "field_system", "field_prompt", "field_completion",
         "field_label", "roles_to_train", "train_on_eos", "drop_system_message", "chat_template", "shards"}


def dataset_source(m: Mapping, key: str, i: int, entry: dict, method: str) -> dict:
    where = f"{m.where}: axolotl {key}[{i}]"
    if not isinstance(entry, dict) or not entry.get("path"):
        raise UserError(f"{where}: each dataset needs a path")
    unknown = sorted(k for k, v in entry.items() if k not in KNOWN and v not in (None, False, "", [], {}))
    if unknown:
        raise UserError(f"{where}: key '{unknown[0]}' cannot be honoured: tunelab has no equivalent")
    kind = str(entry.get("type") or ("chat_template" if method == "sft" else ""))
    files = entry.get("data_files")
    path = files[0] if isinstance(files, list) and len(files) == 1 else files or entry["path"]
    if not isinstance(path, str):
        raise UserError(f"{where}: data_files with several files: list each as its own dataset")
    path = m.locate(path, f"axolotl {key}[{i}].path")
    if not Path(path).exists() and not any(c in path for c in "*?["):
        m.note(f"{key}[{i}].path", f"{path} is not a local file: tunelab reads local files (jsonl, json, csv, "
                                   "parquet, a saved dataset dir); download it and point path at it")
    source = {"path": path, **_format(where, kind, entry, method)}
    if entry.get("drop_system_message"):
        # axolotl drops the leading system turn in its chat_template strategy (SFT and bradley_terry); its other
        # strategies (alpaca, DPO's chat_template.*) never read the key
        base = kind.partition(".")[0]
        if (base == "chat_template" and method == "sft") or base == "bradley_terry":
            source["drop_system"] = True
        else:
            m.note(f"{key}[{i}].drop_system_message", f"ignored, as axolotl ignores it for type {kind} "
                                                      f"(method {method})")
    if entry.get("split") not in (None, "train"):
        m.note(f"{key}[{i}].split", "a local file is read whole")
    return source


def _format(where: str, kind: str, entry: dict, method: str) -> dict:
    base, _, variant = kind.partition(".")
    if method in ("dpo", "orpo") or base == "bradley_terry":
        return _preference(where, kind, entry)
    if method == "kto":
        return {"format": "kto", **_renames(entry, {"prompt": "field_prompt", "completion": "field_completion",
                                                    "label": "field_label"})}
    if base == "alpaca":  # alpaca:chat / alpaca:phi differ only in the prompt text, which data.template sets
        return {"format": "alpaca", **_renames(entry, {"instruction": "field_instruction", "input": "field_input",
                                                       "output": "field_output", "system": "field_system"})}
    if base == "completion":
        return {"format": "text", "text_field": entry.get("field") or "text"}
    if base == "sharegpt":
        return {"format": "sharegpt"}
    if base == "chat_template":
        return {"format": "chat", **_chat(entry)}
    raise UserError(f"{where}: type {kind!r} cannot be honoured: tunelab reads alpaca, chat_template, sharegpt and "
                    "completion rows (and preference rows for rl)")


def _preference(where: str, kind: str, entry: dict) -> dict:
    base, _, variant = kind.partition(".")
    if base in ("chat_template", "bradley_terry") or variant in ("ultra", "argilla", "intel", "icr", "prompt_pairs",
                                                                 "argilla_chat", "default", ""):
        out = {"format": "preference", **_chat(entry)}
        renames = _renames(entry, {"chosen": "field_chosen", "rejected": "field_rejected"})
        out.setdefault("columns", {}).update(renames.get("columns", {}))
        if base == "bradley_terry":  # {system, input, chosen, rejected} strings
            out["columns"].update({"prompt": "input"})
        elif base != "chat_template" and variant == "intel":
            out["columns"].update({"prompt": "question"})
        elif base != "chat_template" and variant == "argilla":
            out["columns"].update({"prompt": "instruction", "chosen": "chosen_response",
                                   "rejected": "rejected_response"})
        return {k: v for k, v in out.items() if v}
    raise UserError(f"{where}: type {kind!r} cannot be honoured: tunelab reads preference rows as "
                    "{prompt|messages, chosen, rejected}")


def _chat(entry: dict) -> dict:
    columns = {"messages": entry["field_messages"]} if entry.get("field_messages") not in (None, "messages") else {}
    props = dict(entry.get("message_property_mappings") or {})
    for ours in ("role", "content"):
        if entry.get(f"message_field_{ours}"):
            props[ours] = entry[f"message_field_{ours}"]
    message_keys = {k: v for k, v in props.items() if k in ("role", "content") and k != v}
    roles = dict(DEFAULT_ROLES)
    for ours, aliases in (entry.get("roles") or {}).items():
        roles.update({alias: ours for alias in ([aliases] if isinstance(aliases, str) else aliases) if alias != ours})
    return {k: v for k, v in (("columns", columns), ("message_keys", message_keys), ("roles", roles)) if v}


def _renames(entry: dict, fields: dict) -> dict:
    columns = {ours: entry[theirs] for ours, theirs in fields.items() if entry.get(theirs) not in (None, ours)}
    return {"columns": columns} if columns else {}
