"""The quantize pass and its spec strings: RTN and GPTQ against the interpreter, per-layer
choices, the report, and every parsing error."""
import numpy as np
import pytest
import torch

from bitsmith import ir
from bitsmith.frontend import from_torch
from bitsmith.ir.dtypes import IntType
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint
from bitsmith.passes import PassError, PipelineError, parse_pipeline, run
from bitsmith.passes.quant_methods import (
    _column_rtn,
    gptq,
    relative_error,
    rotate_columns,
    rotate_hessian,
    rotation_block,
    rtn,
)
from bitsmith.passes.quant_spec import QuantSpecError, parse_quant_spec, quant_pipeline_entry


@pytest.mark.parametrize("text, want", [
    ("w4g128", {"bits": 4, "group": 128}),
    ("w3g128:gptq", {"bits": 3, "group": 128, "method": "gptq"}),
    ("w8", {"bits": 8, "group": 0}),
    ("f6e3m2g64", {"format": "f6e3m2", "group": 64}),
    ("w2g64:gptq:no-act-order:sym:axis=auto:scale=bf16:keep=*pooler*|lm_head*:promote=0.25",
     {"bits": 2, "group": 64, "method": "gptq", "act_order": False, "sym": True,
      "axis": "auto", "scale": "bf16", "keep": "*pooler*|lm_head*", "promote": 0.25}),
    ("w3g128:gptq:rot", {"bits": 3, "group": 128, "method": "gptq", "rotate": 128}),
    ("w4g64:rot=32:damp=0.1", {"bits": 4, "group": 64, "rotate": 32, "damp": 0.1}),
])
def test_spec_strings_parse(text: str, want: dict) -> None:
    assert parse_quant_spec(text) == want
    entry = quant_pipeline_entry(text)
    parse_pipeline(entry)  # every spec is a valid pipeline entry


@pytest.mark.parametrize("text, match", [
    ("", "it is empty"),
    ("w9g128", "integer weights take 1..8 bits, got 9"),
    ("w0", "take 1..8 bits"),
    ("x4g128", "should be wBITS"),
    ("w4g", "should be wBITS"),
    ("f5e3m2", "unknown dtype"),
    ("w4:fast", "unknown option 'fast'"),
    ("w4:axis=diag", "axis must be out, in or auto"),
    ("w4:scale=f64", "scale must be f16, bf16 or f32"),
    ("w4:promote=2", "promote= takes a fraction"),
    ("w4:keep=", "keep= needs at least one"),
    ("f4e2m1:sym", "always symmetric"),
    ("w4:color=red", "unknown setting 'color'"),
    ("w4:rot=48", "rot= takes a power of two >= 2"),
    ("w4:rot=1", "rot= takes a power of two >= 2"),
    ("w4:damp=0", "damp= takes a fraction in"),
    ("w4:damp=x", "damp= takes a fraction in"),
])
def test_spec_errors_say_what_was_expected(text: str, match: str) -> None:
    with pytest.raises(QuantSpecError, match=match) as info:
        parse_quant_spec(text)
    assert "expected e.g. w4g128" in str(info.value)
    assert isinstance(info.value, PipelineError)


def mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.GELU(),
                                torch.nn.Linear(40, 24))
    return model, torch.randn(4, 96)


def quantized(spec: str, calib: int = 0) -> ir.Module:
    model, x = mlp()
    module = from_torch(model, (x,), {}, name="mlp")
    run(module, "canonicalize,cse")
    rng = np.random.default_rng(3)
    module.calibration = [(rng.standard_normal((4, 96)).astype(np.float32),)
                          for _ in range(calib)]
    run(module, quant_pipeline_entry(spec))
    return module


@pytest.mark.parametrize("spec, tol", [("w8", 0.02), ("w4g32", 0.15), ("f6e3m2g32", 0.15),
                                       ("w4g32:gptq", 0.15), ("w5g16:axis=in", 0.1),
                                       ("w4g32:rot", 0.15), ("w4g32:gptq:rot=32", 0.2)])
def test_quantized_model_stays_close_to_f32(spec: str, tol: float) -> None:
    model, x = mlp()
    module = quantized(spec, calib=8)
    names = [op.name for op in module.ops]
    assert names.count("quant.linear") == 2 and "graph.linear" not in names
    got = ir.interpret(module, x.numpy())[0]
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    report = module.metadata["quantization"]
    assert report["bytes"] < report["f32_bytes"] / 3
    assert all(r["error"] > 0 for r in report["layers"])


