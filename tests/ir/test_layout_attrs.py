"""Layout attributes: NHWC conv/pooling, batch_norm's channel axis, matmul transposes and the
pre-packed `layout` tag of constants, each checked against torch, symbolically and in text.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import TensorType, symbol

from ..support import randn, tolerance

NHWC_TO_NCHW, NCHW_TO_NHWC, OIHW_TO_HWIO = (0, 3, 1, 2), (0, 2, 3, 1), (2, 3, 1, 0)


def build(op_cls: type[ir.Operation], *types: TensorType, **attrs: object) -> ir.Module:
    """A verified one-op module over inputs of `types`."""
    m = ir.Module("t", list(types))
    b = ir.Builder.at_end(m.body)
    op = b.create(op_cls, *m.inputs, **attrs)
    b.create(ReturnOp, *op.results)
    ir.verify(m)
    return m


def run1(op_cls: type[ir.Operation], *arrays: np.ndarray, **attrs: object) -> np.ndarray:
    """Build a one-op module over `arrays`, verify and interpret it."""
    types = [TensorType(a.shape, dtypes.from_numpy_dtype(a.dtype)) for a in arrays]
    (out,) = ir.interpret(build(op_cls, *types, **attrs), *arrays)
    return out


def expect(got: np.ndarray, want: torch.Tensor) -> None:
    """Same shape and dtype as torch's result; values element by element within the dtype's
    tolerance, relative above 1 and absolute below."""
    ref = want.detach().numpy()
    assert got.shape == ref.shape, f"shape {got.shape}, torch {ref.shape}"
    assert got.dtype == ref.dtype, f"dtype {got.dtype}, torch {ref.dtype}"
    tol = tolerance(ref.dtype)
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


def nchw(x: np.ndarray) -> torch.Tensor:
    """An NHWC array as an NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(NHWC_TO_NCHW)))


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """An NCHW torch tensor back in NHWC."""
    return t.permute(*NCHW_TO_NHWC).contiguous()


# ---- conv2d -----------------------------------------------------------------------------------

CONVS = [  # (in_channels, out_channels, kernel, stride, padding, dilation, groups, bias)
    (3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    (3, 5, (3, 2), (2, 2), (1, 2), (1, 1), 1, False),
    (4, 6, (2, 3), (1, 2), (0, 1), (2, 1), 2, True),
    (4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 4, False),  # depthwise
    (6, 9, (1, 3), (2, 1), (0, 1), (1, 2), 3, True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("cin, cout, kernel, stride, padding, dilation, groups, bias", CONVS)
def test_conv2d_nhwc(cin: int, cout: int, kernel: tuple, stride: tuple, padding: tuple,
                     dilation: tuple, groups: int, bias: bool, dtype: object) -> None:
    x = randn(2, 7, 5, cin, seed=1, dtype=dtype)
    w_oihw = randn(cout, cin // groups, *kernel, seed=2, dtype=dtype)
    w_hwio = np.ascontiguousarray(w_oihw.transpose(OIHW_TO_HWIO))
    extra = [randn(cout, seed=3, dtype=dtype)] if bias else []
    got = run1(graph.Conv2dOp, x, w_hwio, *extra, stride=stride, padding=padding,
               dilation=dilation, groups=groups, layout="NHWC")
    want = F.conv2d(nchw(x).float(), torch.from_numpy(w_oihw).float(),
                    *[torch.from_numpy(b).float() for b in extra], stride=stride,
                    padding=padding, dilation=dilation, groups=groups)
    expect(got, nhwc(want).to(torch.from_numpy(x).dtype))


def test_conv2d_default_layout_is_nchw() -> None:
    x, w = randn(1, 3, 5, 4, seed=1), randn(2, 3, 3, 3, seed=2)
    m = build(graph.Conv2dOp, TensorType(x.shape, dtypes.f32), TensorType(w.shape, dtypes.f32))
    assert m.ops[0].layout == "NCHW" and 'layout = "NCHW"' in str(m)
    expect(ir.interpret(m, x, w)[0], F.conv2d(torch.from_numpy(x), torch.from_numpy(w)))


# ---- pooling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", [
    ((3, 3), (2, 2), (1, 1), (1, 1), True), ((3, 2), (2, 1), (1, 0), (2, 1), True),
    ((2, 2), (2, 2), (0, 0), (1, 1), False)])
def test_max_pool2d_nhwc(kernel: tuple, stride: tuple, padding: tuple, dilation: tuple,
                         ceil_mode: bool) -> None:
    x = randn(2, 7, 6, 3)
    got = run1(graph.MaxPool2dOp, x, kernel=kernel, stride=stride, padding=padding,
               dilation=dilation, ceil_mode=ceil_mode, layout="NHWC")
    expect(got, nhwc(F.max_pool2d(nchw(x), kernel, stride, padding, dilation,
                                  ceil_mode=ceil_mode)))


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_avg_pool2d_nhwc(ceil_mode: bool, count_include_pad: bool) -> None:
    x = randn(2, 7, 6, 3)
    got = run1(graph.AvgPool2dOp, x, kernel=(3, 2), stride=(2, 2), padding=(1, 1),
               ceil_mode=ceil_mode, count_include_pad=count_include_pad, layout="NHWC")
    expect(got, nhwc(F.avg_pool2d(nchw(x), (3, 2), (2, 2), (1, 1), ceil_mode,
                                  count_include_pad)))


@pytest.mark.parametrize("size", [(1, 1), (2, 3)])
def test_adaptive_avg_pool2d_nhwc(size: tuple) -> None:
    x = randn(2, 7, 5, 3)
    got = run1(graph.AdaptiveAvgPool2dOp, x, size=size, layout="NHWC")
    assert got.shape == (2, *size, 3)
    expect(got, nhwc(F.adaptive_avg_pool2d(nchw(x), size)))


# ---- batch_norm -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((2, 5, 4, 3), -1), ((2, 3, 5, 4), 1),
                                         ((4, 3), -1), ((2, 5, 3), 2), ((2, 3, 1), 1)])
