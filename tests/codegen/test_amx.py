"""The AMX GEMM kernels against numpy (on a CPU with AMX): bf16 with its rounding against
torch's, int8 against the exact integer arithmetic it stands for."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith.codegen.template import Target
from bitsmith.codegen.tvm import lower  # noqa: F401 - imported before the templates
from bitsmith.codegen.tvm.amx import (
    amx_tvm_target,
    bf16_bits,
    from_bf16_bits,
    gemm,
    gemm_bf16,
    gemm_int8,
    has_amx,
    has_amx_bf16,
    pack_bf16_panels,
    pack_int8_panels,
    quantize_int8,
)
from bitsmith.codegen.tvm.target import host_target
from bitsmith.errors import CodegenError
from bitsmith.runtime.host import request_amx
from bitsmith.runtime.tvm_runtime import tvm

RNG = np.random.default_rng(11)


def test_bf16_rounding_is_torchs() -> None:
    x = np.concatenate([RNG.standard_normal(4096).astype(np.float32) * 1e3,
                        np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, 3.4e38,
                                  np.float32(1.00390625), np.float32(1.01171875)],
                                 np.float32)])
    ours = bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert (ours[~nan] == theirs[~nan]).all()
    assert np.isnan(from_bf16_bits(ours[nan])).all()


def test_a_target_without_amx_is_told_so() -> None:
    assert not has_amx_bf16(Target(kind="llvm", isa=("avx2", "fma"), cores=2))
    assert has_amx_bf16(Target(kind="llvm", isa=("amx_bf16", "amx_tile", "avx512_bf16"),
                               cores=2))


@pytest.mark.skipif(not (has_amx_bf16(host_target()) and request_amx()),
                    reason="needs a CPU with AMX-BF16 and Linux's tile permission")
@pytest.mark.parametrize("m, k, n", [(100, 300, 70), (1, 32, 32), (64, 768, 96), (33, 20, 5)])
def test_amx_gemm_matches_the_bf16_rounded_product(m: int, k: int, n: int) -> None:
    x = RNG.standard_normal((m, k)).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    x[0, 3] = np.inf if m > 1 else x[0, 3]
    func = gemm_bf16((m, k), n)
    ex = tvm.compile(tvm.IRModule({"main": func}), target=amx_tvm_target(host_target()))
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    out = tvm.runtime.empty((up(m), up(n)), "float32")
    ex["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_bf16_panels(w)), out)
    xr = from_bf16_bits(bf16_bits(x)).astype(np.float64)
    wr = from_bf16_bits(bf16_bits(w)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = xr @ wr.T
    got = out.numpy()[:m, :n]
    finite = np.isfinite(want)
    assert (np.isinf(got) == np.isinf(want)).all() and (np.isnan(got) == np.isnan(want)).all()
    scale = np.abs(want[finite]).max()
    # f32 accumulation of exact bf16 products: only the order of the sums differs
    assert np.abs(got[finite] - want[finite]).max() <= 1e-5 * scale


def _int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x as the kernel quantizes them: codes (int64) and scales; NaN scale where a
    row is not finite."""
    finite = np.isfinite(x).all(axis=1)
    big = np.maximum(np.abs(np.where(finite[:, None], x, 0)).max(axis=1), 1e-30)
    codes = np.rint(np.where(finite[:, None], x, 0) * (np.float32(127) / big)[:, None])
    return codes.astype(np.int64), np.where(finite, big / np.float32(127), np.nan)


@pytest.mark.skipif(not (has_amx(host_target(), "int8") and request_amx()),
                    reason="needs a CPU with AMX-INT8 and Linux's tile permission")
