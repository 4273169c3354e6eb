"""ATen converters for contractions, normalizations, pooling, reductions and attention."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConversionError
from ..ir import Value, graph
from .context import ImportContext, converts, ir_dtype, plain_dtype

aten = torch.ops.aten


@converts(aten.linear.default)
def convert_linear(ctx: ImportContext, x: Value, weight: Value, bias: Value | None = None
                   ) -> Value:
    return ctx.value(graph.LinearOp, x, weight, bias)


@converts(aten.mm.default, aten.bmm.default, aten.matmul.default)
def convert_matmul(ctx: ImportContext, a: Value, b: Value) -> Value:
    return ctx.value(graph.MatmulOp, a, b)


@converts(aten.addmm.default, aten.baddbmm.default)
def convert_addmm(ctx: ImportContext, bias: Value, a: Value, b: Value, beta: Any = 1,
                  alpha: Any = 1) -> Value:
    """beta * bias + alpha * (a @ b)."""
    dtype = ctx.out_dtype()
    product = ctx.value(graph.MatmulOp, a, b)
    if alpha != 1:
        product = ctx.value(graph.BINARY_OPS["mul"], product, ctx.scalar(alpha, dtype))
    if beta == 0:
        return product
    if beta != 1:
        bias = ctx.value(graph.BINARY_OPS["mul"], bias, ctx.scalar(beta, dtype))
    return ctx.value(graph.BINARY_OPS["add"], product, bias)


@converts(aten.convolution.default, aten.conv2d.default)
def convert_convolution(ctx: ImportContext, x: Value, weight: Value, bias: Value | None = None,
                        stride: Sequence[int] = (1, 1), padding: Any = (0, 0),
                        dilation: Sequence[int] = (1, 1), *rest: Any) -> Value:
    transposed, groups = (rest[0], rest[2]) if len(rest) == 3 else (False, rest[0] if rest
                                                                      else 1)
    if transposed:
        raise ConversionError("transposed convolution")
    if x.type.rank != 4:
        raise ConversionError(f"{x.type.rank - 2}-d convolution (only 2-d is supported)")
    if isinstance(padding, str):
        raise ConversionError(f"padding='{padding}'")
    return ctx.value(graph.Conv2dOp, x, weight, bias, stride=_two(stride), padding=_two(padding),
                     dilation=_two(dilation), groups=groups)


def _two(values: Sequence[int] | int) -> tuple[int, int]:
    vals = [values] if isinstance(values, int) else list(values)
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


@converts(aten._native_batch_norm_legit_no_training.default)
def convert_batch_norm(ctx: ImportContext, x: Value, weight: Value | None, bias: Value | None,
                       mean: Value, var: Value, momentum: float, eps: float) -> tuple:
    if weight is None and bias is not None:
        raise ConversionError("batch norm with a bias but no weight")
    out = ctx.value(graph.BatchNormOp, x, mean, var, weight, bias, eps=eps)
    return out, None, None


@converts(aten.native_layer_norm.default)
def convert_native_layer_norm(ctx: ImportContext, x: Value, shape: Sequence[int],
                              weight: Value | None, bias: Value | None, eps: float) -> tuple:
    return convert_layer_norm(ctx, x, shape, weight, bias, eps), None, None


@converts(aten.layer_norm.default)
def convert_layer_norm(ctx: ImportContext, x: Value, shape: Sequence[int],
                       weight: Value | None = None, bias: Value | None = None,
                       eps: float = 1e-5, *rest: Any) -> Value:
    if weight is None and bias is not None:
        raise ConversionError("layer norm with a bias but no weight")
    return ctx.value(graph.LayerNormOp, x, weight, bias, ndim=len(shape), eps=eps)


@converts(aten.rms_norm.default)
def convert_rms_norm(ctx: ImportContext, x: Value, shape: Sequence[int],
                     weight: Value | None = None, eps: float | None = None) -> Value:
    if eps is None:
        eps = float(torch.finfo(torch.float32).eps)  # torch's default for f32 inputs
    return ctx.value(graph.RmsNormOp, x, weight, ndim=len(shape), eps=eps)


@converts(aten._softmax.default, aten.softmax.int)
def convert_softmax(ctx: ImportContext, x: Value, dim: int, *rest: Any) -> Value:
    out = ctx.value(graph.SoftmaxOp, x, axis=dim % max(x.type.rank, 1))
    return ctx.cast(out, ctx.out_dtype())


@converts(aten._log_softmax.default, aten.log_softmax.int)
def convert_log_softmax(ctx: ImportContext, x: Value, dim: int, *rest: Any) -> Value:
    out = ctx.value(graph.LogSoftmaxOp, x, axis=dim % max(x.type.rank, 1))
    return ctx.cast(out, ctx.out_dtype())


@converts(aten.max_pool2d_with_indices.default, aten.max_pool2d.default)
def convert_max_pool(ctx: ImportContext, x: Value, kernel: Sequence[int],
                     stride: Sequence[int] = (), padding: Any = 0, dilation: Any = 1,
                     ceil_mode: bool = False) -> Any:
    out = ctx.value(graph.MaxPool2dOp, x, kernel=_two(kernel),
                    stride=_two(stride or kernel), padding=_two(padding),
                    dilation=_two(dilation), ceil_mode=ceil_mode)
    if isinstance(ctx.current.meta.get("val"), (tuple, list)):
        return out, None  # the indices output is only for training
    return out


@converts(aten.avg_pool2d.default)
def convert_avg_pool(ctx: ImportContext, x: Value, kernel: Sequence[int],
                     stride: Sequence[int] = (), padding: Any = 0, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: int | None = None
                     ) -> Value:
    return ctx.value(graph.AvgPool2dOp, x, kernel=_two(kernel), stride=_two(stride or kernel),
                     padding=_two(padding), ceil_mode=ceil_mode,
                     count_include_pad=count_include_pad, divisor=divisor_override)


@converts(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def convert_adaptive_avg_pool(ctx: ImportContext, x: Value, size: Sequence[int]) -> Value:
    return ctx.value(graph.AdaptiveAvgPool2dOp, x, size=_two(size))


def _axes(x: Value, dims: Any) -> tuple[int, ...]:
    if dims is None:
        return ()
    dims = [dims] if isinstance(dims, int) else list(dims)
    return tuple(sorted(d % max(x.type.rank, 1) for d in dims))


def _reduce(name: str) -> Any:
    cls = {"sum": graph.ReduceSumOp, "mean": graph.ReduceMeanOp, "max": graph.ReduceMaxOp,
           "min": graph.ReduceMinOp, "prod": graph.ReduceProdOp, "any": graph.ReduceAnyOp,
           "all": graph.ReduceAllOp}[name]

    def convert(ctx: ImportContext, x: Value, dims: Any = None, keepdim: bool = False,
                **kwargs: Any) -> Value:
        dtype = ctx.out_dtype()
        x = ctx.cast(x, dtype) if name not in ("any", "all") else x
        return ctx.value(cls, x, axes=_axes(x, dims), keepdim=keepdim)
    return convert


for _targets, _name in (
        ((aten.sum.dim_IntList, aten.sum.default), "sum"),
        ((aten.mean.dim, aten.mean.default), "mean"),
        ((aten.amax.default,), "max"), ((aten.amin.default,), "min"),
        ((aten.prod.dim_int, aten.prod.default), "prod"),
        ((aten.any.dim, aten.any.dims, aten.any.default), "any"),
        ((aten.all.dim, aten.all.default), "all")):
    converts(*_targets)(_reduce(_name))


@converts(aten.max.dim, aten.min.dim)
def convert_max_dim(ctx: ImportContext, x: Value, dim: int, keepdim: bool = False) -> tuple:
    is_max = ctx.current.target is aten.max.dim
    axis = dim % max(x.type.rank, 1)
    values = ctx.value(graph.ReduceMaxOp if is_max else graph.ReduceMinOp, x, axes=(axis,),
                       keepdim=keepdim)
    index = ctx.value(graph.ArgMaxOp if is_max else graph.ArgMinOp, x, axis=axis,
                      keepdim=keepdim)
    return values, index


@converts(aten.argmax.default, aten.argmin.default)
def convert_argmax(ctx: ImportContext, x: Value, dim: int | None = None, keepdim: bool = False
                   ) -> Value:
    cls = graph.ArgMaxOp if ctx.current.target is aten.argmax.default else graph.ArgMinOp
    if dim is None:
        flat = ctx.reshape(x, x.type.with_shape((x.type.numel(),)))
        return ctx.reshape(ctx.value(cls, flat, axis=0), ctx.out_type())
    return ctx.value(cls, x, axis=dim % max(x.type.rank, 1), keepdim=keepdim)


@converts(aten.cumsum.default)
def convert_cumsum(ctx: ImportContext, x: Value, dim: int, dtype: Any = None) -> Value:
    x = ctx.cast(x, ctx.out_dtype())
    return ctx.value(graph.CumsumOp, x, axis=dim % max(x.type.rank, 1))


@converts(aten.scaled_dot_product_attention.default)
def convert_sdpa(ctx: ImportContext, q: Value, k: Value, v: Value, attn_mask: Value | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> Value:
    return _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@converts(aten._scaled_dot_product_flash_attention_for_cpu.default)
def convert_flash_cpu(ctx: ImportContext, q: Value, k: Value, v: Value, dropout_p: float = 0.0,
                      is_causal: bool = False, *, attn_mask: Value | None = None,
                      scale: float | None = None) -> tuple:
    return _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, False), None


def _attention(ctx: ImportContext, q: Value, k: Value, v: Value, mask: Value | None,
               dropout_p: float, is_causal: bool, scale: float | None, gqa: bool) -> Value:
    if dropout_p:
        raise ConversionError(f"attention dropout p={dropout_p} (call model.eval() first)")
    if mask is not None and mask.type.dtype not in (q.type.dtype, ir_dtype(torch.bool)):
        mask = ctx.cast(mask, plain_dtype(q.type))
    gqa = gqa or (q.type.rank >= 3 and q.type.shape[-3] != k.type.shape[-3])
    return ctx.value(graph.AttentionOp, q, k, v, mask, is_causal=is_causal, scale=scale, gqa=gqa)
