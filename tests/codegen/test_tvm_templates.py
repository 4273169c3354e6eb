"""Every CPU template against the interpreter on odd shapes (primes, size-1 dims, sizes that
are not a multiple of the tile), under its default config and under every config that moves
one knob, and the template each kind of kernel selects."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.template import TEMPLATES, Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates import Dense, pack_panels
from bitsmith.errors import CodegenError

from .tvm_checks import check_module, func, one_knob_at_a_time

RNG = np.random.default_rng(7)


def _weights(**shapes: tuple) -> dict[str, np.ndarray]:
    return {k: RNG.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def _sweep(text: str, weights: dict, template: str, batches: tuple = (1, 3)) -> int:
    name, configs = one_knob_at_a_time(text, weights)
    assert name == template
    for config in configs:
        check_module(text, weights, batches=batches, config=config, template=template)
    return len(configs)


@pytest.mark.parametrize("rows, k, n", [(1, 5, 3), (7, 67, 17), (13, 64, 100), (4, 16, 64)])
def test_dense_with_bias_and_gelu(rows: int, k: int, n: int) -> None:
    x, w, o = f"tensor<{rows}x{k}xf32>", f"tensor<{n}x{k}xf32>", f"tensor<{rows}x{n}xf32>"
    text = func(f"%x: {x}", o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<{n}xf32>
        %2 = "graph.linear"(%x, %0, %1) : ({x}, {w}, tensor<{n}xf32>) -> {o}
        %3 = "graph.gelu"(%2) {{approximate = "none"}} : ({o}) -> {o}
        "func.return"(%3) : ({o}) -> ()
    """)
    assert _sweep(text, _weights(w=(n, k), b=(n,)), "dense") >= 3


@pytest.mark.parametrize("config", [
    {"TILE_M": 6, "TILE_N": 48, "TILE_K": 64, "ROW_BLOCK": 4, "ORDER": "nm"},
    {"TILE_M": 5, "TILE_N": 32, "TILE_K": 128, "ROW_BLOCK": 8, "ORDER": "mn"},
    {"TILE_M": 12, "TILE_N": 64, "TILE_K": 0, "ROW_BLOCK": 4, "ORDER": "mn"},
    {"TILE_M": 7, "TILE_N": 16, "TILE_K": 64, "ROW_BLOCK": 0, "ORDER": "nm"}])
