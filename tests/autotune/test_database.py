"""The tuning database: WAL, records, the noise tie-break, errors, concurrency, schema version."""
import hashlib
import sqlite3
import subprocess
import sys
import time

import pytest

from bitsmith.autotune.database import (
    SCHEMA_VERSION,
    CorruptRecordWarning,
    Record,
    TuningDatabase,
    default_database_path,
)
from bitsmith.errors import TuningError

TASK, FP = "dense:N=64:K=128", "fp0"


def ok(config: str, median: float, created: float = 0.0, task: str = TASK) -> Record:
    return Record(task, FP, "dense", config, (median, median), median, None, created)


def test_wal_mode_and_schema_version(tmp_path) -> None:
    with TuningDatabase(tmp_path / "t.sqlite3") as db:
        assert db.count() == 0
    conn = sqlite3.connect(tmp_path / "t.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_default_path_honours_the_cache_dir_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "c"))
    assert default_database_path() == tmp_path / "c" / "tuning.sqlite3"


def test_records_round_trip_oldest_first(tmp_path) -> None:
    with TuningDatabase(tmp_path / "t.sqlite3") as db:
        second = ok('{"TILE_N":8}', 2e-3, created=20.0)
        first = ok('{"TILE_N":16}', 1e-3, created=10.0)
        db.add(second)
        db.add_many([first, ok('{"TILE_N":8}', 5e-3, task="other")])
        assert db.records(TASK, FP) == [first, second]
        assert db.records(TASK, "another-device") == []
        assert db.count() == 3
        assert db.tasks() == [(TASK, FP, 2), ("other", FP, 1)]
        assert db.measured_configs(TASK, FP) == {'{"TILE_N":8}', '{"TILE_N":16}'}


def test_best_is_fastest_and_breaks_noise_ties_by_config_hash(tmp_path) -> None:
    configs = [f'{{"TILE_N":{n}}}' for n in (8, 16, 32, 64)]
    by_hash = sorted(configs, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    with TuningDatabase(tmp_path / "t.sqlite3") as db:
        assert db.best(TASK, FP) is None
        # the fastest is by_hash[3]; by_hash[0] is 1% slower: within the 2% noise, it wins
        db.add_many([ok(by_hash[3], 1.00e-3), ok(by_hash[0], 1.01e-3),
                     ok(by_hash[1], 1.50e-3), ok(by_hash[2], 0.90e-3, task="other")])
        assert db.best(TASK, FP).config == by_hash[0]
        assert db.best(TASK, FP, noise=0.0).config == by_hash[3]
    # insertion order does not matter: the same answer from a database filled the other way
    with TuningDatabase(tmp_path / "u.sqlite3") as db:
        db.add_many([ok(by_hash[1], 1.50e-3), ok(by_hash[0], 1.01e-3), ok(by_hash[3], 1.00e-3)])
        assert db.best(TASK, FP).config == by_hash[0]
        with pytest.raises(TuningError, match="noise expected a fraction >= 0, got -1"):
            db.best(TASK, FP, noise=-1)


def test_errors_are_recorded_with_null_times(tmp_path) -> None:
    with TuningDatabase(tmp_path / "t.sqlite3") as db:
        db.add(Record.failed(TASK, FP, "dense", '{"TILE_N":128}', "CodegenError: too big"))
        db.add(Record.measured(TASK, FP, "dense", '{"TILE_N":8}', [3e-3, 1e-3, 2e-3]))
        failed, measured = db.records(TASK, FP)
        assert (failed.times, failed.median, failed.error) == (None, None, "CodegenError: too big")
        assert measured.median == 2e-3 and measured.times == (3e-3, 1e-3, 2e-3)
        assert db.best(TASK, FP).config == '{"TILE_N":8}'  # the failure never wins
        assert '{"TILE_N":128}' in db.measured_configs(TASK, FP)  # nor is it retried
    row = sqlite3.connect(tmp_path / "t.sqlite3").execute(
        "SELECT times, median, error FROM records WHERE error IS NOT NULL").fetchone()
    assert row == (None, None, "CodegenError: too big")


def test_invalid_records_are_refused() -> None:
    with pytest.raises(TuningError, match="expected times and a median"):
        Record(TASK, FP, "dense", "{}", None, None, None, 0.0)
    with pytest.raises(TuningError, match="failed measurement expected no times"):
        Record(TASK, FP, "dense", "{}", (1.0,), 1.0, "boom", 0.0)
    with pytest.raises(TuningError, match=r'config expected canonical JSON \(\{"A":1,"B":2\}\)'):
        Record(TASK, FP, "dense", '{"B": 2, "A": 1}', (1.0,), 1.0, None, 0.0)


CHILD = """
import sys, time
from pathlib import Path
from bitsmith.autotune.database import Record, TuningDatabase
db = TuningDatabase(sys.argv[1])
Path(sys.argv[1] + ".ready").touch()
for i in range(int(sys.argv[2])):
    db.add(Record("task", "fp", "dense", '{"I":%d}' % i, (1e-3,), 1e-3, None, time.time()))
db.close()
"""


def test_a_second_process_writing_concurrently_loses_nothing(tmp_path) -> None:
    path, n = tmp_path / "t.sqlite3", 150
    db = TuningDatabase(path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "t.sqlite3.ready").exists() and child.poll() is None:
        assert time.monotonic() < deadline, "the child never opened the database"
        time.sleep(0.01)
    for i in range(n):
        db.add(Record("task", "fp", "dense", f'{{"J":{i}}}', (1e-3,), 1e-3, None, time.time()))
    assert child.wait(timeout=60) == 0, child.stderr.read()
    configs = db.measured_configs("task", "fp")
    assert db.count() == 2 * n
    assert configs == {f'{{"I":{i}}}' for i in range(n)} | {f'{{"J":{i}}}' for i in range(n)}
    db.close()


def test_another_schema_version_is_refused(tmp_path) -> None:
    path = tmp_path / "t.sqlite3"
    TuningDatabase(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(TuningError, match=f"schema version expected {SCHEMA_VERSION}, got "
                                          f"{SCHEMA_VERSION + 1}; delete the file"):
        TuningDatabase(path)


def test_not_a_database_and_closed_database_are_tuning_errors(tmp_path) -> None:
    (tmp_path / "junk.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TuningError, match="junk.sqlite3: file is not a database; delete"):
        TuningDatabase(tmp_path / "junk.sqlite3")
    db = TuningDatabase(tmp_path / "t.sqlite3")
    db.close()
    with pytest.raises(TuningError, match="is closed"):
        db.count()


def test_history_joins_known_tasks_of_current_template_versions(tmp_path) -> None:
    with TuningDatabase(tmp_path / "t.sqlite3") as db:
        db.add_task("a", "dense", 1, {"M": 16, "x": "tensor<(16*B)x64xf32>"})
        db.add_task("a", "dense", 7, {"M": 99})  # the first description of a task is kept
        db.add_task("old", "dense", 0, {"M": 1})
        for key, i in (("a", 0), ("a", 1), ("old", 2), ("unknown", 3), ("b", 4)):
            db.add(Record.measured(key, "fp", "dense", f'{{"I":{i}}}', (1e-3 * (i + 1),)))
        db.add(Record.failed("a", "fp", "dense", '{"I":9}', "boom"))
        db.add(Record.measured("a", "other-fp", "dense", '{"I":8}', (1.0,)))
        got = db.history("fp", {"dense": 1}, limit=10)
        assert [(k, c, m) for k, _, _, c, m in got] == [("a", '{"I":1}', 2e-3),
                                                        ("a", '{"I":0}', 1e-3)]
        assert got[0][1:3] == ("dense", {"M": 16, "x": "tensor<(16*B)x64xf32>"})
        assert len(db.history("fp", {"dense": 1}, limit=1)) == 1
        assert db.history("fp", {"dense": 1}, limit=10, exclude=["a"]) == []
        assert db.history("fp", {}, limit=10) == []


def test_a_version_1_file_is_migrated_and_keeps_its_records(tmp_path) -> None:
    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, task_key TEXT NOT NULL, "
                 "fingerprint TEXT NOT NULL, template TEXT NOT NULL, config TEXT NOT NULL, "
                 "times TEXT, median REAL, error TEXT, created REAL NOT NULL)")
    conn.execute("INSERT INTO records (task_key, fingerprint, template, config, times, median, "
                 "error, created) VALUES ('t', 'fp', 'dense', '{\"I\":1}', '[0.5]', 0.5, NULL, "
                 "1.0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with TuningDatabase(path) as db:
        assert db.count() == 1 and db.best("t", "fp").median == 0.5
        db.add_task("t", "dense", 1, {"M": 2})
        assert len(db.history("fp", {"dense": 1}, limit=5)) == 1
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()


PLANTED = [  # (config, times, median, error, created): rows no writer of ours makes
    ('{"TILE_N":1}', "not json", 1e-9, None, 1.0),
    ('{"TILE_N":2}', '{"a": 1}', 1e-9, None, 1.0),
    ('{"TILE_N":3}', "[1e999]", 1e-9, None, 1.0),  # infinite seconds
    ('{"TILE_N":4}', "[1e-9]", "fast", None, 1.0),  # text where a number belongs
    ('{"TILE_N":5}', "[1e-9]", -1.0, None, 1.0),
    ('{"TILE_N": 6}', "[1e-9]", 1e-9, None, 1.0),  # not canonical
    ('{"TILE_N":7}', "[1e-9]", 1e-9, "boom", 1.0),  # failed, yet timed
    ("[[[[" * 400 + "]]]]" * 400, "[1e-9]", 1e-9, None, 1.0),
    ('{"TILE_N":9}', "[1e-9]", 1e-9, None, "yesterday"),
    (b"\x00blob", "[1e-9]", 1e-9, None, 1.0),
]


def test_planted_records_are_ignored_with_a_warning(tmp_path) -> None:
    path = tmp_path / "t.sqlite3"
    with TuningDatabase(path) as db:
        db.add_task(TASK, "dense", 1, {"M": 16})
        db.add_task("planted", "dense", 1, {"M": 16})
        db.add(ok('{"TILE_N":8}', 2e-3))
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO records (task_key, fingerprint, template, config, times, "
                     "median, error, created) VALUES (?, ?, 'dense', ?, ?, ?, ?, ?)",
                     [(TASK, FP, *row) for row in PLANTED]
                     + [("planted", FP, *row) for row in PLANTED])
    conn.execute("UPDATE tasks SET problem = 'not json' WHERE task_key = 'planted'")
    conn.commit()
    conn.close()
    with TuningDatabase(path) as db:
        with pytest.warns(CorruptRecordWarning, match=f"ignored {len(PLANTED)} unreadable"):
            assert db.records(TASK, FP) == [ok('{"TILE_N":8}', 2e-3)]
        with pytest.warns(CorruptRecordWarning, match="unreadable record"):
            best = db.best(TASK, FP)
        assert best is not None and best.config == '{"TILE_N":8}'
        with pytest.warns(CorruptRecordWarning, match="unreadable record"):
            assert db.measured_configs(TASK, FP) == {'{"TILE_N":8}'}  # the rest are retried
        with pytest.warns(CorruptRecordWarning, match="unreadable record"):
            assert db.best("planted", FP) is None
        with pytest.warns(CorruptRecordWarning, match="unreadable record"):
            got = db.history(FP, {"dense": 1}, limit=100)
        assert [(k, c, m) for k, _, _, c, m in got] == [(TASK, '{"TILE_N":8}', 2e-3)]
