"""Generic TVM lowering: every kernel of a fused module, compiled for the host CPU, matches the
interpreter on odd shapes (and on a symbolic batch at two sizes)."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.template import CodegenError
from bitsmith.codegen.tvm import lower

from .tvm_checks import check_module, func

T = "tensor<3x5x7xf32>"


def test_elementwise_chain_with_broadcast_and_literals() -> None:
    v = "tensor<7xf32>"
    text = func(f"%x: {T}, %y: {v}", T, f"""
        %0 = "graph.constant"() {{value = dense<tensor<f32> [0.5]>}} : () -> tensor<f32>
        %1 = "graph.mul"(%x, %0) : ({T}, tensor<f32>) -> {T}
        %2 = "graph.add"(%1, %y) : ({T}, {v}) -> {T}
        %3 = "graph.gelu"(%2) {{approximate = "tanh"}} : ({T}) -> {T}
        %4 = "graph.tanh"(%3) : ({T}) -> {T}
        %5 = "graph.relu"(%4) : ({T}) -> {T}
        %6 = "graph.clamp"(%5) {{max = 0.25}} : ({T}) -> {T}
        %7 = "graph.silu"(%6) : ({T}) -> {T}
        "func.return"(%7) : ({T}) -> ()
    """)
    assert check_module(text) == 1


def test_shape_ops_and_gather() -> None:
    e = "tensor<11x6xf32>"
    text = func(f"%x: {T}, %ids: tensor<3x4xi64>", "tensor<7x3x5xf32>, tensor<3x4x6xf32>", f"""
        %0 = "graph.permute"(%x) {{perm = [2, 0, 1]}} : ({T}) -> tensor<7x3x5xf32>
        %1 = "graph.reshape"(%0) : (tensor<7x3x5xf32>) -> tensor<7x15xf32>
        %2 = "graph.slice"(%1) {{axis = 1, start = 1, end = 14, step = 3}}
            : (tensor<7x15xf32>) -> tensor<7x5xf32>
        %3 = "graph.concat"(%2, %2, %2) {{axis = 1}}
            : (tensor<7x5xf32>, tensor<7x5xf32>, tensor<7x5xf32>) -> tensor<7x15xf32>
        %4 = "graph.reshape"(%3) : (tensor<7x15xf32>) -> tensor<7x3x5xf32>
        %5 = "graph.constant"() {{weight = "e"}} : () -> {e}
        %6 = "graph.embedding"(%5, %ids) : ({e}, tensor<3x4xi64>) -> tensor<3x4x6xf32>
        "func.return"(%4, %6) : (tensor<7x3x5xf32>, tensor<3x4x6xf32>) -> ()
    """)
    weights = {"e": np.random.default_rng(1).standard_normal((11, 6)).astype(np.float32)}
    assert check_module(text, weights) >= 1


def test_reductions_and_norms() -> None:
    r, v = "tensor<3x5x1xf32>", "tensor<7xf32>"
    text = func(f"%x: {T}, %w: {v}, %b: {v}", f"{T}, {T}, {T}, {r}, tensor<3xf32>", f"""
        %0 = "graph.softmax"(%x) {{axis = 2}} : ({T}) -> {T}
        %1 = "graph.layer_norm"(%x, %w, %b) {{eps = 1e-05, ndim = 1}} : ({T}, {v}, {v}) -> {T}
        %2 = "graph.rms_norm"(%x, %w) {{eps = 1e-06, ndim = 1}} : ({T}, {v}) -> {T}
        %3 = "graph.reduce_mean"(%x) {{axes = [2], keepdim = true}} : ({T}) -> {r}
        %4 = "graph.reduce_max"(%x) {{axes = [1, 2], keepdim = false}} : ({T}) -> tensor<3xf32>
        "func.return"(%0, %1, %2, %3, %4) : ({T}, {T}, {T}, {r}, tensor<3xf32>) -> ()
    """)
    assert check_module(text) == 5


def test_matmuls_linear_epilogue_and_symbolic_batch() -> None:
    x, w, o = "tensor<Bx5x7xf32>", "tensor<11x7xf32>", "tensor<Bx5x11xf32>"
    m = "tensor<Bx5x5xf32>"
    text = func(f"%x: {x}, %y: tensor<1x5x7xf32>", f"{o}, {m}", f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<11xf32>
        %2 = "graph.linear"(%x, %0, %1) : ({x}, {w}, tensor<11xf32>) -> {o}
        %3 = "graph.gelu"(%2) {{approximate = "none"}} : ({o}) -> {o}
        %4 = "graph.matmul"(%x, %y) {{transpose_rhs = true}} : ({x}, tensor<1x5x7xf32>) -> {m}
        "func.return"(%3, %4) : ({o}, {m}) -> ()
    """)
    rng = np.random.default_rng(2)
    weights = {"w": rng.standard_normal((11, 7)).astype(np.float32),
               "b": rng.standard_normal(11).astype(np.float32)}
    assert check_module(text, weights, batches=(1, 3)) == 2


