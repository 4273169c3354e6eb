"""Generic Triton lowering: any `kernel.fused` region -> readable Triton source, one program per
block of output elements.

Every value of the region is an expression of an index tuple (Triton tensors of [BLOCK]
lanes, or loop counters), as in TVM's tensor expressions: `Emitter.at(value, idx)` writes
the Triton statements that compute the value at `idx` and names the result. Elementwise and
shape ops only transform indices; a reduction (a sum, a max, a matmul's dot, a conv's window,
a norm's statistics, attention's softmax) is a `for` loop over its reduced extent that
accumulates, per lane, in f32. Values are computed in f32 whatever their storage type (a cast
to f16 rounds through f16), integers in their own type.

Loads never need masks: every index is clamped into its dim first, so lanes past the end and
the taps of a padded window read a valid element, which the op's own condition then discards.
Symbolic dims (the batch `B`) become int arguments `D0, D1, ...` that the launcher fills from
the plan. An op without a rule raises `CodegenError` naming it: there is no silent fallback.

This is the correctness baseline every region compiles through, on a GPU and under
`TRITON_INTERPRET=1` alike; templates with tiles (`tl.dot`) replace it kernel by kernel.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from ...ir import Operation, OpResult, Value
from ...ir.dialects.kernel import FusedOp
from ...ir.dtypes import DType, IntType, torch_int_via
from ...ir.packing import row_words
from ...ir.types import Dim, QuantType, TensorType, format_dim
from ..template import CodegenError

Rule = Callable[[Operation, int, list[str], "Emitter"], str]
RULES: dict[str, Rule] = {}

TL_DTYPES = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "bool": "tl.int1",
             "i8": "tl.int8", "i16": "tl.int16", "i32": "tl.int32", "i64": "tl.int64",
             "u8": "tl.uint8", "u16": "tl.uint16", "u32": "tl.uint32", "u64": "tl.uint64"}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: register the rule for ops `names` (graph ops unless the name is dotted)."""
    def wrap(fn: Rule) -> Rule:
        for name in names:
            RULES[name if "." in name else f"graph.{name}"] = fn
        return fn
    return wrap


def tl_dtype(type: TensorType) -> str:
    """The Triton dtype of a plain tensor type."""
    name = TL_DTYPES.get(str(type.dtype))
    if name is None:
        raise CodegenError(f"Triton codegen: element type {type.dtype} has no Triton dtype")
    return name


def is_float(value: Value) -> bool:
    dtype = value.type.dtype
    return isinstance(dtype, DType) and dtype.is_float


def yielded(kernel: FusedOp) -> tuple[Value, ...]:
    """The values a kernel's region yields: its outputs."""
    terminator = kernel.regions[0].block.terminator
    if terminator is None:
        raise CodegenError(f"kernel '{kernel.kernel_name}': its region has no kernel.yield")
    return terminator.operands


