"""Every `graph` op's interpreter semantics against the equivalent torch function.

The numpy interpreter is the oracle later passes and kernels are checked against, so each op
is run on odd shapes (3x5x7, size-1 dims, broadcasting, rank 0 where legal) with fixed seeds and
compared with torch: floats within a per-dtype tolerance, ints, bools and shapes exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.types import TensorType, symbol

from ..support import BF16, is_float, randint, randn, tolerance

FLOATS = [np.float32, np.float16, BF16]
SETTINGS = settings(derandomize=True, database=None, max_examples=60, deadline=None)


# ---- helpers --------------------------------------------------------------------------------

def run(op_cls: type[ir.Operation], *arrays: np.ndarray, result_types: list | None = None,
        **attrs: object) -> list[np.ndarray]:
    """Build a one-op module over `arrays`, verify it and interpret it."""
    m = ir.Module("t", [TensorType(a.shape, dtypes.from_numpy_dtype(a.dtype)) for a in arrays])
    b = ir.Builder.at_end(m.body)
    op = b.create(op_cls, *m.inputs, result_types=result_types, **attrs)
    b.create(ir.OP_REGISTRY["func.return"], *op.results)
    ir.verify(m)
    return ir.interpret(m, *arrays)


def run1(op_cls: type[ir.Operation], *arrays: np.ndarray, **kwargs: object) -> np.ndarray:
    """`run` for a single-result op."""
    (out,) = run(op_cls, *arrays, **kwargs)
    return out


def tt(a: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor (bfloat16 included)."""
    if a.dtype == BF16:
        return torch.from_numpy(np.array(a, np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a numpy array of the matching dtype."""
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(BF16)
    return t.detach().numpy()


def expect(got: np.ndarray, want: torch.Tensor, exact: bool = False) -> None:
    """Same shape and dtype; floats element by element within the dtype's tolerance, relative
    above 1 and absolute below (NaNs where torch has them), else exact."""
    ref = as_numpy(want)
    assert got.shape == ref.shape, f"shape {got.shape}, torch {ref.shape}"
    assert got.dtype == ref.dtype, f"dtype {got.dtype}, torch {ref.dtype}"
    if is_float(ref.dtype) and not exact:
        tol = tolerance(ref.dtype)
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32),
                                   equal_nan=True, rtol=tol, atol=tol)
    elif is_float(ref.dtype):  # numpy's comparisons do not see bfloat16 NaNs
        np.testing.assert_array_equal(got.astype(np.float32), ref.astype(np.float32))
    else:
        np.testing.assert_array_equal(got, ref)


TESTED_OPS = [
    *graph.UNARY_OPS, *graph.BINARY_OPS, "gelu", "clamp", "where", "cast", "reduce_sum",
    "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_any", "reduce_all",
    "argmax", "argmin", "cumsum", "softmax", "log_softmax", "layer_norm", "rms_norm",
    "batch_norm", "matmul", "linear", "conv2d", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "attention", "reshape", "permute", "expand", "slice", "concat",
    "split", "gather", "index_select", "index", "embedding", "pad", "full", "arange",
    "constant",
]


def test_every_graph_op_is_covered() -> None:
    assert set(ir.list_dialects()["graph"]) == {f"graph.{n}" for n in TESTED_OPS}


# ---- unary ----------------------------------------------------------------------------------

TORCH_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "erf": torch.erf,
    "sigmoid": torch.sigmoid, "relu": torch.relu, "silu": F.silu, "floor": torch.floor,
    "ceil": torch.ceil, "round": torch.round, "sign": torch.sign,
    "logical_not": torch.logical_not, "log1p": torch.log1p, "expm1": torch.expm1,
}
POSITIVE = {"log", "sqrt", "rsqrt"}
SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -2.5, 1e-30,
                     -1e-30, 3.0, -7.25, 100.0, -100.0], np.float32)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (5, 1), ()])
@pytest.mark.parametrize("name", sorted(TORCH_UNARY))
def test_unary_float(name: str, shape: tuple, dtype: object) -> None:
    x = randn(*shape, dtype=np.float32) * 3
    x = (np.abs(x) + 0.1 if name in POSITIVE else x).astype(dtype)
    expect(run1(graph.UNARY_OPS[name], x), TORCH_UNARY[name](tt(x)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(TORCH_UNARY))
def test_unary_special_values(name: str, dtype: object) -> None:
    x = SPECIALS.astype(dtype)
    expect(run1(graph.UNARY_OPS[name], x), TORCH_UNARY[name](tt(x)))


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8])
@pytest.mark.parametrize("name", ["neg", "abs", "relu", "floor", "ceil", "round", "sign"])
def test_unary_int(name: str, dtype: object) -> None:
    info = np.iinfo(dtype)
    lo = 0 if dtype == np.uint8 else -9
    x = np.concatenate([randint(3, 7, lo=lo, dtype=dtype).ravel(),
                        np.array([info.min, info.max, 0], dtype)]).reshape(4, 6)
    expect(run1(graph.UNARY_OPS[name], x), TORCH_UNARY[name](tt(x)))


def test_logical_not() -> None:
    x = randn(3, 1, 4) > 0
    expect(run1(graph.UNARY_OPS["logical_not"], x), torch.logical_not(tt(x)))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate: str, dtype: object) -> None:
    x = np.concatenate([randn(3, 5, 7).ravel() * 4, SPECIALS[np.inf != SPECIALS]]).astype(dtype)
    expect(run1(graph.GeluOp, x, approximate=approximate),
           F.gelu(tt(x), approximate=approximate))


@pytest.mark.parametrize("bounds", [(-0.5, 0.75), (None, 0.25), (-1.0, None), (1.0, -1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_clamp_float(bounds: tuple, dtype: object) -> None:
    x = np.concatenate([randn(3, 5, 7).ravel(), [np.nan, np.inf, -np.inf]]).astype(dtype)
    lo, hi = bounds
    expect(run1(graph.ClampOp, x, min=lo, max=hi), torch.clamp(tt(x), lo, hi))


def test_clamp_int() -> None:
    x = randint(3, 5, 7, dtype=np.int8)
    expect(run1(graph.ClampOp, x, min=-3, max=4), torch.clamp(tt(x), -3, 4))
    expect(run1(graph.ClampOp, x, min=2), torch.clamp(tt(x), min=2))


# ---- binary ---------------------------------------------------------------------------------

def _torch_binary(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if name == "div" and not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    fn = {"floor_div": torch.floor_divide, "add": torch.add, "sub": torch.sub,
          "mul": torch.mul, "div": torch.div, "remainder": torch.remainder, "pow": torch.pow,
          "maximum": torch.maximum, "minimum": torch.minimum,
          "logical_and": torch.logical_and, "logical_or": torch.logical_or}.get(name)
    return fn(a, b) if fn else getattr(torch, name)(a, b)


ARITH = ["add", "sub", "mul", "div", "floor_div", "remainder", "fmod", "pow", "maximum",
         "minimum"]
DIVISIONS = ["div", "floor_div", "remainder", "fmod"]
COMPARE = ["eq", "ne", "lt", "le", "gt", "ge"]


def test_binary_table_is_complete() -> None:
    assert set(graph.BINARY_OPS) == set(ARITH + COMPARE + ["logical_and", "logical_or"])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shapes", [((3, 5, 7), (3, 5, 7)), ((3, 5, 7), (5, 1)),
                                    ((1, 5, 1), (3, 1, 7)), ((), (4, 1)), ((), ())])
@pytest.mark.parametrize("name", ARITH + COMPARE + ["logical_and", "logical_or"])
def test_binary_float(name: str, shapes: tuple, dtype: object) -> None:
    a = (randn(*shapes[0], seed=1) * 3).astype(dtype)
    b = (randn(*shapes[1], seed=2) * 3).astype(dtype)
    if name == "pow":
        a = np.abs(a).astype(dtype)  # negative bases give NaN on both sides; keep it informative
    if name in COMPARE:
        b = np.where(np.random.default_rng(3).random(b.shape) < 0.3, 1.0, b).astype(dtype)
        a = np.where(np.random.default_rng(4).random(a.shape) < 0.3, 1.0, a).astype(dtype)
    expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))


@pytest.mark.parametrize("name", DIVISIONS)
def test_division_sign_rules_float(name: str) -> None:
    a = np.array([5, -5, 5, -5, 6, -6, 1, -1, 0, -1, 7.5, -7.5, 1e30], np.float32)
    b = np.array([3, 3, -3, -3, 3, 3, 0, 0, 0, np.inf, 2, 2, 3], np.float32)
    expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8])
@pytest.mark.parametrize("name", ARITH + COMPARE)
def test_binary_int(name: str, dtype: object) -> None:
    lo = 0 if dtype == np.uint8 else -20
    a = randint(3, 5, 7, lo=lo, hi=20, dtype=dtype, seed=1)
    b = randint(5, 1, lo=lo, hi=20, dtype=dtype, seed=2)
    if name in DIVISIONS:
        b = np.where(b == 0, 3, b).astype(dtype)  # integer division by zero raises in torch
    if name == "pow":
        a = randint(3, 5, 7, lo=0 if dtype == np.uint8 else -3, hi=4, dtype=dtype)
        b = randint(5, 1, lo=0 if dtype == np.uint8 else -2, hi=5, dtype=dtype)
    expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))


def test_integer_division_sign_rules() -> None:
    a = np.array([7, -7, 7, -7, 6, -6, 0, -128], np.int8)
    b = np.array([2, 2, -2, -2, 3, -3, 5, -1], np.int8)
    for name in DIVISIONS:
        expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))


@pytest.mark.parametrize("name", DIVISIONS)
def test_integer_division_by_zero_raises(name: str) -> None:
    a, b = np.array([1, 2], np.int32), np.array([1, 0], np.int32)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _torch_binary(name, tt(a), tt(b))
    with pytest.raises(ir.InterpretError, match="integer division by zero"):
        run1(graph.BINARY_OPS[name], a, b)


def test_int64_stays_exact_beyond_float_precision() -> None:
    a = np.array([2**62 + 1, -(2**62) - 7, 2**53 + 1, -9], np.int64)
    b = np.array([3, 3, 1, 2], np.int64)
    for name in DIVISIONS:
        expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))
    for name in ("floor", "ceil", "round", "sign", "neg"):
        expect(run1(graph.UNARY_OPS[name], a), TORCH_UNARY[name](tt(a)))


@pytest.mark.parametrize("name", ["logical_and", "logical_or", "eq", "ne"])
def test_binary_bool(name: str) -> None:
    a, b = randn(3, 5, 7, seed=1) > 0, randn(5, 1, seed=2) > 0
    expect(run1(graph.BINARY_OPS[name], a, b), _torch_binary(name, tt(a), tt(b)))


DIM = st.sampled_from([1, 2, 3])


@SETTINGS
@given(name=st.sampled_from(sorted(graph.BINARY_OPS)), lhs=st.lists(DIM, max_size=4),
       rhs=st.lists(DIM, max_size=4), seed=st.integers(0, 2**16))
def test_binary_broadcasting_property(name: str, lhs: list, rhs: list, seed: int) -> None:
    try:
        want_shape = torch.broadcast_shapes(tuple(lhs), tuple(rhs))
    except RuntimeError:
        want_shape = None
    assume(want_shape is not None)
    a, b = randn(*lhs, seed=seed) * 2, randn(*rhs, seed=seed + 1) * 2
    got = run1(graph.BINARY_OPS[name], a, b)
    assert got.shape == tuple(want_shape)
    expect(got, _torch_binary(name, tt(a), tt(b)))


# ---- where, cast ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_where_broadcasts_all_three(dtype: object) -> None:
    cond = randn(5, 1, seed=1) > 0
    x, y = randn(3, 5, 7, seed=2).astype(dtype), randn(7, seed=3).astype(dtype)
    expect(run1(graph.WhereOp, cond, x, y), torch.where(tt(cond), tt(x), tt(y)))


CAST_CASES = [
    (np.array([0.5, -0.5, 1.99, -1.99, 2.5, -3.7, 1e9, -2e9, 0.0], np.float32), torch.int32),
    (np.array([300.0, -200.5, 127.9, -128.9, 255.0, 1e6], np.float32), torch.int8),
    (np.array([300, -1, 255, 256, -129, 2**31 - 1], np.int32), torch.int8),
    (np.array([300, -1, 255, 256, -129], np.int32), torch.uint8),
    (np.array([2**40 + 1, -(2**53) - 1, 2**63 - 1, 16777217], np.int64), torch.float32),
    (np.array([1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 1e-8, 6e-8, -0.0, np.nan,
               np.inf], np.float32), torch.float16),
    (np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.3895e38, 1e-40, np.nan, -np.inf], np.float32),
     torch.bfloat16),
    (np.array([np.nan, 0.0, -0.0, 1e-45, -3.0], np.float32), torch.bool),
    (np.array([True, False]), torch.float16),
    (np.array([65504, -65504, 0.33325], np.float16), torch.float32),
]


@pytest.mark.parametrize("x, to", CAST_CASES, ids=lambda v: str(getattr(v, "dtype", v)))
def test_cast(x: np.ndarray, to: torch.dtype) -> None:
    target = dtypes.from_numpy_dtype(as_numpy(torch.empty(0, dtype=to)).dtype)
    expect(run1(graph.CastOp, x, dtype=target), tt(x).to(to), exact=True)


# ---- reductions -----------------------------------------------------------------------------

def _torch_reduce(name: str, x: torch.Tensor, axes: tuple, keepdim: bool) -> torch.Tensor:
    dims = tuple(a % max(x.dim(), 1) for a in axes) or tuple(range(x.dim()))
    if name == "prod":
        for d in sorted(dims, reverse=True):
            x = torch.prod(x, d, keepdim=keepdim)
        return x
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin,
          "any": torch.any, "all": torch.all}[name]
    return fn(x, dim=dims, keepdim=keepdim) if dims else fn(x)


AXES = [(), (0,), (1, 2), (-1,), (0, 2), (2, 0, 1)]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("name", ["sum", "mean", "max", "min", "prod"])
def test_reduce_float(name: str, axes: tuple, keepdim: bool) -> None:
    x = randn(3, 5, 7) * (0.6 if name == "prod" else 1.0)
    op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
    expect(run1(op, x, axes=axes, keepdim=keepdim), _torch_reduce(name, tt(x), axes, keepdim))


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_reduce_f16_and_size_one(name: str) -> None:
    x = randn(3, 1, 7, dtype=np.float16)
    op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
    expect(run1(op, x, axes=(1, 2)), _torch_reduce(name, tt(x), (1, 2), False))


@pytest.mark.parametrize("axes", [(), (0,), (-1,)])
@pytest.mark.parametrize("name", ["sum", "max", "mean"])
def test_reduce_rank0(name: str, axes: tuple) -> None:
    x = np.array(2.5, np.float32)
    op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
    expect(run1(op, x, axes=axes), _torch_reduce(name, tt(x), axes, False))


@pytest.mark.parametrize("name", ["sum", "max", "min", "prod"])
def test_reduce_int(name: str) -> None:
    x = randint(3, 5, 7, lo=-100, hi=100)
    op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
    # torch widens integer sums/products to int64; the IR keeps the dtype and wraps
    want = _torch_reduce(name, tt(x), (0, 2), True).to(torch.int32)
    expect(run1(op, x, axes=(0, 2), keepdim=True), want)


@pytest.mark.parametrize("axes", [(), (1,), (0, 2)])
@pytest.mark.parametrize("name", ["any", "all"])
def test_reduce_bool(name: str, axes: tuple) -> None:
    x = randn(3, 5, 7) > -1.0
    op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
    expect(run1(op, x, axes=axes), _torch_reduce(name, tt(x), axes, False))


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_arg_reduce_ties_pick_first(name: str, axis: int, keepdim: bool) -> None:
    x = randint(3, 5, 7, lo=0, hi=3, dtype=np.float32)  # many ties
    op = graph.ArgMaxOp if name == "argmax" else graph.ArgMinOp
    expect(run1(op, x, axis=axis, keepdim=keepdim),
           getattr(torch, name)(tt(x), dim=axis, keepdim=keepdim))


@pytest.mark.parametrize("name", ["argmax", "argmin", "max", "min"])
def test_nan_wins_reductions(name: str) -> None:
    x = np.array([[1.0, np.nan, 3.0, np.nan], [2.0, -1.0, 5.0, 0.0]], np.float32)
    if name.startswith("arg"):
        op = graph.ArgMaxOp if name == "argmax" else graph.ArgMinOp
        expect(run1(op, x, axis=1), getattr(torch, name)(tt(x), 1))
    else:
        op = ir.OP_REGISTRY[f"graph.reduce_{name}"]
        expect(run1(op, x, axes=(1,)), _torch_reduce(name, tt(x), (1,), False))


def test_arg_reduce_rank0_and_int() -> None:
    expect(run1(graph.ArgMaxOp, np.array(3.0, np.float32), axis=0),
           torch.argmax(torch.tensor(3.0), 0))
    x = randint(4, 6, lo=-2, hi=2)
    expect(run1(graph.ArgMinOp, x, axis=1), torch.argmin(tt(x), 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumsum(axis: int, dtype: object) -> None:
    x = randn(3, 5, 7).astype(dtype) if dtype != np.int32 else randint(3, 5, 7)
    # torch widens integer cumsums to int64; the IR keeps the dtype and wraps
    expect(run1(graph.CumsumOp, x, axis=axis), torch.cumsum(tt(x), axis).to(tt(x).dtype))


def test_cumsum_rank0() -> None:
    expect(run1(graph.CumsumOp, np.array(2.5, np.float32), axis=0),
           torch.cumsum(torch.tensor(2.5), 0))


# ---- softmax and normalizations -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax(name: str, axis: int, dtype: object) -> None:
    x = randn(3, 5, 7) * 4
    x[0, 0, 0] = x[1, 2, 3] = -np.inf
    x = x.astype(dtype)
    op = graph.SoftmaxOp if name == "softmax" else graph.LogSoftmaxOp
    expect(run1(op, x, axis=axis), getattr(torch, name)(tt(x), axis))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_rank0(name: str) -> None:
    op = graph.SoftmaxOp if name == "softmax" else graph.LogSoftmaxOp
    expect(run1(op, np.array(1.5, np.float32), axis=0),
           getattr(torch, name)(torch.tensor(1.5), 0))


@pytest.mark.parametrize("affine", [0, 1, 2])
@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_norm(ndim: int, affine: int, dtype: object) -> None:
    x = (randn(3, 5, 7) * 2 + 1).astype(dtype)
    shape = x.shape[3 - ndim:]
    params = [randn(*shape, seed=1).astype(dtype), randn(*shape, seed=2).astype(dtype)][:affine]
    want = F.layer_norm(tt(x), shape, *[tt(p) for p in params], eps=1e-5)
    expect(run1(graph.LayerNormOp, x, *params, ndim=ndim, eps=1e-5), want)


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rms_norm(ndim: int, weight: bool, dtype: object) -> None:
    x = (randn(3, 5, 7) * 2 + 1).astype(dtype)
    shape = x.shape[3 - ndim:]
    params = [randn(*shape, seed=1).astype(dtype)] if weight else []
    want = F.rms_norm(tt(x), shape, *[tt(p) for p in params], eps=1e-6)
    expect(run1(graph.RmsNormOp, x, *params, ndim=ndim, eps=1e-6), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("affine", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 3), (2, 3, 1)])
def test_batch_norm_inference(shape: tuple, affine: int, dtype: object) -> None:
    x = randn(*shape, dtype=dtype)
    mean, var = randn(3, seed=1, dtype=dtype), (np.abs(randn(3, seed=2)) + 0.5).astype(dtype)
    params = [randn(3, seed=3, dtype=dtype), randn(3, seed=4, dtype=dtype)][:affine]
    want = F.batch_norm(tt(x), tt(mean), tt(var), *[tt(p) for p in params], training=False,
                        eps=1e-3)
    expect(run1(graph.BatchNormOp, x, mean, var, *params, eps=1e-3), want)


# ---- contractions and windows ---------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((7,), (7,)), ((7,), (7, 5)), ((3, 7), (7,)),
                                    ((3, 7), (7, 5)), ((2, 3, 7), (7, 5)), ((7,), (2, 7, 5)),
                                    ((2, 3, 7), (7,)), ((2, 1, 3, 7), (4, 7, 5)),
                                    ((1, 1), (1, 1))])
def test_matmul(shapes: tuple) -> None:
    a, b = randn(*shapes[0], seed=1), randn(*shapes[1], seed=2)
    expect(run1(graph.MatmulOp, a, b), torch.matmul(tt(a), tt(b)))


def test_matmul_int_and_f16() -> None:
    a, b = randint(2, 3, 7, seed=1), randint(7, 5, seed=2)
    expect(run1(graph.MatmulOp, a, b), torch.matmul(tt(a), tt(b)))
    a, b = randn(2, 3, 7, dtype=np.float16, seed=1), randn(7, 5, dtype=np.float16, seed=2)
    expect(run1(graph.MatmulOp, a, b), torch.matmul(tt(a), tt(b)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("xshape", [(2, 3, 7), (7,), (1, 7)])
def test_linear(xshape: tuple, bias: bool) -> None:
    x, w = randn(*xshape, seed=1), randn(5, 7, seed=2)
    extra = [randn(5, seed=3)] if bias else []
    expect(run1(graph.LinearOp, x, w, *extra), F.linear(tt(x), tt(w), *map(tt, extra)))


CONVS = [  # (in_channels, out_channels, kernel, stride, padding, dilation, groups, bias)
    (3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    (3, 5, (3, 2), (2, 1), (1, 2), (1, 1), 1, False),
    (4, 6, (2, 3), (1, 2), (0, 1), (2, 1), 2, True),
    (4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 4, False),  # depthwise
    (4, 8, (1, 1), (1, 1), (0, 0), (1, 1), 4, True),  # depthwise multiplier 2
    (2, 3, (5, 1), (3, 1), (2, 0), (1, 3), 1, True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, groups, bias", CONVS)
def test_conv2d(cin: int, cout: int, kernel: tuple, stride: tuple, padding: tuple,
                dilation: tuple, groups: int, bias: bool, dtype: object) -> None:
    x = randn(2, cin, 7, 6, seed=1, dtype=dtype)
    w = randn(cout, cin // groups, *kernel, seed=2, dtype=dtype)
    extra = [randn(cout, seed=3, dtype=dtype)] if bias else []
    got = run1(graph.Conv2dOp, x, w, *extra, stride=stride, padding=padding,
               dilation=dilation, groups=groups)
    expect(got, F.conv2d(tt(x), tt(w), *map(tt, extra), stride=stride, padding=padding,
                         dilation=dilation, groups=groups))


POOLS = [  # (kernel, stride, padding, ceil_mode)
    ((2, 2), (2, 2), (0, 0), False), ((3, 2), (2, 1), (1, 0), True),
    ((3, 3), (2, 2), (1, 1), True), ((3, 3), (2, 3), (1, 1), False),
    ((2, 3), (3, 2), (0, 1), True), ((1, 1), (2, 2), (0, 0), True),
]


@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS)
def test_max_pool2d(kernel: tuple, stride: tuple, padding: tuple, ceil_mode: bool,
                    dilation: tuple) -> None:
    x = randn(2, 3, 7, 6)
    got = run1(graph.MaxPool2dOp, x, kernel=kernel, stride=stride, padding=padding,
               dilation=dilation, ceil_mode=ceil_mode)
    expect(got, F.max_pool2d(tt(x), kernel, stride, padding, dilation, ceil_mode=ceil_mode),
           exact=True)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float16, BF16])
def test_max_pool2d_pads_with_the_dtype_minimum(dtype: object) -> None:
    x = randint(2, 3, 7, 6, lo=0 if dtype == np.uint8 else -9, dtype=dtype)
    got = run1(graph.MaxPool2dOp, x, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
               ceil_mode=True)
    expect(got, F.max_pool2d(tt(x), 3, 2, 1, ceil_mode=True), exact=True)


@pytest.mark.parametrize("divisor", [None, 5])
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", POOLS)
def test_avg_pool2d(kernel: tuple, stride: tuple, padding: tuple, ceil_mode: bool,
                    count_include_pad: bool, divisor: int | None) -> None:
    x = randn(2, 3, 7, 6, dtype=np.float16 if divisor else np.float32)
    got = run1(graph.AvgPool2dOp, x, kernel=kernel, stride=stride, padding=padding,
               ceil_mode=ceil_mode, count_include_pad=count_include_pad, divisor=divisor)
    expect(got, F.avg_pool2d(tt(x), kernel, stride, padding, ceil_mode, count_include_pad,
                             divisor))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hw, size", [((7, 5), (3, 2)), ((5, 7), (2, 3)), ((6, 6), (3, 3)),
                                      ((3, 2), (5, 4)), ((7, 5), (1, 1))])
def test_adaptive_avg_pool2d(hw: tuple, size: tuple, dtype: object) -> None:
    x = randn(2, 3, *hw, dtype=dtype)
    expect(run1(graph.AdaptiveAvgPool2dOp, x, size=size), F.adaptive_avg_pool2d(tt(x), size))


# ---- attention ------------------------------------------------------------------------------

def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
          **kwargs: object) -> tuple[np.ndarray, torch.Tensor]:
    ir_kw = {"is_causal": kwargs.get("is_causal", False), "scale": kwargs.get("scale"),
             "gqa": kwargs.get("enable_gqa", False)}
    arrays = [q, k, v] + ([mask] if mask is not None else [])
    got = run1(graph.AttentionOp, *arrays, **ir_kw)
    want = F.scaled_dot_product_attention(tt(q), tt(k), tt(v), None if mask is None
                                          else tt(mask), **kwargs)
    return got, want


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal_short_q",
                                  "causal_long_q", "scale", "gqa", "rank2", "masked_row"])
def test_attention(case: str) -> None:
    lq, s = (6, 4) if case == "causal_long_q" else (4, 6)
    hq = 6 if case == "gqa" else 3
    q = randn(2, hq, lq, 8, seed=1)
    k, v = randn(2, 3, s, 8, seed=2), randn(2, 3, s, 5, seed=3)
    mask = None
    if case in ("bool_mask", "masked_row"):
        mask = randn(lq, s, seed=4) > -0.5
        mask[:, 0] = True
        if case == "masked_row":
            mask[1] = False  # a query that sees nothing: torch gives zeros, not NaN
    elif case == "float_mask":
        mask = randn(2, 1, lq, s, seed=4)
        mask[..., 1, 2:] = -np.inf
    kwargs = {"causal_short_q": {"is_causal": True}, "causal_long_q": {"is_causal": True},
              "scale": {"scale": 0.3}, "gqa": {"enable_gqa": True}}.get(case, {})
    if case == "rank2":
        q, k, v = q[0, 0], k[0, 0], v[0, 0]
    expect(*_sdpa(q, k, v, mask, **kwargs))


def test_attention_f16() -> None:
    q, k, v = (randn(1, 2, 5, 8, seed=i, dtype=np.float16) for i in range(3))
    got, want = _sdpa(q, k, v, is_causal=True)
    np.testing.assert_allclose(got.astype(np.float32), want.float().numpy(), atol=2e-3,
                               rtol=2e-3)


# ---- shape and data movement ----------------------------------------------------------------

def test_reshape_permute_expand() -> None:
    x = randn(3, 5, 7)
    expect(run1(graph.ReshapeOp, x, result_types=[TensorType((7, 1, 15), dtypes.f32)]),
           tt(x).reshape(7, 1, 15), exact=True)
    expect(run1(graph.ReshapeOp, np.array([4.0], np.float32),
                result_types=[TensorType((), dtypes.f32)]), torch.tensor([4.0]).reshape(()))
    expect(run1(graph.PermuteOp, x, perm=(2, 0, 1)), tt(x).permute(2, 0, 1), exact=True)
    expect(run1(graph.PermuteOp, x[0, 0, 0], perm=()), tt(x[0, 0, 0]).permute(()), exact=True)
    y = randn(3, 1, 7)
    expect(run1(graph.ExpandOp, y, result_types=[TensorType((2, 3, 5, 7), dtypes.f32)]),
           tt(y).expand(2, 3, 5, 7), exact=True)


@pytest.mark.parametrize("axis, start, end, step", [
    (1, 1, 4, 1), (1, -4, -1, 2), (-1, 0, 100, 3), (2, -100, 3, 1), (0, 2, 1, 1),
    (1, 4, 5, 2), (-1, -1, 2**62, 1)])
def test_slice(axis: int, start: int, end: int, step: int) -> None:
    x = randn(3, 5, 7)
    index = [slice(None)] * 3
    index[axis] = slice(start, end, step)
    got = run1(graph.SliceOp, x, axis=axis, start=start, end=end, step=step)
    expect(got, tt(x)[tuple(index)], exact=True)


@pytest.mark.parametrize("axis", [1, -1])
def test_concat_and_split(axis: int) -> None:
    xs = [randn(3, n, 4, seed=n) if axis == 1 else randn(3, 2, n, seed=n) for n in (1, 4, 2)]
    expect(run1(graph.ConcatOp, *xs, axis=axis), torch.cat([tt(x) for x in xs], axis),
           exact=True)
    x = randn(3, 7, 7)
    got = run(graph.SplitOp, x, axis=axis, sizes=(1, 4, 2))
    for part, want in zip(got, torch.split(tt(x), [1, 4, 2], axis), strict=True):
        expect(part, want, exact=True)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("index_shape", [(3, 5, 7), (2, 4, 3), (1, 5, 1)])
def test_gather(axis: int, index_shape: tuple) -> None:
    x = randn(3, 5, 7)
    index = randint(*index_shape, lo=0, hi=x.shape[axis], dtype=np.int64)
    expect(run1(graph.GatherOp, x, index, axis=axis), torch.gather(tt(x), axis, tt(index)),
           exact=True)


@pytest.mark.parametrize("index", [np.array([4, 0, 0, 2], np.int64), np.array(3, np.int32),
                                   np.array([1], np.int64)])
def test_index_select(index: np.ndarray) -> None:
    x = randn(3, 5, 7)
    want = tt(x).index_select(1, tt(index).long()) if index.ndim else tt(x)[:, int(index)]
    expect(run1(graph.IndexSelectOp, x, index, axis=1), want, exact=True)


def test_index_adjacent_and_non_adjacent() -> None:
    x = randn(3, 5, 7, 2)
    i = randint(2, 1, lo=-5, hi=5, dtype=np.int64, seed=1)
    j = randint(4, lo=-7, hi=7, dtype=np.int64, seed=2)
    tx, ti, tj = tt(x), tt(i), tt(j)
    expect(run1(graph.IndexOp, x, i, j, axes=(1, 2)), tx[:, ti, tj], exact=True)
    k = randint(4, lo=-3, hi=3, dtype=np.int64, seed=3)
    expect(run1(graph.IndexOp, x, k, j, axes=(0, 2)), tx[tt(k), :, tj], exact=True)
    m = randint(2, 3, lo=0, hi=2, dtype=np.int32, seed=4)
    expect(run1(graph.IndexOp, x, m, axes=(-1,)), tx[..., tt(m).long()], exact=True)
    n = randint(4, lo=-2, hi=2, dtype=np.int64, seed=5)
    expect(run1(graph.IndexOp, x, k, n, axes=(0, 3)), tx[tt(k), :, :, tt(n)], exact=True)


def test_embedding() -> None:
    w, idx = randn(11, 6), randint(3, 4, lo=0, hi=11, dtype=np.int64)
    expect(run1(graph.EmbeddingOp, w, idx), F.embedding(tt(idx), tt(w)), exact=True)
    idx0 = np.array(10, np.int32)
    expect(run1(graph.EmbeddingOp, w, idx0), F.embedding(tt(idx0).long(), tt(w)), exact=True)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_pad(dtype: object) -> None:
    x = randn(3, 5, 7).astype(dtype)
    pads = (0, 1, 2, 0, 1, 3)  # (before, after) per axis, in axis order
    torch_pads = [p for i in reversed(range(3)) for p in pads[2 * i:2 * i + 2]]
    expect(run1(graph.PadOp, x, pads=pads, value=-2.0),
           F.pad(tt(x), torch_pads, value=-2), exact=True)


# ---- constants ------------------------------------------------------------------------------

def _constant(op_cls: type[ir.Operation], type: TensorType, **attrs: object) -> np.ndarray:
    return run1(op_cls, result_types=[type], **attrs)


def test_full_and_arange() -> None:
    got = _constant(graph.FullOp, TensorType((3, 1, 5), dtypes.f32), value=2.5)
    expect(got, torch.full((3, 1, 5), 2.5), exact=True)
    got = _constant(graph.FullOp, TensorType((2,), dtypes.i8), value=-3)
    expect(got, torch.full((2,), -3, dtype=torch.int8), exact=True)
    got = _constant(graph.FullOp, TensorType((), dtypes.boolean), value=True)
    expect(got, torch.tensor(True), exact=True)
    got = _constant(graph.ArangeOp, TensorType((7,), dtypes.f32), start=0.5, step=0.25)
    expect(got, torch.arange(0.5, 2.25, 0.25), exact=True)
    got = _constant(graph.ArangeOp, TensorType((5,), dtypes.i64), start=-3, step=2)
    expect(got, torch.arange(-3, 7, 2), exact=True)
    got = _constant(graph.ArangeOp, TensorType((3,), dtypes.i64), start=2**60 + 1, step=3)
    expect(got, torch.arange(2**60 + 1, 2**60 + 10, 3), exact=True)
    got = _constant(graph.ArangeOp, TensorType((4,), dtypes.f16), start=2047, step=1)
    expect(got, torch.arange(2047, 2051, 1, dtype=torch.float16), exact=True)


def test_constant_weight_and_literal() -> None:
    w = randn(2, 3)
    m = ir.Module("t", [], weights={"w": w})
    b = ir.Builder.at_end(m.body)
    t = TensorType((2, 3), dtypes.f32)
    a = b.value(graph.ConstantOp, result_types=[t], weight="w")
    lit = ir.DenseAttr(TensorType((3,), dtypes.f32), np.array([1, 2, 3]))
    c = b.value(graph.ConstantOp, result_types=[lit.type], value=lit)
    b.create(ir.OP_REGISTRY["func.return"], a, c)
    ir.verify(m)
    got_w, got_lit = ir.interpret(m)
    np.testing.assert_array_equal(got_w, w)
    np.testing.assert_array_equal(got_lit, np.array([1, 2, 3], np.float32))


# ---- symbolic batch -------------------------------------------------------------------------

def test_symbolic_batch_runs_at_two_sizes() -> None:
    batch = symbol("B")
    w, bias = randn(4, 6, seed=1), randn(4, seed=2)
    m = ir.Module("t", [TensorType((batch, 3, 6), dtypes.f32), TensorType((4, 6), dtypes.f32),
                        TensorType((4,), dtypes.f32)])
    b = ir.Builder.at_end(m.body)
    x, wv, bv = m.inputs
    h = b.value(graph.LinearOp, x, wv, bv)
    s = b.value(graph.SoftmaxOp, h, axis=-1)
    n = b.value(graph.LayerNormOp, s, ndim=1)
    r = b.value(graph.ReduceSumOp, n, axes=(1,))
    flat = b.value(graph.ReshapeOp, r, result_types=[TensorType((4 * batch,), dtypes.f32)])
    b.create(ir.OP_REGISTRY["func.return"], flat)
    ir.verify(m)
    for size in (1, 5):
        xs = randn(size, 3, 6, seed=size)
        want = F.layer_norm(torch.softmax(F.linear(tt(xs), tt(w), tt(bias)), -1), (4,))
        (got,) = ir.interpret(m, xs, w, bias)
        expect(got, want.sum(1).reshape(-1))


def test_symbolic_batch_windows() -> None:
    batch = symbol("B")
    m = ir.Module("t", [TensorType((batch, 2, 7, 6), dtypes.f32), TensorType((4, 2, 3, 2),
                                                                            dtypes.f32)])
    b = ir.Builder.at_end(m.body)
    c = b.value(graph.Conv2dOp, *m.inputs, stride=(2, 1), padding=(1, 0))
    p = b.value(graph.MaxPool2dOp, c, kernel=(2, 2), stride=(2, 2), ceil_mode=True)
    a = b.value(graph.AdaptiveAvgPool2dOp, p, size=(1, 3))
    b.create(ir.OP_REGISTRY["func.return"], a)
    ir.verify(m)
    w = randn(4, 2, 3, 2, seed=9)
    for size in (1, 3):
        xs = randn(size, 2, 7, 6, seed=size)
        want = F.conv2d(tt(xs), tt(w), stride=(2, 1), padding=(1, 0))
        want = F.adaptive_avg_pool2d(F.max_pool2d(want, 2, 2, ceil_mode=True), (1, 3))
        expect(ir.interpret(m, xs, w)[0], want)


# ---- verifier errors ------------------------------------------------------------------------

def _build(op_cls: type[ir.Operation], *shapes: tuple | TensorType, dtype: object = dtypes.f32,
           **attrs: object) -> None:
    types = [s if isinstance(s, TensorType) else TensorType(s, dtype) for s in shapes]
    m = ir.Module("t", types)
    b = ir.Builder.at_end(m.body)
    b.create(ir.OP_REGISTRY["func.return"], *b.create(op_cls, *m.inputs, **attrs).results)
    ir.verify(m)


@pytest.mark.parametrize("op_cls, shapes, attrs, message", [
    (graph.MatmulOp, [(3, 7), (6, 5)], {}, "contraction dims differ"),
    (graph.MatmulOp, [(2, 3, 7), (4, 7, 5)], {}, "do not broadcast"),
    (graph.Conv2dOp, [(1, 6, 5, 5), (4, 3, 3, 3)], {"groups": 4}, "do not fit groups=4"),
    (graph.Conv2dOp, [(1, 6, 5, 5), (4, 4, 3, 3)], {}, "do not fit groups=1"),
    (graph.PermuteOp, [(3, 5, 7)], {"perm": (0, 2, 2)}, "not a permutation"),
    (graph.SoftmaxOp, [(3, 5)], {"axis": 2}, "out of range"),
    (graph.SplitOp, [(3, 5)], {"axis": 1, "sizes": (2, 2)}, "sum to 4"),
    (graph.LinearOp, [(2, 7), (5, 6)], {}, "in_features differ"),
    (graph.AttentionOp, [(1, 4, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8)], {}, "set gqa=true"),
    (graph.AttentionOp, [(1, 4, 3, 8), (1, 3, 5, 8), (1, 3, 5, 8)], {"gqa": True},
     "not a multiple"),
    (graph.ReduceSumOp, [(3, 5)], {"axes": (1, -1)}, "repeated axis"),
    (graph.ReshapeOp, [(3, 5)], {"result_types": [TensorType((4, 4), dtypes.f32)]},
     "element count differs"),
    (graph.Conv2dOp, [(1, 2, 5, 5), (3, 2, 7, 1)], {}, "window larger than the padded"),
])
def test_verifier_rejects(op_cls: type, shapes: list, attrs: dict, message: str) -> None:
    with pytest.raises(ir.VerifyError, match=message):
        _build(op_cls, *shapes, **attrs)


def test_verifier_rejects_mixed_element_types() -> None:
    m = ir.Module("t", [TensorType((3,), dtypes.f32), TensorType((3,), dtypes.f16)])
    b = ir.Builder.at_end(m.body)
    b.create(graph.BINARY_OPS["add"], *m.inputs)
    b.create(ir.OP_REGISTRY["func.return"])
    with pytest.raises(ir.VerifyError, match="operand element types differ: f32 vs f16"):
        ir.verify(m)


def test_verifier_rejects_float_index() -> None:
    with pytest.raises(ir.VerifyError, match="index must have an integer element type, got f32"):
        _build(graph.GatherOp, (3, 5), (3, 5), axis=1)


def test_verifier_rejects_gather_index_larger_than_x() -> None:
    with pytest.raises(ir.VerifyError, match="no larger dims off axis 1"):
        _build(graph.GatherOp, (3, 5), TensorType((4, 5), dtypes.i64), axis=1)


def test_verifier_rejects_float_clamp_of_ints() -> None:
    with pytest.raises(ir.VerifyError, match="float bound min=0.5 on a i32 operand"):
        _build(graph.ClampOp, (3,), dtype=dtypes.i32, min=0.5)
