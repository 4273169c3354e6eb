"""Measuring candidate kernels in worker processes.

A candidate is (kernel, template, config). Builds run in a pool of worker processes, several at
a time; timings run one at a time in a separate measuring process, so that no two candidates
share the CPU while one is timed. A build or a run that crashes its worker, raises, hangs past
its timeout or computes a wrong result costs that candidate an infinite time and a reason,
never the tuner: the pool is rebuilt and the next candidate goes on.

A candidate is timed as its model will run it. When the model's working set exceeds the
last-level cache, timing rotates over enough copies of the kernel's inputs and outputs to
exceed that cache (`rotate_bytes`), so a kernel whose operands would fit in cache is not timed
hot when in the model they have been evicted; when the whole model fits (`hot`), it is timed on
one copy, hot, as the model will find it. Each candidate's output is checked against the
interpreter before its time counts.

`Runner` is the interface the tuner sees; `LocalRunner` is the worker-pool implementation on
this machine (a Ray-backed runner, one actor per device, is the way past one machine).

Workers die with the process that started them, even when it is killed (`kill -9`) and never
closes its runner (`runtime.processes.worker_pool`).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from .. import ir
from ..codegen.template import TEMPLATES, CodegenError, Config
from ..codegen.tvm.amx import amx_tvm_target
from ..codegen.tvm.lower import compile_funcs
from ..codegen.tvm.target import target_from_json, tvm_target
from ..codegen.tvm.templates import TvmKernel
from ..ir.dialects.kernel import FusedOp
from ..ir.packing import to_storage
from ..runtime.host import request_amx
from ..runtime.processes import without_main, worker_pool
from ..runtime.tvm_runtime import tvm
from .candidates import (  # noqa: F401
    RTOL,
    MeasureInput,
    MeasureOptions,
    MeasureResult,
    Runner,
    kernel_text,
    reference,
)
from .candidates import kernel_of as _kernel_of
from .candidates import mismatch as _mismatch


def _built(inp: MeasureInput, kernel: FusedOp) -> TvmKernel:
    template = TEMPLATES.get(inp.template)
    if template is None:
        raise CodegenError(f"unknown template {inp.template!r}; known: {sorted(TEMPLATES)}")
    problem = template.match(kernel)
    if problem is None:
        raise CodegenError(f"template {inp.template} does not match kernel "
                           f"'{kernel.kernel_name}'")
    return template.build(problem, Config(json.loads(inp.config)), target_from_json(inp.target))


def _guarded(fn: Any) -> Any:
    """Worker entry points return failures as text: an exception of ours may not pickle."""
    def call(*args: Any) -> Any:
        try:
            return fn(*args), None
        except Exception as exc:  # any failure of a candidate is its result, not ours
            return None, f"{type(exc).__name__}: {str(exc).strip()[-400:]}"
    call.__name__ = fn.__name__
    return call


def build_candidate(inp: MeasureInput) -> bytes:
    """Schedule and compile one candidate; the shared library's bytes."""
    kernel = _kernel_of(ir.parse(inp.kernel_ir))
    built = _built(inp, kernel)
    cpu = target_from_json(inp.target)
    target = amx_tvm_target(cpu) if built.isa else tvm_target(cpu)
    executable = compile_funcs({"main": built.func}, kernel.kernel_name, target)
    with tempfile.TemporaryDirectory(prefix="bitsmith-tune-") as tmp:
        path = Path(tmp) / "kernel.so"
        executable.export_library(str(path))
        return path.read_bytes()


def time_candidate(inp: MeasureInput, library: bytes, options: MeasureOptions) -> MeasureResult:
    """Load a built candidate, check it against the interpreter, time it.

    The interpreter's matmuls run on one BLAS thread: OpenBLAS's threads spin-wait after a
    call, and a kernel timed while they spin loses a core (measured: a parallel GEMM at half
    its speed, or stalled in 4 ms scheduler slices)."""
    with threadpool_limits(limits=1, user_api="blas"):
        kernel, arrays, want = reference(inp)
    built = _built(inp, kernel)
    if "amx_tile" in built.isa and not request_amx():
        raise CodegenError("an AMX kernel, and Linux refused this process the tile state")
    with tempfile.TemporaryDirectory(prefix="bitsmith-tune-") as tmp:
        path = Path(tmp) / "kernel.so"
        path.write_bytes(library)
        func = tvm.runtime.load_module(str(path))["main"]
        stored = [to_storage(v.type, a) for v, a in zip(kernel.operands, arrays, strict=True)]
        packed = [built.packs[i][1](a) if i in built.packs else a for i, a in enumerate(stored)]
        one = sum(a.nbytes for a in packed) + sum(w.nbytes for w in want)
        copies = 1 if inp.hot else max(1, min(options.max_copies,
                                              math.ceil(options.rotate_bytes / max(one, 1))))
        sets = [([tvm.runtime.tensor(a) for a in packed],
                 [tvm.runtime.empty(w.shape, str(w.dtype)) for w in want])
                for _ in range(copies)]
        func(*sets[0][0], *sets[0][1])
        precision = kernel.attributes.get("precision")
        error = _mismatch([o.numpy() for o in sets[0][1]], want,
                          precision if isinstance(precision, str) else None)
        if error:
            return MeasureResult(math.inf, error=error)
        for i in range(options.warmup):
            ins, outs = sets[i % copies]
            func(*ins, *outs)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < options.repeats or time.perf_counter() - start < options.min_seconds:
            ins, outs = sets[len(times) % copies]
            t0 = time.perf_counter()
            func(*ins, *outs)
            times.append(time.perf_counter() - t0)
            if len(times) >= 100 * options.repeats:
                break
    return MeasureResult.of(times)


