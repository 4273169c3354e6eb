"""GPU kernel templates: a `kernel.fused` region -> Triton source (readable Python, one file per
kernel) and how to launch it.

- `triton.generic`: every region, through the generic lowering (`emit`): one program per
  BLOCK output elements, reductions as per-lane loops. Knobs: BLOCK, num_warps.

A built kernel is a `TritonKernel`: the source, and per `@triton.jit` function its launch (the
output it writes, the flat size that sets the grid, the symbolic dims it takes as arguments,
and the constexpr/launch options of the config). Compiling the source is Triton's business, at
the first launch on the device (its own cache keeps the binaries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...ir import Operation
from ...ir.dialects.kernel import FusedOp
from ..template import (CodegenError, Config, KernelTemplate, Knob, KnobSpace, Problem, Target,
                        match_templates, register_template)
from . import emit_nn  # noqa: F401 - registers the nn and quant rules
from .emit import generate

TRITON_VERSION = "3.6"
"""The Triton the generated sources are written for (`tl` API of 3.x)."""


@dataclass
class TritonKernel:
    """One kernel: its source, its launches, and the template and config that built it."""

    source: str
    launches: list[dict[str, Any]]
    template: str
    config: Config
    packs: dict[int, Any] = field(default_factory=dict)  # no pre-packed weights on the GPU


class TritonTemplate(KernelTemplate):
    """Base of the Triton templates."""


@register_template
class Generic(TritonTemplate):
    """Any region through the generic lowering."""

    name = "triton.generic"
    version = 1
    space = KnobSpace(Knob("BLOCK", (128, 256, 512, 1024, 64)),
                      Knob("num_warps", (4, 2, 8, 1)))
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        signature = ";".join(str(v.type) for v in op.operands) + "->" + ";".join(
            str(r.type) for r in op.results) + "|" + ",".join(o.name for o in op.body_ops)
        return Problem(self.name, {"signature": signature}, op)

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        op = problem.op
        assert isinstance(op, FusedOp)
        source, launches = generate(op)
        meta = {"BLOCK": int(config["BLOCK"]), "num_warps": int(config["num_warps"])}
        for launch in launches:
            launch["meta"] = meta
        return TritonKernel(source, launches, self.name, config)


def select(op: FusedOp, target: Target) -> tuple[TritonTemplate, Problem]:
    """The first Triton template that matches `op` (the generic one matches every region)."""
    matches = [(t, p) for t, p in match_templates(op) if isinstance(t, TritonTemplate)]
    if not matches:
        raise CodegenError(f"no Triton template matches kernel '{op.kernel_name}'")
    return matches[0]


def build_kernel(op: FusedOp, target: Target, config: Config | None = None) -> TritonKernel:
    """Build one kernel with its template (the default config unless `config`)."""
    template, problem = select(op, target)
    config = template.space.check(config) if config is not None else template.space.default()
    return template.build(problem, config, target)


def cuda_target() -> Target:
    """The GPU this process would run on, or Triton's CPU interpreter."""
    import os  # noqa: PLC0415
    if os.environ.get("TRITON_INTERPRET") == "1":
        return Target("cuda", mcpu="triton-interpreter", attrs={"interpreter": True})
    try:
        import torch  # noqa: PLC0415 - only the GPU target needs torch here
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise CodegenError("target 'cuda' needs an NVIDIA GPU visible to torch, or "
                           "TRITON_INTERPRET=1 to check the Triton kernels on CPU")
    props = torch.cuda.get_device_properties(0)
    return Target("cuda", mcpu=props.name, cores=props.multi_processor_count,
                  attrs={"capability": f"{props.major}.{props.minor}",
                         "memory": int(props.total_memory)})
