"""`RayRunner`: the measurement runner on a Ray cluster (`pip install 'bitsmith[cluster]'`).

Builds are Ray tasks, run on any node with a free CPU (Ray retries a task whose node died);
timings run on one timing actor per node, grouped by the node's device fingerprint, and a
candidate is timed only on a node of the fingerprint being tuned for (this machine's, unless
`fingerprint=` says otherwise). The timing actors of one fingerprint share the candidates of a
round; each actor times one candidate at a time, after every build of the round is done, so
that no build shares a node's CPU with a timing, as `LocalRunner` keeps them apart on one
machine.

A node that dies, or an actor that crashes or hangs, costs only its in-flight candidate: a
crash or a dead node puts the candidate back for another actor of the fingerprint (once), a
hang past `run_timeout` fails it; the actor is replaced while its node lives. Results come
back to the caller (the tuner on the driver), which alone writes the database.

Nothing here imports Ray until a `RayRunner` is made: the single-machine path never loads it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TuningError
from ..runtime.ray_cluster import join, ray_module
from .candidates import MeasureInput, MeasureOptions, MeasureResult

RETRIES = 1
"""How many more actors a candidate whose actor crashed (or whose node died) is given."""


def _ray() -> Any:
    return ray_module(TuningError, "RayRunner")


def node_fingerprint() -> str:
    """The device fingerprint hash of the machine this runs on (this CPU as the tuner sees
    it): what a node's timing actor reports."""
    from ..codegen.tvm.target import host_target  # noqa: PLC0415 - needs TVM
    from .fingerprint import device_fingerprint, fingerprint_hash  # noqa: PLC0415

    return fingerprint_hash(device_fingerprint(host_target()))


def _build(build_fn: Callable[..., Any], inp: MeasureInput) -> tuple[bytes | None, str | None]:
    return build_fn(inp)


class TimingActor:
    """One node's timer (a Ray actor): reports the node's fingerprint, times candidates."""

    def __init__(self, time_fn: Callable[..., Any],
                 fingerprint_fn: Callable[[], str]) -> None:
        self.time_fn = time_fn
        self.fingerprint_fn = fingerprint_fn

    def fingerprint(self) -> str:
        return self.fingerprint_fn()

    def time(self, inp: MeasureInput, library: bytes,
             options: MeasureOptions) -> tuple[MeasureResult | None, str | None]:
        return self.time_fn(inp, library, options)


@dataclass
class _Device:
    """A node's timing actor, of the wanted fingerprint."""

    node: str
    actor: Any
    busy: tuple[Any, int, float] | None = None  # (object ref, candidate, started)


@dataclass
class _Round:
    """The timing phase of one `run`: what is left to time, and the results so far."""

    todo: list[int]
    results: dict[int, MeasureResult] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)