def _build_worker(inp: MeasureInput) -> tuple[bytes | None, str | None]:
    return _guarded(build_candidate)(inp)


def _time_worker(inp: MeasureInput, library: bytes,
                 options: MeasureOptions) -> tuple[MeasureResult | None, str | None]:
    return _guarded(time_candidate)(inp, library, options)


class LocalRunner:
    """Builds in `build_workers` processes, times in one process, on this machine."""

    def __init__(self, options: MeasureOptions | None = None,
                 build_workers: int | None = None, *, build_fn: Any = None,
                 time_fn: Any = None) -> None:
        self.options = options or MeasureOptions()
        # what the workers run: module-level functions (picklable); tests inject faults here
        self.build_fn = build_fn or _build_worker
        self.time_fn = time_fn or _time_worker
        self.build_workers = build_workers or max(1, len(os.sched_getaffinity(0)))
        self._builders: ProcessPoolExecutor | None = None
        self._timer: ProcessPoolExecutor | None = None
        self.close_grace = 5.0  # seconds `close` waits for a busy worker before killing it

    def _submit(self, which: str, fn: Any, *args: Any) -> Future:
        with without_main():
            return self._pool(which).submit(fn, *args)

    def _pool(self, which: str) -> ProcessPoolExecutor:
        if which == "build":
            if self._builders is None:
                self._builders = self._new_pool(self.build_workers)
            return self._builders
        if self._timer is None:
            self._timer = self._new_pool(1)
        return self._timer

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        """Workers that die with this process (see `runtime.processes`)."""
        return worker_pool(workers)

    def _reset(self, which: str) -> None:
        pool = self._builders if which == "build" else self._timer
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)
        if which == "build":
            self._builders = None
        else:
            self._timer = None

    def _wait(self, which: str, future: Future, timeout: float) -> tuple[Any, str | None]:
        try:
            value, error = future.result(timeout=timeout)
            return value, (f"{which} failed: {error}" if error else None)
        except FutureTimeout:
            self._reset(which)
            return None, f"{which} timed out after {timeout:g} s"
        except BrokenProcessPool:
            self._reset(which)
            return None, f"{which} crashed its worker process"

    def run(self, inputs: Sequence[MeasureInput]) -> list[MeasureResult]:
        """Build every candidate (in parallel), then time the ones that built, one by one."""
        results: list[MeasureResult | None] = [None] * len(inputs)
        libraries: list[bytes | None] = [None] * len(inputs)
        futures = []
        for inp in inputs:
            try:
                futures.append(self._submit("build", self.build_fn, inp))
            except BrokenProcessPool:
                self._reset("build")
                futures.append(self._submit("build", self.build_fn, inp))
        for i, future in enumerate(futures):
            library, error = self._wait("build", future, self.options.build_timeout)
            if error:
                results[i] = MeasureResult(math.inf, error=error)
                if "crashed" in error or "timed out" in error:  # the pool is gone: resubmit
                    futures[i + 1:] = [self._submit("build", self.build_fn, inp)
                                       for inp in inputs[i + 1:]]
            else:
                libraries[i] = library
        for i, inp in enumerate(inputs):
            if results[i] is not None:
                continue
            future = self._submit("time", self.time_fn, inp, libraries[i], self.options)
            result, error = self._wait("time", future, self.options.run_timeout)
            results[i] = (MeasureResult(math.inf, error=error) if error
                          else _with_library(result, libraries[i]))
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Stop the worker processes: idle ones exit at once; one still busy, as when the run
        was interrupted (Ctrl-C), is killed after `close_grace` seconds."""
        pools = [pool for pool in (self._builders, self._timer) if pool is not None]
        self._builders = self._timer = None
        processes = [process for pool in pools
                     for process in list((getattr(pool, "_processes", None) or {}).values())]
        managers = [thread for pool in pools
                    if (thread := getattr(pool, "_executor_manager_thread", None)) is not None]
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        running = {process.sentinel: process for process in processes}
        deadline = time.monotonic() + self.close_grace
        while running and (left := deadline - time.monotonic()) > 0:
            for sentinel in wait_for_exit(list(running), timeout=left):
                del running[sentinel]
        for process in running.values():
            process.kill()
        for thread in managers:  # each pool's manager ends once its workers have
            thread.join(timeout=self.close_grace)

    def __enter__(self) -> LocalRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_library(result: MeasureResult, library: bytes | None) -> MeasureResult:
    return MeasureResult(result.median, result.times, result.spread, result.error,
                         library or b"")