def test_dense_blocked_configs_on_ragged_sizes(config: dict) -> None:
    """Several knobs moved at once, on sizes that none of them divides: 75 rows (the last row
    block and tile partial), K = 150 (the last reduction slice partial), N = 100 (the last
    panel partial), batched (3 x 25 rows, so tiles straddle samples) and not."""
    for x, o in (("tensor<75x150xf32>", "tensor<75x100xf32>"),
                 ("tensor<3x25x150xf32>", "tensor<3x25x100xf32>")):
        text = func(f"%x: {x}", o, f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<100x150xf32>
            %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<100xf32>
            %2 = "graph.linear"(%x, %0, %1) : ({x}, tensor<100x150xf32>, tensor<100xf32>) -> {o}
            %3 = "graph.gelu"(%2) {{approximate = "none"}} : ({o}) -> {o}
            "func.return"(%3) : ({o}) -> ()
        """)
        full = Config({**config, "PARALLEL": True})
        batched = x.startswith("tensor<3x")
        if batched and full["ROW_BLOCK"]:
            # a row block must hold whole samples of 25 rows: such a config is refused
            from bitsmith import ir, passes
            module = ir.parse(text, weights=_weights(w=(100, 150), b=(100,)))
            passes.run(module, "canonicalize,fuse")
            (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
            dense = TEMPLATES["dense"]
            assert not dense.valid(dense.match(kernel), full)
            continue
        check_module(text, _weights(w=(100, 150), b=(100,)), config=full, template="dense")


@pytest.mark.parametrize("batch, seq, n, heads", [
    ("B", 1, 24, False), ("B", 7, 24, False), ("B", 12, 24, True), ("B", 7, 24, True),
    (4, 7, 32, False), (4, 5, 32, True)])
def test_dense_symbolic_batch_residual_and_head_split(batch: str | int, seq: int, n: int,
                                                      heads: bool) -> None:
    """A static batch too: rows padded to whole tiles, tiles that straddle two samples, and an
    epilogue whose output keeps the batch axis (run per work item over the flattened rows)."""
    x, w, o = f"tensor<{batch}x{seq}x19xf32>", f"tensor<19x{n}xf32>", \
        f"tensor<{batch}x{seq}x{n}xf32>"
    h = f"tensor<{batch}x{seq}x4x{n // 4}xf32>"
    text = func(f"%x: {x}, %r: {o}", h if heads else o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.matmul"(%x, %0) : ({x}, {w}) -> {o}
        %2 = "graph.add"(%1, %r) : ({o}, {o}) -> {o}
        %3 = "graph.reshape"(%2) : ({o}) -> {h}
        "func.return"(%3) : ({h}) -> ()
    """ if heads else f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.matmul"(%x, %0) : ({x}, {w}) -> {o}
        %2 = "graph.add"(%1, %r) : ({o}, {o}) -> {o}
        "func.return"(%2) : ({o}) -> ()
    """)
    assert _sweep(text, _weights(w=(19, n)), "dense",
                  batches=(1, 2, 5) if batch == "B" else (batch,)) >= 3


@pytest.mark.parametrize("x, w, stride, padding, dilation, out, template", [
    ("tensor<2x7x9x3xf32>", (3, 3, 3, 5), (1, 1), (1, 1), (1, 1), "tensor<2x7x9x5xf32>",
     "conv_gemm"),
    ("tensor<1x11x5x8xf32>", (3, 1, 8, 20), (2, 2), (1, 0), (1, 1), "tensor<1x6x3x20xf32>",
     "conv_gemm"),
    ("tensor<Bx9x8x5xf32>", (3, 3, 5, 70), (1, 2), (2, 1), (2, 1), "tensor<Bx9x4x70xf32>",
     "conv_gemm"),
    ("tensor<3x4x4x16xf32>", (1, 1, 16, 64), (1, 1), (0, 0), (1, 1), "tensor<3x4x4x64xf32>",
     "dense"),  # a pointwise conv is a matmul of pixels by channels
])
def test_conv2d_nhwc_with_bias_relu_and_residual(x: str, w: tuple, stride: tuple,
                                                 padding: tuple, dilation: tuple, out: str,
                                                 template: str) -> None:
    wt, b = f"tensor<{'x'.join(map(str, w))}xf32>", f"tensor<{w[3]}xf32>"
    attrs = (f'{{dilation = [{dilation[0]}, {dilation[1]}], groups = 1, layout = "NHWC", '
             f'padding = [{padding[0]}, {padding[1]}], stride = [{stride[0]}, {stride[1]}]}}')
    text = func(f"%x: {x}, %r: {out}", out, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {wt}
        %1 = "graph.constant"() {{weight = "b"}} : () -> {b}
        %2 = "graph.conv2d"(%x, %0, %1) {attrs} : ({x}, {wt}, {b}) -> {out}
        %3 = "graph.add"(%2, %r) : ({out}, {out}) -> {out}
        %4 = "graph.relu"(%3) : ({out}) -> {out}
        "func.return"(%4) : ({out}) -> ()
    """)
    batches = (1, 3) if x.startswith("tensor<B") else (1,)
    weights = _weights(w=w, b=(w[3],))
    if x == "tensor<2x7x9x3xf32>":  # one knob at a time once; its schedule is dense's
        assert _sweep(text, weights, template, batches=batches) >= 3
        return
    name, configs = one_knob_at_a_time(text, weights)
    assert name == template
    for config in [configs[0], *(c for c in configs[1:] if c["TILE_M"] == 5 or
                                 c.get("ORDER") == "mn")]:
        check_module(text, weights, batches=batches, config=config, template=template)


@pytest.mark.parametrize("lq, lk, e, configs", [(5, 7, 6, 4), (1, 3, 1, 4), (13, 13, 16, 4),
                                                (8, 9, 16, 6), (16, 5, 3, 7)])
