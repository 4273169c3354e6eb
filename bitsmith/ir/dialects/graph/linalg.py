"""Contractions and windowed ops: matmul, linear, conv2d and 2-d pooling (NCHW or NHWC)."""
from __future__ import annotations

import math
from typing import cast

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ....errors import VerifyError
from ...core import Anchor, AttrSpec, Operation, Trait, attr, register_op
from ...interpreter import EvalContext
from ...shapes import ShapeError
from ...types import Dim, TensorType, dims_equal, format_dim
from .elementwise import checked_broadcast, in_float, plain_dtype


def _same_dtype(op: Operation, *types: TensorType, float_only: bool = False) -> None:
    dtypes = {plain_dtype(op, t) for t in types}
    if len(dtypes) > 1:
        raise VerifyError(op, f"operand element types differ: {sorted(map(str, dtypes))}")
    if float_only and not next(iter(dtypes)).is_float:
        raise VerifyError(op, f"expected float operands, got {next(iter(dtypes))}")


@register_op
class MatmulOp(Operation):
    """torch.matmul semantics: batched, broadcasting, 1-d operands promoted and squeezed.

    `transpose_lhs` / `transpose_rhs` swap that operand's last two dims before the product
    (numpy's swapaxes(-1, -2)), so a weight stored [N, K] multiplies as [K, N]; a transposed
    operand needs rank >= 2.
    """

    name = "graph.matmul"
    TRAITS = frozenset({Trait.ANCHOR})
    ANCHOR = Anchor.MATMUL
    OPERANDS = ("lhs", "rhs")
    ATTRS = {"transpose_lhs": attr("bool", False), "transpose_rhs": attr("bool", False)}

    def infer_types(self) -> list[TensorType]:
        a, b = self._operand_shape("lhs"), self._operand_shape("rhs")
        if not a or not b:
            raise VerifyError(self, "operands must have rank >= 1")
        a1, b1 = len(a) == 1, len(b) == 1
        a = [1] + a if a1 else a
        b = b + [1] if b1 else b
        if not dims_equal(a[-1], b[-2]):
            raise VerifyError(self, f"contraction dims differ: {self._describe('lhs')} @ "
                                    f"{self._describe('rhs')} ({format_dim(a[-1])} vs "
                                    f"{format_dim(b[-2])})")
        batch = checked_broadcast(self, a[:-2], b[:-2])
        shape = list(batch) + ([] if a1 else [a[-2]]) + ([] if b1 else [b[-1]])
        return [self.lhs.type.with_shape(tuple(shape))]

    def _operand_type(self, which: str) -> TensorType:
        value = self.operand(which)
        if value is None:  # lhs and rhs are required: operand counts are checked first
            raise VerifyError(self, f"missing operand '{which}'")
        return value.type

    def _operand_shape(self, which: str) -> list[Dim]:
        """The operand's shape as it enters the product (last two dims swapped if asked)."""
        t = self._operand_type(which)
        shape = list(t.shape)
        if self.attributes[f"transpose_{which}"]:
            if t.rank < 2:
                raise VerifyError(self, f"transpose_{which} needs an operand of rank >= 2, "
                                        f"got {t}; reshape it to 2-d or drop the transpose")
            shape[-2], shape[-1] = shape[-1], shape[-2]
        return shape

    def _describe(self, which: str) -> str:
        t = self._operand_type(which)
        return f"{t}^T" if self.attributes[f"transpose_{which}"] else str(t)

    def verify_(self) -> None:
        _same_dtype(self, self.lhs.type, self.rhs.type)

    def evaluate(self, ctx: EvalContext, lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        lhs = np.swapaxes(lhs, -1, -2) if self.transpose_lhs else lhs
        rhs = np.swapaxes(rhs, -1, -2) if self.transpose_rhs else rhs
        dtype = self.lhs.type.dtype
        if dtype.is_float:
            return in_float(np.matmul, dtype, lhs, rhs)
        return dtype.cast(np.matmul(lhs.astype(np.int64), rhs.astype(np.int64)))


@register_op
class LinearOp(Operation):
    """x @ weight^T (+ bias), weight laid out [out_features, in_features] as in torch."""

    name = "graph.linear"
    TRAITS = frozenset({Trait.ANCHOR})
    ANCHOR = Anchor.MATMUL
    OPERANDS = ("x", "weight", "bias?")

    def infer_types(self) -> list[TensorType]:
        x, w = self.x.type, self.weight.type
        if w.rank != 2 or x.rank < 1:
            raise VerifyError(self, f"expected x of rank >= 1 and a 2-d weight, got {x}, {w}")
        if not dims_equal(x.shape[-1], w.shape[1]):
            raise VerifyError(self, f"in_features differ: x {x} vs weight {w}")
        if self.bias is not None and (self.bias.type.rank != 1
                                      or not dims_equal(self.bias.type.shape[0], w.shape[0])):
            raise VerifyError(self, f"bias must be [{format_dim(w.shape[0])}], "
                                    f"got {self.bias.type}")
        return [x.with_shape(tuple(x.shape[:-1]) + (w.shape[0],))]

    def verify_(self) -> None:
        _same_dtype(self, *[v.type for v in self.operands], float_only=True)

    def evaluate(self, ctx: EvalContext, x: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray | None = None) -> np.ndarray:
        def fn(x: np.ndarray, w: np.ndarray, *b: np.ndarray) -> np.ndarray:
            out = np.matmul(x, w.T)
            return out + b[0] if b else out
        args = (x, weight) if bias is None else (x, weight, bias)
        return in_float(fn, self.x.type.dtype, *args)


LAYOUTS = ("NCHW", "NHWC")
LAYOUT_ATTR: AttrSpec = attr("str", "NCHW", choices=LAYOUTS)
_TO_NCHW = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 3, 1, 2)}
_FROM_NCHW = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 2, 3, 1)}
_HWIO_TO_OIHW = (3, 2, 0, 1)


