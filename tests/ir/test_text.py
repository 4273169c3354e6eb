"""Printer and parser: exact round trips (also under hypothesis) and line:col errors."""
import math
from typing import ClassVar

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import GroupAxis, QuantType, TensorType, ZeroPoint, symbol

from .helpers import mlp_module


@ir.register_op
class AnyAttrsOp(ir.Operation):
    """Test-only op: carries arbitrary attributes and any result type."""

    name = "test.any_attrs"
    OPERANDS = ("*inputs",)
    ATTRS: ClassVar = {"a": ir.attr("any", None, optional=True),
                       "b": ir.attr("any", None, optional=True)}
    RESULT_TYPES_GIVEN = True


def roundtrip(module: ir.Module) -> str:
    text = str(module)
    again = ir.parse(text, weights=module.weights)
    assert str(again) == text
    return text


def test_mlp_round_trip_and_interpreter_agree() -> None:
    module = mlp_module()
    text = roundtrip(module)
    assert 'loc("fc")' in text and "tensor<(2*B)xf32>" in text and "%3:2 = " in text
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    again = ir.parse(text, weights=module.weights)
    for a, b in zip(ir.interpret(module, x), ir.interpret(again, x), strict=True):
        np.testing.assert_array_equal(a, b)


# ---- hypothesis: dtypes x shapes x attributes ------------------------------------------------
def _low_floats() -> list[str]:
    return [f"f{1 + e + m}e{e}m{m}" for e in range(1, 8) for m in range(0, 8)
            if 3 <= 1 + e + m <= 8]


DTYPE_NAMES = (["f32", "f16", "bf16", "bool"] + [f"i{w}" for w in range(1, 65)]
               + [f"u{w}" for w in range(1, 65)] + _low_floats())
SYMS = [symbol(n) for n in ("B", "S", "N2", "SEQ_LEN")]


@st.composite
def dims(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["int", "sym", "expr"]))
    if kind == "int":
        return draw(st.integers(0, 4096))
    sym = draw(st.sampled_from(SYMS))
    if kind == "sym":
        return sym
    return draw(st.integers(2, 9)) * sym + draw(st.integers(0, 3)) * draw(st.sampled_from(SYMS))


@st.composite
def element_types(draw: st.DrawFn) -> object:
    if draw(st.booleans()):
        return dtypes.parse_dtype(draw(st.sampled_from(DTYPE_NAMES)))
    storage = draw(st.sampled_from([f"i{w}" for w in range(1, 9)] + [f"u{w}" for w in
                                                                     range(1, 9)]
                                   + ["f4e2m1", "f6e3m2", "f6e2m3", "f8e4m3"]))
    storage_t = dtypes.parse_dtype(storage)
    zps = [ZeroPoint.NONE, ZeroPoint.FLOAT] + ([ZeroPoint.INT] if storage_t.is_int else [])
    return QuantType(storage_t, draw(st.sampled_from([0, 32, 64, 128])),
                     draw(st.sampled_from(list(GroupAxis))),
                     dtypes.parse_dtype(draw(st.sampled_from(["f16", "bf16", "f32"]))),
                     draw(st.sampled_from(zps)))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.text(max_size=12), st.sampled_from(DTYPE_NAMES).map(dtypes.parse_dtype))
attributes = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4).map(tuple),
                          max_leaves=8)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a)
                                                       == math.copysign(1, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(dims(), max_size=4), dtype=element_types(), a=attributes, b=attributes)
def test_print_parse_round_trip(shape: list, dtype: object, a: object, b: object) -> None:
    assume(a is not None or b is not None)
    type = TensorType(tuple(shape), dtype)
    module = ir.Module("prop", [type], ["x"])
    builder = ir.Builder.at_end(module.body)
    op = builder.create(AnyAttrsOp, module.inputs[0], result_types=[type], a=a, b=b,
                        loc="some.where")
    builder.create(ReturnOp, op.result)
    text = roundtrip(module)
    parsed = ir.parse(text).ops[0]
    assert _same(parsed.attributes["a"], op.attributes["a"])
    assert _same(parsed.attributes["b"], op.attributes["b"])
    assert parsed.result.type.same_as(type)