@pytest.mark.parametrize("m, k, n", [(100, 300, 70), (1, 64, 32), (64, 768, 96), (33, 21, 5)])
def test_amx_int8_gemm_is_the_exact_integer_product_scaled(m: int, k: int, n: int) -> None:
    """Each row of x on its own scale, W per column, int32 sums, one scaling: equal to that
    arithmetic done exactly in numpy (to f32 rounding of the scaling); a row holding NaN or
    an infinity is a NaN row; the rest stay within 2% of the f32 product."""
    x = (RNG.standard_normal((m, k)) * RNG.uniform(0.01, 100, (m, 1))).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    if m > 2:
        x[0, 3], x[2, 0] = np.inf, np.nan
        x[1] = 0.0  # an all-zero row: zero out
    if m > 4:  # in the last values of a row, past its whole vectors of 16
        x[3, k - 1], x[4, k - 1] = np.nan, -np.inf
    ex = tvm.compile(tvm.IRModule({"main": gemm_int8((m, k), n)}),
                     target=amx_tvm_target(host_target()))
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    out = tvm.runtime.empty((up(m), up(n)), "float32")
    ex["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_int8_panels(w)), out)
    got = out.numpy()[:m, :n]
    codes, scale = _int8_rows(x)
    w_codes, w_scale = quantize_int8(w)
    assert np.abs(w_codes).max() <= 127
    sums = codes @ w_codes.astype(np.int64).T
    want = sums.astype(np.float64) * scale[:, None] * w_scale[None, :].astype(np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all()
    ok = ~bad
    assert np.abs(got[ok] - want[ok]).max() <= 1e-5 * np.abs(want[ok]).max()
    exact = x[ok].astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(got[ok] - exact).max() <= 2e-2 * np.abs(exact).max()
    if m > 2:
        assert (got[1] == 0).all()


@pytest.mark.skipif(not (has_amx(host_target(), "int8") and request_amx()),
                    reason="needs a CPU with AMX-INT8 and Linux's tile permission")
@pytest.mark.parametrize("m, k, n", [(37, 150, 70), (5, 64, 32)])
def test_smoothed_int8_gemm_is_the_integer_product_of_x_over_s_and_w_times_s(
        m: int, k: int, n: int) -> None:
    """SmoothQuant: x / s quantized per row, W * s per column, the same exact integer
    arithmetic; nearer the f32 product than unsmoothed where x has outlier channels."""
    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[:, 3] *= 80  # outlier channels, as LayerNorm outputs have
    x[:, k - 2] *= 40
    w = RNG.standard_normal((n, k)).astype(np.float32)
    s = np.sqrt(np.abs(x).max(0) / np.abs(w).max(0)).astype(np.float32)
    x[m - 1, k - 1] = np.nan
    ex = tvm.compile(tvm.IRModule({"main": gemm("int8", (m, k), n, smooth=True)}),
                     target=amx_tvm_target(host_target()))
    plain = tvm.compile(tvm.IRModule({"main": gemm_int8((m, k), n)}),
                        target=amx_tvm_target(host_target()))
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    got, unsmoothed = (tvm.runtime.empty((up(m), up(n)), "float32") for _ in range(2))
    ex["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_int8_panels(w, smooth=s)), got)
    plain["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_int8_panels(w)), unsmoothed)
    got, unsmoothed = got.numpy()[:m, :n], unsmoothed.numpy()[:m, :n]
    codes, scale = _int8_rows((x / s).astype(np.float32))
    w_codes, w_scale = quantize_int8(w * s)
    want = (codes @ w_codes.astype(np.int64).T) * scale[:, None] * w_scale[None, :]
    assert np.isnan(got[m - 1]).all() and np.isfinite(got[:m - 1]).all()
    ok = slice(0, m - 1)
    assert np.abs(got[ok] - want[ok]).max() <= 1e-5 * np.abs(want[ok]).max()
    exact = x[ok].astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(got[ok] - exact).max() < np.abs(unsmoothed[ok] - exact).max()


def test_smoothing_factors_are_checked_and_packed_after_the_panels() -> None:
    w = RNG.standard_normal((40, 70)).astype(np.float32)
    s = RNG.uniform(0.5, 2, 70).astype(np.float32)
    packed = pack_int8_panels(w, smooth=s)
    assert packed.shape == (3, 128 // 4 + 1, 32, 4)  # 2 panels (K padded to 128), 1 of 1 / s
    assert np.array_equal(packed[:2], pack_int8_panels(w * s))
    assert np.allclose(packed[2].reshape(-1).view(np.float32)[:70], 1 / s)
    for bad in (s[:69], np.where(np.arange(70) == 4, -1.0, s), np.where(
            np.arange(70) == 9, np.nan, s)):
        with pytest.raises(CodegenError, match="SmoothQuant factors"):
            pack_int8_panels(w, smooth=bad.astype(np.float32))


def test_an_int8_weight_must_be_finite() -> None:
    w = np.ones((4, 8), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(CodegenError, match="must be finite"):
        pack_int8_panels(w)
    assert not has_amx(Target(kind="llvm", isa=("amx_bf16", "amx_tile"), cores=2), "int8")


@pytest.mark.skipif(not (has_amx_bf16(host_target()) and has_amx(host_target(), "int8")
                         and request_amx()),
                    reason="needs a CPU with AMX-BF16, AMX-INT8 and Linux's tile permission")
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("which", ["linear", "pointwise", "conv"])
def test_amx_templates_every_config_against_the_interpreter(which: str, precision: str) -> None:
    """Both AMX templates of both precisions, both work orders with and without row groups,
    on sizes no block divides (75 rows, a 3x3 conv with stride 2 and 5 input channels), a
    bias and an epilogue."""
    from bitsmith import ir, passes
    from bitsmith.codegen.template import TEMPLATES, Config
    from bitsmith.ir.interpreter import kernel_calls

    from ..support import random_inputs
    from .tvm_checks import func, run_kernel

    if which == "linear":
        x, w, o = "tensor<3x25x150xf32>", "tensor<70x150xf32>", "tensor<3x25x70xf32>"
        body = f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
            %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<70xf32>
            %2 = "graph.linear"(%x, %0, %1) : ({x}, {w}, tensor<70xf32>) -> {o}
            %3 = "graph.gelu"(%2) {{approximate = "none"}} : ({o}) -> {o}
            "func.return"(%3) : ({o}) -> ()"""
        weights = {"w": RNG.standard_normal((70, 150)), "b": RNG.standard_normal(70)}
        name = f"dense_{precision}_amx"
    elif which == "pointwise":  # a 1x1 NHWC conv with a bias: the dense template's GEMM
        x, w, o = "tensor<2x7x6x48xf32>", "tensor<1x1x48x40xf32>", "tensor<2x7x6x40xf32>"
        body = f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
            %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<40xf32>
            %2 = "graph.conv2d"(%x, %0, %1) {{dilation = [1, 1], groups = 1, layout = "NHWC",
                padding = [0, 0], stride = [1, 1]}} : ({x}, {w}, tensor<40xf32>) -> {o}
            %3 = "graph.relu"(%2) : ({o}) -> {o}
            "func.return"(%3) : ({o}) -> ()"""
        weights = {"w": RNG.standard_normal((1, 1, 48, 40)), "b": 50 + RNG.standard_normal(40)}
        name = f"dense_{precision}_amx"
    else:
        x, w, o = "tensor<2x13x11x5xf32>", "tensor<3x3x5x40xf32>", "tensor<2x7x6x40xf32>"
        body = f"""
            %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
            %1 = "graph.constant"() {{weight = "b"}} : () -> tensor<40xf32>
            %2 = "graph.conv2d"(%x, %0, %1) {{dilation = [1, 1], groups = 1, layout = "NHWC",
                padding = [1, 1], stride = [2, 2]}} : ({x}, {w}, tensor<40xf32>) -> {o}
            %3 = "graph.relu"(%2) : ({o}) -> {o}
            "func.return"(%3) : ({o}) -> ()"""
        weights = {"w": RNG.standard_normal((3, 3, 5, 40)), "b": RNG.standard_normal(40)}
        name = f"conv_gemm_{precision}_amx"
    module = ir.parse(func(f"%x: {x}", o, body),
                      weights={k: v.astype(np.float32) for k, v in weights.items()})
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    kernel.attributes["precision"] = precision
    template = TEMPLATES[name]
    configs = [Config({"ORDER": order, "ROW_GROUP": group}) for order in ("nm", "mn")
               for group in (0, 2)]
    arrays = random_inputs(module, 1, ints=(0, 5), floats_as=np.float32)
    for op, args, ctx in kernel_calls(module, arrays):
        for config in configs:
            assert run_kernel(op, args, ctx, config, template.name) == name
    problem = template.match(kernel)
    built = template.build(problem, configs[0], host_target())
    # the linear's bias and GELU run on each block of sums (no separate pass over a result
    # buffer); the conv's epilogue is still its own pass
    assert ("amx_gemm" in built.func.script()) == (which == "conv")


@pytest.mark.skipif(not (has_amx(host_target(), "int8") and request_amx()),
                    reason="needs a CPU with AMX-INT8 and Linux's tile permission")
def test_an_epilogue_that_reads_the_gemms_own_input_stays_unfused_and_right() -> None:
    """y = linear(x) + x: the residual is the GEMM's left operand, which the fused function
    takes as its own parameter, so that kernel is built unfused, and matches the interpreter."""
    from bitsmith import ir, passes
    from bitsmith.codegen.template import TEMPLATES
    from bitsmith.ir.interpreter import kernel_calls

    from ..support import random_inputs
    from .tvm_checks import func, run_kernel

    x, w = "tensor<25x40xf32>", "tensor<40x40xf32>"
    module = ir.parse(func(f"%x: {x}", x, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.linear"(%x, %0) : ({x}, {w}) -> {x}
        %2 = "graph.add"(%1, %x) : ({x}, {x}) -> {x}
        "func.return"(%2) : ({x}) -> ()"""),
        weights={"w": RNG.standard_normal((40, 40)).astype(np.float32)})
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    kernel.attributes["precision"] = "int8"
    template = TEMPLATES["dense_int8_amx"]
    built = template.build(template.match(kernel), template.default_config(
        template.match(kernel), host_target()), host_target())
    assert "amx_gemm" in built.func.script()
    arrays = random_inputs(module, 1, ints=(0, 5), floats_as=np.float32)
    for op, args, ctx in kernel_calls(module, arrays):
        assert run_kernel(op, args, ctx, None, template.name) == template.name


@pytest.mark.skipif(not (has_amx(host_target(), "int8") and request_amx()),
                    reason="needs a CPU with AMX-INT8 and Linux's tile permission")
def test_int8_conv_windows_of_three_channels_keep_nan_and_a_cast_epilogue_stays_unfused() -> None:
    """An RGB stem's windows (3 channels a kernel position: no whole vector of 16) with a
    NaN pixel: the windows holding it give NaN outputs, the rest stay finite; a linear whose
    epilogue casts to f16 builds unfused and matches the interpreter."""
    from bitsmith import ir, passes
    from bitsmith.codegen.template import TEMPLATES
    from bitsmith.ir.interpreter import kernel_calls

    from .tvm_checks import build_and_run, func, run_kernel

    x, w, o = "tensor<1x9x9x3xf32>", "tensor<3x3x3x8xf32>", "tensor<1x9x9x8xf32>"
    module = ir.parse(func(f"%x: {x}", o, f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {w}
        %1 = "graph.conv2d"(%x, %0) {{dilation = [1, 1], groups = 1, layout = "NHWC",
            padding = [1, 1], stride = [1, 1]}} : ({x}, {w}) -> {o}
        "func.return"(%1) : ({o}) -> ()"""),
        weights={"w": RNG.standard_normal((3, 3, 3, 8)).astype(np.float32)})
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    kernel.attributes["precision"] = "int8"
    image = RNG.standard_normal((1, 9, 9, 3)).astype(np.float32)
    image[0, 4, 4, 2] = np.nan
    (op, args, ctx), = kernel_calls(module, [image])
    want = op.evaluate(ctx, *args)
    _, (got,) = build_and_run(op, args, want, None)
    assert (np.isnan(got) == np.isnan(want[0])).all() and np.isnan(got[0, 3:6, 3:6]).all()

    xs, ws, os_ = "tensor<5x40xf32>", "tensor<24x40xf32>", "tensor<5x24xf32>"
    module = ir.parse(func(f"%x: {xs}", "tensor<5x24xf16>", f"""
        %0 = "graph.constant"() {{weight = "w"}} : () -> {ws}
        %1 = "graph.linear"(%x, %0) : ({xs}, {ws}) -> {os_}
        %2 = "graph.cast"(%1) {{dtype = f16}} : ({os_}) -> tensor<5x24xf16>
        "func.return"(%2) : (tensor<5x24xf16>) -> ()"""),
        weights={"w": RNG.standard_normal((24, 40)).astype(np.float32)})
    passes.run(module, "canonicalize,fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    kernel.attributes["precision"] = "int8"
    template = TEMPLATES["dense_int8_amx"]
    problem = template.match(kernel)
    built = template.build(problem, template.default_config(problem, host_target()),
                           host_target())
    assert "amx_gemm" in built.func.script()
    for op, args, ctx in kernel_calls(module, [RNG.standard_normal((5, 40)).astype(
            np.float32)]):
        assert run_kernel(op, args, ctx, None, template.name) == template.name
