"""Run a loaded artifact: kernels from its library, called in plan order on TVM tensors.

The execution plan (`manifest.plan`) names every value (`values`: shape with symbolic dims as
text, dtype), which values are the model inputs, outputs and weights, and the `steps`: one
kernel call each, with its input and output value ids, and the range checks of the index
operands it reads (`index_checks`, see `index_checks.py`), run before it; live intervals follow
from the steps.
`state` (optional) lists inputs the kernels update in place, such as an LLM's paged KV cache:
they stay out of the arena, the caller's array itself is handed to the kernels, and it must be
C-contiguous, 64-byte aligned and of the exact element type (`state_array` makes one).
Nothing here imports torch or the compiler; TVM is needed only for its runtime (loading the
library and wrapping the arena's views as its tensors, zero-copy through DLPack).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BitsmithError
from .arena import align_up, assign_offsets
from .artifact import NUMPY_DTYPES, Artifact, ArtifactError, bind_inputs
from .dims import eval_dim
from .host import request_amx
from .index_checks import bind_checks, check_values
from .tvm_runtime import tvm

ALIGNMENT = 64
"""Byte alignment of every buffer in the arena (kernels use aligned vector loads)."""


class Executor:
    """Loads an artifact's kernels and weights once; `run` maps numpy inputs to outputs.

    Inputs, intermediates and outputs live in one arena planned from the values' live
    intervals (`live` in the plan); the arena and the argument list of every kernel call are
    built once per distinct binding of the symbolic dims (per batch size) and reused, so a run
    is: copy the inputs in, call each kernel, copy the outputs out.
    """

    def __init__(self, artifact: Artifact, shared: dict[tuple, Any] | None = None) -> None:
        """`shared`: weights already on the device, by (name, shape, dtype), filled and reused
        across executors (an LLM's entry points hold the same weights once)."""
        self.artifact = artifact
        plan = artifact.manifest.plan
        for key in ("values", "inputs", "outputs", "weights", "steps"):
            if key not in plan:
                raise ArtifactError(f"execution plan lacks '{key}'; recompile the model")
        if len(plan["inputs"]) != len(artifact.manifest.inputs):
            raise ArtifactError(f"execution plan has {len(plan['inputs'])} input(s), the "
                                f"signature {len(artifact.manifest.inputs)}; recompile the model")
        self.plan = plan
        self.state = _state_ids(plan)
        wanted = artifact.manifest.requires.get("isa", [])
        if isinstance(wanted, list) and "amx_tile" in wanted and not request_amx():
            raise ArtifactError("the kernels use AMX tiles, and Linux refused this process "
                                "the tile state (a CPU without AMX, or a kernel older than "
                                "5.16); recompile without precision='bf16'/'int8' here")
        self._dir = tempfile.TemporaryDirectory(prefix="bitsmith-")
        paths = artifact.extract_libraries(self._dir.name)
        self.libraries = {name: _load_library(name, path) for name, path in paths.items()}
        self.raw_kernels = [self._kernel(step) for step in plan["steps"]]
        self.kernels = [_refusals_as_ours(step["kernel"], kernel)
                        for step, kernel in zip(plan["steps"], self.raw_kernels, strict=True)]
        shared = {} if shared is None else shared
        self.weights = {}
        for vid, name in plan["weights"].items():
            array = self._weight(name, plan["values"][vid]["shape"])
            key = (name, array.shape, array.dtype.str)
            if key not in shared:
                shared[key] = tvm.runtime.tensor(array)
            self.weights[vid] = shared[key]
        self._bound: dict[tuple, _Bound] = {}
        self._lock = threading.Lock()  # one arena per batch size: one run at a time

    def _kernel(self, step: Mapping[str, Any]) -> Any:
        library = self.libraries.get(step["library"])
        if library is None:
            raise ArtifactError(f"step {step['kernel']} needs library {step['library']}, which "
                                "the artifact lacks")
        function = step.get("function", step["kernel"])  # a kernel equal to an earlier one
        if not isinstance(function, str):                 # calls that one's function
            raise ArtifactError(f"step {step['kernel']!r} names function {function!r}; "
                                "recompile the model")
        try:
            kernel = library[function]
        except (AttributeError, ValueError, RuntimeError) as exc:  # no such function; a
            # non-string name; tvm.error.TVMError (a RuntimeError) from the loader
            raise ArtifactError(f"step {step['kernel']!r} names a kernel that library "
                                f"{step['library']} lacks ({str(exc).strip()[:200]}); the "
                                "plan and the library do not match, recompile the model"
                                ) from None
        return kernel

    def _weight(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A weight in the plan's shape: ascontiguousarray (and a saved artifact) turn a 0-d
        weight into [1], which a kernel taking a 0-d buffer refuses."""
        if name not in self.artifact.weights:
            raise ArtifactError(f"the plan uses weight {name!r}, which the artifact lacks")
        array = np.ascontiguousarray(self.artifact.weights[name])
        if array.size != math.prod(shape):
            raise ArtifactError(f"weight {name!r} holds {array.size} element(s), the plan "
                                f"expects shape {list(shape)}; recompile the model")
        return array.reshape(tuple(shape))

    def bind(self, *arrays: np.ndarray) -> _Bound:
        """Validate inputs against the signature; the arena and calls for their sizes."""
        bindings = bind_inputs(self.artifact.manifest.inputs, arrays)
        key = tuple(sorted(bindings.items()))
        bound = self._bound.get(key)
        if bound is None:
            try:
                bound = _Bound(self, bindings)
            except (MemoryError, ValueError, OverflowError) as exc:
                raise ArtifactError(f"the plan's buffers for {dict(bindings)} cannot be "
                                    f"allocated ({type(exc).__name__}: {str(exc)[:200]}); "
                                    "the plan is damaged, recompile the model") from None
            self._bound[key] = bound
        return bound

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Validate inputs against the signature, run every step, return the outputs (a
        `state` input is updated in place)."""
        inputs = [np.asarray(a) for a in arrays]
        with self._lock:
            bound = self.bind(*inputs)
            for view, array in zip(bound.inputs, inputs, strict=True):
                if view is None:
                    continue
                np.copyto(view, array)
            bound.attach_state(inputs)
            done = 0
            try:  # the raw kernels (a wrapper per call costs a Python frame each)
                for (kernel, args), checks in zip(bound.calls, bound.checks, strict=True):
                    if checks:  # indices out of range: an error, not the row a kernel clamps to
                        check_values(checks, bound.views)
                    kernel(*args)
                    done += 1
            except (ValueError, TypeError, RuntimeError) as exc:
                if isinstance(exc, BitsmithError):
                    raise
                raise _refused(self.plan["steps"][done]["kernel"], exc) from exc
            return [view.copy() for view in bound.outputs]

    def profile(self, *arrays: np.ndarray, repeat: int = 20) -> list[tuple[str, float]]:
        """Median seconds of each kernel call over `repeat` runs, in plan order."""
        inputs = [np.asarray(a) for a in arrays]
        times: list[list[float]] = []
        with self._lock:
            bound = self.bind(*inputs)
            bound.attach_state(inputs)
            times = [[] for _ in bound.calls]
            for _ in range(repeat + 1):
                # the arena reuses an input's bytes once it is read: copy them in every run
                # (page tables read as garbage would send a kernel out of bounds)
                for view, array in zip(bound.inputs, inputs, strict=True):
                    if view is not None:
                        np.copyto(view, array)
                for k, (kernel, args) in enumerate(bound.calls):
                    start = time.perf_counter()
                    kernel(*args)
                    times[k].append(time.perf_counter() - start)
        return [(step["kernel"], statistics.median(t[1:]))
                for step, t in zip(self.plan["steps"], times, strict=True)]


class _Bound:
    """The arena and the kernel argument lists of one binding of the symbolic dims."""

    def __init__(self, executor: Executor, bindings: Mapping[str, int]) -> None:
        plan = executor.plan
        steps = plan["steps"]
        values = plan["values"]
        live: dict[str, list[int]] = {}
        for vid in plan["inputs"]:
            if vid not in executor.state:
                live[vid] = [0, 0]
        for i, step in enumerate(steps):
            for vid in step["outputs"]:
                live.setdefault(vid, [i, i])
            for vid in step["inputs"]:
                if vid in live:
                    live[vid][1] = max(live[vid][1], i)
        for vid in plan["outputs"]:
            if vid in executor.state:
                raise ArtifactError(f"state input {vid} is also an output; recompile the model")
            if vid in live:
                live[vid][1] = len(steps)
        shapes = {vid: tuple(eval_dim(d, bindings) for d in values[vid]["shape"])
                  for vid in live}
        dtypes = {vid: np.dtype(NUMPY_DTYPES[values[vid]["dtype"]]) for vid in live}
        vids = list(live)
        sizes = [align_up(max(1, math.prod(shapes[v]) * dtypes[v].itemsize), ALIGNMENT)
                 for v in vids]
        offsets = assign_offsets([(size, live[v][0], live[v][1])
                                  for v, size in zip(vids, sizes, strict=True)])
        total = max((o + s for o, s in zip(offsets, sizes, strict=True)), default=0)
        raw = np.empty(total + ALIGNMENT, np.uint8)
        first = -raw.ctypes.data % ALIGNMENT
        self.arena = raw[first:first + total]
        self.views: dict[str, np.ndarray] = {}
        tensors: dict[str, Any] = dict(executor.weights)
        for vid, offset, _size in zip(vids, offsets, sizes, strict=True):
            nbytes = math.prod(shapes[vid]) * dtypes[vid].itemsize
            view = self.arena[offset:offset + nbytes].view(dtypes[vid]).reshape(shapes[vid])
            self.views[vid] = view
            tensors[vid] = as_tvm(view)
        self.inputs: list[np.ndarray | None] = [self.views.get(vid) for vid in plan["inputs"]]
        # where each state input goes in the argument lists: (input position, call, argument)
        self.state_slots = [(plan["inputs"].index(vid), c, a)
                            for c, step in enumerate(steps)
                            for a, vid in enumerate(step["inputs"]) if vid in executor.state]
        self.state_dtypes = {plan["inputs"].index(vid): np.dtype(NUMPY_DTYPES[
            values[vid]["dtype"]]) for vid in executor.state}
        self._attached: dict[int, tuple[int, Any, np.ndarray]] = {}
        self.outputs = [self.views[vid] if vid in self.views
                        else executor.weights[vid].numpy() for vid in plan["outputs"]]
        self.calls = [(kernel, [tensors.get(vid) for vid in step["inputs"] + step["outputs"]])
                      for kernel, step in zip(executor.raw_kernels, steps, strict=True)]
        self.checks = [bind_checks(step, bindings) for step in steps]

    def attach_state(self, inputs: Sequence[np.ndarray]) -> None:
        """Hand the caller's state arrays to the kernels that read and write them."""
        for position, dtype in self.state_dtypes.items():
            array = inputs[position]
            held = self._attached.get(position)
            if held is not None and held[2] is array:
                continue
            if array.dtype != dtype or not array.flags.c_contiguous or not \
                    array.flags.writeable or array.ctypes.data % ALIGNMENT:
                raise ArtifactError(f"state input {position} must be a writable, C-contiguous, "
                                    f"{ALIGNMENT}-byte aligned {dtype} array (make it with "
                                    f"runtime.executor.state_array), got {array.dtype} "
                                    f"contiguous={array.flags.c_contiguous} at address "
                                    f"{array.ctypes.data:#x}")
            self._attached[position] = (array.ctypes.data, as_tvm(array), array)
        for position, call, argument in self.state_slots:
            self.calls[call][1][argument] = self._attached[position][1]


def _state_ids(plan: Mapping[str, Any]) -> frozenset[str]:
    """The plan's state inputs, each checked to be one of its inputs."""
    state = plan.get("state", [])
    if not isinstance(state, list) or any(v not in plan["inputs"] for v in state):
        raise ArtifactError(f"the plan's state {_brief(state)} must list some of its inputs "
                            f"{_brief(plan['inputs'])}; recompile the model")
    return frozenset(state)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def state_array(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A zeroed, C-contiguous, 64-byte aligned array: what a `state` input must be."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    first = -raw.ctypes.data % ALIGNMENT
    return raw[first:first + nbytes].view(dtype).reshape(tuple(shape))


def _load_library(name: str, path: Path) -> Any:
    """A kernel library, loaded; one the loader refuses is an ArtifactError."""
    try:
        return tvm.runtime.load_module(str(path))
    except (RuntimeError, ValueError, OSError) as exc:  # tvm.error.TVMError is a RuntimeError
        said = str(exc).strip().splitlines()
        raise ArtifactError(f"kernel library {name} does not load "
                            f"({said[-1][:200] if said else type(exc).__name__}); "
                            "recompile the model") from None


def _refusals_as_ours(name: str, kernel: Any) -> Callable[..., None]:
    """`kernel`, raising ArtifactError where TVM's FFI raises a bare ValueError/TypeError on
    arguments it refuses (a buffer of another rank, dtype or shape than the plan's)."""
    def call(*args: Any) -> None:
        try:
            kernel(*args)
        except (ValueError, TypeError, RuntimeError) as exc:
            if isinstance(exc, BitsmithError):
                raise
            raise _refused(name, exc) from exc
    return call


def _refused(name: str, exc: Exception) -> ArtifactError:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    said = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else repr(exc)
    return ArtifactError(f"kernel {name} refused its arguments: {said}; the plan does not "
                         "match the kernel, recompile the model")


def as_tvm(view: np.ndarray) -> Any:
    """A zero-copy TVM tensor over an aligned numpy array. numpy's DLPack export does not know
    ml_dtypes' bfloat16: such an array goes out as its uint16 bits and is viewed back."""
    if view.dtype.name == "bfloat16":
        bits: Any = tvm.runtime.from_dlpack(view.view(np.uint16))  # a view keeps its base alive
        return bits._create_view(view.shape, "bfloat16")
    return tvm.runtime.from_dlpack(view)


def value_spec(shape: Sequence[int | str], dtype: str) -> dict[str, Any]:
    """The plan's description of one value."""
    if dtype not in NUMPY_DTYPES:
        raise ArtifactError(f"values of type {dtype} cannot be stored by this runtime")
    return {"shape": list(shape), "dtype": dtype}
