"""Checks for Triton codegen tests: build every kernel of a fused module with its Triton
template, run it (on the GPU, or under TRITON_INTERPRET=1 on the CPU) and compare it with the
interpreter on the very values the interpreter feeds that kernel. Needs no TVM, so the GPU
machine runs the same checks."""
from __future__ import annotations

import tempfile

import numpy as np

from bitsmith import ir, passes
from bitsmith.codegen.template import TEMPLATES, Config
from bitsmith.codegen.triton.templates import build_kernel, cuda_target
from bitsmith.ir.interpreter import EvalContext, kernel_calls
from bitsmith.ir.packing import to_storage
from bitsmith.runtime.triton_executor import as_torch, bind_launches, device, launch, load_source

RTOL = {"float32": 2e-5, "float16": 1e-3}
"""Max error relative to the largest magnitude: f32 kernels agree to f32 rounding; f16 ones to
about an f16 ulp (tiled kernels feed f16 tiles to `tl.dot`, as the GPU will, where the
interpreter rounds once at the end)."""


def run_kernel(kernel: ir.Operation, arrays: list[np.ndarray], ctx: EvalContext,
               config: Config | None = None, template: str | None = None) -> str:
    """Build, launch and compare one kernel; returns its source."""
    import torch  # noqa: PLC0415

    want = kernel.evaluate(ctx, *arrays)
    built = build_kernel(kernel, cuda_target(), config, template)
    where = device()
    inputs = [as_torch(to_storage(v.type, a), str(v.type.dtype), where)
              for v, a in zip(kernel.operands, arrays, strict=True)]
    outs = [torch.empty(w.shape, dtype=getattr(torch, w.dtype.name), device=where)
            for w in want]
    with tempfile.TemporaryDirectory() as tmp:
        module = load_source(kernel.kernel_name, built.source, tmp)
        launch(bind_launches(module, built.launches, inputs, outs,
                             {str(k): v for k, v in ctx.bindings.items()}))
    for got, expected in zip(outs, want, strict=True):
        got = got.cpu().numpy()
        assert got.shape == expected.shape and got.dtype == expected.dtype
        if expected.dtype.kind == "f":
            finite = np.isfinite(expected)
            np.testing.assert_array_equal(got[~finite], expected[~finite])
            w, h = expected[finite].astype(np.float64), got[finite].astype(np.float64)
            scale = max(float(np.abs(w).max(initial=0.0)), 1e-6)
            err = float(np.abs(h - w).max(initial=0.0)) / scale
            assert err < RTOL[expected.dtype.name], (
                f"{kernel.kernel_name}: relative error {err:.2e}\n{built.source}")
        else:
            np.testing.assert_array_equal(got, expected)
    return built.source


def inputs_for(module: ir.Module, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for arg in module.inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in arg.type.shape)
        if arg.type.dtype.is_float:
            out.append(rng.standard_normal(shape).astype(np.float32))
        else:
            out.append(rng.integers(0, 5, shape).astype(arg.type.dtype.numpy_dtype))
    return out


def check_module(text: str | ir.Module, weights: dict[str, np.ndarray] | None = None,
                 batches: tuple[int, ...] = (1,), pipeline: str = "canonicalize,fuse",
                 config: Config | None = None, template: str | None = None) -> int:
    """Fuse, then build, launch and check every kernel (with `template` where it matches, which
    at least one kernel must); returns how many kernels."""
    module = text if isinstance(text, ir.Module) else ir.parse(text, weights=weights or {})
    if pipeline:
        passes.run(module, pipeline)
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    if template is None:
        for batch in batches:
            for op, args, ctx in kernel_calls(module, inputs_for(module, batch)):
                run_kernel(op, args, ctx, config)
        return len(kernels)
    chosen = TEMPLATES[template]
    matched = {op for op in kernels if chosen.match(op) is not None}
    assert matched, f"template {template} matches none of the kernels"
    for batch in batches:
        for op, args, ctx in kernel_calls(module, inputs_for(module, batch)):
            if op in matched:
                run_kernel(op, args, ctx, config, template)
            else:
                run_kernel(op, args, ctx)
    return len(matched)