def checked_layout(op: Operation) -> str:
    """The op's `layout` attribute, checked against LAYOUTS (types are inferred before verify)."""
    layout = op.attributes["layout"]
    LAYOUT_ATTR.check(op, "layout", layout)
    return cast(str, layout)  # check() accepts only one of LAYOUTS


def to_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    """An NCHW view of a 4-d array in `layout`."""
    return x if layout == "NCHW" else np.transpose(x, _TO_NCHW[layout])


def from_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    """A contiguous 4-d array in `layout` from an NCHW one."""
    return x if layout == "NCHW" else np.ascontiguousarray(np.transpose(x, _FROM_NCHW[layout]))


def layout_shape(layout: str, n: Dim, c: Dim, h: Dim, w: Dim) -> tuple[Dim, ...]:
    """(n, c, h, w) ordered as `layout` stores them."""
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _pair(op: Operation, key: str) -> tuple[int, int]:
    value = op.attributes[key]
    if not isinstance(value, tuple):
        raise VerifyError(op, f"attribute '{key}' needs 2 entries (h, w), got {value!r}")
    if len(value) != 2:
        raise VerifyError(op, f"attribute '{key}' needs 2 entries (h, w), got {list(value)}")
    return int(value[0]), int(value[1])


def window_out(size: Dim, kernel: int, stride: int, pad: int, dilation: int,
               ceil_mode: bool = False) -> Dim:
    """Output length of a sliding window (torch's formula, including ceil_mode)."""
    if stride < 1 or dilation < 1 or kernel < 1 or pad < 0:
        raise ShapeError(f"a window needs kernel, stride and dilation >= 1 and padding >= 0, "
                         f"got kernel {kernel}, stride {stride}, dilation {dilation}, "
                         f"padding {pad}")
    span = dilation * (kernel - 1) + 1
    if not isinstance(size, int):
        if stride == 1:
            return size + 2 * pad - span + 1
        raise ShapeError(f"a strided window over symbolic dim {format_dim(size)}")
    num = size + 2 * pad - span
    out = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             pads: tuple[int, int, int, int], dilation: tuple[int, int],
             fill: float) -> np.ndarray:
    """[N, C, OH, OW, KH, KW] windows of x padded by (top, bottom, left, right)."""
    top, bottom, left, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    win = sliding_window_view(xp, span, axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1], ::dilation[0], ::dilation[1]]


