"""The quant dialect: dequantize/quantize semantics per grouping, packed constants, text round
trips, and the verifier's errors."""
import numpy as np
import pytest

from bitsmith import ir
from bitsmith.ir import Builder, Module, TensorType, graph
from bitsmith.ir.dialects import func, quant
from bitsmith.ir.dtypes import IntType, f4e2m1, f16, f32, i4, u8
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint


def test_dequantize_per_output_channel_with_a_short_last_group() -> None:
    qt = QuantType(IntType(3, False), 4, GroupAxis.OUT, f16, ZeroPoint.INT)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, (2, 10), dtype=np.uint8)
    assert quant.scale_shape(qt, (2, 10)) == (2, 3)  # groups of 4, 4 and 2 inputs
    scale = rng.random((2, 3)).astype(np.float16)
    zero = rng.integers(0, 8, (2, 3), dtype=np.uint8)
    got = quant.dequantize(codes, scale, zero, qt)
    for n in range(2):
        for k in range(10):
            want = (float(codes[n, k]) - float(zero[n, k // 4])) * float(scale[n, k // 4])
            assert got[n, k] == np.float32(want)


def test_dequantize_per_input_channel_groups_run_along_the_outputs() -> None:
    qt = QuantType(i4, 2, GroupAxis.IN, f32, ZeroPoint.NONE)
    codes = i4.to_bits(np.array([[-8, 7], [1, 2], [3, -1]]))
    scale = np.array([[1.0, 10.0], [0.5, 0.25]], np.float32)  # [ceil(3/2), K]
    got = quant.dequantize(codes, scale, None, qt)
    np.testing.assert_array_equal(got, [[-8.0, 70.0], [1.0, 20.0], [1.5, -0.25]])


def test_low_bit_float_codes_decode_through_the_format() -> None:
    qt = QuantType(f4e2m1, 0, GroupAxis.OUT, f16, ZeroPoint.NONE)
    values = np.array([[0.0, 0.5, 1.5, 6.0, -3.0]], np.float32)
    scale = np.array([[2.0]], np.float16)
    codes = quant.quantize(values * 2, scale, None, qt)
    np.testing.assert_array_equal(quant.dequantize(codes, scale, None, qt), values * 2)


def test_quantize_rounds_half_to_even_and_clamps() -> None:
    qt = QuantType(IntType(2, False), 0, GroupAxis.OUT, f32, ZeroPoint.INT)
    x = np.array([[-9.0, 0.5, 1.5, 2.5, 99.0]], np.float32)
    codes = quant.quantize(x, np.ones((1, 1), np.float32), np.zeros((1, 1), np.uint8), qt)
    assert codes.tolist() == [[0, 0, 2, 2, 3]]


def random_weight(m: Module, b: Builder, qt: QuantType, n: int, k: int, seed: int
                  ) -> tuple[object, object, object]:
    """Constants of random codes [n, k] (packed), f16 scales and, if asymmetric, zero points."""
    rng = np.random.default_rng(seed)
    sshape = quant.scale_shape(qt, (n, k))
    m.weights["w"] = pack_rows(rng.integers(0, 1 << qt.bits, (n, k), dtype=np.uint8), qt.bits)
    m.weights["s"] = rng.random(sshape).astype(np.float16)
    w = b.value(graph.ConstantOp, weight="w", result_types=[TensorType((n, k), qt)])
    s = b.value(graph.ConstantOp, weight="s", result_types=[TensorType(sshape, f16)])
    z = None
    if qt.zero_point is ZeroPoint.INT:
        m.weights["z"] = rng.integers(0, 1 << qt.bits, sshape, dtype=np.uint8)
        z = b.value(graph.ConstantOp, weight="z", result_types=[TensorType(sshape, u8)])
    return w, s, z


def quant_module(qt: QuantType, n: int = 5, k: int = 7, seed: int = 0) -> Module:
    m = Module("q", [TensorType((2, k), f32)], ["x"])
    b = Builder.at_end(m.body)
    w, s, z = random_weight(m, b, qt, n, k, seed)
    y = b.value(quant.LinearOp, m.inputs[0], w, s, z)
    wf = b.value(quant.DequantizeOp, w, s, z)
    b.create(func.ReturnOp, y, wf)
    ir.verify(m)
    return m


@pytest.mark.parametrize("qt", [
    QuantType(IntType(5, False), 4, GroupAxis.OUT, f16, ZeroPoint.INT),
    QuantType(IntType(3, True), 2, GroupAxis.IN, f16, ZeroPoint.NONE),
    QuantType(f4e2m1, 0, GroupAxis.OUT, f16, ZeroPoint.NONE),
])
def test_quant_module_prints_parses_and_runs(qt: QuantType) -> None:
    m = quant_module(qt)
    text = str(m)
    assert "!quant.weight<" in text and '"quant.linear"' in text
    again = ir.parse(text, weights=m.weights)
    assert str(again) == text
    x = np.random.default_rng(1).standard_normal((2, 7)).astype(np.float32)
    y, w = ir.interpret(again, x)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ir.interpret(m, x)[1], w)


def test_verifier_names_the_expected_scale_and_zero_point_types() -> None:
    qt = QuantType(IntType(4, False), 4, GroupAxis.OUT, f16, ZeroPoint.INT)
    m = quant_module(qt)
    lin = next(op for op in m.ops if op.name == "quant.linear")
    with pytest.raises(ir.VerifyError, match=r"scale must be tensor<5x2xf16>"):
        quant.check_params(lin, lin.operands[1], lin.operands[0], lin.operands[3])
    with pytest.raises(ir.VerifyError, match="needs a zero-point operand of type "
                                             r"tensor<5x2xu8>"):
        quant.check_params(lin, lin.operands[1], lin.operands[2], None)


def test_verifier_checks_the_packed_weight_shape() -> None:
    m = quant_module(QuantType(IntType(3, False), 0, GroupAxis.OUT, f16, ZeroPoint.INT))
    m.weights["w"] = np.zeros((5, 2), np.uint32)  # 7 codes of 3 bits take 1 word
    with pytest.raises(ir.VerifyError, match=r"stored packed as uint32\[5, 1\]"):
        ir.verify(m)


def qconv_module(qt: QuantType, x_shape: tuple[int, ...], out: int, kernel: tuple[int, int],
                 layout: str = "NCHW", groups: int = 1, seed: int = 0, **attrs: object
                 ) -> Module:
    """x -> quant.conv2d by random codes of [out, in/groups*KH*KW] -> (y, its f32 weight)."""
    c = x_shape[1 if layout == "NCHW" else 3]
    m = Module("qc", [TensorType(x_shape, f32)], ["x"])
    b = Builder.at_end(m.body)
    w, s, z = random_weight(m, b, qt, out, c // groups * kernel[0] * kernel[1], seed)
    y = b.value(quant.Conv2dOp, m.inputs[0], w, s, z, kernel=kernel, layout=layout,
                groups=groups, **attrs)
    b.create(func.ReturnOp, y, b.value(quant.DequantizeOp, w, s, z))
    ir.verify(m)
    return m


@pytest.mark.parametrize("layout, groups, attrs", [
    ("NCHW", 1, {"stride": (2, 1), "padding": (1, 2)}),
    ("NHWC", 1, {"dilation": (2, 1)}),
    ("NCHW", 3, {"padding": (1, 1)}),
])
def test_quant_conv2d_is_torch_conv_by_the_dequantized_weight(layout: str, groups: int,
                                                              attrs: dict) -> None:
    torch = pytest.importorskip("torch")
    qt = QuantType(IntType(3, False), 8, GroupAxis.OUT, f16, ZeroPoint.INT)
    x = np.random.default_rng(2).standard_normal((2, 6, 9, 7)).astype(np.float32)  # NCHW
    xin = x if layout == "NCHW" else x.transpose(0, 2, 3, 1)
    m = qconv_module(qt, xin.shape, 5 if groups == 1 else 9, (3, 2), layout, groups, **attrs)
    again = ir.parse(str(m), weights=m.weights)
    assert str(again) == str(m) and '"quant.conv2d"' in str(m)
    y, w = ir.interpret(again, xin)
    want = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w.reshape(w.shape[0], 6 // groups, 3, 2)),
        groups=groups, **attrs).numpy()
    np.testing.assert_allclose(y if layout == "NCHW" else y.transpose(0, 3, 1, 2), want,
                               rtol=1e-5, atol=1e-5)


def test_quant_conv2d_verifier_says_what_the_weight_should_be() -> None:
    qt = QuantType(IntType(4, False), 0, GroupAxis.OUT, f16, ZeroPoint.INT)
    with pytest.raises(ir.VerifyError, match=r"does not fit input .* kernel 2x2 and groups=1: "
                                             r"expected in = 6/1\*2\*2"):
        m = qconv_module(qt, (1, 6, 5, 5), 4, (3, 2))  # a weight made for 3x2
        conv = next(op for op in m.ops if op.name == "quant.conv2d")
        quant.Conv2dOp.create(*conv.operands, kernel=(2, 2))