def test_attention(lq: int, lk: int, e: int, configs: int) -> None:
    """`configs`: the default, one move of each of the 3 bool knobs, and each ROW_CHUNKS that
    divides the query rows into chunks of at least 2."""
    q, kv, o = f"tensor<Bx3x{lq}x{e}xf32>", f"tensor<Bx3x{lk}x{e}xf32>", f"tensor<Bx3x{lq}x{e}xf32>"
    m = f"tensor<Bx1x{lq}x{lk}xf32>"
    text = func(f"%q: {q}, %k: {kv}, %v: {kv}, %m: {m}", o, f"""
        %0 = "graph.attention"(%q, %k, %v, %m) {{gqa = false, is_causal = false}}
            : ({q}, {kv}, {kv}, {m}) -> {o}
        "func.return"(%0) : ({o}) -> ()
    """)
    assert _sweep(text, {}, "attention") == configs


def test_decomposed_attention() -> None:
    q, kt, s = "tensor<2x3x5x4xf32>", "tensor<2x3x4x7xf32>", "tensor<2x3x5x7xf32>"
    v, o = "tensor<2x3x7x4xf32>", "tensor<2x3x5x4xf32>"
    text = func(f"%q: {q}, %k: {kt}, %v: {v}", o, f"""
        %0 = "graph.matmul"(%q, %k) : ({q}, {kt}) -> {s}
        %1 = "graph.softmax"(%0) {{axis = -1}} : ({s}) -> {s}
        %2 = "graph.matmul"(%1, %v) : ({s}, {v}) -> {o}
        "func.return"(%2) : ({o}) -> ()
    """)
    assert _sweep(text, {}, "attention") == 4


@pytest.mark.parametrize("shape", ["tensor<3x37xf32>", "tensor<Bx5x13xf32>", "tensor<1x1xf32>"])
def test_rows_softmax_and_layer_norm(shape: str) -> None:
    n = int(shape.split("x")[-2])
    text = func(f"%x: {shape}", f"{shape}, {shape}", f"""
        %0 = "graph.constant"() {{weight = "g"}} : () -> tensor<{n}xf32>
        %1 = "graph.softmax"(%x) {{axis = -1}} : ({shape}) -> {shape}
        %2 = "graph.layer_norm"(%x, %0) {{eps = 1.0e-05, ndim = 1}}
            : ({shape}, tensor<{n}xf32>) -> {shape}
        "func.return"(%1, %2) : ({shape}, {shape}) -> ()
    """)
    module_kernels = 0
    for config in [None, Config({"VECTORIZE": False, "MIN_PARALLEL": 1 << 40,
                                 "VECTOR_FACTOR": 4}),
                   Config({"VECTORIZE": True, "MIN_PARALLEL": 4096, "VECTOR_FACTOR": 1}),
                   Config({"VECTORIZE": True, "MIN_PARALLEL": 16384, "VECTOR_FACTOR": 2})]:
        module_kernels = check_module(text, _weights(g=(n,)), batches=(1, 4), config=config,
                                      template="rows")
    assert module_kernels == 2


def test_elementwise_chain_and_embedding() -> None:
    x, t, ids, e = "tensor<Bx7x33xf32>", "tensor<50x33xf32>", "tensor<Bx7xi64>", \
        "tensor<Bx7x33xf32>"
    text = func(f"%x: {x}, %i: {ids}", e, f"""
        %0 = "graph.constant"() {{weight = "t"}} : () -> {t}
        %1 = "graph.embedding"(%0, %i) : ({t}, {ids}) -> {e}
        %2 = "graph.tanh"(%x) : ({x}) -> {x}
        %3 = "graph.mul"(%1, %2) : ({e}, {x}) -> {e}
        "func.return"(%3) : ({e}) -> ()
    """)
    for config in [None, Config({"VECTORIZE": False, "MIN_PARALLEL": 1 << 40,
                                 "VECTOR_FACTOR": 4}),
                   Config({"VECTORIZE": True, "MIN_PARALLEL": 4096, "VECTOR_FACTOR": 1}),
                   Config({"VECTORIZE": True, "MIN_PARALLEL": 16384, "VECTOR_FACTOR": 2})]:
        assert check_module(text, _weights(t=(50, 33)), batches=(1, 6), config=config,
                            template="elementwise") >= 1


def test_pack_panels_is_exact_and_zero_padded() -> None:
    w = RNG.standard_normal((10, 3)).astype(np.float32)
    packed = pack_panels(w, 4, transposed=True)
    assert packed.shape == (3, 3, 4)
    np.testing.assert_array_equal(packed.transpose(0, 2, 1).reshape(12, 3)[:10], w)
    assert not packed.transpose(0, 2, 1).reshape(12, 3)[10:].any()
    np.testing.assert_array_equal(pack_panels(w.T, 4, transposed=False), packed)