def test_an_op_without_a_rule_is_a_codegen_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registered op has a rule (tests/test_op_coverage.py); take one away."""
    monkeypatch.delitem(lower.RULES, "graph.sign")
    text = func(f"%x: {T}", T, f"""
        %0 = "graph.sign"(%x) : ({T}) -> {T}
        "func.return"(%0) : ({T}) -> ()
    """)
    with pytest.raises(CodegenError, match=r"generic lowering has no rule for 'graph.sign' "
                                           r"\(kernel 'k0_sign'\)"):
        check_module(text)


def test_reshape_groups_pair_up_the_smallest_runs_of_axes_with_equal_products() -> None:
    import sympy

    from bitsmith.codegen.tvm.lower import reshape_groups
    b = sympy.Symbol("B")
    r = range
    assert reshape_groups((8, 65, 64), (8, 65, 4, 16)) == [(r(0, 1), r(0, 1)),
                                                           (r(1, 2), r(1, 2)),
                                                           (r(2, 3), r(2, 4))]
    assert reshape_groups((b * 65, 64), (b, 65, 64)) == [(r(0, 1), r(0, 2)), (r(1, 2), r(2, 3))]
    assert reshape_groups((8, 1, 65), (8, 65)) == [(r(0, 1), r(0, 1)), (r(1, 3), r(1, 2))]
    assert reshape_groups((2, 3), (3, 2)) == [(r(0, 2), r(0, 2))]
    assert reshape_groups((4, 1), (4,)) == [(r(0, 1), r(0, 1)), (r(1, 2), r(1, 1))]
    assert reshape_groups((b, 3), (3, b)) == [(r(0, 2), r(0, 2))]
    assert reshape_groups((0, 3), (3, 0)) is None


def test_fast_exp_is_within_two_ulp_and_keeps_the_specials() -> None:
    """`fast_exp` against f64 over the whole f32 range in a vectorised loop: within 2 ulp
    wherever e^x is a normal float; inf, 0 and NaN where libm gives them (0 also where libm
    gives a subnormal, under 1.2e-38)."""
    import tvm
    from tvm import te

    from bitsmith.codegen.tvm.fast_math import fast_exp
    from bitsmith.codegen.tvm.target import host_target, tvm_target

    n = 1 << 16
    a = te.placeholder((n,), "float32")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, te.compute((n,), lambda i: fast_exp(a[i]))]))
    _, lanes = sch.split(sch.get_loops(sch.get_sblock("compute"))[0], [None, 16])
    sch.vectorize(lanes)
    kernel = tvm.compile(sch.mod, target=tvm_target(host_target()))["main"]
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, 88.73, -87.3, -87.4, -200.0, 1e-30]
    x = np.concatenate([np.linspace(-110, 100, n - len(specials)), specials]).astype(np.float32)
    out = tvm.runtime.tensor(np.empty_like(x))
    kernel(tvm.runtime.tensor(x), out)
    got = out.numpy()
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    normal = (want >= np.finfo(np.float32).tiny) & (want <= np.finfo(np.float32).max)
    ulp = np.spacing(want[normal].astype(np.float32))
    assert (np.abs(got[normal] - want[normal]) <= 2 * ulp).all()
    assert (got[want > np.finfo(np.float32).max] == np.inf).all()
    assert (got[want < np.finfo(np.float32).tiny] < 1.2e-38).all()
    assert np.isnan(got[-len(specials)]) and got[-len(specials) + 2] == 0.0