class Emitter:
    """The statements of one Triton program, built on demand from the region's values."""

    def __init__(self, kernel: FusedOp) -> None:
        self.kernel = kernel
        block = kernel.regions[0].block
        self.inputs: dict[Value, int] = {arg: i for i, arg in enumerate(block.args)}
        self.dim_args: dict[str, str] = {}  # symbolic dim text -> kernel argument
        self.lines: list[str] = []
        self.depth = 1
        self.scopes: list[dict[tuple, str]] = [{}]
        self.count = 0
        self.lanes = "[BLOCK]"  # the shape of a value: one lane per output element

    # ---- text -------------------------------------------------------------------------------
    def dim(self, d: Dim) -> str:
        """A dim as Triton source: an int literal, or the int argument that carries it."""
        if isinstance(d, int):
            return str(d)
        text = format_dim(d)
        return self.dim_args.setdefault(text, f"D{len(self.dim_args)}")

    def shape(self, value: Value) -> list[str]:
        return [self.dim(d) for d in value.type.shape]

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def name(self, prefix: str = "t") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def let(self, expr: str, prefix: str = "t") -> str:
        """Bind `expr` to a fresh name and return the name."""
        var = self.name(prefix)
        self.emit(f"{var} = {expr}")
        return var

    # ---- values -----------------------------------------------------------------------------
    def at(self, value: Value, idx: Sequence[str]) -> str:
        """The name holding `value` at `idx` (f32 for floats), computed once per scope."""
        key = (value, tuple(idx))
        for scope in reversed(self.scopes):
            if key in scope:
                return scope[key]
        if value in self.inputs:
            expr = self.load(value, idx)
        elif isinstance(value, OpResult):
            op = value.op
            fn = RULES.get(op.name)
            if fn is None:
                raise CodegenError(f"Triton generic lowering has no rule for '{op.name}' "
                                   f"(kernel '{self.kernel.kernel_name}'); rules exist for "
                                   f"{', '.join(sorted(RULES))}")
            expr = fn(op, op.results.index(value), list(idx), self)
        else:
            raise CodegenError(f"kernel '{self.kernel.kernel_name}': a value that is neither a "
                               "kernel input nor an op result")
        var = self.let(expr)
        self.scopes[-1][key] = var
        return var

    def offset(self, shape: Sequence[str], idx: Sequence[str]) -> str:
        """Row-major offset of idx, each index clamped into its dim."""
        off = "0"
        for size, i in zip(shape, idx, strict=True):
            clamped = "0" if size == "1" else f"tl.minimum(tl.maximum({i}, 0), {size} - 1)"
            off = clamped if off == "0" else f"({off}) * {size} + {clamped}"
        return off

    def load(self, value: Value, idx: Sequence[str]) -> str:
        """A kernel input at idx: floats widened to f32."""
        if isinstance(value.type.dtype, QuantType):
            raise CodegenError("a packed quantized weight is read through its quant op")
        ptr = f"in{self.inputs[value]}"
        expr = f"tl.load({ptr} + {self.offset(self.shape(value), idx)})"
        return f"{expr}.to(tl.float32)" if is_float(value) else expr

    def load_words(self, value: Value, n: str, word: str) -> str:
        """Word `word` of row n of a packed quantized weight (stored as int32), as uint32."""
        n_dim, k_dim = value.type.shape
        shape = [self.dim(n_dim), str(row_words(int(k_dim), value.type.dtype.bits))]
        return (f"tl.load(in{self.inputs[value]} + {self.offset(shape, [n, word])})"
                ".to(tl.uint32, bitcast=True)")

    def broadcast(self, value: Value, idx: Sequence[str]) -> list[str]:
        """The index of a numpy-broadcast operand at the result's idx."""
        shape = value.type.shape
        lead = idx[len(idx) - len(shape):] if shape else []
        return ["0" if d == 1 else i for d, i in zip(shape, lead, strict=True)]

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """An indented block under `header` (a `for`, an `if`) with a fresh scope."""
        self.emit(header)
        self.depth += 1
        self.scopes.append({})
        try:
            yield
        finally:
            self.scopes.pop()
            self.depth -= 1

    @contextmanager
    def loop(self, extent: str) -> Iterator[str]:
        """`for r in range(extent):` with a fresh scope; yields the counter."""
        var = self.name("r")
        with self.block(f"for {var} in range(0, {extent}):"):
            yield var

    def reduce(self, combine: str, init: str, extents: Sequence[str],
               body: Callable[[list[str]], str], dtype: str = "tl.float32") -> str:
        """An accumulator (f32 unless `dtype`) over the nested loops `extents`:
        acc = combine(acc, body(r)) where combine is "sum", "max", "min" or "prod"."""
        acc = self.let(f"tl.zeros({self.lanes}, {dtype}) + {init}", "acc")
        nan = NAN_ARG if "float" in dtype else ""  # a NaN wins a max or min, as in torch

        def nest(vars: list[str]) -> None:
            if len(vars) == len(extents):
                v = body(vars)
                update = {"sum": f"{acc} + {v}", "prod": f"{acc} * {v}",
                          "max": f"tl.maximum({acc}, {v}{nan})",
                          "min": f"tl.minimum({acc}, {v}{nan})"}[combine]
                self.emit(f"{acc} = {update}")
                return
            with self.loop(extents[len(vars)]) as r:
                nest([*vars, r])
        nest([])
        return acc

    def affine(self, out: str, op: Operation, idx: Sequence[str]) -> str:
        """out * weight[idx] + bias[idx], for the op's optional `weight` and `bias`."""
        if op.weight is not None:
            out = f"{out} * {self.at(op.weight, idx)}"
        if getattr(op, "bias", None) is not None:
            out = f"{out} + {self.at(op.bias, idx)}"
        return out

    def full(self, value: object, dtype: str) -> str:
        return f"tl.full({self.lanes}, {number(value)}, {dtype})"


