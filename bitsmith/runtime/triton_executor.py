"""Run a `cuda` artifact: its Triton kernel sources, launched in plan order on torch tensors.

A cuda artifact's libraries are Python sources (`<kernel>.py`, one per kernel, `@triton.jit`
functions); each plan step lists its launches (`launches`: the function, the output it
writes, its grid (per axis, extents over symbolic dims divided by block constexprs), the
symbolic dims it takes, its constexprs and `num_warps`, and whether its output starts zeroed).
Sources are written to a private directory and imported from there (Triton reads a kernel's
source from its file); Triton compiles each at its first launch and caches it.

Tensors live on the GPU, or, under `TRITON_INTERPRET=1` on a machine without one, on the CPU,
where Triton's interpreter runs the same kernels (that is how CI checks them). Every buffer of
a binding of the symbolic dims is allocated, and every launch's grid and arguments worked out,
once and reused, so a run is: copy the inputs in, launch each kernel, copy the outputs out.
A step that reads indices first checks their range (`index_checks`): one device sync each.

This is the one runtime module that needs torch (Triton launches take torch tensors); it is
imported only for cuda artifacts, so CPU artifacts still load without torch.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .artifact import NUMPY_DTYPES, Artifact, ArtifactError, bind_inputs
from .dims import eval_dim
from .index_checks import IndexCheck, bind_checks


def device() -> str:
    """Where Triton kernels run in this process: "cuda", or "cpu" under the interpreter."""
    import torch  # noqa: PLC0415 - cuda artifacts only
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        raise ArtifactError("this artifact runs Triton kernels: it needs an NVIDIA GPU visible to "
                            "torch, or TRITON_INTERPRET=1 to run them (slowly) on the CPU")
    return "cuda"


def load_source(name: str, source: str, directory: str | os.PathLike) -> ModuleType:
    """Import a kernel source as a module from a file in `directory`."""
    path = Path(directory) / f"{name}.py" if not name.endswith(".py") else Path(directory) / name
    path.write_text(source)
    module_name = f"bitsmith_triton_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton resolves globals through the module
    spec.loader.exec_module(module)
    return module


Call = tuple[Any, tuple[int, ...], list[Any], dict[str, Any], Any]
"""One bound launch: the jit function, its grid, its arguments, its keyword options, and the
output to zero first (split-K programs add into it) or None."""
_Step = tuple[list[IndexCheck], list[Call]]
"""One plan step, bound: the index checks to run before it, and its launches."""


def bind_launches(module: ModuleType, launches: Sequence[Mapping[str, Any]],
                  inputs: Sequence[Any], outputs: Sequence[Any],
                  bindings: Mapping[str, int]) -> list[Call]:
    """Every function of a kernel with its grid and arguments (inputs, its output, its dim
    arguments) worked out for one binding of the symbolic dims."""
    calls = []
    for spec in launches:
        meta = dict(spec["meta"])
        scope = {**bindings, **{k: v for k, v in meta.items() if isinstance(v, int)}}
        grid = tuple(max(1, math.prod(
            -(-math.prod(eval_dim(d, scope) for d in extent) // (meta[block] if block else 1))
            for extent, block in axis)) for axis in spec["grid"])
        dims = [eval_dim(d, bindings) for d in spec["dims"]]
        out = outputs[spec["output"]]
        calls.append((getattr(module, spec["fn"]), grid, [*inputs, out, *dims], meta,
                      out if spec.get("zero") else None))
    return calls


def launch(calls: Sequence[Call]) -> None:
    """Run bound launches in order (zeroing first the outputs that programs add into)."""
    for fn, grid, args, meta, zero in calls:
        if zero is not None:
            zero.zero_()
        fn[grid](*args, **meta)


def check_tensors(checks: Sequence[IndexCheck], buffers: Mapping[str, Any]) -> None:
    """Run index checks on torch tensors (`buffers` by plan value id): one device sync
    each (the min and max come back together), only for steps that read indices."""
    import torch  # noqa: PLC0415
    for check in checks:
        if isinstance(check.source, tuple):
            check.verify(*check.source)
            continue
        values = buffers[check.source]
        if values.numel():
            if values.dtype in (torch.uint16, torch.uint32, torch.uint64):
                values = values.long()  # aminmax lacks these (torch only indexes by i32/i64)
            least, most = torch.stack(torch.aminmax(values)).tolist()
            check.verify(int(least), int(most))


def as_torch(array: np.ndarray, dtype: str, where: str) -> Any:
    """A numpy array as a torch tensor on `where` (packed u32 words travel as int32)."""
    import torch  # noqa: PLC0415
    array = np.asarray(array, order="C")  # ascontiguousarray would make a 0-d array [1]
    if dtype == "u32" or array.dtype == np.uint32:
        array = array.view(np.int32)
    if array.dtype.name == "bfloat16":  # ml_dtypes' bf16: torch takes its bits
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).to(where)
    return torch.from_numpy(array.copy()).to(where)


class TritonExecutor:
    """Loads a cuda artifact's kernels and weights once; `run` maps numpy inputs to outputs."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.plan = artifact.manifest.plan
        inputs = self.plan.get("inputs", ())
        if len(inputs) != len(artifact.manifest.inputs):
            raise ArtifactError(f"execution plan has {len(inputs)} input(s), the signature "
                                f"{len(artifact.manifest.inputs)}; recompile the model")
        self.device = device()
        self._dir = tempfile.TemporaryDirectory(prefix="bitsmith-triton-")
        self.modules = {name: load_source(name, data.decode(), self._dir.name)
                        for name, data in artifact.libraries.items()}
        values = self.plan["values"]
        self.weights = {vid: as_torch(artifact.weights[name], values[vid]["dtype"], self.device)
                        for vid, name in self.plan["weights"].items()}
        self._bound: dict[tuple, tuple[dict[str, Any], list[_Step]]] = {}
        self._lock = threading.Lock()

    def _bind(self, bindings: Mapping[str, int]) -> tuple[dict[str, Any], list[_Step]]:
        """The buffers, and each step's index checks and bound launches, of one binding,
        made once and reused."""
        import torch  # noqa: PLC0415
        key = tuple(sorted(bindings.items()))
        if key not in self._bound:
            buffers = dict(self.weights)
            for vid, spec in self.plan["values"].items():
                if vid in buffers:
                    continue
                shape = tuple(eval_dim(d, bindings) for d in spec["shape"])
                dtype = getattr(torch, NUMPY_DTYPES[spec["dtype"]])
                buffers[vid] = torch.empty(shape, dtype=dtype, device=self.device)
            steps: list[_Step] = []
            for step in self.plan["steps"]:
                module = self.modules.get(step["library"])
                if module is None:
                    raise ArtifactError(f"step {step['kernel']} needs kernel source "
                                        f"{step['library']}, which the artifact lacks")
                steps.append((bind_checks(step, bindings),
                              bind_launches(module, step["launches"],
                                            [buffers[v] for v in step["inputs"]],
                                            [buffers[v] for v in step["outputs"]], bindings)))
            self._bound[key] = (buffers, steps)
        return self._bound[key]

    @staticmethod
    def _launch(buffers: Mapping[str, Any], steps: Sequence[_Step]) -> None:
        """Each step's launches, after its index checks (out-of-range indices are an
        error, not the row a kernel clamps to)."""
        for checks, calls in steps:
            if checks:
                check_tensors(checks, buffers)
            launch(calls)

    def run_torch(self, *tensors: Any) -> list[Any]:
        """torch tensors in (on any device), torch tensors out on the kernels' device: inputs
        are copied device to device, and outputs come back without a trip through the host."""
        import torch  # noqa: PLC0415
        views = [np.broadcast_to(torch.empty(0, dtype=t.dtype).numpy().dtype.type(0), t.shape)
                 for t in tensors]  # shape and dtype only, for the signature check
        with self._lock:
            buffers, steps = self._bind(bind_inputs(self.artifact.manifest.inputs, views))
            for vid, tensor in zip(self.plan["inputs"], tensors, strict=True):
                buffers[vid].copy_(tensor)
            self._launch(buffers, steps)
            return [buffers[v].clone() for v in self.plan["outputs"]]

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Validate inputs against the signature, launch every kernel, return the outputs."""
        import torch  # noqa: PLC0415
        inputs = [np.asarray(a) for a in arrays]
        with self._lock:
            buffers, steps = self._bind(bind_inputs(self.artifact.manifest.inputs, inputs))
            for vid, array in zip(self.plan["inputs"], inputs, strict=True):
                buffers[vid].copy_(torch.from_numpy(np.asarray(array, order="C")))
            self._launch(buffers, steps)
            return [buffers[v].cpu().numpy().copy() for v in self.plan["outputs"]]


def benchmark(name: str, source: str, launches: Sequence[Mapping[str, Any]],
              inputs: Sequence[tuple[np.ndarray, str]], outputs: Sequence[np.ndarray],
              bindings: Mapping[str, int], warmup: int, repeats: int,
              min_seconds: float) -> tuple[list[np.ndarray], list[float]]:
    """Run one kernel source on `inputs` (arrays with their IR dtypes), return its outputs
    (shaped and typed as `outputs`) from the first run, and the seconds of each timed run:
    CUDA events on a GPU, the wall clock under the interpreter."""
    import torch  # noqa: PLC0415
    where = device()
    args = [as_torch(a, dtype, where) for a, dtype in inputs]
    outs = [torch.empty(o.shape, dtype=getattr(torch, o.dtype.name), device=where)
            for o in outputs]
    with tempfile.TemporaryDirectory(prefix="bitsmith-tune-") as tmp:
        calls = bind_launches(load_source(name, source, tmp), launches, args, outs, bindings)
        launch(calls)
        got = [o.cpu().numpy().copy() for o in outs]
        for _ in range(warmup):
            launch(calls)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            if where == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                begin.record()
                launch(calls)
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                launch(calls)
                times.append(time.perf_counter() - t0)
            if len(times) >= 100 * max(repeats, 1):
                break
    return got, times
