"""ATen converters: elementwise math, comparisons, casts, no-ops and tensor factories."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConversionError
from ..ir import Value, graph
from ..ir import dtypes as dt
from ..ir.types import TensorType
from .context import TORCH_DTYPES, ImportContext, converts, ir_dtype, plain_dtype

aten = torch.ops.aten
_TO_TORCH = {v: k for k, v in TORCH_DTYPES.items() if k is not torch.float64}


def promoted(*operands: Any) -> dt.DType:
    """torch's result_type over Values (by dtype and rank) and Python scalars."""
    probes: list[Any] = []
    for x in operands:
        if isinstance(x, Value):
            shape = () if x.type.rank == 0 else (1,)
            probes.append(torch.empty(shape, dtype=_TO_TORCH[plain_dtype(x.type)]))
        else:
            probes.append(x)
    result = probes[0] if len(probes) == 1 else torch.result_type(probes[0], probes[1])
    for extra in probes[2:]:
        result = torch.result_type(torch.empty((1,), dtype=result), extra)
    return ir_dtype(result if isinstance(result, torch.dtype) else result.dtype)


# ---- unary ---------------------------------------------------------------------------------
_UNARY = {
    aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp",
    aten.log.default: "log", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
    aten.reciprocal.default: "reciprocal", aten.sin.default: "sin", aten.cos.default: "cos",
    aten.tanh.default: "tanh", aten.erf.default: "erf", aten.sigmoid.default: "sigmoid",
    aten.relu.default: "relu", aten.silu.default: "silu", aten.floor.default: "floor",
    aten.ceil.default: "ceil", aten.round.default: "round", aten.sign.default: "sign",
    aten.logical_not.default: "logical_not",
}


def _unary(name: str) -> Any:
    def convert(ctx: ImportContext, x: Value) -> Value:
        return ctx.value(graph.UNARY_OPS[name], ctx.cast(x, ctx.out_dtype()))
    return convert


for _target, _name in _UNARY.items():
    converts(_target)(_unary(_name))


@converts(aten.bitwise_not.default)
def convert_bitwise_not(ctx: ImportContext, x: Value) -> Value:
    if x.type.dtype != dt.boolean:
        raise ConversionError(f"bitwise_not of {x.type.dtype} (only bool is supported)")
    return ctx.value(graph.UNARY_OPS["logical_not"], x)


@converts(aten.gelu.default)
def convert_gelu(ctx: ImportContext, x: Value, approximate: str = "none") -> Value:
    return ctx.value(graph.GeluOp, x, approximate=approximate)


@converts(aten.clamp.default)
def convert_clamp(ctx: ImportContext, x: Value, min: Any = None, max: Any = None) -> Value:
    """torch.clamp: an absent bound is no bound (hardtanh's -1/1 defaults are its own)."""
    return ctx.value(graph.ClampOp, x, min=min, max=max)


@converts(aten.hardtanh.default)
def convert_hardtanh(ctx: ImportContext, x: Value, min_val: Any = -1.0,
                     max_val: Any = 1.0) -> Value:
    return ctx.value(graph.ClampOp, x, min=min_val, max=max_val)


@converts(aten.clamp_min.default)
def convert_clamp_min(ctx: ImportContext, x: Value, min: Any) -> Value:
    return ctx.value(graph.ClampOp, x, min=min)


@converts(aten.clamp_max.default)
def convert_clamp_max(ctx: ImportContext, x: Value, max: Any) -> Value:
    return ctx.value(graph.ClampOp, x, max=max)


# ---- binary --------------------------------------------------------------------------------
def _binary(ctx: ImportContext, name: str, a: Any, b: Any, dtype: dt.DType | None = None) -> Value:
    dtype = dtype or ctx.out_dtype()
    return ctx.value(graph.BINARY_OPS[name], ctx.as_tensor(a, dtype), ctx.as_tensor(b, dtype))


def _scaled(ctx: ImportContext, b: Any, alpha: Any, dtype: dt.DType) -> Any:
    if alpha == 1:
        return b
    if not isinstance(b, Value):
        return b * alpha
    return ctx.value(graph.BINARY_OPS["mul"], ctx.cast(b, dtype), ctx.scalar(alpha, dtype))