def test_batch_norm_axis(shape: tuple, axis: int) -> None:
    c = shape[axis]
    x = randn(*shape)
    mean, var = randn(c, seed=1), np.abs(randn(c, seed=2)) + 0.5
    weight, bias = randn(c, seed=3), randn(c, seed=4)
    got = run1(graph.BatchNormOp, x, mean, var, weight, bias, eps=1e-3, axis=axis)
    want = F.batch_norm(torch.from_numpy(x).movedim(axis, 1), *map(torch.from_numpy,
                        (mean, var, weight, bias)), training=False, eps=1e-3)
    expect(got, want.movedim(1, axis))


# ---- matmul -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shapes, t_lhs, t_rhs", [
    (((7, 3), (7, 5)), True, False),
    (((3, 7), (5, 7)), False, True),
    (((7, 3), (5, 7)), True, True),
    (((2, 1, 7, 3), (4, 5, 7)), True, True),  # batched, broadcast
    (((2, 3, 7), (4, 1, 5, 7)), False, True),
    (((7,), (2, 5, 7)), False, True),  # 1-d lhs promoted after rhs is transposed
    (((2, 7, 3), (7,)), True, False),
    (((1, 1), (1, 1)), True, True),
])
def test_matmul_transposes(shapes: tuple, t_lhs: bool, t_rhs: bool) -> None:
    a, b = randn(*shapes[0], seed=1), randn(*shapes[1], seed=2)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    want = torch.matmul(ta.transpose(-1, -2) if t_lhs else ta, tb.transpose(-1, -2) if t_rhs
                        else tb)
    expect(run1(graph.MatmulOp, a, b, transpose_lhs=t_lhs, transpose_rhs=t_rhs), want)


def test_matmul_transpose_int() -> None:
    a = np.random.default_rng(1).integers(-9, 10, (2, 7, 3)).astype(np.int32)
    b = np.random.default_rng(2).integers(-9, 10, (5, 7)).astype(np.int32)
    got = run1(graph.MatmulOp, a, b, transpose_lhs=True, transpose_rhs=True)
    np.testing.assert_array_equal(got, np.swapaxes(a, -1, -2) @ b.T)
    assert got.dtype == np.int32


