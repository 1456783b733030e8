"""Reading data files into rows: every row remembers its file and line, so every error can name them.

Supported: .jsonl, .json (an array of objects, or JSON Lines), .csv, .parquet, .txt (one document per file,
for pretraining) and directories written by `datasets.save_to_disk`. Paths may be globs.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import DataSource, UserError
from .columns import remap
from .formats import check_row

SUPPORTED = ".jsonl .json .csv .parquet .txt, or a directory saved by datasets.save_to_disk"


@dataclass
class Row:
    source: str
    line: int  # 1-based line (jsonl, csv, txt) or row number (json array, parquet, dataset dir)
    data: dict
    format: str | None = None  # the DataSource format; set by load_rows

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class Rows(list):
    """The rows of `load_rows`, plus what `skip_bad_rows` skipped: a count and the first few errors (with file:line)."""

    def __init__(self):
        super().__init__()
        self.skipped = 0
        self.skipped_errors: list[str] = []


def read_rows(path: str) -> Iterator[Row]:
    """Yield the rows of one file (or dataset dir); raise UserError naming file and line on the first bad one."""
    for item in _read(path):
        if isinstance(item, UserError):
            raise item
        yield item


def load_rows(sources: list[DataSource], *, skip_bad_rows: bool = False) -> Rows:
    """Read and validate every source (globs expanded), concatenated in order.

    Each row is checked against its source's format here, so bad rows surface at load time. Rows of format
    "text" are normalised to data={"text": ...} whatever the source's text_field. With skip_bad_rows, bad rows
    are dropped and reported in the result's `skipped` and `skipped_errors`; file-level problems (missing,
    empty, unreadable) always raise.
    """
    rows = Rows()
    for source in sources:
        for path in _expand(source.path):
            if path.endswith(".txt") and source.format != "text":
                raise UserError(f"{path}: .txt files are plain text documents; use format: text")
            for item in _read(path):
                try:
                    if isinstance(item, UserError):
                        raise item
                    item.format = source.format
                    item.data = remap(item.data, source)
                    if source.format == "text" and not path.endswith(".txt"):
                        item.data = {"text": _text_field(item, source.text_field)}
                    check_row(item, source.format)
                    rows.append(item)
                except UserError as e:
                    if not skip_bad_rows:
                        raise
                    rows.skipped += 1
                    if len(rows.skipped_errors) < 5:
                        rows.skipped_errors.append(str(e))
    if not rows:
        raise UserError(f"no usable rows in {', '.join(s.path for s in sources)} ({rows.skipped} bad rows skipped)")
    return rows


def text_sources(sources: list[DataSource], method: str, key: str) -> list[DataSource]:
    """Raw-text methods read every source as format text (the `text_field` column, or whole .txt files); a source
    that names another format explicitly is a mistake worth stopping for."""
    out = []
    for i, source in enumerate(sources):
        if "format" not in source.model_fields_set:
            source = source.model_copy(update={"format": "text"})
        elif source.format != "text":
            raise UserError(
                f"{key}[{i}] ({source.path}): method: {method} trains on raw text, not format {source.format}; set "
                f"format: text (the '{source.text_field}' column of each row, or whole .txt files)")
        out.append(source)
    return out


def _text_field(row: Row, field: str) -> str:
    if field not in row.data:
        raise UserError(f"{row.where}: text row needs '{field}' (data.text_field)")
    return row.data[field]


def _expand(pattern: str) -> list[str]:
    if glob.has_magic(pattern):
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise UserError(f"no data files match {pattern}")
        return paths
    return [pattern]


def _read(path: str) -> Iterator[Row | UserError]:
    """Rows, or a UserError in place of a bad row (so load_rows can skip it); file-level errors are raised."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {path}")
    if p.is_dir():
        rows = _read_dataset_dir(path)
    else:
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
                   ".txt": _read_txt}
        reader = readers.get(p.suffix.lower())
        if reader is None:
            raise UserError(f"{path}: unsupported file type '{p.suffix}'; supported: {SUPPORTED}")
        rows = reader(path)
    empty = True
    for item in rows:
        empty = False
        yield item
    if empty:
        raise UserError(f"{path}: file is empty (no rows)")


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def _json_object(path: str, line: int, text: str) -> Row | UserError:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return UserError(f"{path}:{line}: invalid JSON: {e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        return UserError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    return Row(path, line, obj)


def _read_jsonl(path: str) -> Iterator[Row | UserError]:
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield UserError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8")
                continue
            if text.strip():
                yield _json_object(path, line, text)


def _read_json(path: str) -> Iterator[Row | UserError]:
    text = _decode(path, Path(path).read_bytes())
    if text.lstrip().startswith("{"):  # many ".json" files are really JSON Lines
        yield from _read_jsonl(path)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (or JSON Lines), got {type(data).__name__}")
    for i, obj in enumerate(data, start=1):
        if isinstance(obj, dict):
            yield Row(path, i, obj)
        else:
            yield UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")


def _read_csv(path: str) -> Iterator[Row | UserError]:
    reader = csv.DictReader(io.StringIO(_decode(path, Path(path).read_bytes()), newline=""))
    start = 2  # a record's first line: quoted fields may span lines, and reader.line_num is its last line
    for record in reader:
        if None in record or None in record.values():
            yield UserError(f"{path}:{start}: has a different number of fields than the header ({reader.fieldnames})")
        else:
            yield Row(path, start, record)
        start = reader.line_num + 1


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        i = 0
        for batch in batches:
            for obj in batch.to_pylist():
                i += 1
                yield Row(path, i, obj)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise UserError(f"{path}: cannot read as parquet: {e}") from None


def _read_txt(path: str) -> Iterator[Row]:
    text = _decode(path, Path(path).read_bytes())
    if text.strip():
        yield Row(path, 1, {"text": text})


def _read_dataset_dir(path: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one saved by datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path} holds the splits {list(ds)}; point data paths at one of them, e.g. {Path(path) / next(iter(ds))}")
    for i, obj in enumerate(ds, start=1):
        yield Row(path, i, obj)