class RayRunner:
    """Builds as Ray tasks anywhere, times on the cluster's nodes of one device fingerprint.

    `address`: the cluster ("auto": the one `ray start` made on this machine, or
    "ray://host:10001"); None joins a Ray already initialised in this process. `fingerprint`:
    the device fingerprint hash to time on (this machine's by default). `build_fn` and
    `time_fn` are what the tasks and actors run (module-level functions, as `LocalRunner`'s);
    `fingerprint_fn` what a node reports as its fingerprint (`node_fingerprint`).
    """

    def __init__(self, address: str | None = "auto", *, options: MeasureOptions | None = None,
                 fingerprint: str | None = None, build_fn: Callable[..., Any] | None = None,
                 time_fn: Callable[..., Any] | None = None,
                 fingerprint_fn: Callable[[], str] | None = None) -> None:
        ray = join(address, TuningError, "RayRunner")
        if build_fn is None or time_fn is None:
            from .measure import _build_worker, _time_worker  # noqa: PLC0415 - needs TVM
            build_fn, time_fn = build_fn or _build_worker, time_fn or _time_worker
        self.options = options or MeasureOptions()
        self.fingerprint_fn = fingerprint_fn or node_fingerprint
        self.fingerprint = fingerprint or self.fingerprint_fn()
        self._build = ray.remote(num_cpus=1, max_retries=2)(_build)
        self._actor = ray.remote(num_cpus=0, max_restarts=0)(TimingActor)
        self._build_fn, self._time_fn = build_fn, time_fn
        self._devices: dict[str, _Device] = {}
        self._other: set[str] = set()  # nodes of another fingerprint
        self.close_grace = 5.0

    # -- the cluster's devices --

    def devices(self) -> list[str]:
        """The node ids this runner times on (live nodes of its fingerprint), found anew."""
        self._discover()
        return sorted(self._devices)

    def _discover(self) -> None:
        """A timing actor on every live node not seen yet; kept where the node reports this
        runner's fingerprint."""
        ray = _ray()
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            NodeAffinitySchedulingStrategy,
        )
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for node in set(self._devices) - alive:  # a busy one's error comes to `_finish`
            if self._devices[node].busy is None:
                del self._devices[node]
        fresh = {}
        for node in alive - set(self._devices) - self._other:
            actor = self._actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node, soft=False)).remote(self._time_fn, self.fingerprint_fn)
            fresh[node] = (actor, actor.fingerprint.remote())
        for node, (actor, ref) in fresh.items():
            try:
                reported = ray.get(ref, timeout=self.options.run_timeout)
            except Exception:  # a node that cannot host the actor: not a device of this runner
                ray.kill(actor)
                self._other.add(node)
                continue
            if reported == self.fingerprint:
                self._devices[node] = _Device(node, actor)
            else:
                self._other.add(node)
                ray.kill(actor)

    # -- Runner --

    def run(self, inputs: Sequence[MeasureInput]) -> list[MeasureResult]:
        """Build every candidate (tasks, in parallel), then time the ones that built, spread
        over this fingerprint's nodes; results in input order."""
        libraries, failed = self._build_all(inputs)
        todo = [i for i in range(len(inputs)) if i not in failed]
        timed = self._time_all(inputs, libraries, _Round(todo)) if todo else {}
        out = []
        for i in range(len(inputs)):
            result = failed.get(i) or timed[i]
            if result.ok:
                result = MeasureResult(result.median, result.times, result.spread, None,
                                       libraries[i] or b"")
            out.append(result)
        return out

    def _build_all(self, inputs: Sequence[MeasureInput]
                   ) -> tuple[list[bytes | None], dict[int, MeasureResult]]:
        ray = _ray()
        refs = [self._build.remote(self._build_fn, inp) for inp in inputs]
        libraries: list[bytes | None] = [None] * len(inputs)
        failed: dict[int, MeasureResult] = {}
        for i, ref in enumerate(refs):
            try:
                library, error = ray.get(ref, timeout=self.options.build_timeout)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref, force=True)
                library, error = None, (f"build timed out after "
                                        f"{self.options.build_timeout:g} s")
            except ray.exceptions.RayError as exc:  # its worker or node lost, retries spent
                library, error = None, f"build crashed: {type(exc).__name__}"
            if error or library is None:
                failed[i] = MeasureResult(math.inf, error=(error if error and error.startswith(
                    "build") else f"build failed: {error}"))
            else:
                libraries[i] = library
        return libraries, failed

    def _time_all(self, inputs: Sequence[MeasureInput], libraries: list[bytes | None],
                  state: _Round) -> dict[int, MeasureResult]:
        ray = _ray()
        self._discover()
        if not self._devices:
            raise TuningError(f"no live node of device fingerprint {self.fingerprint} in the "
                              "Ray cluster: start bitsmith's Ray workers on such a machine")
        while state.todo or any(d.busy for d in self._devices.values()):
            for device in list(self._devices.values()):
                if device.busy is None and state.todo:
                    i = state.todo.pop(0)
                    ref = device.actor.time.remote(inputs[i], libraries[i], self.options)
                    device.busy = (ref, i, time.monotonic())
            busy = {d.busy[0]: d for d in self._devices.values() if d.busy is not None}
            if not busy:  # every actor gone with work left
                for i in state.todo:
                    state.results[i] = MeasureResult(
                        math.inf, error=f"no live node of fingerprint {self.fingerprint} left")
                break
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=0.5)
            for ref in ready:
                self._finish(busy[ref], ref, state)
            self._reap_hung(state)
        return state.results

    def _finish(self, device: _Device, ref: Any, state: _Round) -> None:
        ray = _ray()
        assert device.busy is not None
        _, i, _ = device.busy
        device.busy = None
        try:
            result, error = ray.get(ref)
            state.results[i] = (MeasureResult(math.inf, error=f"timing failed: {error}")
                                if error else result)
        except ray.exceptions.RayActorError:  # its process crashed or its node died
            self._replace(device)
            state.tries[i] = state.tries.get(i, 0) + 1
            if state.tries[i] <= RETRIES and self._devices:
                state.todo.insert(0, i)
            else:
                state.results[i] = MeasureResult(math.inf, error="timing crashed its actor")
        except ray.exceptions.RayError as exc:
            state.results[i] = MeasureResult(math.inf, error=f"timing failed: "
                                                             f"{type(exc).__name__}")

    def _reap_hung(self, state: _Round) -> None:
        ray = _ray()
        now = time.monotonic()
        for device in list(self._devices.values()):
            if device.busy is not None and now - device.busy[2] > self.options.run_timeout:
                ref, i, _ = device.busy
                if ray.wait([ref], timeout=0)[0]:  # it finished while the loop was away
                    self._finish(device, ref, state)
                    continue
                device.busy = None
                state.results[i] = MeasureResult(
                    math.inf, error=f"timing timed out after {self.options.run_timeout:g} s")
                self._replace(device)

    def _replace(self, device: _Device) -> None:
        """Kill a device's actor; a new one on the same node if the node still lives."""
        ray = _ray()
        ray.kill(device.actor)
        self._devices.pop(device.node, None)
        self._discover()

    def close(self) -> None:
        """Kill the timing actors (the cluster, and Ray in this process, stay up)."""
        ray = _ray()
        for device in self._devices.values():
            ray.kill(device.actor)
        self._devices.clear()

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