class Window2dOp(Operation):
    """Shared shape rule for conv2d and pooling over NCHW or NHWC (`layout`) inputs."""

    def nchw_dims(self) -> tuple[Dim, Dim, Dim, Dim]:
        """The input's (N, C, H, W) dims, whatever its layout."""
        layout, x = checked_layout(self), self.operands[0].type
        if x.rank != 4:
            raise VerifyError(self, f"expected an {layout} input of rank 4, got {x}")
        n, c, h, w = (x.shape[i] for i in _TO_NCHW[layout])
        return n, c, h, w

    def result_hw(self, ctx: EvalContext) -> tuple[int, int]:
        """The concrete output height and width."""
        shape = ctx.shape(self.result.type)
        _, _, oh, ow = (shape[i] for i in _TO_NCHW[self.layout])
        return oh, ow

    def out_hw(self, kernel: tuple[int, int], ceil_mode: bool = False) -> tuple[Dim, Dim]:
        """Output height and width."""
        stride, padding = _pair(self, "stride"), _pair(self, "padding")
        dilation = _pair(self, "dilation") if "dilation" in self.ATTRS else (1, 1)
        x = self.operands[0].type
        _, _, h, w = self.nchw_dims()
        try:
            hw = (window_out(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode),
                  window_out(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode))
        except ShapeError as exc:
            raise VerifyError(self, str(exc)) from None
        if any(isinstance(d, int) and d <= 0 for d in hw):
            raise VerifyError(self, f"window larger than the padded input {x}")
        return hw

    def extra_pads(self, x: np.ndarray, kernel: tuple[int, int], out: tuple[int, int]
                   ) -> tuple[int, int, int, int]:
        """Padding (top, bottom, left, right) so that `out` windows fit an NCHW `x`."""
        stride, padding = _pair(self, "stride"), _pair(self, "padding")
        dilation = _pair(self, "dilation") if "dilation" in self.ATTRS else (1, 1)
        pads = []
        for i in range(2):
            need = (out[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1
            pads += [padding[i], max(padding[i], need - x.shape[2 + i] - padding[i])]
        return pads[0], pads[1], pads[2], pads[3]


@register_op
class Conv2dOp(Window2dOp):
    """2-d convolution with groups, stride, padding, dilation.

    layout "NCHW": x NCHW, weight OIHW, result NCHW (torch's convention);
    layout "NHWC": x NHWC, weight HWIO ([KH, KW, I/groups, O]), result NHWC. Bias is [O].
    """

    name = "graph.conv2d"
    TRAITS = frozenset({Trait.ANCHOR, Trait.NCHW, Trait.PAD_PROLOGUE})
    ANCHOR = Anchor.CONV
    OPERANDS = ("x", "weight", "bias?")
    ATTRS = {"stride": attr("ints", (1, 1)), "padding": attr("ints", (0, 0)),
             "dilation": attr("ints", (1, 1)), "groups": attr("int", 1),
             "layout": LAYOUT_ATTR}

    def infer_types(self) -> list[TensorType]:
        x, w, layout = self.x.type, self.weight.type, checked_layout(self)
        w_layout = "OIHW" if layout == "NCHW" else "HWIO"
        if w.rank != 4:
            raise VerifyError(self, f"weight must be {w_layout} (rank 4) for layout {layout}, "
                                    f"got {w}")
        o, i, kh, kw = (w.shape[a] for a in ((0, 1, 2, 3) if layout == "NCHW"
                                             else _HWIO_TO_OIHW))
        if not isinstance(kh, int) or not isinstance(kw, int):
            raise VerifyError(self, f"kernel size must be static, got weight {w}")
        n, c, _, _ = self.nchw_dims()
        g = self.groups
        if g < 1 or o % g or not dims_equal(c, i * g):
            raise VerifyError(self, f"channels do not fit groups={g}: input {x}, {w_layout} "
                                    f"weight {w} (expected input channels = {format_dim(i)}"
                                    f"*{g}, got {format_dim(c)})")
        if self.bias is not None and (self.bias.type.rank != 1
                                      or not dims_equal(self.bias.type.shape[0], o)):
            raise VerifyError(self, f"bias must be [{format_dim(o)}], got {self.bias.type}")
        oh, ow = self.out_hw((kh, kw))
        return [x.with_shape(layout_shape(layout, n, o, oh, ow))]

    def verify_(self) -> None:
        _same_dtype(self, *[v.type for v in self.operands], float_only=True)

    def evaluate(self, ctx: EvalContext, x: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray | None = None) -> np.ndarray:
        weight = weight if self.layout == "NCHW" else np.transpose(weight, _HWIO_TO_OIHW)
        return conv2d_oihw(self, ctx, x, weight, bias)


def conv_windows(op: Window2dOp, x: np.ndarray, kernel: tuple[int, int],
                 out_hw: tuple[int, int]) -> np.ndarray:
    """[N, C, OH, OW, KH, KW] windows of an NCHW x under `op`'s stride, padding, dilation."""
    pads = op.extra_pads(x, kernel, out_hw)
    win = _windows(x, kernel, _pair(op, "stride"), pads, _pair(op, "dilation"), 0.0)
    return win[:, :, :out_hw[0], :out_hw[1]]


def conv2d_oihw(op: Window2dOp, ctx: EvalContext, x: np.ndarray, weight: np.ndarray,
                bias: np.ndarray | None) -> np.ndarray:
    """The convolution `op` (its layout, stride, padding, dilation, groups) of x by an OIHW
    weight: what graph.conv2d and quant.conv2d compute."""
    layout = op.layout
    x = to_nchw(x, layout)
    kernel = weight.shape[2:]
    out_hw = op.result_hw(ctx)
    g = op.groups

    def fn(x: np.ndarray, w: np.ndarray, *b: np.ndarray) -> np.ndarray:
        win = conv_windows(op, x, kernel, out_hw)
        n, c, oh, ow, kh, kw = win.shape
        win = win.reshape(n, g, c // g, oh, ow, kh, kw)
        wg = w.reshape(g, w.shape[0] // g, c // g, kh, kw)
        out = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True)
        out = out.reshape(n, w.shape[0], oh, ow)
        return out + b[0].reshape(1, -1, 1, 1) if b else out
    args = (x, weight) if bias is None else (x, weight, bias)
    return from_nchw(in_float(fn, op.x.type.dtype, *args), layout)


class Pool2dOp(Window2dOp):
    """Base of 2-d pooling: same channels, windowed height and width, NCHW or NHWC."""

    TRAITS = frozenset({Trait.ANCHOR, Trait.NCHW, Trait.PAD_PROLOGUE})

    ANCHOR = Anchor.POOL

    OPERANDS = ("x",)

    def infer_types(self) -> list[TensorType]:
        oh, ow = self.out_hw(_pair(self, "kernel"), self.ceil_mode)
        n, c, _, _ = self.nchw_dims()
        return [self.x.type.with_shape(layout_shape(self.layout, n, c, oh, ow))]


@register_op
class MaxPool2dOp(Pool2dOp):
    """2-d max pooling (padding counts as -inf)."""

    name = "graph.max_pool2d"
    OPERANDS = ("x",)
    ATTRS = {"kernel": attr("ints"), "stride": attr("ints"), "padding": attr("ints", (0, 0)),
             "dilation": attr("ints", (1, 1)), "ceil_mode": attr("bool", False),
             "layout": LAYOUT_ATTR}

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        x = to_nchw(x, self.layout)
        kernel, out_hw = _pair(self, "kernel"), self.result_hw(ctx)
        pads = self.extra_pads(x, kernel, out_hw)
        fill = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf  # ints have no -inf
        win = _windows(x, kernel, _pair(self, "stride"), pads, _pair(self, "dilation"),
                       fill)[:, :, :out_hw[0], :out_hw[1]]
        return from_nchw(np.asarray(win.max(axis=(4, 5))).astype(x.dtype, order="C"),
                         self.layout)


@register_op
class AvgPool2dOp(Pool2dOp):
    """2-d average pooling with torch's count_include_pad and ceil_mode rules."""

    name = "graph.avg_pool2d"
    OPERANDS = ("x",)
    ATTRS = {"kernel": attr("ints"), "stride": attr("ints"), "padding": attr("ints", (0, 0)),
             "ceil_mode": attr("bool", False), "count_include_pad": attr("bool", True),
             "divisor": attr("int", None, optional=True), "layout": LAYOUT_ATTR}

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        x = to_nchw(x, self.layout)
        kernel, out_hw = _pair(self, "kernel"), self.result_hw(ctx)
        stride, padding = _pair(self, "stride"), _pair(self, "padding")
        pads = self.extra_pads(x, kernel, out_hw)
        ones = np.zeros((1, 1) + x.shape[2:], np.float32)
        ones = np.pad(ones, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2),
                      constant_values=1.0 if self.count_include_pad else 0.0)
        ones[:, :, padding[0]:padding[0] + x.shape[2], padding[1]:padding[1] + x.shape[3]] = 1
        extra = (0, pads[1] - padding[0], 0, pads[3] - padding[1])
        counts = _windows(ones, kernel, stride, extra, (1, 1), 0.0)[:, :, :out_hw[0],
                                                                    :out_hw[1]].sum((4, 5))

        def fn(x: np.ndarray) -> np.ndarray:
            win = _windows(x, kernel, stride, pads, (1, 1), 0.0)[:, :, :out_hw[0], :out_hw[1]]
            total = win.sum(axis=(4, 5))
            return total / (self.divisor if self.divisor else counts)
        return from_nchw(in_float(fn, self.x.type.dtype, x), self.layout)


@register_op
class AdaptiveAvgPool2dOp(Operation):
    """Average over adaptive windows so that the output's H, W is `size` (torch's bounds)."""

    name = "graph.adaptive_avg_pool2d"
    TRAITS = frozenset({Trait.ANCHOR, Trait.NCHW})
    ANCHOR = Anchor.POOL
    OPERANDS = ("x",)
    ATTRS = {"size": attr("ints"), "layout": LAYOUT_ATTR}

    def infer_types(self) -> list[TensorType]:
        x, layout = self.x.type, checked_layout(self)
        if x.rank != 4 or len(self.size) != 2:
            raise VerifyError(self, f"expected an {layout} input and a 2-entry size, got {x}, "
                                    f"{list(self.size)}")
        n, c = x.shape[0], x.shape[_TO_NCHW[layout][1]]
        return [x.with_shape(layout_shape(layout, n, c, self.size[0], self.size[1]))]

    def evaluate(self, ctx: EvalContext, x: np.ndarray) -> np.ndarray:
        x = to_nchw(x, self.layout)
        (h, w), (oh, ow) = x.shape[2:], self.size

        def fn(x: np.ndarray) -> np.ndarray:
            rows = []
            for i in range(oh):
                h0, h1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
                cols = [x[:, :, h0:h1, (j * w) // ow:math.ceil((j + 1) * w / ow)].mean((2, 3))
                        for j in range(ow)]
                rows.append(np.stack(cols, axis=-1))
            return np.stack(rows, axis=-2)
        return from_nchw(in_float(fn, self.x.type.dtype, x), self.layout)
