"""Tuner workers die with the process that started them: killed (`kill -9`) without closing its
runner, or interrupted (SIGINT) while a worker is busy, the parent leaves no worker and no
resource tracker behind."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; elsewhere workers poll (best effort)")

CHILD = """
import os, sys, threading, time
from bitsmith.autotune.measure import LocalRunner

runner = LocalRunner(build_workers=1)
runner.close_grace = 1.0
pids = {}
def start(which):
    pids[which] = runner._submit(which, os.getpid).result(timeout=120)
if sys.argv[1] == "kill":
    # the timer starts from a thread that then ends: its worker must outlive that thread
    starter = threading.Thread(target=start, args=("time",))
    starter.start()
    start("build")
    starter.join()
    assert runner._submit("time", os.getpid).result(timeout=60) == pids["time"]
else:
    started = {which: runner._submit(which, os.getpid) for which in ("build", "time")}
    pids = {which: future.result(timeout=120) for which, future in started.items()}
print(*pids.values(), flush=True)
if sys.argv[1] == "interrupt":
    with runner:  # on the SIGINT, closes an idle timer and a busy builder
        runner._submit("build", time.sleep, 600).result()
else:
    time.sleep(600)
"""
DEADLINE_SECONDS = 20.0


def _parents() -> dict[int, int]:
    """The parent pid of every process, from /proc/<pid>/stat."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents = _parents()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in parents.items() if pp == parent} - found
        found |= children
        todo.extend(children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _start(mode: str, stderr: Path) -> tuple[subprocess.Popen, set[int], set[int]]:
    """The parent running CHILD, its two workers' pids, and every process under it. Its
    stderr goes to a file: workers that outlive it would hold a pipe open."""
    with stderr.open("w") as err:
        parent = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE,
                                  stderr=err, text=True)
    with parent.stdout:  # type: ignore[union-attr]
        line = parent.stdout.readline()  # type: ignore[union-attr]
    if not line:
        parent.kill()
        parent.wait()
        pytest.fail(f"the parent printed no worker pids: {stderr.read_text()[-2000:]}")
    workers = {int(pid) for pid in line.split()}
    return parent, workers, _descendants(parent.pid)


def _survivors(processes: set[int]) -> set[int]:
    """Those of `processes` still alive after up to DEADLINE_SECONDS (then killed)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (alive := {pid for pid in processes if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:  # a failing test must not leave 500 MB workers behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return alive


def test_a_killed_parent_leaves_no_worker_or_resource_tracker(tmp_path) -> None:
    parent, workers, processes = _start("kill", tmp_path / "stderr")
    assert workers <= processes and len(workers) == 2  # a builder and a timer
    assert any("resource_tracker" in _cmdline(pid) for pid in processes - workers)
    parent.kill()
    parent.wait()
    survivors = _survivors(processes)
    assert not survivors, {pid: _cmdline(pid) for pid in survivors}


def test_an_interrupted_parent_stops_its_busy_workers_and_exits(tmp_path) -> None:
    parent, _, processes = _start("interrupt", tmp_path / "stderr")
    time.sleep(0.5)  # let the parent hand the sleeping job to its build worker
    parent.send_signal(signal.SIGINT)
    try:
        parent.wait(timeout=DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        parent.kill()
        parent.wait()
        _survivors(processes)
        pytest.fail("the interrupted parent did not exit: closing its runner hung")
    assert "KeyboardInterrupt" in (tmp_path / "stderr").read_text()
    survivors = _survivors(processes)
    assert not survivors, {pid: _cmdline(pid) for pid in survivors}
