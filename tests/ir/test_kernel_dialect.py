"""The kernel dialect: `kernel.fused` round trips, runs, and its verifier names what is wrong."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir.dialects.kernel import KERNEL_KINDS

T, R, V = "tensor<3x5x7xf32>", "tensor<3x5x1xf32>", "tensor<7xf32>"
S = "tensor<f32>"
WEIGHTS = {"w": np.random.default_rng(0).standard_normal(7).astype(np.float32)}

# A hand-written kernel in the printer's canonical form: (x - mean(x)) * 2 * w, and the mean.
GOOD = f"""module @k {{
  func.func @main(%x: {T}) -> ({T}, {R}) {{
    %0 = "graph.constant"() {{weight = "w"}} : () -> {V} loc("norm")
    %1:2 = "kernel.fused"(%x, %0) (
      {{
      ^bb0(%a: {T}, %b: {V}):
        %2 = "graph.reduce_mean"(%a) {{axes = [2], keepdim = true}} : ({T}) -> {R}
        %3 = "graph.sub"(%a, %2) : ({T}, {R}) -> {T}
        %4 = "graph.constant"() {{value = dense<{S} [2.0]>}} : () -> {S}
        %5 = "graph.mul"(%3, %4) : ({T}, {S}) -> {T}
        %6 = "graph.mul"(%5, %b) : ({T}, {V}) -> {T} loc("norm")
        "kernel.yield"(%6, %2) : ({T}, {R}) -> ()
      }}
    ) {{kind = "reduction", name = "k0_norm"}} : ({T}, {V}) -> ({T}, {R}) loc("norm")
    %7 = "graph.tanh"(%1#0) : ({T}) -> {T}
    "func.return"(%7, %1#1) : ({T}, {R}) -> ()
  }}
}}
"""


def test_hand_written_kernel_round_trips_verifies_and_runs() -> None:
    module = ir.parse(GOOD, weights=WEIGHTS)
    assert str(module) == GOOD
    assert str(ir.parse(str(module), weights=WEIGHTS)) == GOOD
    ir.verify(module)
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    assert (kernel.kind, kernel.kernel_name, kernel.loc) == ("reduction", "k0_norm", "norm")
    assert kernel.name == "kernel.fused"
    assert [op.name for op in kernel.body_ops] == [
        "graph.reduce_mean", "graph.sub", "graph.constant", "graph.mul", "graph.mul"]
    assert kernel.regions[0].block.terminator.name == "kernel.yield"

    x = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(np.float32)
    out, mean = ir.interpret(module, x)
    want_mean = x.mean(axis=2, keepdims=True)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, np.tanh((x - want_mean) * 2 * WEIGHTS["w"]), rtol=1e-5,
                               atol=1e-6)
    assert out.dtype == mean.dtype == np.float32


def test_every_kernel_kind_is_accepted() -> None:
    for kind in KERNEL_KINDS:
        text = GOOD.replace('kind = "reduction"', f'kind = "{kind}"')
        assert ir.parse(text, weights=WEIGHTS).ops[1].kind == kind


@pytest.mark.parametrize("old, new, message", [
    (f"^bb0(%a: {T}, %b: {V}):", f"^bb0(%a: {T}, %b: {V}, %c: {V}):",
     r"'kernel.fused' op at norm: region takes 3 argument\(s\) for 2 input\(s\)"),
    (f"^bb0(%a: {T}, %b: {V}):", f"^bb0(%b: {V}, %a: {T}):",
     rf"region argument #0 is {V}, input is {T}"),
    (f'        "kernel.yield"(%6, %2) : ({T}, {R}) -> ()\n', "",
     r"'kernel.fused' op at norm: region must end with 'kernel.yield'"),
    (f'"kernel.yield"(%6, %2) : ({T}, {R})', f'"kernel.yield"(%6, %3) : ({T}, {T})',
     rf"yields \({T}, {T}\), results are \({T}, {R}\)"),
    (f'"kernel.yield"(%6, %2) : ({T}, {R})', f'"kernel.yield"(%6) : ({T})',
     rf"yields \({T}\), results are \({T}, {R}\)"),
    ('%3 = "graph.sub"(%a, %2)', '%3 = "graph.sub"(%x, %2)',
     r"'graph.sub' op: operand #0 comes from outside its kernel.fused region; pass it in as "
     r"a kernel input"),
    ('%6 = "graph.mul"(%5, %b)', '%6 = "graph.mul"(%5, %0)',
     r"'graph.mul' op at norm: operand #1 comes from outside its kernel.fused region"),
    ('kind = "reduction"', 'kind = "fancy"',
     r"attribute 'kind' expected one of \['matmul', 'conv', .*\], got 'fancy'"),
    ('kind = "reduction"', "kind = 3", r"attribute 'kind' expected str, got 3"),
    (f'"kernel.yield"(%6, %2) : ({T}, {R}) -> ()',
     f'"kernel.yield"(%6, %2) : ({T}, {R}) -> ()\n        "kernel.yield"(%6, %2) : ({T}, {R}) '
     "-> ()", r"'kernel.yield' op: 'kernel.yield' must be the last op of its region"),
    ('"func.return"(%7, %1#1)', f'"kernel.yield"(%7, %1#1) : ({T}, {R}) -> ()\n'
     f'    "func.return"(%7, %1#1)',
     r"'kernel.yield' op: 'kernel.yield' may only end a 'kernel.fused' region, found in the "
     r"function body"),
])
def test_verifier_errors_say_what_is_wrong(old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(ir.VerifyError, match=message):
        ir.parse(GOOD.replace(old, new, 1), weights=WEIGHTS)


def test_missing_kind_is_a_parse_error() -> None:
    bad = GOOD.replace('kind = "reduction", ', "")
    with pytest.raises(ir.ParseError, match=r"'kernel.fused' needs attribute 'kind' \(str\)"):
        ir.parse(bad, weights=WEIGHTS)


def test_kernel_region_is_evaluated_in_isolation() -> None:
    """The region sees its block arguments, not the enclosing values (nor stale bindings)."""
    module = ir.parse(GOOD, weights=WEIGHTS)
    kernel = module.ops[1]
    ctx = ir.EvalContext(WEIGHTS)
    a = np.ones((3, 5, 7), np.float32)
    out, mean = kernel.evaluate(ctx, a, np.full(7, 3.0, np.float32))
    np.testing.assert_array_equal(mean, np.ones((3, 5, 1), np.float32))
    np.testing.assert_array_equal(out, np.zeros((3, 5, 7), np.float32))
