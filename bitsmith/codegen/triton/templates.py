"""GPU kernel templates: a `kernel.fused` region -> Triton source (readable Python, one file per
kernel) and how to launch it.

- `triton.matmul`: linear, matmul (batched), NCHW conv (implicit GEMM) and quant.linear /
  quant.conv2d (dequant-GEMM), with their elementwise epilogue: [BLOCK_M, BLOCK_N] tiles,
  `tl.dot` over K (`tiles`). Knobs: BLOCK_M/N/K, GROUP_M, SPLIT_K, num_warps, num_stages.
- `triton.gemv`: the same contractions when M is a few static rows (decode, batch 1): the
  rows in one tile, a broadcast multiply-and-sum over [BLOCK_N, BLOCK_K] weight tiles, split-K.
- `triton.generic`: every region, through the generic lowering (`emit`): one program per
  BLOCK output elements, reductions as per-lane loops. Knobs: BLOCK, num_warps.

- `triton.attention`: flash attention (`attention`). Knobs: BLOCK_M/N, num_warps, num_stages.
- `triton.rows`: one program per output row, row statistics across its lanes (`rows`).

`select` prefers a specialised template to the generic one.

A built kernel is a `TritonKernel`: the source, and per `@triton.jit` function its launch (the
output it writes, the flat size that sets the grid, the symbolic dims it takes as arguments,
and the constexpr/launch options of the config). Compiling the source is Triton's business, at
the first launch on the device (its own cache keeps the binaries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...ir import Operation, Trait
from ...ir.dialects.kernel import FusedOp
from ..template import (
    TEMPLATES,
    CodegenError,
    Config,
    KernelTemplate,
    Knob,
    KnobSpace,
    Problem,
    Target,
    match_templates,
    register_template,
)
from . import emit_nn  # noqa: F401 - registers the nn and quant rules
from .attention import attention_op, generate_attention, head_blocks
from .emit import generate
from .paged_attention import generate_paged_attention, paged_attention_op
from .rows import generate_rows, row_block
from .tiles import anchor_of, contraction, generate_contraction

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


def in_epilogue(op: Operation) -> bool:
    """Elementwise ops and sources: what the epilogue (or a prologue on an operand) of a tiled
    contraction may hold."""
    return op.has(Trait.ELEMENTWISE, Trait.SOURCE)


def signature(op: FusedOp) -> str:
    """A region's types and ops: kernels with equal signatures share a tuned config."""
    return ";".join(str(v.type) for v in op.operands) + "->" + ";".join(
        str(r.type) for r in op.results) + "|" + ",".join(o.name for o in op.body_ops)


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


BLOCK_DIMS = {"BLOCK_M": "static_m", "BLOCK_N": "N", "BLOCK_K": "K"}
"""Which problem size each block knob tiles."""


def _block_cap(problem: Problem, dim: str) -> int:
    """The largest block worth having over a dim: its next power of two (16 at least, the
    smallest `tl.dot` tile); unbounded for a symbolic dim."""
    size = str(problem[dim])
    return max(16, pow2(int(size))) if size.isdigit() and int(size) > 0 else 1 << 30


class TritonTemplate(KernelTemplate):
    """Base of the Triton templates; `select` takes the matching one of lowest `rank`."""

    rank = 1

    def valid(self, problem: Problem, config: Config) -> bool:
        """No block (BLOCK_M/N/K) past the next power of two of the dim it tiles, unless it
        is the knob's smallest choice (a dim smaller than every block runs masked)."""
        return all(int(config[k.name]) <= self._cap(problem, k) for k in self.space.knobs
                   if k.name in BLOCK_DIMS)

    def default_config(self, problem: Problem, target: Target) -> Config:
        """The space's defaults, each block shrunk to the largest choice that fits its dim."""
        values = dict(self.space.default())
        for knob in self.space.knobs:
            if knob.name in BLOCK_DIMS:
                cap = self._cap(problem, knob)
                if int(values[knob.name]) > cap:
                    values[knob.name] = max(int(c) for c in knob.choices if int(c) <= cap)
        return Config(values)

    @staticmethod
    def _cap(problem: Problem, knob: Knob) -> int:
        return max(_block_cap(problem, BLOCK_DIMS[knob.name]), min(int(c) for c in knob.choices))

    def kernel(self, generated: tuple[str, list[dict]], meta: dict, config: Config,
               zero: bool = False) -> TritonKernel:
        """A built kernel: the source and its launches, each with the launch options."""
        source, launches = generated
        for launch in launches:
            launch["meta"] = meta
            launch["zero"] = zero
        return TritonKernel(source, launches, self.name, config)