# ---- symbolic batch ---------------------------------------------------------------------------

def test_symbolic_batch_channels_last_pipeline() -> None:
    batch, f32 = symbol("B"), dtypes.f32
    m = ir.Module("t", [TensorType((batch, 7, 6, 2), f32), TensorType((3, 2, 2, 4), f32),
                        TensorType((4,), f32), TensorType((4,), f32), TensorType((5, 4), f32)])
    b = ir.Builder.at_end(m.body)
    x, w, mean, var, fc = m.inputs
    c = b.value(graph.Conv2dOp, x, w, stride=(2, 1), padding=(1, 0), layout="NHWC")
    assert c.type.shape[0] == batch and c.type.shape[1:] == (4, 5, 4)
    n = b.value(graph.BatchNormOp, c, mean, var, axis=-1)
    p = b.value(graph.MaxPool2dOp, n, kernel=(2, 2), stride=(2, 2), ceil_mode=True,
                layout="NHWC")
    a = b.value(graph.AdaptiveAvgPool2dOp, p, size=(1, 1), layout="NHWC")
    y = b.value(graph.MatmulOp, a, fc, transpose_rhs=True)
    assert y.type.shape[0] == batch and y.type.shape[1:] == (1, 1, 5)
    b.create(ReturnOp, y)
    ir.verify(m)
    ws, ms, vs, fs = randn(3, 2, 2, 4, seed=9), randn(4, seed=8), randn(4, seed=7) ** 2 + 1, \
        randn(5, 4, seed=6)
    for size in (1, 3):
        xs = randn(size, 7, 6, 2, seed=size)
        t = F.conv2d(nchw(xs), torch.from_numpy(ws.transpose(3, 2, 0, 1).copy()), stride=(2, 1),
                     padding=(1, 0))
        t = F.batch_norm(t, torch.from_numpy(ms), torch.from_numpy(vs), training=False)
        t = F.adaptive_avg_pool2d(F.max_pool2d(t, 2, 2, ceil_mode=True), (1, 1))
        expect(ir.interpret(m, xs, ws, ms, vs, fs)[0], nhwc(t) @ torch.from_numpy(fs).T)


# ---- verifier errors --------------------------------------------------------------------------

def _types(*shapes: tuple) -> list[TensorType]:
    return [TensorType(s, dtypes.f32) for s in shapes]


@pytest.mark.parametrize("op_cls, shapes, attrs, message", [
    (graph.Conv2dOp, [(1, 5, 5, 3), (3, 3, 3, 4)], {"layout": "NWHC"},
     r"attribute 'layout' expected one of \['NCHW', 'NHWC'\], got 'NWHC'"),
    (graph.MaxPool2dOp, [(1, 5, 5, 3)], {"kernel": (2, 2), "stride": (2, 2), "layout": "nhwc"},
     "expected one of"),
    (graph.AdaptiveAvgPool2dOp, [(1, 5, 5, 3)], {"size": (1, 1), "layout": "CHWN"},
     "expected one of"),
    (graph.Conv2dOp, [(1, 5, 5, 6), (3, 3, 2, 4)], {"layout": "NHWC", "groups": 2},
     r"do not fit groups=2.*HWIO weight.*expected input channels = 2\*2, got 6"),
    (graph.Conv2dOp, [(1, 5, 5, 3), (4, 3, 2, 2)], {"layout": "NHWC"},  # an OIHW weight
     "do not fit groups=1"),
    (graph.Conv2dOp, [(1, 5, 5, 3), (3, 3, 3, 4), (3,)], {"layout": "NHWC"},
     r"bias must be \[4\], got tensor<3xf32>"),
    (graph.Conv2dOp, [(1, 5, 5), (3, 3, 3, 4)], {"layout": "NHWC"},
     "expected an NHWC input of rank 4"),
    (graph.MaxPool2dOp, [(1, 3, 2, 8)], {"kernel": (3, 3), "stride": (1, 1), "layout": "NHWC"},
     "window larger than the padded"),
    (graph.MatmulOp, [(7,), (5, 7)], {"transpose_lhs": True},
     r"transpose_lhs needs an operand of rank >= 2, got tensor<7xf32>"),
    (graph.MatmulOp, [(3, 7), (7,)], {"transpose_rhs": True},
     r"transpose_rhs needs an operand of rank >= 2, got tensor<7xf32>"),
    (graph.MatmulOp, [(3, 7), (7, 5)], {"transpose_rhs": True},
     r"contraction dims differ: tensor<3x7xf32> @ tensor<7x5xf32>\^T \(7 vs 5\)"),
    (graph.BatchNormOp, [(2, 5, 4, 3), (4,), (4,)], {"axis": -1},
     r"per-channel parameter does not match x .* on axis -1: expected \[3\], "
     r"got tensor<4xf32>"),
    (graph.BatchNormOp, [(2, 3), (3,), (3,)], {"axis": 2}, "out of range"),
])
def test_verifier_rejects(op_cls: type, shapes: list, attrs: dict, message: str) -> None:
    with pytest.raises(ir.VerifyError, match=message):
        build(op_cls, *_types(*shapes), **attrs)


