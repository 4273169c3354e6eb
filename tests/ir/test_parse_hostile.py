"""IR text is data: hostile text is a ParseError (line:col), never code that runs or a hang.

- Dims that were Python for `sympy.parse_expr` (a shell command, a lambda, attribute access,
  `9**9**9`) and text built to exhaust the parser (literals of 5,000 digits, nesting 10,000
  deep, rank 10,000, dims that sympy.simplify would chew on for minutes) fail with
  ParseError in a child process, which must finish, and whose shell commands would leave a
  marker file. An op whose own checks crash on the text's attributes is an error too.
- Fuzzing: printed modules (symbolic dims, floor division, quantized types, a kernel region)
  mutated by deleting, inserting, replacing and duplicating characters, tokens and spans,
  and spliced together, parse to a Module (which prints back stably), or fail as ParseError
  with a line and column (a module breaking an IR rule too: TextVerifyError, at the op);
  nothing else escapes.
- Every kind of symbolic dim the importer produces prints and parses back to the same text.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith import ir
from bitsmith.errors import ShapeError
from bitsmith.ir import Builder, Module, TensorType, graph
from bitsmith.ir.dialects import func, quant
from bitsmith.ir.dimexpr import floor_div
from bitsmith.ir.dtypes import IntType, f16, f32
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint, format_dim, make_dim, symbol

from .helpers import mlp_module

B, S = symbol("B"), symbol("S")


def identity_module(type_text: str) -> str:
    """A module that returns its input of type `type_text` (the type sits on line 2)."""
    return (f"module @m {{\n  func.func @main(%x: {type_text}) -> ({type_text}) {{\n"
            f'    "func.return"(%x) : ({type_text}) -> ()\n  }}\n}}\n')


def op_module(op_text: str) -> str:
    """A module whose body holds `op_text` on line 3."""
    return (f"module @m {{\n  func.func @main() -> () {{\n    {op_text}\n"
            '    "func.return"() : () -> ()\n  }\n}\n')


def dim_case(type_text: str, message: str) -> tuple[str, str, str, int]:
    """A module whose input has type `type_text`: the error is on line 2."""
    return "parse", identity_module(type_text), message, 2


def op_case(op_text: str, message: str) -> tuple[str, str, str, int]:
    """A module holding the op `op_text`: the error is on line 3."""
    return "parse", op_module(op_text), message, 3


def hostile_cases(marker: Path) -> dict[str, tuple[str, str, str, int]]:
    """name: (what to call, text, what the error must say, the line it must point at)."""
    shell = f"__import__('os').system('touch {marker}')"
    deep = 10_000
    region = '%0 = "kernel.fused"() ({\n ^bb0():\n'
    full = '%0 = "graph.full"() {{value = {}}} : () -> tensor<2xf32>'
    return {
        "shell": dim_case(f"tensor<({shell})x4xf32>", "unknown function '__import__'"),
        "eval": dim_case(f'tensor<(eval("{shell}"))x4xf32>', "unknown function 'eval'"),
        "lambda": dim_case(f"tensor<((lambda: {shell})())x4xf32>", "expected '\\)'"),
        "attribute": dim_case("tensor<(S.__class__.__mro__)x4xf32>", "expected '\\)'"),
        "subclasses": dim_case("tensor<(().__class__.__subclasses__())xf32>",
                               "expected a number, a symbol or '\\('"),
        "power_tower": dim_case("tensor<(9**9**9)x4xf32>", "chained '\\*\\*'"),
        "big_power": dim_case("tensor<(S**99999)x4xf32>", "exponent 99999 is out of range"),
        "folded_power": dim_case("tensor<(((2*S)**16)**16)x4xf32>", "larger than 2\\*\\*62"),
        "huge_static_dim": dim_case(f"tensor<{'9' * 5000}x4xf32>", "out of range"),
        "dim_over_2_62": dim_case(f"tensor<{2**62 + 1}xf32>", "out of range"),
        "huge_dim_literal": dim_case(f"tensor<({'9' * 5000}*S)xf32>", "out of range"),
        "deep_parens": dim_case(f"tensor<{'(' * deep}S{')' * deep}xf32>",
                                "nested deeper than 32"),
        "deep_minus": dim_case(f"tensor<({'-' * deep}S)xf32>", "nested deeper than 32"),
        "long_dim": dim_case(f"tensor<({' + '.join(['S'] * 2000)})xf32>", "longer than 512"),
        "zero_division": dim_case("tensor<(S//(S - S))xf32>", "division by zero"),
        "absurd_rank": dim_case(f"tensor<{'1x' * deep}f32>", "rank above 64"),
        # what sympy.simplify (make_dim, the verifier) could not finish in minutes
        "expanded_product": dim_case(f"tensor<({'*'.join(f'(S{i} + 1)' for i in range(9))})"
                                     "xf32>", "expands to more than 64 terms"),
        "shape_product": dim_case(f"tensor<{'x'.join(f'(S{i} + 1)' for i in range(9))}xf32>",
                                  "the product of its dims expands to more than 64 terms"),
        "nested_floors": dim_case(f"tensor<({'floor(' * 11}S{'/2)' * 11})xf32>",
                                  "nested 5 deep"),
        "wide_max": dim_case(f"tensor<(Max({', '.join(f'S{i}' for i in range(30))}))xf32>",
                             "Max takes 2 to 4 argument"),
        "deep_attribute": op_case(full.format("[" * deep + "1.0" + "]" * deep),
                                  "attribute lists nested deeper than 64"),
        "huge_attribute": op_case(full.format("9" * 5000), "out of range"),
        "attribute_over_64_bits": op_case(full.format(2**64), "out of range"),
        "result_count": op_case(full.replace("%0", "%0:" + "9" * 5000).format(1),
                                "result count 9+\\.\\.\\. is out of range"),
        "dense_overflow": op_case('%0 = "graph.constant"() {value = dense<tensor<1xi8> [300]>}'
                                  " : () -> tensor<1xi8>", "bad dense literal"),
        "deep_regions": ("parse", op_module(region * deep), "regions nested deeper than 64",
                         3 + 2 * 64),
        "no_return": ("parse", op_module(full.format(1)).replace(
            '    "func.return"() : () -> ()\n', ""),
            "expected the body to end with 'func.return', got 'graph.full'", 4),
        "make_dim_shell": ("make_dim", shell, "unknown function '__import__'", 1),
        "make_dim_power": ("make_dim", "9**9**9", "chained '\\*\\*'", 1),
        "make_dim_deep": ("make_dim", "(" * deep + "S" + ")" * deep, "nested deeper", 1),
    }


CHILD = """
import json, sys
from bitsmith import ir
from bitsmith.ir.types import make_dim
results = {}
for name, (call, text, _, _) in json.load(sys.stdin).items():
    try:
        ir.parse(text) if call == "parse" else make_dim(text)
        results[name] = {"type": "none"}
    except Exception as exc:
        results[name] = {"type": type(exc).__name__, "message": str(exc)[:400],
                         "line": getattr(exc, "line", None), "col": getattr(exc, "col", None)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Every hostile case run in one child process (so that a hang ends in a timeout rather
    than hanging the tests, and a shell command would run there): marker, cases, results."""
    marker = tmp_path_factory.mktemp("hostile") / "ran"
    cases = hostile_cases(marker)
    root = str(Path(bitsmith.__file__).resolve().parents[1])
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(cases), env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return marker, cases, json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(hostile_cases(Path("/marker"))))
def test_hostile_text_is_a_parse_error(name: str, hostile_results: tuple[Path, dict, dict]
                                       ) -> None:
    marker, cases, results = hostile_results
    call, _, message, line = cases[name]
    got = results[name]
    assert not marker.exists(), "text ran as code"
    assert got["type"] == ("ParseError" if call == "parse" else "ShapeError"), got
    assert re.search(message, got["message"]), got["message"]
    if call == "parse":
        assert (got["line"], got["col"] >= 1) == (line, True), got


# ---- fuzzing ------------------------------------------------------------------------------
KERNEL = """module @k {
  func.func @main(%x: tensor<Bx(S + 1)x7xf32>) -> (tensor<Bx(S + 1)x7xf32>) {
    %0 = "graph.constant"() {weight = "k.w"} : () -> tensor<7xf32> loc("norm")
    %1 = "kernel.fused"(%x, %0) (
      {
      ^bb0(%a: tensor<Bx(S + 1)x7xf32>, %b: tensor<7xf32>):
        %2 = "graph.reduce_mean"(%a) {axes = [2], keepdim = true} : (tensor<Bx(S + 1)x7xf32>) \
-> tensor<Bx(S + 1)x1xf32>
        %3 = "graph.sub"(%a, %2) : (tensor<Bx(S + 1)x7xf32>, tensor<Bx(S + 1)x1xf32>) -> \
tensor<Bx(S + 1)x7xf32>
        %4 = "graph.constant"() {value = dense<tensor<f32> [2.5]>} : () -> tensor<f32>
        %5 = "graph.mul"(%3, %4) : (tensor<Bx(S + 1)x7xf32>, tensor<f32>) -> \
tensor<Bx(S + 1)x7xf32>
        %6 = "graph.mul"(%5, %b) : (tensor<Bx(S + 1)x7xf32>, tensor<7xf32>) -> \
tensor<Bx(S + 1)x7xf32>
        "kernel.yield"(%6) : (tensor<Bx(S + 1)x7xf32>) -> ()
      }
    ) {kind = "reduction", name = "k0_norm"} : (tensor<Bx(S + 1)x7xf32>, tensor<7xf32>) -> \
tensor<Bx(S + 1)x7xf32> loc("norm")
    "func.return"(%1) : (tensor<Bx(S + 1)x7xf32>) -> ()
  }
}
"""


def quant_module() -> Module:
    """x[B, 7] times a 3-bit weight with int zero points, and the dequantized weight."""
    qt = QuantType(IntType(3, False), 4, GroupAxis.OUT, f16, ZeroPoint.INT)
    rng = np.random.default_rng(0)
    m = Module("q", [TensorType((B, 7), f32)], ["x"])
    b = Builder.at_end(m.body)
    sshape = (5, 2)  # one scale per group of 4 of the 7 inputs
    m.weights["q.w"] = pack_rows(rng.integers(0, 8, (5, 7), dtype=np.uint8), qt.bits)
    m.weights["q.s"] = rng.random(sshape).astype(np.float16)
    m.weights["q.z"] = rng.integers(0, 8, sshape, dtype=np.uint8)
    w = b.value(graph.ConstantOp, weight="q.w", result_types=[TensorType((5, 7), qt)])
    s = b.value(graph.ConstantOp, weight="q.s", result_types=[TensorType(sshape, f16)])
    z = b.value(graph.ConstantOp, weight="q.z",
                result_types=[TensorType(sshape, ir.parse_dtype("u8"))])
    y = b.value(quant.LinearOp, m.inputs[0], w, s, z, loc="proj")
    b.create(func.ReturnOp, y, b.value(quant.DequantizeOp, w, s, z))
    ir.verify(m)
    return m


def symbolic_module() -> Module:
    """Dims of the kinds the importer makes, reshaped and passed through relu."""
    m = Module("s", [TensorType((B, 2 * S, 3), f32),
                     TensorType((floor_div(S + 1, 2), sympy.Max(2, B), sympy.Mod(S, 4), S - 1,
                                 S**2, 3 - S), f32)], ["x", "y"])
    b = Builder.at_end(m.body)
    flat = b.value(graph.ReshapeOp, m.inputs[0], result_types=[TensorType((6 * B * S,), f32)])
    y = b.value(graph.UNARY_OPS["relu"], m.inputs[1], loc="act")
    b.create(func.ReturnOp, flat, y)
    ir.verify(m)
    return m


MODULES = [mlp_module(), quant_module(), symbolic_module()]
WEIGHTS = {"k.w": np.linspace(-1, 1, 7, dtype=np.float32)}
for _module in MODULES:
    WEIGHTS.update(_module.weights)
SEEDS = [str(m) for m in MODULES] + [KERNEL]
TOKENS = ["(", ")", "{", "}", "[", "]", "<", ">", ",", ":", "=", "x", "-", "*", "**", "//", "/",
          "+", "%0", "%1#0", "%x", '"', "\\", "tensor<", "dense<", "!quant.weight<", "^bb0(",
          "loc(", "->", "B", "S", "(S + 1)", "((S//2))", "Max(", "floor(", "9" * 25,
          "-" + "9" * 25, str(2**62 + 1), "1e999", "nan", "-inf", "true", "none", "f32", "u4",
          "i64", "\n", " ", "@", "#", "\u00e9", "\x00", "module", '"graph.relu"', "__import__"]
_TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_.]*|[0-9]+|.", re.S)


@st.composite
def mutants(draw: st.DrawFn) -> str:
    """A seed text after 1..4 mutations of characters, tokens or spans."""
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "splice",
                                     "char", "token"]))
        i = draw(st.sampled_from(range(len(text) + 1)))  # uniform: integers() favours 0
        j = min(len(text), i + draw(st.integers(0, 40)))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[j:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "splice":
            other = draw(st.sampled_from(SEEDS))
            text = text[:i] + other[draw(st.sampled_from(range(len(other) + 1))):]
        elif kind == "char":
            text = text[:i] + draw(st.characters()) + text[i:]
        else:
            tokens = _TOKEN.findall(text)
            k = draw(st.sampled_from(range(max(1, len(tokens)))))
            tokens[k:k + 1] = [draw(st.sampled_from(["", *TOKENS]))]
            text = "".join(tokens)
    return text


def check_mutant(text: str) -> None:
    """Parse gives a Module that prints back stably, or a ParseError at a line and column."""
    try:
        module = ir.parse(text, weights=WEIGHTS)
    except ir.ParseError as exc:
        assert exc.line >= 1 and exc.col >= 1 and exc.reason
        return
    printed = str(module)
    assert str(ir.parse(printed, weights=WEIGHTS)) == printed


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_modules_round_trip(seed: int) -> None:
    text = SEEDS[seed]
    assert str(ir.parse(text, weights=WEIGHTS)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutants())
def test_mutated_text_parses_or_is_a_parse_error(text: str) -> None:
    check_mutant(text)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutants())
def test_mutated_text_parses_or_is_a_parse_error_long(text: str) -> None:
    check_mutant(text)


# ---- every dim kind round-trips ----------------------------------------------------------
DIM_KINDS = {
    "symbol": B, "scaled": 2 * B, "plus": S + 1, "minus": S - 1, "affine": 2 * S - 1,
    "product": 3 * B * S, "power": S**2, "factored": S * (S + 1), "negated": 10 - 2 * S,
    "floordiv": floor_div(S, 2), "floordiv_sum": floor_div(S + 1, 2),
    "floordiv_plus": floor_div(S - 1, 2) + 1, "floordiv_scaled": 2 * floor_div(S, 2),
    "floor": sympy.floor(S / 2), "ceiling": sympy.ceiling(S / 2),
    "floor_rational": sympy.floor(S / 2 + sympy.Rational(1, 2)), "mod": sympy.Mod(S, 4),
    "max": sympy.Max(2, S), "min": sympy.Min(B, S), "lowercase": symbol("s0") + 1,
}


@pytest.mark.parametrize("kind", sorted(DIM_KINDS))
def test_every_dim_kind_round_trips(kind: str) -> None:
    dim = make_dim(DIM_KINDS[kind])
    text = identity_module(f"tensor<{format_dim(dim)}x4xf32>")
    module = ir.parse(text)
    assert str(module) == text
    assert ir.types.dims_equal(module.inputs[0].type.shape[0], dim)
    assert make_dim(format_dim(dim)) == dim  # make_dim reads the same grammar


def test_torch_floor_division_and_max_print_as_ours() -> None:
    """The importer's dims are torch's sympy functions: their text parses back unchanged."""
    functions = pytest.importorskip("torch.utils._sympy.functions")
    for dim in [functions.FloorDiv(S + 1, 2), functions.FloorDiv(S - 1, 3) + 1,
                functions.Max(2, S * B), functions.Min(B, S)]:
        text = identity_module(f"tensor<{format_dim(make_dim(dim))}xf32>")
        assert str(ir.parse(text)) == text


def test_make_dim_reads_text_without_evaluating_it() -> None:
    assert make_dim("2*S + 1") == 2 * S + 1
    assert make_dim("B") == B and make_dim(" 16 ") == 16
    with pytest.raises(ShapeError, match=r"unknown function '__import__'.*column 1"):
        make_dim("__import__('os').getcwd()")
    with pytest.raises(ShapeError, match="must be an integer expression, got S/2"):
        make_dim("S/2")


def test_an_op_whose_checks_crash_is_an_error_at_that_op() -> None:
    """A stride of 0 would divide by zero in conv2d's shape rule: the verifier refuses it, and
    parse says where, never a bare ZeroDivisionError."""
    text = op_module('%0 = "graph.conv2d"(%x, %w) {stride = [0, 0]} : (tensor<1x1x4x4xf32>, '
                     "tensor<1x1x3x3xf32>) -> tensor<1x1x2x2xf32>").replace(
        "@main()", "@main(%x: tensor<1x1x4x4xf32>, %w: tensor<1x1x3x3xf32>)")
    with pytest.raises(ir.ParseError, match="graph.conv2d.*stride 0") as info:
        ir.parse(text)
    assert (info.value.line, info.value.col) == (3, 5)
    assert isinstance(info.value, ir.VerifyError)  # a TextVerifyError: both