def test_keep_leaves_layers_in_f32_and_the_report_says_so() -> None:
    module = quantized("w4g32:keep=2.*")
    assert [op.name for op in module.ops].count("quant.linear") == 1
    rows = {r["layer"]: r for r in module.metadata["quantization"]["layers"]}
    assert rows["2.weight"]["format"] == "f32" and rows["0.weight"]["format"] == "u4"


def test_promote_gives_the_most_sensitive_layer_more_bits() -> None:
    rows = quantized("w3g32:promote=0.5", calib=4).metadata["quantization"]["layers"]
    assert sorted(r["format"] for r in rows) == ["u3", "u5"]


def test_axis_auto_keeps_the_grouping_with_the_smaller_error() -> None:
    auto = {r["layer"]: r for r in quantized("w3g8:axis=auto", calib=4)
            .metadata["quantization"]["layers"]}
    for axis in ("out", "in"):
        fixed = quantized(f"w3g8:axis={axis}", calib=4).metadata["quantization"]["layers"]
        for row in fixed:
            assert auto[row["layer"]]["error"] <= row["error"] + 1e-12


def test_gptq_needs_calibration() -> None:
    with pytest.raises(PassError, match="method=gptq needs calibration inputs"):
        quantized("w4g32:gptq")


@pytest.mark.parametrize("bits, axis", [(3, GroupAxis.OUT), (4, GroupAxis.OUT),
                                        (3, GroupAxis.IN)])
def test_gptq_lowers_layer_error_below_rtn(bits: int, axis: GroupAxis) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((48, 160)).astype(np.float32)
    mix = rng.standard_normal((160, 160)) * 0.3 + np.eye(160)  # correlated inputs
    x = rng.standard_normal((512, 160)) @ mix
    h = x.T @ x
    qt = QuantType(IntType(bits, False), 32, axis, zero_point=ZeroPoint.INT)
    err_rtn = relative_error(w, rtn(w, qt, np.diag(h)), h)
    err_gptq = relative_error(w, gptq(w, h, qt), h)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    plain = relative_error(w, gptq(w, h, qt, act_order=False), h)
    assert plain < err_rtn


@pytest.mark.parametrize("group,signed", [(0, False), (32, False), (100, True)])
def test_column_fit_matches_rtn_on_that_column(group: int, signed: bool) -> None:
    """The GPTQ sweep's one-column clipping search (all factors at once) picks what `rtn`
    picks for the column alone: same values, scales and zero points, short last group too."""
    qt = QuantType(IntType(4, signed), group, GroupAxis.IN, ir.dtypes.f16,
                   ZeroPoint.INT if not signed else ZeroPoint.NONE)
    col = np.random.default_rng(group).standard_normal(300).astype(np.float32)
    want = rtn(col[:, None], qt)
    values, scale, zero = _column_rtn(col, qt)
    np.testing.assert_array_equal(values, want.weight()[:, 0])
    np.testing.assert_array_equal(scale, want.scale)
    assert (zero is None) == (want.zero is None)
    if zero is not None:
        np.testing.assert_array_equal(zero, want.zero)


@pytest.mark.parametrize("block", [2, 16, 128])
def test_rotation_is_orthogonal_and_leaves_the_layer_unchanged(block: int) -> None:
    r = rotation_block(block).astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(block), atol=1e-6)
    rng = np.random.default_rng(block)
    k = 3 * block
    w, x = rng.standard_normal((5, k)), rng.standard_normal((7, k))
    full = np.kron(np.eye(3), r)  # blockdiag(r, r, r)
    np.testing.assert_allclose(rotate_columns(w, r), w @ full, atol=1e-9)
    np.testing.assert_allclose((x @ full) @ rotate_columns(w, r).T, x @ w.T, atol=1e-9)
    h = x.T @ x
    np.testing.assert_allclose(rotate_hessian(h, r), full.T @ h @ full, atol=1e-9)


