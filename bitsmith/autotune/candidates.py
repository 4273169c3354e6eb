"""What a measured candidate is, independent of the backend that builds it: the candidate
(`MeasureInput`), its result (`MeasureResult`), the timing options, the `Runner` interface,
the canonical text of a kernel, and the interpreter's reference outputs a candidate must
match. TVM-free and torch-free, so the Triton runner on a GPU machine without TVM uses it too.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .. import ir
from ..codegen.backend import kernels_of
from ..codegen.template import CodegenError
from ..ir.dialects.kernel import FusedOp
from ..ir.interpreter import EvalContext
from ..ir.printer import Namer, print_op
from ..ir.types import QuantType, evaluate_dim

RTOL = 1e-4
"""Largest relative error (max |got - want| / max |want|) a candidate may have against the
interpreter on f32 kernels."""
RTOL_F16 = 2e-3
"""The same for f16 outputs: about two f16 ulps (tiles reach `tl.dot` in f16, where the
interpreter rounds once at the end)."""
RTOL_BF16 = 2e-2
"""The same for a kernel computed in bf16 (`kernel.fused {precision = "bf16"}`): operands
rounded to 8 significant bits, products summed in f32; measured about 3e-3 on K = 768-3072
dot products of normal values, a wrong kernel is off by O(1)."""
RTOL_INT8 = 4e-2
"""The same for a kernel computed in int8 (`kernel.fused {precision = "int8"}`): rows of
activations and weight columns each rounded to 8 bits on their own scale, exact int32 sums;
measured about 1e-2 on K = 200-3072 dot products of normal values."""
RTOL_PRECISION = {"bf16": RTOL_BF16, "int8": RTOL_INT8}


def kernel_text(op: FusedOp) -> str:
    """A module holding only `op`: weights it reads become constants named w0, w1, ... (given
    random values when measured), other operands become inputs; no value names, no
    locations, and the kernel's own name replaced by `kernel`. Identical kernels of different
    models have identical text: it is what cache keys hash and what workers parse. An int8
    kernel's SmoothQuant factors are left out: they fit its own layer's activations, not the
    random ones a candidate is timed on, and the config that wins does not depend on them,
    so the smoothed layers of one shape are one task, as their function is one."""
    namer = Namer(anonymous=True)
    args: list[str] = []
    constants: list[str] = []
    for value in dict.fromkeys(op.operands):
        producer = getattr(value, "op", None)
        if producer is not None and producer.name == "graph.constant":
            line = print_op(producer, namer, "    ", locations=False)[0]
            if producer.weight is not None:
                line = line.replace(f'weight = "{producer.weight}"',
                                    f'weight = "w{len(constants)}"')
            constants.append(line)
        else:
            args.append(f"%{namer.name_arg(value)}: {value.type}")
    saved = dict(op.attributes)
    op.attributes.pop("smooth", None)
    try:
        body = print_op(op, namer, "    ", locations=False)
    finally:  # the attributes back in their order
        op.attributes.clear()
        op.attributes.update(saved)
    body[-1] = body[-1].replace(f'name = "{op.kernel_name}"', 'name = "kernel"')
    results = ", ".join(namer[r] for r in op.results)
    types = ", ".join(str(r.type) for r in op.results)
    head = f"  func.func @main({', '.join(args)}) -> ({types}) {{"
    tail = f'    "func.return"({results}) : ({types}) -> ()'
    return "\n".join(["module @kernel {", head, *constants, *body, tail, "  }", "}"]) + "\n"


@dataclass(frozen=True)
class MeasureInput:
    """One candidate: a kernel's canonical text, a template, a config, and the symbolic dims'
    values to time it at."""

    kernel_ir: str
    template: str
    config: str  # canonical JSON of the Config
    bindings: tuple[tuple[str, int], ...] = ()
    hot: bool = False  # time on one copy of the operands (the model fits in the cache)
    target: str = ""  # the CPU target to build for (`target_json`); "" = this host's


@dataclass(frozen=True)
class MeasureResult:
    """Seconds per call (median and every timed call), their spread, or why there are none."""

    median: float  # math.inf on error
    times: tuple[float, ...] = ()
    spread: float = 0.0  # (p75 - p25) / median
    error: str | None = None
    library: bytes = field(default=b"", repr=False)

    @staticmethod
    def of(times: Sequence[float], library: bytes = b"") -> MeasureResult:
        """The result of timed calls: their median and interquartile spread."""
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
        return MeasureResult(median, tuple(times), (q[2] - q[0]) / median if median else 0.0,
                             library=library)

    @property
    def ok(self) -> bool:
        """True when the candidate built, ran and matched the interpreter."""
        return self.error is None


@dataclass(frozen=True)
class MeasureOptions:
    """How candidates are timed."""

    warmup: int = 2
    repeats: int = 15
    min_seconds: float = 0.05
    rotate_bytes: int = 64 << 20
    max_copies: int = 32
    build_timeout: float = 120.0
    run_timeout: float = 60.0


class Runner(Protocol):
    """Builds and times candidates; results come back in input order."""

    def run(self, inputs: Sequence[MeasureInput]) -> list[MeasureResult]: ...

    def close(self) -> None: ...


def kernel_of(module: ir.Module) -> FusedOp:
    kernels = kernels_of(module)
    if len(kernels) != 1:
        raise CodegenError(f"expected one kernel.fused in the candidate, got {len(kernels)}")
    return kernels[0]


def random_array(type: Any, bindings: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """Random values of a tensor type: normal floats, 0/1 integers (valid indices and masks),
    codes of normal values for quantized weights."""
    subs = {s: bindings[s.name] for s in type.symbols}
    shape = tuple(evaluate_dim(d, subs) for d in type.shape)
    if isinstance(type.dtype, QuantType):
        storage = type.dtype.storage
        return storage.to_bits(storage.cast(rng.standard_normal(shape) * 4))
    if type.dtype.is_float:
        return type.dtype.cast(rng.standard_normal(shape).astype(np.float32))
    return rng.integers(0, 2, shape).astype(type.dtype.numpy_dtype)


def mismatch(got: list[np.ndarray], want: list[np.ndarray],
             precision: str | None = None) -> str | None:
    """Why the outputs `got` are not the interpreter's `want`, or None when they are; a kernel
    of `precision` "bf16" or "int8" is held to RTOL_PRECISION's bound."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"wrong result: output {i} has shape {g.shape}, expected {w.shape}"
        if w.dtype.kind == "f":
            scale = max(float(np.abs(w).max(initial=0.0)), 1e-6)
            err = float(np.abs(g.astype(np.float64) - w).max(initial=0.0)) / scale
            tol = RTOL_PRECISION.get(precision or "f32",
                                     RTOL_F16 if w.dtype == np.float16 else RTOL)
            if not err < tol:
                return f"wrong result: output {i} relative error {err:.2e} > {tol:g}"
        elif not np.array_equal(g, w):
            return f"wrong result: output {i} differs from the interpreter"
    return None


def reference(inp: MeasureInput) -> tuple[FusedOp, list[np.ndarray], list[np.ndarray]]:
    """The candidate's kernel, random operands (weights too; fixed seed) and the interpreter's
    outputs on them."""
    module = ir.parse(inp.kernel_ir)
    kernel = kernel_of(module)
    rng = np.random.default_rng(0)
    env = {value: random_array(value.type, dict(inp.bindings), rng) for value in module.inputs}
    for op in module.ops:
        if op.name == "graph.constant":
            env[op.result] = (random_array(op.result.type, {}, rng) if op.weight is not None
                              else np.asarray(op.value.array))
    arrays = [env[v] for v in kernel.operands]
    symbols = {s for v in list(module.inputs) + list(kernel.results) for s in v.type.symbols}
    ctx = EvalContext({}, {s: dict(inp.bindings)[s.name] for s in symbols})
    want = [np.asarray(w) for w in kernel.evaluate(ctx, *arrays)]
    return kernel, arrays, want
