"""Rows whose names differ from their format's: rename columns, message keys and role names before the format
check (data.train[].columns / message_keys / roles; the axolotl and LLaMA-Factory mappings produce them), and drop
the leading system message where the source asks (data.train[].drop_system)."""

from __future__ import annotations

from ..config import DataSource


def remap(data: dict, source: DataSource) -> dict:
    """`data` with the file's columns under the format's names; message dicts (in any list or dict column) get
    their keys renamed and their role names mapped. The row is left alone when the source renames nothing."""
    if not (source.columns or source.message_keys or source.roles or source.drop_system):
        return data
    theirs_to_ours = {theirs: ours for ours, theirs in source.columns.items()}
    out = {}
    for key, value in data.items():
        name = theirs_to_ours.get(key, key)
        if name in out and name not in source.columns:  # a column renamed onto this name wins over the original
            continue
        out[name] = _messages(value, source)
    return _without_system(out) if source.drop_system else out


CONVERSATIONS = ("messages", "conversations")  # the formats' conversation fields (chat / preference, sharegpt / kto)


def _without_system(data: dict) -> dict:
    """axolotl's drop_system_message: its conversation opens with the `system` column's turn unless the first turn
    is a system one already, and that opening turn goes. Dropping both the column and a leading system turn leaves
    the same conversation in every case."""
    out = {k: v for k, v in data.items() if k != "system"}
    for name in CONVERSATIONS:
        turns = out.get(name)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and _is_system(turns[0]):
            out[name] = turns[1:]
    return out


def _is_system(message: dict) -> bool:
    return message.get("role", message.get("from")) in ("system", "developer")


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
