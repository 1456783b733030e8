"""The store's migration for the OpenAI face: a database written by the previous schema opens with its rows intact
and gains files.purpose and jobs.openai."""

from __future__ import annotations

import sqlite3

from tunelab.serve.store import MIGRATIONS, SQLiteStore


def test_a_version_1_database_is_migrated(tmp_path):
    path = tmp_path / "tunelab.db"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    db.execute("INSERT INTO files (id, filename, path, bytes, rows, format, created_at) "
               "VALUES ('file-1', 'a.jsonl', '/x/a.jsonl', 10, 2, 'chat', 1.0)")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    assert store.get_file("file-1") == {"id": "file-1", "filename": "a.jsonl", "path": "/x/a.jsonl", "bytes": 10,
                                        "rows": 2, "format": "chat", "created_at": 1.0, "purpose": None}
    job = store.add_job({"id": "ftjob-1", "state": "PENDING", "method": "sft", "config": {}, "run_dir": "/r",
                         "openai": {"suffix": "s"}})
    assert job["openai"] == {"suffix": "s"}
    store.delete_file("file-1")
    assert store.get_file("file-1") is None
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
