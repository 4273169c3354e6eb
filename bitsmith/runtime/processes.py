"""Worker processes that never outlive the process that started them.

Tuning (measurement workers) and serving (decoding large bodies) run work in spawned worker
processes. They must die with their parent, even when it is killed (`kill -9`) and never shuts
its pool down: on Linux each worker asks the kernel for SIGKILL at its parent's death
(`PR_SET_PDEATHSIG`); elsewhere, or where that call fails, a thread in each worker polls its
parent pid every second. Multiprocessing's resource tracker then goes too: it exits once no
process holds its pipe, and only the parent and the workers did.

Spawned workers need only bitsmith, never the parent's main script: `without_main` hides it
while they start, so a script without an `if __name__ == "__main__":` guard is not run again
in every worker.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn pool whose workers die with this process. Submit to it inside `without_main()`
    (workers start at a submit)."""
    main = threading.current_thread() is threading.main_thread()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(), main))


def die_with_parent(parent: int, by_signal: bool) -> None:
    """Worker initializer: end this worker when `parent`, the pool's process, dies.

    Linux signals a worker at the death of the *thread* that started it, so a pool started
    from a thread other than the main one (`by_signal` false) polls instead.
    """
    if not (by_signal and _kill_at_parent_death()):
        threading.Thread(target=_poll_parent, args=(parent,), name="bitsmith-parent-watch",
                         daemon=True).start()
    if os.getppid() != parent:  # the parent died before the kernel was asked to tell us
        os._exit(1)


def _kill_at_parent_death() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that cannot be."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):  # no libc, or no prctl in it
        return False


def _poll_parent(parent: int) -> None:
    """Exit this worker once it has been reparented, i.e. `parent` has died."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


@contextlib.contextmanager
def without_main() -> Iterator[None]:
    """Start worker processes without the parent's `__main__`.

    A spawned process normally re-imports the parent's main script, which runs a script without
    an `if __name__ == "__main__":` guard a second time in every worker (compiling, tuning,
    serving...). For the moment workers start, the main module hides its file and spec, from
    which multiprocessing would re-import it.
    """
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__")
             if main is not None and hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