@register_template
class Generic(TritonTemplate):
    """Any region through the generic lowering."""

    name = "triton.generic"
    version = 1
    rank = 9  # the fallback
    space = KnobSpace(Knob("BLOCK", (128, 256, 512, 1024, 64)),
                      Knob("num_warps", (4, 2, 8, 1)))
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        return Problem(self.name, {"signature": signature(op)}, op)

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        meta = {"BLOCK": int(config["BLOCK"]), "num_warps": int(config["num_warps"])}
        return self.kernel(generate(problem.kernel_op), meta, config)


class _Tiled(TritonTemplate):
    """A contraction with an elementwise epilogue, built by `tiles.generate_contraction`."""

    inner = "dot"
    key = ("anchor", "M", "N", "K", "batch", "epilogue", "dtype")

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        anchor = anchor_of(op, in_epilogue)
        if anchor is None:
            return None
        c = contraction(anchor)
        if c is None:
            return None
        epilogue = ",".join(o.name.split(".")[1] for o in op.body_ops if o is not anchor)
        qtype = anchor.operands[1].type.dtype if anchor.name.startswith("quant.") else ""
        return Problem(self.name, {
            "anchor": anchor.name, "M": " * ".join(str(d) for d in c.m),
            "static_m": c.static_m or 0, "N": str(c.n), "K": str(c.k),
            "batch": ",".join(str(d) for d in c.batch), "epilogue": epilogue,
            "dtype": f"{anchor.results[0].type.dtype}{qtype and ':'}{qtype}",
            "plain": not epilogue and str(op.results[0].type.dtype) == "f32"}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        split = int(config["SPLIT_K"])
        k_text = str(problem["K"])
        k = int(k_text) if k_text.isdigit() else 1 << 30
        return super().valid(problem, config) and (
            split == 1 or (bool(problem["plain"]) and k >= split * int(config["BLOCK_K"])))

    def meta(self, problem: Problem, config: Config) -> dict:
        return {k: int(v) for k, v in config.items()}

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        config = self.space.check(config)
        if not self.valid(problem, config):
            raise CodegenError(f"template {self.name}: config {config} is not valid for "
                               f"{dict(problem.params)}")
        op = problem.kernel_op
        meta = self.meta(problem, config)
        anchor = anchor_of(op, in_epilogue)
        c = contraction(anchor) if anchor is not None else None
        if c is None:
            raise CodegenError(f"template {self.name}: kernel '{op.kernel_name}' is not a tiled "
                               "contraction")
        generated = generate_contraction(op, c, self.inner)
        return self.kernel(generated, meta, config, zero=meta["SPLIT_K"] > 1)


@register_template
class Matmul(_Tiled):
    """Tiled GEMM with `tl.dot` (every contraction with an elementwise epilogue)."""

    name = "triton.matmul"
    version = 1
    space = KnobSpace(Knob("BLOCK_M", (64, 32, 128, 16)), Knob("BLOCK_N", (64, 32, 128, 16)),
                      Knob("BLOCK_K", (32, 16, 64, 128)), Knob("GROUP_M", (8, 1, 2, 4)),
                      Knob("SPLIT_K", (1, 2, 4, 8)), Knob("num_warps", (4, 2, 8)),
                      Knob("num_stages", (3, 2, 4, 1)))


@register_template
class Gemv(_Tiled):
    """GEMV: M static and at most 8 rows, all in one tile; FMA over [BLOCK_K, BLOCK_N] tiles of
    the weight (no tensor-core rows wasted), split-K across programs."""

    name = "triton.gemv"
    version = 1
    rank = 0  # before triton.matmul, which matches the same kernels
    inner = "fma"
    space = KnobSpace(Knob("BLOCK_N", (32, 16, 64, 128, 8)), Knob("BLOCK_K", (128, 64, 256, 32)),
                      Knob("SPLIT_K", (1, 2, 4, 8)), Knob("num_warps", (4, 2, 8, 1)),
                      Knob("num_stages", (2, 1, 3, 4)))

    def match(self, op: Operation) -> Problem | None:
        problem = super().match(op)
        if problem is None or not 0 < int(problem["static_m"]) <= 8:
            return None
        return problem

    def meta(self, problem: Problem, config: Config) -> dict:
        return {**super().meta(problem, config), "BLOCK_M": pow2(int(problem["static_m"])),
                "GROUP_M": 1}


@register_template
class FlashAttention(TritonTemplate):
    """`graph.attention` alone in its region: keys streamed in BLOCK_N blocks, online softmax."""

    name = "triton.attention"
    version = 1
    space = KnobSpace(Knob("BLOCK_M", (64, 32, 128, 16)), Knob("BLOCK_N", (64, 32, 128, 16)),
                      Knob("num_warps", (4, 8, 2)), Knob("num_stages", (2, 1, 3)))
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp):
            return None
        att = attention_op(op)
        if att is None:
            return None
        length, keys = att.q.type.shape[-2], att.k.type.shape[-2]
        return Problem(self.name, {"signature": signature(op),
                                   "static_m": length if isinstance(length, int) else 0,
                                   "N": str(keys), "K": "0"}, op)

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        config = self.space.check(config)
        kernel = problem.kernel_op
        att = attention_op(kernel)
        if att is None:
            raise CodegenError(f"template {self.name}: kernel '{kernel.kernel_name}' holds no "
                               "graph.attention alone")
        block_e, block_d = head_blocks(att)
        meta = {**{k: int(v) for k, v in config.items()}, "BLOCK_E": block_e,
                "BLOCK_D": block_d}
        return self.kernel(generate_attention(kernel, att), meta, config)


