"""Checks for TVM codegen tests: build every kernel of a fused module with the CPU template
that matches it (scheduled, weights packed as the compiler packs them), run it, and compare it
with the interpreter on the very values the interpreter feeds that kernel."""
from __future__ import annotations

import numpy as np
import tvm

from bitsmith import ir, passes
from bitsmith.autotune.candidates import RTOL_PRECISION
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.amx import amx_tvm_target
from bitsmith.codegen.tvm.lower import compile_funcs
from bitsmith.codegen.tvm.target import host_target, tvm_target
from bitsmith.codegen.tvm.templates import select
from bitsmith.ir.interpreter import EvalContext, kernel_calls
from bitsmith.ir.packing import to_storage

from ..support import assert_outputs_match, random_inputs, tolerance

RTOL = tolerance(np.float32)
"""Every float output: the CPU templates compute in f32 and round once at the end, as the
interpreter does, so even f16 and bf16 outputs agree to f32 rounding."""


def build_and_run(kernel: ir.Operation, arrays: list[np.ndarray], want: list[np.ndarray],
                  config: Config | None = None, built_before: dict | None = None,
                  ) -> tuple[str, list[np.ndarray]]:
    """Build `kernel` with its template (the default config unless `config`), run it on
    `arrays` into outputs shaped as `want`; the template's name and the outputs.
    `built_before`: kernels built earlier (the same op and config at another batch size)."""
    target = host_target()
    key = (id(kernel), str(config))
    if built_before is not None and key in built_before:
        chosen, built, exe = built_before[key]
    else:
        chosen, problem = select(kernel, target)
        built = chosen.build(problem, config or chosen.default_config(problem, target), target)
        compiled_for = amx_tvm_target(target) if built.isa else tvm_target(target)
        exe = compile_funcs({"main": built.func}, kernel.kernel_name, compiled_for)
        if built_before is not None:
            built_before[key] = (chosen, built, exe)
    arrays = [to_storage(v.type, a) for v, a in zip(kernel.operands, arrays, strict=True)]
    arrays = [built.packs[i][1](a) if i in built.packs else a for i, a in enumerate(arrays)]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    outs = [tvm.runtime.tensor(np.zeros(w.shape, w.dtype)) for w in want]
    exe["main"](*args, *outs)
    return chosen.name, [o.numpy() for o in outs]


def run_kernel(kernel: ir.Operation, arrays: list[np.ndarray], ctx: EvalContext,
               config: Config | None = None, template: str | None = None,
               built_before: dict | None = None) -> str:
    """Build `kernel` (its template's default config unless `config`), run it on `arrays`,
    compare each output with the interpreter; returns the template's name."""
    want = kernel.evaluate(ctx, *arrays)
    name, outs = build_and_run(kernel, arrays, want, config, built_before)
    assert template is None or name == template, (name, template)
    try:  # a kernel marked bf16 or int8 rounds its operands: the tuner's bound for it
        assert_outputs_match(outs, want,
                             RTOL_PRECISION.get(kernel.attributes.get("precision"), RTOL))
    except AssertionError as exc:
        raise AssertionError(f"{kernel.kernel_name} ({name}): {exc}") from None
    return name


def check_module(text: str | ir.Module, weights: dict[str, np.ndarray] | None = None,
                 batches: tuple[int, ...] = (1,), pipeline: str = "canonicalize,fuse",
                 inputs: list[np.ndarray] | None = None, config: Config | None = None,
                 template: str | None = None) -> int:
    """Fuse `text`, then compile and check every kernel on the values the interpreter feeds it."""
    module = text if isinstance(text, ir.Module) else ir.parse(text, weights=weights or {})
    if pipeline:
        passes.run(module, pipeline)
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    built: dict = {}  # a symbolic-batch kernel is built once, run at every batch
    for batch in batches:
        arrays = inputs or random_inputs(module, batch, ints=(0, 5), floats_as=np.float32)
        for op, args, ctx in kernel_calls(module, arrays):
            run_kernel(op, args, ctx, config, template, built)
    return len(kernels)


def func(inputs: str, outputs: str, body: str) -> str:
    lines = "".join(f"    {line.strip()}\n" for line in body.strip().splitlines())
    return f"module @m {{\n  func.func @main({inputs}) -> ({outputs}) {{\n{lines}  }}\n}}\n"




def one_knob_at_a_time(text: str, weights: dict[str, np.ndarray] | None = None,
                       pipeline: str = "canonicalize,fuse") -> tuple[str, list[Config]]:
    """The template that the module's single kernel selects, and its default config plus every
    valid config that differs from it in one knob."""
    module = ir.parse(text, weights=weights or {})
    passes.run(module, pipeline)
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    target = host_target()
    template, problem = select(kernel, target)
    base = template.default_config(problem, target)
    configs = [base]
    for knob in template.space.knobs:
        for choice in knob.choices:
            config = Config({**base, knob.name: choice})
            if config not in configs and template.valid(problem, config):
                configs.append(config)
    return template.name, configs
