"""The service's database: jobs, their events, uploaded files and endpoints.

`Store` is the interface the rest of the service uses (records are plain dicts); `SQLiteStore` implements it
on one SQLite file under --home in WAL mode (readers do not block the writer; a killed process loses nothing
committed). Another database could implement the same methods. The schema is versioned with PRAGMA
user_version: MIGRATIONS[i] takes a database from version i to i + 1, applied in order at open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

from tunelab.config import UserError

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order: pending jobs run in this order
        id TEXT UNIQUE NOT NULL,
        state TEXT NOT NULL,
        display_name TEXT,
        method TEXT NOT NULL,
        source_model TEXT,
        train_dataset TEXT,
        validation_dataset TEXT,
        config TEXT NOT NULL,                    -- the resolved tunelab config (JSON)
        run_dir TEXT NOT NULL,
        phase TEXT NOT NULL DEFAULT 'train',     -- train | eval: which child runs (or runs next)
        pid INTEGER,                             -- the child's pid = its process group (dropped in 2)
        attempt INTEGER NOT NULL DEFAULT 0,
        progress TEXT NOT NULL DEFAULT '{}',
        latest_metrics TEXT NOT NULL DEFAULT '{}',
        best_metrics TEXT NOT NULL DEFAULT '{}',
        final_metrics TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        tuned_model TEXT,
        create_time REAL NOT NULL,
        start_time REAL,
        end_time REAL,
        update_time REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, seq);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        time REAL NOT NULL,
        kind TEXT NOT NULL,                      -- state | metrics | log
        data TEXT NOT NULL
    );
    CREATE INDEX events_job ON events(job_id, id);
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        path TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        format TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE endpoints (
        name TEXT PRIMARY KEY,                   -- without the 'endpoints/' prefix
        job_id TEXT NOT NULL,
        source_model TEXT,
        path TEXT NOT NULL,
        adapter INTEGER NOT NULL,
        create_time REAL NOT NULL
    );
    """,
    # 2: jobs run through a backend (local processes, Slurm ...): its name, its handle on the job (pid or Slurm job
    # id), where the job runs, and what it asked for. A local child's pid becomes its handle.
    """
    ALTER TABLE jobs ADD COLUMN backend TEXT;
    ALTER TABLE jobs ADD COLUMN handle TEXT;
    ALTER TABLE jobs ADD COLUMN placement TEXT;
    ALTER TABLE jobs ADD COLUMN compute TEXT NOT NULL DEFAULT '{}';
    UPDATE jobs SET backend = 'local', handle = json_object('job_id', CAST(pid AS TEXT), 'pid', pid, 'match', run_dir || '/job.yaml', 'gpus',
        json_array()) WHERE pid IS NOT NULL;
    ALTER TABLE jobs DROP COLUMN pid;
    """,
    # the OpenAI fine-tuning face (openai_ft.py): a file's purpose, an OpenAI job's request and chosen values
    """
    ALTER TABLE files ADD COLUMN purpose TEXT;
    ALTER TABLE jobs ADD COLUMN openai TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
JSON_COLUMNS = ("config", "progress", "latest_metrics", "best_metrics", "final_metrics", "tuned_model", "handle",
                "placement", "compute", "openai")


class Store(Protocol):
    def add_job(self, job: dict) -> dict: ...
    def get_job(self, job_id: str) -> dict | None: ...
    def update_job(self, job_id: str, **fields) -> dict: ...
    def list_jobs(self, states: list[str] | None = None, before_seq: int | None = None,
                  limit: int | None = None, oldest_first: bool = False) -> list[dict]: ...
    def add_event(self, job_id: str, kind: str, data) -> int: ...
    def events(self, job_id: str, after: int = 0, timed: bool = False) -> list[tuple]: ...
    def add_file(self, record: dict) -> dict: ...
    def get_file(self, file_id: str) -> dict | None: ...
    def list_files(self) -> list[dict]: ...
    def delete_file(self, file_id: str) -> None: ...
    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def add_endpoint(self, record: dict) -> dict: ...
    def get_endpoint(self, name: str) -> dict | None: ...
    def list_endpoints(self) -> list[dict]: ...
    def delete_endpoint(self, name: str) -> None: ...
    def close(self) -> None: ...


class SQLiteStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the request threads and the scheduler, serialised by a lock: the service's
        # writes are small and few, and one connection keeps WAL checkpoints simple.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a killed process
            self._migrate(path)

    def _migrate(self, path: Path) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"{path} has schema version {version}, newer than this tunelab understands "
                            f"({SCHEMA_VERSION}); upgrade tunelab or use another --home")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.executescript(f"BEGIN; {MIGRATIONS[target - 1]} PRAGMA user_version = {target}; COMMIT;")

    # -- jobs

    def add_job(self, job: dict) -> dict:
        now = time.time()
        row = {**job, "create_time": now, "update_time": now}
        cols = list(row)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                             [_encode(c, row[c]) for c in cols])
        return self.get_job(job["id"])

    def get_job(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def update_job(self, job_id: str, **fields) -> dict:
        fields["update_time"] = time.time()
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in fields)} WHERE id = ?",
                             [*(_encode(c, v) for c, v in fields.items()), job_id])
        return self.get_job(job_id)

    def list_jobs(self, states=None, before_seq=None, limit=None, oldest_first=False) -> list[dict]:
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += f" ORDER BY seq {'ASC' if oldest_first else 'DESC'}" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            return [_job(r) for r in self._db.execute(sql, args).fetchall()]

    # -- events

    def add_event(self, job_id: str, kind: str, data) -> int:
        with self._lock:
            cur = self._db.execute("INSERT INTO events (job_id, time, kind, data) VALUES (?, ?, ?, ?)",
                                   (job_id, time.time(), kind, json.dumps(data)))
            return cur.lastrowid

    def events(self, job_id: str, after: int = 0, timed: bool = False) -> list[tuple]:
        """(id, kind, data) per event, oldest first; (id, time, kind, data) with timed."""
        with self._lock:
            rows = self._db.execute("SELECT id, time, kind, data FROM events WHERE job_id = ? AND id > ? ORDER BY id",
                                    (job_id, after)).fetchall()
        if timed:
            return [(r["id"], r["time"], r["kind"], json.loads(r["data"])) for r in rows]
        return [(r["id"], r["kind"], json.loads(r["data"])) for r in rows]

    # -- files and endpoints

    def add_file(self, record: dict) -> dict:
        self._insert("files", record)
        return self.get_file(record["id"])

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", file_id)

    def list_files(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM files ORDER BY created_at").fetchall()]

    def delete_file(self, file_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def add_endpoint(self, record: dict) -> dict:
        self._insert("endpoints", record)
        return self.get_endpoint(record["name"])

    def get_endpoint(self, name: str) -> dict | None:
        return self._one("SELECT * FROM endpoints WHERE name = ?", name)

    def list_endpoints(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM endpoints ORDER BY create_time").fetchall()]

    def delete_endpoint(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM endpoints WHERE name = ?", (name,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _insert(self, table: str, record: dict) -> None:
        with self._lock:
            self._db.execute(f"INSERT INTO {table} ({', '.join(record)}) VALUES ({', '.join('?' * len(record))})",
                             list(record.values()))

    def _one(self, sql: str, *args) -> dict | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row else None


def _encode(column: str, value):
    return json.dumps(value) if column in JSON_COLUMNS and value is not None else value


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    for c in JSON_COLUMNS:
        if job[c] is not None:
            job[c] = json.loads(job[c])
    return job
