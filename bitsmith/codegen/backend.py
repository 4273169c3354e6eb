"""The `Backend` protocol: a fused module plus tuned configs -> an artifact.

Each backend (`tvm/build.py` for the CPU, `triton/build.py` for the GPU) builds its kernels and
says what a kernel call needs at run time (its library file, a Triton kernel's launches); the
execution plan and the manifest are built here, once, the same way for both.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .. import __version__
from ..errors import CodegenError, IndexOutOfRangeError
from ..ir import Module, Operation, Value
from ..ir.core import BlockArgument, OpResult
from ..ir.dialects.graph import ArangeOp, ConstantOp
from ..ir.dialects.graph.shape import IndexBound, IndexingOp, index_source
from ..ir.dialects.kernel import FusedOp
from ..ir.types import QuantType, format_dim
from ..runtime.artifact import NUMPY_DTYPES, Artifact, Manifest, TensorSpec
from ..runtime.executor import value_spec
from .template import Config, Target


class Backend(Protocol):
    """Builds the kernels of a fused module for one target and packs them into an artifact."""

    name: str  # the `target=` of `bitsmith.compile`: "cpu" or "cuda"

    def target(self) -> Target:
        """The device this backend builds for (this host's CPU, the GPU or its interpreter)."""
        ...

    def build(self, module: Module, configs: Mapping[str, Config] | None = None, *,
              progress: bool = False) -> Artifact:
        """Every kernel of `module` with its config from `configs` (by kernel name; the
        template's default otherwise), as an artifact in memory."""
        ...


class LibraryStore(Protocol):
    """Compiled libraries by key (the autotuner's library cache is one)."""

    def get(self, key: str, /) -> bytes | None: ...

    def put(self, key: str, data: bytes, /) -> None: ...


def kernels_of(module: Module) -> list[FusedOp]:
    """The module's kernels, in program order."""
    return [op for op in module.ops if isinstance(op, FusedOp)]


def package(module: Module, built: Mapping[Operation, Any],
            step: Callable[[Operation, Any], dict], files: dict[str, bytes], *,
            requires: dict[str, Any], toolchain: dict[str, str]) -> Artifact:
    """The artifact of built kernels: its execution plan (a `step` per kernel call, with the
    backend's entries), its manifest and weights, and the backend's `files`."""
    plan = Planner(module, built, step)
    outputs = module.metadata.get("output_names") or [f"output{i}"
                                                      for i in range(len(module.outputs))]
    manifest = Manifest(
        name=module.name, inputs=plan.specs(module.inputs, module.input_names),
        outputs=plan.specs(module.outputs, outputs), plan=plan.to_json(), requires=requires,
        toolchain=toolchain, bitsmith_version=__version__, metadata=dict(module.metadata))
    return Artifact(manifest, plan.weights, files)


class Planner:
    """Names values, collects weights and kernel calls for the execution plan; `step` gives
    a kernel call's backend-specific entries (its library, a Triton kernel's launches)."""

    def __init__(self, module: Module, built: Mapping[Operation, Any],
                 step: Callable[[Operation, Any], dict]) -> None:
        self.ids: dict[Value, str] = {}
        self.constants: dict[Value, Any] = {}
        self.packed: dict[tuple[Value, str], str] = {}
        self.values: dict[str, dict] = {}
        self.weights: dict[str, Any] = {}
        self.weight_ids: dict[str, str] = {}
        self.steps: list[dict] = []
        for i, arg in enumerate(module.inputs):
            self._name(arg, f"in{i}")
        for op in module.ops:
            if isinstance(op, ConstantOp):
                self._constant(op, module)
            elif isinstance(op, FusedOp):
                kernel = built[op]
                inputs = [self._operand(v, kernel.packs.get(i))
                          for i, v in enumerate(op.operands)]
                checks = self._index_checks(op, inputs, module)
                self.steps.append({"kernel": op.kernel_name, **step(op, kernel),
                                   "template": kernel.template, "config": str(kernel.config),
                                   "inputs": inputs,
                                   "outputs": [self._name(r, f"v{len(self.ids)}")
                                               for r in op.results],
                                   **({"index_checks": checks} if checks else {})})
            elif op.name != "func.return":
                raise CodegenError(f"'{op.name}' at the top level after fusion; every op must "
                                   "be in a kernel.fused (run the fuse pass)")
        self.inputs = [self.ids[a] for a in module.inputs]
        self.outputs = [self._value(v) for v in module.outputs]

    def _name(self, value: Value, vid: str) -> str:
        self.ids[value] = vid
        self.values[vid] = value_spec([_dim(d) for d in value.type.shape], str(value.type.dtype))
        return vid

    def _constant(self, op: ConstantOp, module: Module) -> None:
        """Remember a constant; it enters the artifact when a kernel reads it as it is."""
        name = op.weight if op.weight is not None else f"literal{len(self.constants)}"
        array = module.weights[op.weight] if op.weight is not None else op.value.array
        self.constants[op.results[0]] = (name, array)

    def _weight(self, name: str, array: np.ndarray, dtype: str) -> str:
        vid = f"w{len(self.weight_ids)}"
        self.values[vid] = value_spec(list(array.shape), dtype)
        self.weights[name] = array
        self.weight_ids[vid] = name
        return vid

    def _value(self, value: Value) -> str:
        """The id of a value; a constant's first use stores it (a quantized one packed)."""
        if value not in self.ids and value in self.constants:
            name, array = self.constants[value]
            stored = "u32" if isinstance(value.type.dtype, QuantType) else str(value.type.dtype)
            self.ids[value] = self._weight(name, array, stored)
        return self.ids[value]

    def _operand(self, value: Value, pack: Any) -> str:
        """The value id a kernel reads: the value, or its pre-packed copy (a new weight)."""
        if pack is None:
            return self._value(value)
        layout, fn = pack
        if value not in self.constants:
            raise CodegenError(f"a template packs an operand that is not a weight ({value.type})")
        key = (value, layout)
        if key not in self.packed:
            name, array = self.constants[value]
            packed = fn(np.asarray(array))
            dtype = next(k for k, v in NUMPY_DTYPES.items() if v == packed.dtype.name)
            self.packed[key] = self._weight(f"{name}.{layout}", packed, dtype)
        return self.packed[key]

    def _index_checks(self, kernel: FusedOp, inputs: Sequence[str],
                      module: Module) -> list[dict]:
        """The range checks of the index operands the kernel's ops read, run before it: on
        a kernel input (a model input or an earlier kernel's output), or, for constant
        indices, done here (or, where the range has a symbolic size, from their extremes)."""
        block = kernel.regions[0].block
        checks: list[dict] = []
        for op in kernel.body_ops:
            if not isinstance(op, IndexingOp):
                continue
            for bound in op.index_bounds():
                source = index_source(op.operands[bound.operand], lambda o: o.parent is block)
                where = f"{op.name}" + (f" at {op.loc}" if op.loc else "")
                entry = {"what": f"{where}, operand {bound.name}", "axis": bound.axis,
                         "size": _dim(bound.size), "negative": bound.negative}
                if isinstance(source, BlockArgument) and source.block is block:
                    outer = kernel.operands[source.index]
                    array = self.constants[outer][1] if outer in self.constants else None
                    if array is None:
                        entry["what"] += self._origin(outer, module)
                        checks.append({**entry, "value": inputs[source.index]})
                        continue
                elif isinstance(source, OpResult) and isinstance(source.op, ConstantOp) \
                        and source.op.value is not None:
                    array = source.op.value.array
                else:
                    raise CodegenError(f"kernel {kernel.kernel_name}: the {bound.name} operand "
                                       f"of {where} is computed inside the kernel, where it "
                                       "cannot be range-checked; run the fuse pass, which "
                                       "keeps it out")
                entry["what"] += " (constant indices)"
                extremes = _constant_extremes(array, bound, entry["what"])
                if extremes is not None:
                    checks.append({**entry, "extremes": extremes})
        return checks

    def _origin(self, value: Value, module: Module) -> str:
        """` (input 'ids')` or ` (from kernel k3_add)`, for messages."""
        if value in module.inputs:
            return f" (input '{module.input_names[module.inputs.index(value)]}')"
        if isinstance(value, OpResult) and isinstance(value.op, FusedOp):
            symbolic = [format_dim(d) for d in value.type.shape if not isinstance(d, int)]
            if symbolic and any(isinstance(o, ArangeOp) for o in value.op.body_ops):
                # a table cut to a symbolic length (BERT's position_ids[:, :S])
                return (f" (positions 0..{symbolic[0]}-1 from kernel {value.op.kernel_name}: "
                        f"{symbolic[0]} is longer than the table the model slices by it)")
            return f" (from kernel {value.op.kernel_name})"
        return ""

    def specs(self, values: Sequence[Value], names: Sequence[str]) -> tuple[TensorSpec, ...]:
        """Signature entries of inputs or outputs."""
        return tuple(TensorSpec(n, tuple(_dim(d) for d in v.type.shape), str(v.type.dtype))
                     for v, n in zip(values, names, strict=True))

    def to_json(self) -> dict:
        """The execution plan."""
        return {"values": self.values, "inputs": self.inputs, "outputs": self.outputs,
                "weights": self.weight_ids, "steps": self.steps}


def _constant_extremes(array: Any, bound: IndexBound, what: str) -> list[int] | None:
    """Check constant indices now where their range is static (raise IndexOutOfRangeError);
    where it has a symbolic size, their [min, max] for the check at run time."""
    values = np.asarray(array)
    if values.size == 0:
        return None
    least, most = int(values.min()), int(values.max())
    if not isinstance(bound.size, int):
        return [least, most]
    low = -bound.size if bound.negative else 0
    if least < low or most >= bound.size:
        bad = least if least < low else most
        raise IndexOutOfRangeError(f"{what}: index {bad} out of range "
                                   f"[{low}, {bound.size}) (dim {bound.axis} has size "
                                   f"{bound.size}); the model indexes past the dim")
    return None


def _dim(d: Any) -> int | str:
    return d if isinstance(d, int) else format_dim(d)