def test_rotation_spreads_outlier_columns_and_lowers_the_error() -> None:
    """A few input channels carry large weights (as LLM layers do): unrotated, they set the
    range of their groups; rotated, they are spread over the block."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[:, [3, 70, 200]] *= 25.0
    qt = QuantType(IntType(3, False), 64, GroupAxis.OUT, zero_point=ZeroPoint.INT)
    r = rotation_block(64)
    plain = relative_error(w, rtn(w, qt), None)
    rotated = relative_error(rotate_columns(w, r), rtn(rotate_columns(w, r), qt), None)
    assert rotated < 0.5 * plain, (rotated, plain)


def test_rotated_layers_run_on_rotated_inputs() -> None:
    module = quantized("w4g32:rot=64", calib=2)
    rows = {r["layer"]: r["rotation"] for r in module.metadata["quantization"]["layers"]}
    assert rows == {"0.weight": 32, "2.weight": 8}  # the largest blocks dividing K=96, K=40
    matmuls = [op for op in module.ops if op.name == "graph.matmul"]
    assert sorted(op.operands[1].type.shape for op in matmuls) == [(8, 8), (32, 32)]
    for op in matmuls:  # the inputs [.., K] -> [.., K/b, b] @ R_b -> [.., K] -> quant.linear
        (user,) = [u for u in op.result.users]
        assert user.name == "graph.reshape"
        assert [u.name for u in user.result.users] == ["quant.linear"]


class ConvNet(torch.nn.Module):
    """Odd shapes: strided/padded conv, a dilated conv without bias, a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(5, 13, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(13, 7, (3, 2), dilation=(2, 1), bias=False)
        self.dw = torch.nn.Conv2d(7, 7, 3, groups=7, padding=1)
        self.fc = torch.nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.c2(torch.relu(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def quantized_convnet(spec: str, pipeline: str = "") -> tuple[ir.Module, torch.Tensor,
                                                               torch.Tensor]:
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 5, 17, 15)
    module = from_torch(model, (x,), {}, name="convnet")
    run(module, "canonicalize,cse" + (f",{pipeline}" if pipeline else ""))
    rng = np.random.default_rng(0)
    module.calibration = [(rng.standard_normal((2, 5, 17, 15)).astype(np.float32),)
                          for _ in range(4)]
    run(module, quant_pipeline_entry(spec))
    return module, x, model(x).detach()


@pytest.mark.parametrize("spec, tol", [("w8", 0.005), ("w4g16", 0.05), ("w4g16:gptq", 0.05),
                                       ("w4g16:gptq:axis=in", 0.05), ("f6e3m2g16", 0.05)])
def test_convs_are_quantized_and_stay_close_to_f32(spec: str, tol: float) -> None:
    module, x, want = quantized_convnet(spec)
    names = [op.name for op in module.ops]
    assert names.count("quant.conv2d") == 2 and names.count("graph.conv2d") == 1  # depthwise
    got = ir.interpret(module, x.numpy())[0]
    assert np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max() < tol
    rows = {r["layer"]: r for r in module.metadata["quantization"]["layers"]}
    assert rows["c1.weight"]["shape"] == [13, 5 * 3 * 3] and rows["c1.weight"]["op"] == "conv2d"
    assert rows["c2.weight"]["shape"] == [7, 13 * 3 * 2]
    assert rows["dw.weight"]["format"] == "f32" and "grouped conv" in rows["dw.weight"]["reason"]


def test_gptq_lowers_conv_layer_error_below_rtn() -> None:
    """The conv's Hessian comes from its im2col windows: GPTQ beats RTN on it."""
    errors = {}
    for method in ("rtn", "gptq"):
        rows = quantized_convnet(f"w3g16:{method}")[0].metadata["quantization"]["layers"]
        errors[method] = {r["layer"]: r["error"] for r in rows if r["format"] != "f32"}
    for layer in ("c1.weight", "c2.weight"):
        assert errors["gptq"][layer] < errors["rtn"][layer], (layer, errors)


def test_quantized_convs_run_channels_last_after_the_layout_pass() -> None:
    """quantize before or after layout{conv=nhwc}: same values, convs NHWC either way."""
    before, x, _ = quantized_convnet("w4g16")
    want = ir.interpret(before, x.numpy())[0]
    run(before, "layout{conv=nhwc}")
    after, _, _ = quantized_convnet("w4g16", pipeline="layout{conv=nhwc}")
    for module in (before, after):
        convs = [op for op in module.ops if op.name == "quant.conv2d"]
        assert [op.layout for op in convs] == ["NHWC", "NHWC"]
        np.testing.assert_allclose(ir.interpret(module, x.numpy())[0], want, rtol=1e-5,
                                   atol=1e-6)