def number(value: object) -> str:
    """A Python literal for `value` in kernel source (inf and NaN have no literal of their
    own: repr gives the undefined names `inf` and `nan`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "float('nan')" if math.isnan(value) else f"float('{'-' if value < 0 else ''}inf')"
    return repr(value)


def generate(kernel: FusedOp, fn_prefix: str = "out") -> tuple[str, list[dict]]:
    """Triton source with one `@triton.jit` function per yielded value (each recomputes what
    it needs), and per function its launch: name, flat output size and the dim arguments."""
    block = kernel.regions[0].block
    outputs = yielded(kernel)
    functions, launches = [], []
    for j, value in enumerate(outputs):
        em = Emitter(kernel)
        shape = em.shape(value)
        em.emit("pid = tl.program_id(0)")
        em.emit("offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)" if any(
            not isinstance(d, int) or d > 2**30 for d in value.type.shape)
            else "offs = pid * BLOCK + tl.arange(0, BLOCK)")
        numel = " * ".join(shape) if shape else "1"
        em.emit(f"lane = offs < {numel}")
        idx: list[str] = []
        rest = "offs"
        for k in range(len(shape) - 1, 0, -1):
            idx.insert(0, em.let(f"{rest} % {shape[k]}", "i"))
            rest = em.let(f"{rest} // {shape[k]}", "q")
        if shape:
            idx.insert(0, rest)
        result = em.at(value, idx)
        store = f"({result}).to({tl_dtype(value.type)})"
        em.emit(f"tl.store(out{j} + offs, tl.broadcast_to({store}, [BLOCK]), mask=lane)")
        params = [f"in{i}" for i in range(len(block.args))] + [f"out{j}"]
        params += list(em.dim_args.values())
        name = f"{fn_prefix}{j}"
        functions.append("@triton.jit\n"
                         f"def {name}({', '.join(params)}, BLOCK: tl.constexpr):\n"
                         + "\n".join(em.lines) + "\n")
        numel = [d if isinstance(d, int) else format_dim(d) for d in value.type.shape]
        launches.append({"fn": name, "output": j, "grid": [[[numel, "BLOCK"]]],
                         "dims": list(em.dim_args)})
    header = (f'"""Kernel {kernel.kernel_name}: generated by bitsmith (generic Triton lowering, '
              'one program per BLOCK output elements)."""\nimport triton\n'
              'import triton.language as tl\n\n\n')
    return header + "\n\n".join(functions), launches