def test_dense_literal_round_trip_is_bit_exact() -> None:
    values = np.array([0.1, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38], np.float32)
    type = TensorType((7,), dtypes.f32)
    module = ir.Module("d", [])
    b = ir.Builder.at_end(module.body)
    c = b.value(graph.ConstantOp, result_types=[type], value=ir.DenseAttr(type, values))
    b.create(ReturnOp, c)
    text = roundtrip(module)
    (out,) = ir.interpret(ir.parse(text))
    assert out.tobytes() == values.tobytes()


def test_symbolic_expression_dims_print_in_parentheses() -> None:
    B = symbol("B")
    t = TensorType((B, 3 * B + 1, symbol("s0")), dtypes.f32)
    assert str(t) == "tensor<Bx(3*B + 1)x(s0)xf32>"
    module = ir.Module("s", [t], ["x"])
    ir.Builder.at_end(module.body).create(ReturnOp, module.inputs[0])
    parsed = ir.parse(roundtrip(module))
    assert parsed.inputs[0].type.shape[1] - 3 * B == 1
    assert isinstance(parsed.inputs[0].type.shape[0], sympy.Symbol)


# ---- parse errors ---------------------------------------------------------------------------
GOOD = str(mlp_module())


@pytest.mark.parametrize("old, new, where, message", [
    ("tensor<3x4xf32> loc", "tensor<3x4xf33> loc", "3:", "unknown dtype 'f33'"),
    ('"graph.relu"', '"graph.relux"', "5:", r"unknown op 'graph.relux'; did you mean graph.relu"),
    ("(%1)", "(%9)", "5:", r"use of undefined value %9"),
    ("{axis = 1, sizes = [1, 2]}", "{axis = 1, sizes = [1, 2}", "6:",
     r"expected '\]' or ','"),
    ("{axis = 1, sizes = [1, 2]}", "{axis = 1, sizes = [1, 2], bogus = 3}", "6:",
     r"'graph.split' has no attribute\(s\) \['bogus'\]"),
    ('-> tensor<Bx3xf32> loc("act")', '-> tensor<Bx3xf32 loc("act")', "5:", r"expected '>'"),
    ("(%x, %0) : (tensor<Bx4xf32>", "(%x, %0) : (tensor<Bx5xf32>", "4:",
     r"operand type mismatch: value has type tensor<Bx4xf32>, signature says tensor<Bx5xf32>"),
    ("%2 = ", "%1 = ", "5:", r"redefinition of value %1"),
])
def test_parse_errors_say_where_and_what(old: str, new: str, where: str, message: str) -> None:
    assert old in GOOD
    bad = GOOD.replace(old, new, 1)
    with pytest.raises(ir.ParseError, match=message) as info:
        ir.parse(bad)
    assert str(info.value).startswith(where)
    assert info.value.line == int(where[:-1]) and info.value.col >= 1


def test_parse_error_points_at_the_column() -> None:
    with pytest.raises(ir.ParseError) as info:
        ir.parse("module @m {\n  func.func @main() -> () {\n    %0 = \"graph.full\"() "
                 "{value = 1.0} : () -> tensor<2xq32>\n  }\n}\n")
    err = info.value
    assert (err.line, err.col) == (3, 56)
    assert "^" in str(err) and "tensor<2xq32>" in str(err)


def test_parse_then_verify_reports_type_errors() -> None:
    text = ("module @m {\n  func.func @main(%x: tensor<2x3xf32>) -> (tensor<2x5xf32>) {\n"
            '    %0 = "graph.reduce_sum"(%x) {axes = [1], keepdim = true} : (tensor<2x3xf32>) '
            '-> tensor<2x5xf32> loc("head")\n'
            '    "func.return"(%0) : (tensor<2x5xf32>) -> ()\n  }\n}\n')
    with pytest.raises(ir.VerifyError, match=r"'graph.reduce_sum' op at head: result type "
                                             r"mismatch: inferred \(tensor<2x1xf32>\), got "
                                             r"\(tensor<2x5xf32>\)"):
        ir.parse(text)
