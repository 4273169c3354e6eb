"""`quant.linear` with act=i8 (int8 activation blocks): the interpreter's semantics against a
plain numpy statement of them, the VNNI template and the generic CPU path against the
interpreter, on odd sizes, every zero-point kind, NaN/inf rows, and hosts without VNNI."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.codegen.template import Target
from bitsmith.codegen.tvm import templates_a8
from bitsmith.codegen.tvm.target import host_target
from bitsmith.errors import VerifyError
from bitsmith.ir import Builder, EvalContext, Module
from bitsmith.ir.dialects import func, graph, quant
from bitsmith.ir.dtypes import IntType, f16, f32
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, TensorType, ZeroPoint

from .test_tvm_quant import qlinear_module
from .tvm_checks import check_module

VNNI = templates_a8.has_vnni(host_target())
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI")

Q4_1 = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.MIN)
Q4_0 = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.INT)
Q8_0 = QuantType(IntType(8, True), 32, GroupAxis.OUT, f16, ZeroPoint.NONE)
W4G128 = QuantType(IntType(4, False), 128, GroupAxis.OUT, f16, ZeroPoint.INT)
W3 = QuantType(IntType(3, True), 64, GroupAxis.OUT, f16, ZeroPoint.NONE)
W6 = QuantType(IntType(6, False), 0, GroupAxis.OUT, f16, ZeroPoint.INT)
I4_MIN = QuantType(IntType(4, True), 32, GroupAxis.OUT, f16, ZeroPoint.MIN)
I5_INT = QuantType(IntType(5, True), 64, GroupAxis.OUT, f16, ZeroPoint.INT)
CASES = [Q4_1, Q4_0, Q8_0, W4G128, W3, W6, I4_MIN, I5_INT]


def test_activation_blocks_round_trip_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 70)) * np.array([1e-30, 1.0, 1e30])[:, None]).astype(
        np.float32)
    xq, d = quant.quantize_activations(x)
    assert xq.shape == x.shape and d.shape == (3, 3)
    assert np.array_equal(xq, np.rint(xq)) and np.abs(xq).max() <= 127
    step = np.repeat(d, 32, axis=1)[:, :70]
    assert np.all(np.abs(xq * step - x) <= 0.5 * step * (1 + 1e-6))
    # every block's largest magnitude lands on +-127
    assert np.all(np.abs(xq[:, :64]).reshape(3, 2, 32).max(-1) == 127)


def test_semantics_integer_part_on_blocks_minimum_on_exact_x() -> None:
    rng = np.random.default_rng(1)
    n, k = 5, 96
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = (rng.random((n, 3)) * 0.1).astype(np.float16).astype(np.float32)
    m = rng.standard_normal((n, 3)).astype(np.float16).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    x[1, 40] = np.nan
    op = _linear_op(Q4_1, x.shape, n, k)
    got = op.evaluate(EvalContext({}), x, codes, s, m)
    xq, d = quant.quantize_activations(x[:1])
    dx = xq * np.repeat(d, 32, axis=1)
    want = dx @ (codes * np.repeat(s, 32, axis=1)).T + x[:1] @ np.repeat(m, 32, axis=1).T
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert np.isnan(got[1]).all()  # a NaN activation: its whole row NaN, never a number
    exact = x[:1] @ quant.dequantize(codes, s, m, Q4_1).T
    assert np.abs(got[0] - exact[0]).max() < 0.02 * np.abs(exact).max()


def test_act_i8_needs_integer_codes_without_float_zero_points() -> None:
    qt = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.FLOAT)
    with pytest.raises(VerifyError, match="act=i8 needs integer codes"):
        _linear_op(qt, (1, 64), 16, 64)


@needs_vnni
@pytest.mark.parametrize("qt", CASES, ids=str)
@pytest.mark.parametrize("m, n, k", [(1, 48, 576), (3, 32, 300), (5, 16, 64)])
def test_vnni_template_matches_interpreter(qt: QuantType, m: int, n: int, k: int) -> None:
    module = qlinear_module(qt, m, n, k, seed=k + m, epilogue=False, act="i8")
    assert check_module(module, pipeline="fuse", template="qdense_i8") == 1


@needs_vnni
@pytest.mark.parametrize("tile_m", [1, 2, 4, 8])
def test_vnni_template_every_row_tile_with_bias_and_residual(tile_m: int) -> None:
    from bitsmith.codegen.template import Config
    module = _residual_module(Q4_1, 9, 64, 160)
    assert check_module(module, pipeline="fuse", template="qdense_i8",
                        config=Config({"TILE_M": tile_m})) == 1


@needs_vnni
def test_vnni_template_nan_inf_and_tiny_rows() -> None:
    module = qlinear_module(Q4_0, 4, 32, 96, epilogue=False, act="i8")
    x = np.random.default_rng(3).standard_normal((4, 96)).astype(np.float32)
    x[1, 3], x[2, 95] = np.nan, -np.inf
    x[3, :32] = np.float32(1e-37) * np.arange(32)  # a block scale below the normal floats
    assert check_module(module, pipeline="fuse", template="qdense_i8", inputs=[x]) == 1


@needs_vnni
@pytest.mark.parametrize("qt", [Q4_1, Q8_0, W3, I5_INT], ids=str)
def test_vnni_template_fuses_an_elementwise_epilogue(qt: QuantType) -> None:
    # gelu(x @ W^T + b): not adds alone, so the epilogue is lowered and run on each tile
    module = qlinear_module(qt, 5, 48, 100, act="i8")
    x = np.random.default_rng(6).standard_normal((5, 100)).astype(np.float32)
    x[1, 3], x[4, 99] = np.nan, -np.inf
    assert check_module(module, pipeline="fuse", template="qdense_i8", inputs=[x]) == 1


@needs_vnni
def test_vnni_template_fused_epilogue_writes_a_reshaped_output() -> None:
    # gelu, then the rows split in two: the epilogue's output is not shaped [m, n]
    module = qlinear_module(Q4_0, 6, 32, 64, act="i8", out_shape=(3, 2, 32))
    assert check_module(module, pipeline="fuse", template="qdense_i8") == 1


@pytest.mark.parametrize("qt", [Q4_1, Q8_0, W3], ids=str)
def test_generic_path_matches_interpreter(qt: QuantType) -> None:
    # 21 output rows are not whole 16-row tiles: no VNNI kernel; the generic lowering runs it
    module = qlinear_module(qt, 3, 21, 100, act="i8")
    x = np.random.default_rng(4).standard_normal((3, 100)).astype(np.float32)
    x[2, 7] = np.inf
    check_module(module, pipeline="fuse", inputs=[x])


def test_no_vnni_host_gets_no_vnni_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = host_target()
    avx2 = Target(kind=plain.kind, mcpu="haswell", isa=("avx", "avx2", "fma"),
                  cores=plain.cores, attrs=dict(plain.attrs))
    assert not templates_a8.has_vnni(avx2)
    monkeypatch.setattr(templates_a8, "host_target", lambda: avx2)
    module = qlinear_module(Q4_1, 2, 32, 64, epilogue=False, act="i8")
    from bitsmith import passes
    passes.run(module, "fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    assert templates_a8.QDenseI8().match(kernel) is None


def test_packing_round_trips() -> None:
    rng = np.random.default_rng(5)
    for nibbles, hi in ((True, 16), (False, 256)):
        codes = rng.integers(0, hi, (32, 70)).astype(np.uint8)
        packed = templates_a8.pack_codes(codes, nibbles)
        assert packed.shape == (2, 3 * (4 if nibbles else 8), 64)
        tile = packed[1].reshape(-1, 16, 4)  # [chunk, row, 4 bytes]
        if nibbles:
            lo, up = tile & 15, tile >> 4
            k8 = np.concatenate([lo, up], axis=-1)  # [chunk, row, 8]: k = 8 chunk + i
            got = k8.transpose(1, 0, 2).reshape(16, -1)
        else:
            got = tile.transpose(1, 0, 2).reshape(16, -1)
        assert np.array_equal(got[:, :70], codes[16:])
        assert not got[:, 70:].any()


def _linear_op(qt: QuantType, xshape: tuple, n: int, k: int) -> quant.LinearOp:
    sshape = quant.scale_shape(qt, (n, k))
    module = Module("m", [TensorType(xshape, f32)], ["x"])
    b = Builder.at_end(module.body)
    w = b.value(graph.ConstantOp, weight="w", result_types=[TensorType((n, k), qt)])
    s = b.value(graph.ConstantOp, weight="s", result_types=[TensorType(sshape, f16)])
    zdt = quant.zero_dtype(qt)
    z = None if zdt is None else b.value(graph.ConstantOp, weight="z",
                                         result_types=[TensorType(sshape, zdt)])
    return quant.LinearOp.create(module.inputs[0], w, s, z, act="i8")


def _residual_module(qt: QuantType, m: int, n: int, k: int) -> Module:
    """r + (x @ W^T + bias): the shape of an LLM's output projections."""
    rng = np.random.default_rng(6)
    sshape = tuple(int(d) for d in quant.scale_shape(qt, (n, k)))
    module = Module("q", [TensorType((m, k), f32), TensorType((m, n), f32)], ["x", "r"])
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    module.weights.update({"w": pack_rows(codes, 4),
                           "s": (rng.random(sshape) * 0.1).astype(np.float16),
                           "z": (rng.standard_normal(sshape) * 0.2).astype(np.float16),
                           "b": rng.standard_normal(n).astype(np.float32)})
    b = Builder.at_end(module.body)
    w = b.value(graph.ConstantOp, weight="w", result_types=[TensorType((n, k), qt)])
    s = b.value(graph.ConstantOp, weight="s", result_types=[TensorType(sshape, f16)])
    z = b.value(graph.ConstantOp, weight="z", result_types=[TensorType(sshape, f16)])
    bias = b.value(graph.ConstantOp, weight="b", result_types=[TensorType((n,), f32)])
    y = b.value(quant.LinearOp, module.inputs[0], w, s, z, act="i8")
    y = b.value(graph.BINARY_OPS["add"], y, bias)
    y = b.value(graph.BINARY_OPS["add"], module.inputs[1], y)
    b.create(func.ReturnOp, y)
    ir.verify(module)
    return module