# ---- constants and elementwise ------------------------------------------------------------
@rule("constant")
def _constant(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    if op.value is None:
        raise CodegenError(f"weight '{op.weight}' inside a kernel region; pass it as an input")
    flat = op.value.array.reshape(-1).tolist()
    dtype = "tl.float32" if is_float(op.result) else tl_dtype(op.result.type)
    if len(set(flat)) == 1:
        return em.full(flat[0], dtype)
    at = em.offset(em.shape(op.result), idx)
    expr = em.full(flat[-1], dtype)
    for k in range(len(flat) - 2, -1, -1):
        expr = f"tl.where({at} == {k}, {number(flat[k])}, {expr})"
    return expr


@rule("full")
def _full(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    dtype = "tl.float32" if is_float(op.result) else tl_dtype(op.result.type)
    value = op.value
    if isinstance(value, float) and not math.isfinite(value):
        value = "float('inf')" if value > 0 else ("-float('inf')" if value < 0 else "float('nan')")
        return f"tl.full({em.lanes}, {value}, {dtype})"
    return em.full(value, dtype)


_UNARY = {"exp": "tl.exp({})", "log": "tl.log({})", "sqrt": "tl.sqrt({})",
          "rsqrt": "tl.rsqrt({})", "erf": "tl.erf({})", "sigmoid": "tl.sigmoid({})",
          "abs": "tl.abs({})", "neg": "-{}", "sin": "tl.sin({})", "cos": "tl.cos({})",
          "floor": "tl.floor({})", "ceil": "tl.ceil({})", "logical_not": "({} == 0)",
          "tanh": "(2.0 * tl.sigmoid(2.0 * {}) - 1.0)", "reciprocal": "(1.0 / {})",
          "silu": "({0} * tl.sigmoid({0}))",
          "sign": "tl.where({0} > 0, 1, tl.where({0} < 0, -1, 0)).to(tl.float32)"}


@rule(*_UNARY)
def _unary(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = em.at(op.operands[0], idx)
    kind = op.name.split(".")[1]
    if kind == "sign" and not is_float(op.operands[0]):
        return f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0)).to({tl_dtype(op.result.type)})"
    if kind in ("floor", "ceil") and not is_float(op.operands[0]):
        return x  # integers are whole already
    return _UNARY[kind].format(x)


@rule("relu")
def _relu(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = em.at(op.operands[0], idx)
    return f"tl.maximum({x}, 0{NAN_ARG if is_float(op.operands[0]) else ''})"


NAN_ARG = ", propagate_nan=tl.PropagateNan.ALL"
"""tl.maximum/tl.minimum keep a NaN operand only when asked (torch and numpy keep it)."""


@rule("round")
def _round(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """Half to even, as numpy."""
    x = em.at(op.operands[0], idx)
    r = em.let(f"tl.floor({x} + 0.5)")
    odd_tie = f"(({r} - {x}) == 0.5) & (({r} - 2.0 * tl.floor({r} * 0.5)) == 1.0)"
    return f"tl.where({odd_tie}, {r} - 1.0, {r})"


@rule("gelu")
def _gelu(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    x = em.at(op.operands[0], idx)
    if op.approximate == "tanh":
        inner = f"{math.sqrt(2 / math.pi)!r} * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"0.5 * {x} * (2.0 * tl.sigmoid(2.0 * ({inner})))"
    # NaN at +-inf, as torch's CPU GELU (x - x is NaN exactly there and for NaN)
    return (f"tl.where({x} - {x} != 0.0, {x} - {x}, "
            f"0.5 * {x} * (1.0 + tl.erf({x} * {math.sqrt(0.5)!r})))")


_BINARY = {"add": "{} + {}", "sub": "{} - {}", "mul": "{} * {}", "div": "{} / {}",
           "maximum": "tl.maximum({}, {})", "minimum": "tl.minimum({}, {})",
           "eq": "{} == {}", "ne": "{} != {}", "lt": "{} < {}", "le": "{} <= {}",
           "gt": "{} > {}", "ge": "{} >= {}", "logical_and": "({} != 0) & ({} != 0)",
           "logical_or": "({} != 0) | ({} != 0)"}


def _operands(op: Operation, idx: list[str], em: Emitter) -> list[str]:
    return [em.at(v, em.broadcast(v, idx)) for v in op.operands]


@rule(*_BINARY)
def _binary(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    a, b = _operands(op, idx, em)
    if op.name == "graph.div" and not is_float(op.operands[0]):
        raise CodegenError("Triton lowering of integer graph.div is not written yet")
    if op.name in ("graph.maximum", "graph.minimum") and is_float(op.operands[0]):
        return f"tl.{op.name[6:]}({a}, {b}{NAN_ARG})"
    return "(" + _BINARY[op.name.split(".")[1]].format(a, b) + ")"


@rule("pow")
def _pow(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """a ** b for floats: |a| ** b by exp2/log2, the sign for an odd integer b, NaN for a
    negative base with a fractional exponent, and x ** 0 = 1."""
    a, b = _operands(op, idx, em)
    mag = em.let(f"tl.exp2({b} * tl.log2(tl.abs({a})))")
    whole = f"(tl.floor({b}) == {b})"
    odd = f"({whole} & (({b} - 2.0 * tl.floor({b} * 0.5)) == 1.0))"
    out = f"tl.where(({a} < 0) & {odd}, -{mag}, {mag})"
    out = f"tl.where(({a} < 0) & ~{whole}, float('nan'), {out})"
    return f"tl.where({b} == 0, 1.0, {out})"


@rule("remainder", "floor_div")
def _floor_ops(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """Python's floor semantics (the sign of the divisor), for ints and floats."""
    a, b = _operands(op, idx, em)
    if is_float(op.operands[0]):
        q = f"tl.floor({a} / {b})"
        return q if op.name == "graph.floor_div" else f"{a} - {q} * {b}"
    r = em.let(f"{a} % {b}")
    fix = f"(({r} != 0) & (({r} < 0) != ({b} < 0)))"
    if op.name == "graph.remainder":
        return f"tl.where({fix}, {r} + {b}, {r})"
    return f"tl.where({fix}, {a} // {b} - 1, {a} // {b})"


@rule("fmod")
def _fmod(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """C's fmod (the sign of the dividend): Triton's % is LLVM's frem / srem, exactly that."""
    a, b = _operands(op, idx, em)
    return f"({a} % {b})"


_SERIES_BELOW = 0.25  # below this |x|, log1p and expm1 by series (the plain forms lose bits)


@rule("log1p")
def _log1p(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """log(1 + x), without libdevice (Triton's interpreter has none): for |x| < 1/4 the series
    2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9), s = x / (2 + x) (|s| < 1/7: the next term is
    below 1e-9 relative), else log(1 + x); -1 gives -inf, below -1 and NaN give NaN."""
    x = em.at(op.operands[0], idx)
    s = em.let(f"{x} / (2.0 + {x})")
    s2 = em.let(f"{s} * {s}")
    series = (f"2.0 * {s} * (1.0 + {s2} * ({1 / 3!r} + {s2} * (0.2 + {s2} * ({1 / 7!r} + "
              f"{s2} * {1 / 9!r}))))")
    return f"tl.where(tl.abs({x}) < {_SERIES_BELOW!r}, {series}, tl.log(1.0 + {x}))"


@rule("expm1")
def _expm1(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """e^x - 1: for |x| < 1/4 the Taylor series to x^8/8! (the rest is below 1e-9 relative),
    else exp(x) - 1."""
    x = em.at(op.operands[0], idx)
    series = "1.0"
    for n in range(8, 1, -1):
        series = f"(1.0 + {x} * {1 / n!r} * {series})"
    return f"tl.where(tl.abs({x}) < {_SERIES_BELOW!r}, {x} * {series}, tl.exp({x}) - 1.0)"


@rule("where")
def _where(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    c, x, y = _operands(op, idx, em)
    return f"tl.where({c} != 0, {x}, {y})"


@rule("clamp")
def _clamp(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    out = em.at(op.operands[0], idx)
    nan = NAN_ARG if is_float(op.operands[0]) else ""
    if op.min is not None and not (isinstance(op.min, float) and math.isinf(op.min)):
        out = f"tl.maximum({out}, {op.min!r}{nan})"
    if op.max is not None and not (isinstance(op.max, float) and math.isinf(op.max)):
        out = f"tl.minimum({out}, {op.max!r}{nan})"
    return out


@rule("cast")
def _cast(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    """torch's cast on x86 CPU (`dtypes.convert`), on every device: float -> int through int32
    or int64, NaN/inf/out-of-range giving that int's minimum, then the low bits; int -> f16/bf16
    through f32; bool is x != 0 (NaN true: Triton's != is unordered). On an NVIDIA GPU torch's
    own float -> int of NaN/inf/out-of-range values is CUDA's conversion, not x86's; these
    kernels keep the x86 values there too (not checked on a GPU); in-range values agree."""
    x = em.at(op.operands[0], idx)
    src, dst = op.x.type.dtype, op.dtype
    if str(dst) == "bool":
        return f"({x} != 0)"
    if str(dst) == "bf16" and str(src) != "bf16":
        return _round_to_bf16(em.let(f"{x}.to(tl.float32)"), em)
    if dst.is_float:  # held in f32: round through the narrower type
        wide = f"{x}.to(tl.float32)"
        return f"{wide}.to({TL_DTYPES[str(dst)]}).to(tl.float32)" if str(dst) != "f32" else wide
    if src.is_float and isinstance(dst, IntType):
        via = torch_int_via(dst)
        ok = em.let(f"({x} >= {-2.0 ** (via - 1)!r}) & ({x} < {2.0 ** (via - 1)!r})")
        wide = em.let(f"tl.where({ok}, tl.where({ok}, {x}, 0.0).to(tl.int{via}), "
                      f"{-(2 ** (via - 1))})")
        return wide if str(dst) == f"i{via}" else f"{wide}.to({TL_DTYPES[str(dst)]})"
    return f"{x}.to({TL_DTYPES[str(dst)]})"


def _round_to_bf16(f: str, em: Emitter) -> str:
    """f32 `f` rounded to bf16 (nearest, ties to even; NaN stays NaN) by its bits, held in f32:
    Triton's interpreter keeps a bf16 value in f32 without rounding it."""
    u = em.let(f"{f}.to(tl.uint32, bitcast=True)")
    bits = f"((({u} + 0x7FFF + (({u} >> 16) & 1)) >> 16) << 16)"
    return f"tl.where({f} != {f}, {f}, {bits}.to(tl.float32, bitcast=True))"


@rule("batch_norm")
def _batch_norm(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    c = [idx[op.axis % op.x.type.rank]]
    x, mean, var = em.at(op.x, idx), em.at(op.mean, c), em.at(op.var, c)
    return em.affine(f"({x} - {mean}) * tl.rsqrt({var} + {op.eps!r})", op, c)


@rule("arange")
def _arange(op: Operation, i: int, idx: list[str], em: Emitter) -> str:
    dtype = "tl.float32" if is_float(op.result) else tl_dtype(op.result.type)
    return f"({op.start!r} + {idx[0]} * {op.step!r}).to({dtype})"