@converts(aten.pow.Tensor_Scalar)
def convert_pow_scalar(ctx: ImportContext, x: Value, exponent: Any) -> Value:
    """x ** c. torch's CPU kernel computes the exponents 2, 3, -1, -2, 0.5 and -0.5 of a float
    tensor as x*x, x*x*x, 1/x, 1/(x*x), sqrt and rsqrt (not pow): so does this, bit for bit."""
    dtype = ctx.out_dtype()
    if not dtype.is_float or exponent not in (2, 3, -1, -2, 0.5, -0.5):
        return _binary(ctx, "pow", x, exponent, dtype)
    x = ctx.cast(x, dtype)
    if exponent in (0.5, -0.5):
        return ctx.value(graph.UNARY_OPS["sqrt" if exponent > 0 else "rsqrt"], x)
    square = ctx.value(graph.BINARY_OPS["mul"], x, x)
    power = {2: square, -2: square, -1: x}.get(exponent) or ctx.value(
        graph.BINARY_OPS["mul"], square, x)
    return power if exponent > 0 else ctx.value(graph.UNARY_OPS["reciprocal"], power)


@converts(aten.add.Tensor, aten.add.Scalar)
def convert_add(ctx: ImportContext, a: Any, b: Any, alpha: Any = 1) -> Value:
    dtype = ctx.out_dtype()
    return _binary(ctx, "add", a, _scaled(ctx, b, alpha, dtype), dtype)


@converts(aten.sub.Tensor, aten.sub.Scalar)
def convert_sub(ctx: ImportContext, a: Any, b: Any, alpha: Any = 1) -> Value:
    dtype = ctx.out_dtype()
    return _binary(ctx, "sub", a, _scaled(ctx, b, alpha, dtype), dtype)


@converts(aten.rsub.Scalar, aten.rsub.Tensor)
def convert_rsub(ctx: ImportContext, a: Any, b: Any, alpha: Any = 1) -> Value:
    dtype = ctx.out_dtype()
    return _binary(ctx, "sub", b, _scaled(ctx, a, alpha, dtype), dtype)


@converts(aten.div.Tensor_mode, aten.div.Scalar_mode)
def convert_div_mode(ctx: ImportContext, a: Any, b: Any, rounding_mode: str | None = None
                     ) -> Value:
    dtype = ctx.out_dtype()
    if rounding_mode is None:
        return _binary(ctx, "div", a, b, dtype)
    if rounding_mode == "floor":
        return _binary(ctx, "floor_div", a, b, dtype)
    quotient = _binary(ctx, "div", a, b, dtype)
    if dtype.is_float:
        return _trunc(ctx, quotient)
    return quotient


def _trunc(ctx: ImportContext, x: Value) -> Value:
    """trunc(x) = sign(x) * floor(|x|)."""
    floor = ctx.value(graph.UNARY_OPS["floor"], ctx.value(graph.UNARY_OPS["abs"], x))
    return ctx.value(graph.BINARY_OPS["mul"], ctx.value(graph.UNARY_OPS["sign"], x), floor)


_SIMPLE_BINARY = {
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div",
    aten.div.Scalar: "div", aten.pow.Tensor_Tensor: "pow",
    aten.pow.Scalar: "pow", aten.maximum.default: "maximum", aten.minimum.default: "minimum",
    aten.remainder.Tensor: "remainder", aten.remainder.Scalar: "remainder",
    aten.floor_divide.default: "floor_div", aten.logical_and.default: "logical_and",
    aten.logical_or.default: "logical_or", aten.bitwise_and.Tensor: "logical_and",
    aten.bitwise_or.Tensor: "logical_or",
}

_COMPARE = {
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
    aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
    aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge",
}


def _simple(name: str) -> Any:
    def convert(ctx: ImportContext, a: Any, b: Any) -> Value:
        dtype = ctx.out_dtype()
        if name in ("logical_and", "logical_or") and dtype != dt.boolean:
            raise ConversionError(f"bitwise {name} of {dtype} (only bool is supported)")
        return _binary(ctx, name, a, b, dtype)
    return convert