def test_parsed_bad_layout_is_rejected() -> None:
    m = build(graph.MaxPool2dOp, *_types((1, 4, 4, 3)), kernel=(2, 2), stride=(2, 2),
              layout="NHWC")
    text = str(m).replace('layout = "NHWC"', 'layout = "HWNC"')
    with pytest.raises(ir.VerifyError, match="expected one of"):
        ir.parse(text)


def test_constant_rejects_an_empty_layout_tag() -> None:
    m = ir.Module("t", [], weights={"w": randn(2, 3)})
    b = ir.Builder.at_end(m.body)
    c = b.value(graph.ConstantOp, result_types=_types((2, 3)), weight="w", layout=" ")
    b.create(ReturnOp, c)
    with pytest.raises(ir.VerifyError, match="layout tag must name a layout"):
        ir.verify(m)


# ---- text round trip --------------------------------------------------------------------------

def test_layout_attrs_round_trip_and_constant_tag_keeps_semantics() -> None:
    weights = {"conv.w": randn(3, 3, 2, 4, seed=1), "fc.w": randn(5, 4, seed=2),
               "bn.mean": randn(4, seed=3), "bn.var": randn(4, seed=4) ** 2 + 1}
    m = ir.Module("layouts", _types((symbol("B"), 6, 5, 2)), ["x"], weights=weights)
    b = ir.Builder.at_end(m.body)
    w = b.value(graph.ConstantOp, result_types=_types((3, 3, 2, 4)), weight="conv.w",
                layout="HWIO")
    fc = b.value(graph.ConstantOp, result_types=_types((5, 4)), weight="fc.w", layout="NK")
    mean = b.value(graph.ConstantOp, result_types=_types((4,)), weight="bn.mean")
    var = b.value(graph.ConstantOp, result_types=_types((4,)), weight="bn.var")
    c = b.value(graph.Conv2dOp, m.inputs[0], w, padding=(1, 1), layout="NHWC")
    n = b.value(graph.BatchNormOp, c, mean, var, axis=-1)
    p = b.value(graph.AvgPool2dOp, n, kernel=(2, 2), stride=(2, 2), ceil_mode=True,
                count_include_pad=False, layout="NHWC")
    a = b.value(graph.AdaptiveAvgPool2dOp, p, size=(1, 1), layout="NHWC")
    y = b.value(graph.MatmulOp, a, fc, transpose_rhs=True)
    b.create(ReturnOp, y)
    ir.verify(m)
    text = str(m)
    for piece in ('layout = "HWIO"', 'layout = "NK"', 'layout = "NHWC"', "axis = -1",
                  "transpose_lhs = false, transpose_rhs = true"):
        assert piece in text, piece
    assert text.count("layout = ") == 5  # untagged constants print no layout
    again = ir.parse(text, weights=weights)
    assert str(again) == text
    x = randn(2, 6, 5, 2, seed=5)
    (want,), (got,) = ir.interpret(m, x), ir.interpret(again, x)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 1, 1, 5)
