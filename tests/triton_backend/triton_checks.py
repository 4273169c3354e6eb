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

from ..support import assert_outputs_match, random_inputs

# Tolerances are the table's (tests/support): f32 kernels agree to f32 rounding; f16 ones to
# about an f16 ulp (tiled kernels feed f16 tiles to `tl.dot`, as the GPU will, where the
# interpreter rounds once at the end).


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
    try:
        assert_outputs_match([o.cpu().numpy() for o in outs], want)
    except AssertionError as exc:
        raise AssertionError(f"{kernel.kernel_name}: {exc}\n{built.source}") from None
    return built.source


def check_module(text: str | ir.Module, weights: dict[str, np.ndarray] | None = None,
                 batches: tuple[int, ...] = (1,), pipeline: str = "canonicalize,fuse",
                 config: Config | None = None, template: str | None = None) -> int:
    """Fuse, then build, launch and check every kernel (with `template` where it matches, which
    at least one kernel must); returns how many kernels."""
    module = text if isinstance(text, ir.Module) else ir.parse(text, weights=weights or {})
    if pipeline:
        passes.run(module, pipeline)
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    # floats as f32 and ints in [0, 5), as the kernels' callers hand them over
    arrays = {b: random_inputs(module, b, ints=(0, 5), floats_as=np.float32) for b in batches}
    if template is None:
        for batch in batches:
            for op, args, ctx in kernel_calls(module, arrays[batch]):
                run_kernel(op, args, ctx, config)
        return len(kernels)
    chosen = TEMPLATES[template]
    matched = {op for op in kernels if chosen.match(op) is not None}
    assert matched, f"template {template} matches none of the kernels"
    for batch in batches:
        for op, args, ctx in kernel_calls(module, arrays[batch]):
            if op in matched:
                run_kernel(op, args, ctx, config, template)
            else:
                run_kernel(op, args, ctx)
    return len(matched)