def _compare(name: str) -> Any:
    def convert(ctx: ImportContext, a: Any, b: Any) -> Value:
        return _binary(ctx, name, a, b, promoted(a, b))
    return convert


for _target, _name in _SIMPLE_BINARY.items():
    converts(_target)(_simple(_name))
for _target, _name in _COMPARE.items():
    converts(_target)(_compare(_name))


@converts(aten.isnan.default)
def convert_isnan(ctx: ImportContext, x: Value) -> Value:
    """x != x: true exactly for NaN (an unordered compare in every backend)."""
    return _binary(ctx, "ne", x, x, plain_dtype(x.type))


@converts(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def convert_where(ctx: ImportContext, cond: Value, a: Any, b: Any) -> Value:
    dtype = ctx.out_dtype()
    return ctx.value(graph.WhereOp, ctx.cast(cond, dt.boolean), ctx.as_tensor(a, dtype),
                     ctx.as_tensor(b, dtype))


@converts(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def convert_masked_fill(ctx: ImportContext, x: Value, mask: Value, value: Any) -> Value:
    dtype = plain_dtype(x.type)
    return ctx.value(graph.WhereOp, ctx.cast(mask, dt.boolean), ctx.as_tensor(value, dtype), x)


# ---- casts and no-ops ----------------------------------------------------------------------
@converts(aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default)
def convert_to(ctx: ImportContext, x: Value, *args: Any, **kwargs: Any) -> Value:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        raise ConversionError(f"copy to device {device}")
    return ctx.cast(x, ctx.out_dtype())


@converts(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default,
          aten.contiguous.default, aten.detach.default, aten.lift_fresh.default)
def convert_identity(ctx: ImportContext, x: Value, *args: Any, **kwargs: Any) -> Value:
    return x


@converts(aten.dropout.default, aten.native_dropout.default)
def convert_dropout(ctx: ImportContext, x: Value, p: float = 0.5, train: bool | None = False
                    ) -> Any:
    if train and p > 0:
        raise ConversionError("dropout in training mode (call model.eval() first)")
    return x


@converts(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
          aten.sym_constrain_range_for_size.default, aten._assert_async.msg)
def convert_assertion(ctx: ImportContext, *args: Any, **kwargs: Any) -> None:
    return None  # shape/dtype checks torch already proved at export time


# ---- factories -----------------------------------------------------------------------------
def _fill(ctx: ImportContext, value: Any) -> Value:
    type = ctx.out_type()
    return ctx.value(graph.FullOp, result_types=[type], value=_number(value, type))


def _number(value: Any, type: TensorType) -> Any:
    if isinstance(value, Value):
        raise ConversionError("a fill value that is a tensor")
    if type.dtype == dt.boolean:
        return bool(value)
    return float(value) if plain_dtype(type).is_float else int(value)


@converts(aten.full.default, aten.full_like.default)
def convert_full(ctx: ImportContext, size_or_x: Any, value: Any, **kwargs: Any) -> Value:
    return _fill(ctx, value)


@converts(aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
def convert_zeros(ctx: ImportContext, *args: Any, **kwargs: Any) -> Value:
    return _fill(ctx, 0)


@converts(aten.ones.default, aten.ones_like.default, aten.new_ones.default)
def convert_ones(ctx: ImportContext, *args: Any, **kwargs: Any) -> Value:
    return _fill(ctx, 1)


@converts(aten.scalar_tensor.default)
def convert_scalar_tensor(ctx: ImportContext, value: Any, **kwargs: Any) -> Value:
    return _fill(ctx, value)


@converts(aten.arange.default, aten.arange.start, aten.arange.start_step)
def convert_arange(ctx: ImportContext, *args: Any, **kwargs: Any) -> Value:
    numbers = [a for a in args if not isinstance(a, Value)]
    start, step = (0, 1) if len(numbers) == 1 else (numbers[0], numbers[2] if len(numbers) > 2
                                                     else 1)
    type = ctx.out_type()
    if any(not isinstance(v, (int, float)) for v in (start, step)):
        raise ConversionError("arange with a symbolic start or step")
    return ctx.value(graph.ArangeOp, result_types=[type], start=start, step=step)