@register_template
class PagedAttention(TritonTemplate):
    """`kv.paged_attention` alone in its region (float caches): a program per sequence and
    KV head, pages streamed through an online softmax."""

    name = "triton.paged_attention"
    version = 1
    space = KnobSpace(Knob("num_warps", (4, 2, 8)))
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp) or paged_attention_op(op) is None:
            return None
        return Problem(self.name, {"signature": signature(op)}, op)

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        config = self.space.check(config)
        kernel = problem.kernel_op
        op = paged_attention_op(kernel)
        if op is None:
            raise CodegenError(f"template {self.name}: kernel '{kernel.kernel_name}' holds no "
                               "kv.paged_attention with a float cache alone")
        source, launches = generate_paged_attention(kernel, op)
        meta = {**{k: int(v) for k, v in config.items()}, **launches[0].pop("blocks")}
        return self.kernel((source, launches), meta, config)


@register_template
class Rows(TritonTemplate):
    """Softmax, layer/RMS norm, reductions over the last axes (and what is fused around them):
    one program per output row, the row's reductions across its lanes."""

    name = "triton.rows"
    version = 1
    space = KnobSpace(Knob("num_warps", (4, 1, 2, 8, 16)))
    key = ("signature",)

    def match(self, op: Operation) -> Problem | None:
        if not isinstance(op, FusedOp) or any(o.has(Trait.ANCHOR) for o in op.body_ops):
            return None
        block = row_block(op)
        if block is None:
            return None
        return Problem(self.name, {"signature": signature(op), "BLOCK": block}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        return int(config["num_warps"]) * 32 <= max(32, int(problem["BLOCK"]))  # a lane each

    def default_config(self, problem: Problem, target: Target) -> Config:
        warps = min(8, max(1, int(problem["BLOCK"]) // 256))
        return Config({"num_warps": 1 << (warps.bit_length() - 1)})

    def build(self, problem: Problem, config: Config, target: Target) -> TritonKernel:
        meta = {"BLOCK": int(problem["BLOCK"]), "num_warps": int(config["num_warps"])}
        return self.kernel(generate_rows(problem.kernel_op), meta, config)


def select(op: FusedOp, target: Target) -> tuple[TritonTemplate, Problem]:
    """The Triton template of lowest rank that matches `op`: a specialised one, else the
    generic one (which matches every region)."""
    matches = [(t, p) for t, p in match_templates(op) if isinstance(t, TritonTemplate)]
    if not matches:
        raise CodegenError(f"no Triton template matches kernel '{op.kernel_name}'")
    return min(matches, key=lambda m: m[0].rank)


def build_kernel(op: FusedOp, target: Target, config: Config | None = None,
                 template: str | None = None) -> TritonKernel:
    """Build one kernel with its template (`select`'s, or the one named), at the default config
    unless `config`."""
    if template is None:
        chosen, problem = select(op, target)
    else:
        found = TEMPLATES.get(template)
        problem = found.match(op) if isinstance(found, TritonTemplate) else None
        if problem is None or not isinstance(found, TritonTemplate):
            raise CodegenError(f"Triton template {template!r} does not match kernel "
                               f"'{op.kernel_name}'")
        chosen = found
    config = (chosen.space.check(config) if config is not None
              else chosen.default_config(problem, target))
    return chosen.build(problem, config, target)


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
