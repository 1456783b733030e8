"""Rows whose names differ from their format's: rename columns, message keys and role names before the format
check (data.train[].columns / message_keys / roles; the axolotl and LLaMA-Factory mappings produce them)."""

from __future__ import annotations

from ..config import DataSource


def remap(data: dict, source: DataSource) -> dict:
    """`data` with the file's columns under the format's names; message dicts (in any list or dict column) get
    their keys renamed and their role names mapped. The row is left alone when the source renames nothing."""
    if not (source.columns or source.message_keys or source.roles):
        return data
    theirs_to_ours = {theirs: ours for ours, theirs in source.columns.items()}
    out = {}
    for key, value in data.items():
        name = theirs_to_ours.get(key, key)
        if name in out and name not in source.columns:  # a column renamed onto this name wins over the original
            continue
        out[name] = _messages(value, source)
    return out


def _messages(value, source: DataSource):
    if isinstance(value, list):
        return [_message(item, source) if isinstance(item, dict) else item for item in value]
    return _message(value, source) if isinstance(value, dict) else value


def _message(message: dict, source: DataSource) -> dict:
    keys = {theirs: ours for ours, theirs in source.message_keys.items()}
    out = {keys.get(k, k): v for k, v in message.items()}
    for role_key in ("role", "from"):
        role = out.get(role_key)
        if isinstance(role, str) and role in source.roles:
            out[role_key] = source.roles[role]
    return out
