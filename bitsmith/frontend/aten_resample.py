"""Upsampling converters (nearest, nearest-exact, linear, bilinear, trilinear) composed from
index_select by constant index tables, as torch's CPU kernels compute them: nearest picks what
torch's own kernel picks (its float rounding and special cases differ between the 1-, 2- and
3-d overloads), linear weights the two neighbours with torch's f32 formulas, zero weights
multiplied as torch multiplies them (so an infinite neighbour gives NaN where torch's does).
The importer keeps these ops whole where torch's own decompositions compute otherwise."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConversionError
from ..ir import Value, graph
from ..ir import dtypes as dt
from .aten_more import _bin, _literal, _static
from .context import ImportContext, converts, plain_dtype

aten = torch.ops.aten

F32 = np.float32


def _scale_value(scale: float | None, size_in: int, size_out: int) -> np.float32:
    """torch's compute_scales_value<float>: 1/scale when given, else in/out, in f32."""
    if scale is not None and scale > 0:
        return F32(1.0 / scale)
    return F32(size_in) / F32(size_out)


def linear_table(size_in: int, size_out: int, scale: float | None, align_corners: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) per output index, as torch's compute_source_index_and_lambda (f32)."""
    dst = np.arange(size_out)
    if size_out == size_in:
        return dst, dst, np.ones(size_out, F32), np.zeros(size_out, F32)
    if align_corners:
        ratio = F32(size_in - 1) / F32(size_out - 1) if size_out > 1 else F32(0)
        real = ratio * dst.astype(F32)
    else:
        ratio = _scale_value(scale, size_in, size_out)
        real = ratio * (dst.astype(F32) + F32(0.5)) - F32(0.5)
        real = np.where(real < 0, F32(0), real)
    i0 = np.minimum(np.floor(real).astype(np.int64), size_in - 1)
    w1 = np.clip(real - i0.astype(F32), F32(0), F32(1)).astype(F32)
    i1 = i0 + (i0 < size_in - 1)
    return i0, i1, (F32(1) - w1).astype(F32), w1


def _sizes(ctx: ImportContext, x: Value) -> tuple[list[int], list[int]]:
    ins = [_static(d, "upsampling") for d in x.type.shape[2:]]
    return ins, [_static(d, "upsampling") for d in ctx.out_type().shape[2:]]


def _vec_scales(x: Value, output_size: Any, scales: Any) -> list[float | None]:
    """The .vec overloads' scales: the scale factors when they, not a size, were given."""
    if scales is None or output_size is not None:
        return [None] * (x.type.rank - 2)
    return [float(v) for v in scales]


def _linear_axes(ctx: ImportContext, x: Value, scales: list[float | None], align_corners: bool
                 ) -> Value:
    """Per axis, last first: x[.., i0, ..] * w0 + x[.., i1, ..] * w1, torch's nesting and
    products (a zero weight still multiplies: 0 * inf is NaN in torch as here)."""
    ins, outs = _sizes(ctx, x)
    dtype = plain_dtype(x.type)
    rank = x.type.rank
    for axis in reversed(range(2, rank)):
        i0, i1, w0, w1 = linear_table(ins[axis - 2], outs[axis - 2], scales[axis - 2],
                                      align_corners)
        shape = (outs[axis - 2],) + (1,) * (rank - 1 - axis)
        parts = []
        for index, weight in ((i0, w0), (i1, w1)):
            picked = ctx.value(graph.IndexSelectOp, x, _literal(ctx, index, dt.i64), axis=axis)
            parts.append(_bin(ctx, "mul", picked, _literal(ctx, weight.reshape(shape), dtype)))
        x = _bin(ctx, "add", parts[0], parts[1])
    return x


NEAREST = (aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
           aten.upsample_nearest1d.default, aten.upsample_nearest2d.default,
           aten.upsample_nearest3d.default, aten._upsample_nearest_exact1d.vec,
           aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec,
           aten._upsample_nearest_exact1d.default, aten._upsample_nearest_exact2d.default,
           aten._upsample_nearest_exact3d.default)
"""torch.export decomposes all but upsample_nearest2d.vec (and bilinear2d.vec) unless an
importer keeps them; each converts here all the same."""


def nearest_tables(op: Any, sizes: Sequence[int], args: Sequence[Any],
                   kwargs: dict[str, Any]) -> list[np.ndarray]:
    """The source index of each output index, per spatial axis, as torch's own kernel for `op`
    picks it: the op run on a ramp along that axis (its float rounding and special cases, such
    as 2-d's exact copy and halving, differ between the overloads)."""
    tables = []
    for axis, n in enumerate(sizes):
        view = [1] * len(sizes)
        view[axis] = n
        ramp = torch.arange(n, dtype=torch.float32).view(1, 1, *view).expand(1, 1, *sizes)
        with torch.no_grad():
            out = op(ramp.contiguous(), *args, **kwargs)
        at = (0, 0, *(slice(None) if a == axis else 0 for a in range(len(sizes))))
        tables.append(out[at].numpy().astype(np.int64))
    return tables


@converts(*NEAREST)
def convert_upsample_nearest(ctx: ImportContext, x: Value, *args: Any, **kwargs: Any) -> Value:
    """index_select along each spatial axis by a constant table (nearest_tables)."""
    ins, outs = _sizes(ctx, x)
    if any(n >= 1 << 24 for n in ins):
        raise ConversionError(f"nearest upsampling of a dim of {max(ins)} (a float ramp "
                              "indexes it: at most 2**24)")
    for axis, table in enumerate(nearest_tables(ctx.current.target, ins, args, kwargs),
                                 start=2):
        if table.shape != (outs[axis - 2],):
            raise ConversionError(f"nearest upsampling: torch gives {table.shape[0]} outputs "
                                  f"along axis {axis}, the export {outs[axis - 2]}")
        if not np.array_equal(table, np.arange(ins[axis - 2])):
            x = ctx.value(graph.IndexSelectOp, x, _literal(ctx, table, dt.i64), axis=axis)
    return x


@converts(aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec,
          aten.upsample_trilinear3d.vec)
def convert_upsample_linear(ctx: ImportContext, x: Value, output_size: Any = None,
                            align_corners: bool = False, scales: Any = None) -> Value:
    return _linear_axes(ctx, x, _vec_scales(x, output_size, scales), align_corners)


@converts(aten.upsample_bilinear2d.default)
def convert_upsample_bilinear2d(ctx: ImportContext, x: Value, output_size: Any,
                                align_corners: bool, scales_h: float | None = None,
                                scales_w: float | None = None) -> Value:
    return _linear_axes(ctx, x, [scales_h, scales_w], align_corners)
