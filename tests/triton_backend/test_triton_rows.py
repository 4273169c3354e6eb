"""The `triton.rows` template (one program per output row, row reductions across lanes) against
the interpreter under TRITON_INTERPRET=1: softmax, log-softmax, layer and RMS norm (over one
and two axes), means and maxima fused with them, reductions that must stay per-lane loops
(over a middle axis, a cumsum), dynamic batch and f16."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith import passes
from bitsmith.codegen.template import TEMPLATES
from bitsmith.codegen.triton.rows import generate_rows
from bitsmith.frontend import from_torch

from .triton_checks import check_module

GPU = "canonicalize,cse,dce,fuse"


def checked(model: torch.nn.Module, *args: torch.Tensor, dynamic: bool = False,
            batches: tuple[int, ...] = (1,)) -> int:
    torch.manual_seed(0)
    module = from_torch(model.eval(), args, {}, name="m", dynamic_batch=dynamic)
    return check_module(module, pipeline=GPU, batches=batches, template="triton.rows")


class Block(torch.nn.Module):
    def __init__(self, n: int = 19) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(n)
        self.rms = torch.nn.RMSNorm(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return torch.softmax(y, -1) + self.rms(y) * y.mean(-1, keepdim=True) - F.silu(y).amax(
            -1, keepdim=True)


@pytest.mark.parametrize("n", [19, 1, 300])
def test_norms_softmax_and_fused_stats(n: int) -> None:
    assert checked(Block(n), torch.randn(2, 3, n)) >= 1


def test_dynamic_batch() -> None:
    assert checked(Block(), torch.randn(2, 3, 19), dynamic=True, batches=(1, 3)) >= 1


class Mixed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln2 = torch.nn.LayerNorm((5, 7))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.ln2(x), F.log_softmax(x, -1), x.sum(1) * 2.0,
                torch.softmax(x, -1).cumsum(-1))


def test_two_axis_norm_log_softmax_and_per_lane_fallbacks() -> None:
    assert checked(Mixed(), torch.randn(3, 5, 7)) >= 2


def test_row_reductions_are_across_lanes_and_loops_only_where_needed() -> None:
    torch.manual_seed(0)
    module = from_torch(Mixed().eval(), (torch.randn(3, 5, 7),), {}, name="m")
    passes.run(module, GPU)
    rows = TEMPLATES["triton.rows"]
    sources = {op.kernel_name.split("_", 1)[1]: generate_rows(op)[0] for op in module.ops
               if op.name == "kernel.fused" and rows.match(op) is not None}
    assert "cumsum" not in sources  # no row reduction: the generic template's
    for name in ("layer_norm", "log_softmax", "softmax"):
        # statistics once per row across the lanes, no loop
        assert "tl.sum(" in sources[name] and "for " not in sources[name], sources[name]
    # a sum over axis 1 varies along the output row: it stays a per-lane loop
    assert "for " in sources["reduce_sum_mul"]


def test_f16_softmax() -> None:
    class Soft(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x * 0.5, -1)
    assert checked(Soft(), torch.randn(4, 33).half()) == 1
