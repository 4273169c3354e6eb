"""Quantized kernels against the interpreter's dequantize-then-matmul: every integer width
1..8 and the low-bit float formats, on odd shapes (N and K not multiples of anything, K not a
multiple of the group: the last group is short), the fused template and the generic path."""
import numpy as np
import pytest

from bitsmith import ir, passes
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates import select
from bitsmith.ir import Builder, Module, TensorType, graph
from bitsmith.ir.dialects import func, quant
from bitsmith.ir.dtypes import IntType, f16, f32, parse_dtype
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint

from ..support import random_inputs
from .tvm_checks import build_and_run, check_module, kernel_calls


def qlinear_module(qt: QuantType, m: int, n: int, k: int, seed: int = 0,
                   epilogue: bool = True, act: str = "f32",
                   out_shape: tuple[int, ...] | None = None) -> Module:
    """x [m, k] -> gelu(quant.linear(x, W) + b): a quantized layer with an epilogue (without
    it, quant.linear(x, W) alone). Random codes, f16 scales and, where the format has them,
    zero points."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in quant.scale_shape(qt, (n, k)))
    module = Module("q", [TensorType((m, k), f32)], ["x"])
    storage = qt.storage
    codes = storage.to_bits(storage.cast(rng.standard_normal((n, k)) * 3))
    module.weights.update({"w": pack_rows(codes, qt.bits),
                           "s": (rng.random(shape) * 0.1 + 0.01).astype(np.float16)})
    if epilogue:
        module.weights["b"] = rng.standard_normal(n).astype(np.float32)
    b = Builder.at_end(module.body)
    w = b.value(graph.ConstantOp, weight="w", result_types=[TensorType((n, k), qt)])
    s = b.value(graph.ConstantOp, weight="s", result_types=[TensorType(shape, f16)])
    z = None
    zdt = quant.zero_dtype(qt)
    if zdt is not None and qt.zero_point is ZeroPoint.MIN:  # a float minimum per group
        module.weights["z"] = zdt.cast(rng.standard_normal(shape) * 0.3)
        z = b.value(graph.ConstantOp, weight="z", result_types=[TensorType(shape, zdt)])
    elif zdt is not None:
        lo, hi = int(storage.min_value), int(storage.max_value)
        module.weights["z"] = zdt.cast(rng.integers(lo, hi + 1, shape))
        z = b.value(graph.ConstantOp, weight="z", result_types=[TensorType(shape, zdt)])
    y = b.value(quant.LinearOp, module.inputs[0], w, s, z, act=act)
    if epilogue:
        bias = b.value(graph.ConstantOp, weight="b", result_types=[TensorType((n,), f32)])
        y = b.value(graph.GeluOp, b.value(graph.BINARY_OPS["add"], y, bias))
    if out_shape is not None:  # the result viewed in another shape
        y = b.value(graph.ReshapeOp, y, result_types=[TensorType(out_shape, f32)])
    b.create(func.ReturnOp, y)
    ir.verify(module)
    return module


INT_CASES = [(bits, signed) for bits in range(1, 9) for signed in (False, True)]


@pytest.mark.parametrize("bits, signed", INT_CASES)
def test_fused_dequant_gemv_every_integer_width(bits: int, signed: bool) -> None:
    zp = ZeroPoint.NONE if signed else ZeroPoint.INT
    qt = QuantType(IntType(bits, signed), 32, GroupAxis.OUT, f16, zp)
    # K = 300: blocks of 512 padded, groups of 32 with a short last one (300 = 9*32 + 12)
    assert check_module(qlinear_module(qt, 1, 37, 300, seed=bits), pipeline="fuse",
                        template="qdense") == 1


@pytest.mark.parametrize("fmt", ["f4e2m1", "f6e3m2", "f6e2m3", "f8e4m3", "f8e5m2", "f3e1m1",
                                 "f5e2m2"])
def test_fused_dequant_gemm_low_bit_floats(fmt: str) -> None:
    qt = QuantType(parse_dtype(fmt), 64, GroupAxis.OUT, f16, ZeroPoint.NONE)
    check_module(qlinear_module(qt, 3, 29, 700), pipeline="fuse", template="qdense")


@pytest.mark.parametrize("group, k", [(0, 1100), (1024, 1100), (512, 1500), (16, 70)])
def test_fused_kernel_groupings(group: int, k: int) -> None:
    qt = QuantType(IntType(5, False), group, GroupAxis.OUT, f16, ZeroPoint.INT)
    check_module(qlinear_module(qt, 2, 19, k), pipeline="fuse", template="qdense")


def test_every_knob_of_the_fused_template() -> None:
    qt = QuantType(IntType(3, False), 64, GroupAxis.OUT, f16, ZeroPoint.INT)
    module = qlinear_module(qt, 4, 24, 200)
    passes.run(module, "fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    template, problem = select(kernel, host_target())
    base = template.default_config(problem, host_target())
    for knob in template.space.knobs:
        for choice in knob.choices:
            config = Config({**base, knob.name: choice})
            if config != base and template.valid(problem, config):
                check_module(qlinear_module(qt, 4, 24, 200), pipeline="fuse", config=config,
                             template="qdense")


@pytest.mark.parametrize("qt", [
    QuantType(IntType(4, False), 8, GroupAxis.IN, f16, ZeroPoint.INT),  # per input channel
    QuantType(IntType(6, True), 100, GroupAxis.OUT, f16, ZeroPoint.NONE),  # odd group
    QuantType(parse_dtype("f6e3m2"), 0, GroupAxis.IN, f16, ZeroPoint.NONE),
])
def test_generic_path_for_groupings_the_fused_template_does_not_take(qt: QuantType) -> None:
    check_module(qlinear_module(qt, 2, 21, 230), pipeline="fuse", template="rows")


def test_subnormal_decode_gives_nan_not_zeros_when_subnormals_are_flushed() -> None:
    """DECODE=subnormal reads codes as subnormal floats: a thread that flushes them to zero
    (DAZ) would see every weight as 0, so the kernel's probe turns its outputs into NaN."""
    torch = pytest.importorskip("torch")
    qt = QuantType(IntType(4, True), 64, GroupAxis.OUT, f16, ZeroPoint.NONE)
    module = qlinear_module(qt, 1, 8, 128)
    passes.run(module, "fuse")
    arrays = random_inputs(module, 1, ints=(0, 5), floats_as=np.float32)
    kernel, args, ctx = next(kernel_calls(module, arrays))
    want = kernel.evaluate(ctx, *args)
    template, problem = select(kernel, host_target())
    config = Config({**template.default_config(problem, host_target()),
                     "DECODE": "subnormal", "PARALLEL": False})  # runs in this thread
    _, (ok,) = build_and_run(kernel, args, want, config)
    np.testing.assert_allclose(ok, want[0], rtol=1e-5, atol=1e-5)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        _, (flushed,) = build_and_run(kernel, args, want, config)
    finally:
        torch.set_flush_denormal(False)
    assert np.isnan(flushed).all(), flushed


