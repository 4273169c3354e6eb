"""The tuning database: every measurement the autotuner made, in one SQLite file.

Records are keyed by task (a kernel's tuning key, so identical kernels of different models share
their measurements) and device fingerprint. A second table holds each task's template and problem
sizes, so that a cost model can learn from every task this device has measured, not only from
the tasks of the current run. The file is in WAL mode, so readers run while a
process writes, and has a long busy timeout, so concurrent writers wait for the lock instead of
failing; every write is one `BEGIN IMMEDIATE` transaction.

Reads are defensive: a row that does not read back as a record (edited, planted, or written by
something else: text where a number belongs, JSON that does not parse, a config that is not
canonical, a time that is not finite) is ignored, as if never measured, with one
`CorruptRecordWarning` per query.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TuningError
from .cache import cache_dir, canonical_json

SCHEMA_VERSION = 2  # bump on any change to the tables (with a step in _MIGRATIONS)
BUSY_TIMEOUT_MS = 60_000
_TASKS = ("CREATE TABLE tasks (task_key TEXT PRIMARY KEY, template TEXT NOT NULL, "
          "version INTEGER NOT NULL, problem TEXT NOT NULL)")
_SCHEMA = (
    "CREATE TABLE records (id INTEGER PRIMARY KEY, task_key TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, template TEXT NOT NULL, config TEXT NOT NULL, times TEXT, "
    "median REAL, error TEXT, created REAL NOT NULL)",
    "CREATE INDEX records_task ON records (task_key, fingerprint)",
    _TASKS,
)
_MIGRATIONS = {1: (_TASKS,)}
"""Statements that take a file from version v to v + 1 (its records are kept)."""
_COLUMNS = "task_key, fingerprint, template, config, times, median, error, created"
_RECORD_COLUMNS = ", ".join(f"r.{column}" for column in _COLUMNS.split(", "))


class CorruptRecordWarning(UserWarning):
    """Rows of the tuning database that do not read back as records were ignored."""


def default_database_path() -> Path:
    """The default tuning database: `tuning.sqlite3` in the cache directory."""
    return cache_dir() / "tuning.sqlite3"


@dataclass(frozen=True, slots=True)
class Record:
    """One measurement of one config: its times (seconds) and median, or why it failed."""

    task_key: str
    fingerprint: str
    template: str
    config: str
    times: tuple[float, ...] | None
    median: float | None
    error: str | None
    created: float

    def __post_init__(self) -> None:
        if self.times is not None:
            object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        where = f"record of template '{self.template}', task {self.task_key[:16]}"
        if self.error is None and (not self.times or self.median is None):
            raise TuningError(f"{where}: a measurement expected times and a median, got times "
                              f"{self.times} and median {self.median}")
        if self.error is not None and (self.times is not None or self.median is not None):
            raise TuningError(f"{where}: a failed measurement expected no times or median, "
                              f"got times {self.times} and median {self.median}")
        try:
            canonical = canonical_json(json.loads(self.config))
        except (TypeError, ValueError, RecursionError, TuningError):  # nested past the limit
            canonical = None
        if canonical != self.config:
            raise TuningError(f"{where}: config expected canonical JSON ({canonical}), got "
                              f"{self.config!r}")

    @classmethod
    def measured(cls, task_key: str, fingerprint: str, template: str, config: str,
                 times: Sequence[float]) -> Record:
        """A successful measurement, its median computed, created now."""
        return cls(task_key, fingerprint, template, config, tuple(times),
                   statistics.median(times) if times else None, None, time.time())

    @classmethod
    def failed(cls, task_key: str, fingerprint: str, template: str, config: str,
               error: str) -> Record:
        """A config that failed to build or run, created now."""
        return cls(task_key, fingerprint, template, config, None, None, error, time.time())


class TuningDatabase:
    """Every measured record, in SQLite (WAL); safe with several processes writing."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                         isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise TuningError(f"tuning database {self.path}: journal mode expected wal, "
                                  f"got {mode}; put the file on a local filesystem")
            self._create_or_check_schema()
        except (OSError, sqlite3.Error, TuningError) as exc:
            self.close()
            if isinstance(exc, TuningError):
                raise
            raise TuningError(f"tuning database {self.path}: {exc}; delete the file to start "
                              "a new one") from None

    def __enter__(self) -> TuningDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningDatabase({str(self.path)!r})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def add(self, record: Record) -> None:
        """Store one record."""
        self.add_many([record])

    def add_many(self, records: Iterable[Record]) -> None:
        """Store several records in one transaction."""
        rows = [(r.task_key, r.fingerprint, r.template, r.config,
                 None if r.times is None else json.dumps(list(r.times)), r.median, r.error,
                 r.created) for r in records]
        with self._transaction() as conn:
            conn.executemany(f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             rows)

    def add_task(self, task_key: str, template: str, version: int,
                 problem: Mapping[str, Any]) -> None:
        """Remember a task's template, its version and the problem sizes (the first time)."""
        with self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO tasks (task_key, template, version, problem) "
                         "VALUES (?, ?, ?, ?)",
                         (task_key, template, int(version), canonical_json(dict(problem))))

    def history(self, fingerprint: str, versions: Mapping[str, int], limit: int,
                exclude: Iterable[str] = ()) -> list[tuple[str, str, dict[str, Any], str, float]]:
        """The newest `limit` successful measurements on a device of tasks made with the given
        template versions ({template: version}), except the tasks in `exclude`:
        (task key, template, problem, config, median)."""
        exclude = sorted(set(exclude))
        wanted = " OR ".join("(t.template = ? AND t.version = ?)" for _ in versions) or "0"
        rows = self._query(
            f"SELECT {_RECORD_COLUMNS}, t.template, t.problem FROM records r JOIN tasks t "
            "ON t.task_key = r.task_key WHERE r.fingerprint = ? AND "
            f"r.error IS NULL AND r.median IS NOT NULL AND ({wanted}) AND r.task_key NOT IN "
            f"({','.join('?' * len(exclude))}) ORDER BY r.created DESC, r.id DESC LIMIT ?",
            (fingerprint, *[x for item in sorted(versions.items()) for x in item], *exclude,
             limit))
        return self._readable(rows, _history_row)

    def records(self, task_key: str, fingerprint: str) -> list[Record]:
        """Every record of one task on one device, oldest first."""
        rows = self._query(f"SELECT {_COLUMNS} FROM records WHERE task_key = ? AND "
                           "fingerprint = ? ORDER BY created, id", (task_key, fingerprint))
        return self._readable(rows, _record)

    def best(self, task_key: str, fingerprint: str, noise: float = 0.02) -> Record | None:
        """The fastest successful record; within `noise` of it, the smallest sha256(config)."""
        if not noise >= 0:
            raise TuningError(f"best(): noise expected a fraction >= 0, got {noise}")
        rows = self._query(f"SELECT {_COLUMNS} FROM records WHERE task_key = ? AND "
                           "fingerprint = ? AND error IS NULL AND median IS NOT NULL "
                           "ORDER BY created, id", (task_key, fingerprint))
        timed = [(r, r.median) for r in self._readable(rows, _record) if r.median is not None]
        if not timed:
            return None
        lowest = min(median for _, median in timed)
        # timings this close are noise: pick among them by a stable key, not by luck
        close = [r for r, median in timed if median <= lowest * (1.0 + noise)]
        return min(close, key=lambda r: (hashlib.sha256(r.config.encode()).hexdigest(),
                                         r.median))

    def measured_configs(self, task_key: str, fingerprint: str) -> set[str]:
        """Every config already measured for a task, failed ones included."""
        rows = self._query(f"SELECT {_COLUMNS} FROM records WHERE task_key = ? AND "
                           "fingerprint = ?", (task_key, fingerprint))
        return {record.config for record in self._readable(rows, _record)}

    def count(self) -> int:
        """How many records the database holds."""
        return int(self._query("SELECT COUNT(*) FROM records", ())[0][0])

    def tasks(self) -> list[tuple[str, str, int]]:
        """(task key, fingerprint, record count) of every task, sorted."""
        rows = self._query("SELECT task_key, fingerprint, COUNT(*) FROM records "
                           "GROUP BY task_key, fingerprint ORDER BY task_key, fingerprint", ())
        return [(str(t), str(f), int(n)) for t, f, n in rows]

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise TuningError(f"tuning database {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so it cannot
        deadlock upgrading a read lock against another writer."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise TuningError(f"tuning database {self.path}: {exc}") from None

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise TuningError(f"tuning database {self.path}: {exc}") from None

    def _readable(self, rows: Sequence[Sequence[Any]], read: Any) -> list[Any]:
        """`read` of every row that reads back; the others ignored, with one warning."""
        out, skipped = [], []
        for row in rows:
            try:
                out.append(read(row))
            except TuningError as exc:
                skipped.append(str(exc))
        if skipped:
            warnings.warn(f"tuning database {self.path}: ignored {len(skipped)} unreadable "
                          f"record(s), first: {skipped[0]}; they count as never measured",
                          CorruptRecordWarning, stacklevel=3)
        return out

    def _create_or_check_schema(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            empty = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            if version == 0 and empty:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                return
            while version in _MIGRATIONS:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
        if version != SCHEMA_VERSION:
            raise TuningError(f"tuning database {self.path}: schema version expected "
                              f"{SCHEMA_VERSION}, got {version}; delete the file (its "
                              "measurements will be redone)")


def _record(row: Sequence[Any]) -> Record:
    """A row of `records` as a Record; TuningError if it is not one."""
    task_key, fingerprint, template, config, times, median, error, created = row
    _texts(task_key=task_key, fingerprint=fingerprint, template=template, config=config)
    if error is not None:
        _texts(error=error)
    seconds = None if times is None else _json(times, "times")
    if seconds is not None and not (isinstance(seconds, list)
                                    and all(_seconds(t) for t in seconds)):
        raise TuningError(f"times expected a JSON list of finite seconds >= 0, got "
                          f"{str(times)[:60]!r}")
    if median is not None and not _seconds(median):
        raise TuningError(f"median expected finite seconds >= 0, got {median!r}")
    if not _seconds(created):
        raise TuningError(f"created expected a finite time, got {created!r}")
    return Record(task_key, fingerprint, template, config,
                  None if seconds is None else tuple(seconds), median, error, created)


def _history_row(row: Sequence[Any]) -> tuple[str, str, dict[str, Any], str, float]:
    """A row of `history`'s query (a record, its task's template and problem), checked;
    TuningError if it is not one."""
    record, (template, problem) = _record(row[:-2]), row[-2:]
    _texts(template=template)
    sizes = _json(problem, "problem")
    if not isinstance(sizes, dict):
        raise TuningError(f"problem expected a JSON object, got {str(problem)[:60]!r}")
    if not isinstance(json.loads(record.config), dict):
        raise TuningError(f"config expected a JSON object, got {record.config[:60]!r}")
    if record.median is None:
        raise TuningError("median expected seconds, got none")
    return record.task_key, template, sizes, record.config, float(record.median)


def _texts(**fields: Any) -> None:
    for name, value in fields.items():
        if not isinstance(value, str):
            raise TuningError(f"{name} expected text, got {type(value).__name__} "
                              f"{str(value)[:60]!r}")


def _json(text: Any, name: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TuningError(f"{name} expected JSON, got {str(text)[:60]!r} ({exc})") from None


def _seconds(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)