def test_a_config_outside_the_space_or_invalid_is_refused() -> None:
    x, w, o = "tensor<6x8xf32>", "tensor<5x8xf32>", "tensor<6x5xf32>"
    text = func(f"%x: {x}", o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.linear"(%x, %0) : ({x}, {w}) -> {o}
        "func.return"(%1) : ({o}) -> ()
    """)
    from bitsmith import ir, passes
    module = ir.parse(text, weights=_weights(w=(5, 8)))
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    dense = TEMPLATES["dense"]
    assert isinstance(dense, Dense)
    problem = dense.match(kernel)
    base = dense.default_config(problem, host_target())
    with pytest.raises(CodegenError, match="knob TILE_M=9 is not one of"):
        dense.build(problem, Config({**base, "TILE_M": 9}), host_target())
    with pytest.raises(CodegenError, match="is not valid for"):  # a slice longer than K = 8
        dense.build(problem, Config({**base, "TILE_K": 64}), host_target())
    with pytest.raises(CodegenError, match="is not valid for"):  # a tile taller than 6 rows
        dense.build(problem, Config({**base, "TILE_M": 8}), host_target())


def test_dense_row_blocks_over_a_symbolic_batch() -> None:
    """Row blocks of a symbolic row count: the last block partial (or the only one short) at
    every batch, an elementwise residual read per work item."""
    x, o = "tensor<Bx19xf32>", "tensor<Bx70xf32>"
    text = func(f"%x: {x}, %r: {o}", o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> tensor<70x19xf32>
        %1 = "graph.linear"(%x, %0) : ({x}, tensor<70x19xf32>) -> {o}
        %2 = "graph.add"(%1, %r) : ({o}, {o}) -> {o}
        "func.return"(%2) : ({o}) -> ()""")
    for config in ({"TILE_M": 6, "TILE_N": 16, "ROW_BLOCK": 4, "ORDER": "nm"},
                   {"TILE_M": 5, "TILE_N": 64, "ROW_BLOCK": 8, "ORDER": "mn"}):
        check_module(text, _weights(w=(70, 19)), batches=(1, 5, 29, 64),
                     config=Config({**config, "TILE_K": 0, "PARALLEL": True}), template="dense")


@pytest.mark.parametrize("lanes, isa", [(16, ("avx512f", "fma", "avx2")), (8, ("avx2", "fma"))])
def test_a_narrow_conv_splits_its_rows_over_the_cores_by_default(lanes: int, isa: tuple) -> None:
    """ResNet's first-stage 3x3 conv: 64 output channels are one or two panels, so the
    default splits the 56 x 56 pixels into row blocks of whole tiles dividing them (tile
    height 7 where 6 does not divide 3136), within the register budget of the vector ISA;
    never every row in one work item on one core."""
    from bitsmith import ir, passes
    from bitsmith.codegen.template import Target

    x, w, o = "tensor<1x56x56x64xf32>", "tensor<3x3x64x64xf32>", "tensor<1x56x56x64xf32>"
    text = func(f"%x: {x}", o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.conv2d"(%x, %0) {{dilation = [1, 1], groups = 1, layout = "NHWC",
            padding = [1, 1], stride = [1, 1]}} : ({x}, {w}) -> {o}
        "func.return"(%1) : ({o}) -> ()""")
    module = ir.parse(text, weights=_weights(w=(3, 3, 64, 64)))
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    template = TEMPLATES["conv_gemm"]
    problem = template.match(kernel)
    target = Target(kind="llvm", isa=isa, cores=2, attrs={"vector_lanes_f32": lanes})
    config = template.default_config(problem, target)
    vectors = int(config["TILE_N"]) // lanes
    assert template.valid(problem, config)
    assert (int(config["TILE_M"]) + 1) * vectors <= (32 if lanes == 16 else 16)
    panels = -(-64 // int(config["TILE_N"]))
    items = panels * (-(-3136 // (int(config["TILE_M"]) * int(config["ROW_BLOCK"])))
                      if config["ROW_BLOCK"] else 1)
    assert items >= 2 * target.cores