def test_rotated_quantized_layers_compile_to_kernels_that_match_the_interpreter() -> None:
    """`quantize{rotate=b}` puts reshape -> matmul(R_b) -> reshape before each quant.linear:
    every kernel of the fused result against the interpreter, at batch 1 and 3."""
    torch = pytest.importorskip("torch")
    from bitsmith.frontend import from_torch  # noqa: PLC0415 - torch only here

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.GELU(),
                                torch.nn.Linear(40, 24))
    module = from_torch(model, (torch.randn(3, 96),), {}, name="mlp")
    passes.run(module, "canonicalize,cse,quantize{bits=4,group=32,rotate=64}")
    assert sum(op.name == "graph.matmul" for op in module.ops) == 2
    assert check_module(module, pipeline="fuse", batches=(3,)) >= 2


@pytest.mark.parametrize("spec, layout", [("w3g16:axis=in", "nchw"), ("w5g16", "nhwc"),
                                          ("f4e2m1g0", "nhwc")])
def test_quantized_convs_compile_to_kernels_that_match_the_interpreter(spec: str,
                                                                       layout: str) -> None:
    """quant.conv2d (strided/padded and dilated, odd channel counts) in either layout, its
    bias add and relu fused after it: every kernel against the interpreter."""
    torch = pytest.importorskip("torch")
    from bitsmith.frontend import from_torch  # noqa: PLC0415 - torch only here
    from bitsmith.passes.quant_spec import quant_pipeline_entry  # noqa: PLC0415

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 13, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(13, 7, (3, 2), dilation=(2, 1)))
    module = from_torch(model, (torch.randn(2, 5, 17, 15),), {}, name="convs")
    passes.run(module, f"canonicalize,cse,{quant_pipeline_entry(spec)},layout{{conv={layout}}}")
    assert sum(op.name == "quant.conv2d" for op in module.ops) == 2
    assert check_module(module, pipeline="fuse") >= 2
