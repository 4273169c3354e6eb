"""The generic Triton lowering, kernel by kernel against the interpreter (under
TRITON_INTERPRET=1 without a GPU): elementwise chains, reductions and norms, contractions,
convs and pools, attention, shape ops, every quantized weight format, dynamic batch, f16."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith import passes
from bitsmith.codegen.template import Config
from bitsmith.frontend import from_torch
from bitsmith.passes.quant_spec import quant_pipeline_entry

from .triton_checks import check_module

GPU = "canonicalize,cse,dce,fuse"
GENERIC = "triton.generic"


def checked(model: torch.nn.Module, *args: torch.Tensor, pipeline: str = GPU,
            dynamic: bool = False, batches: tuple[int, ...] = (1,), **kw: object) -> int:
    torch.manual_seed(0)
    module = from_torch(model.eval(), args, {}, name="m", dynamic_batch=dynamic)
    return check_module(module, pipeline=pipeline, batches=batches, template=GENERIC, **kw)


class Block(torch.nn.Module):
    """linear + gelu + layer norm + softmax + rms norm + a mean, odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(37, 19)
        self.ln = torch.nn.LayerNorm(19)
        self.rms = torch.nn.RMSNorm(19)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(F.gelu(self.fc(x)))
        return torch.softmax(y, -1) + self.rms(y) * y.mean(-1, keepdim=True) - F.silu(y).amax(-1,
                                                                                     keepdim=True)


def test_elementwise_reductions_and_norms() -> None:
    assert checked(Block(), torch.randn(2, 3, 37)) >= 2


def test_dynamic_batch_and_every_block_size() -> None:
    assert checked(Block(), torch.randn(2, 2, 37), dynamic=True, batches=(1, 3)) >= 2
    checked(Block(), torch.randn(1, 2, 37), config=Config({"BLOCK": 64, "num_warps": 2}))


class Shapes(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.emb(ids)  # [2, 5, 6]
        y = torch.cat([e, x.permute(0, 2, 1)], dim=-1)[:, 1:4].reshape(2, 3, 3, 3)
        z = F.pad(y, (1, 2)) * 2.0
        return z.cumsum(-1), torch.where(z > 0.1, z, -z).argmax(-1), (z - 1.5).round()


def test_shape_ops_embedding_cumsum_argmax_round() -> None:
    ids = torch.tensor([[1, 3, 10, 0, 7], [2, 2, 5, 9, 4]])
    assert checked(Shapes(), ids, torch.randn(2, 3, 5)) >= 1


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 10, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(10, 10, 3, groups=5, dilation=2, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c1(x))
        y = F.max_pool2d(self.c2(y), 3, 2, padding=1)
        z = F.avg_pool2d(y, 2, ceil_mode=True, count_include_pad=False)
        return F.adaptive_avg_pool2d(z, (2, 3)).flatten(1)


def test_convs_and_pools() -> None:
    assert checked(ConvNet(), torch.randn(2, 3, 17, 13)) >= 3


class Attn(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_causal_and_masked() -> None:
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert checked(Attn(), q, k, v, mask) >= 1


def test_f16_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.ReLU(),
                                torch.nn.LayerNorm(12)).half()
    assert checked(model, torch.randn(3, 20).half()) >= 1


QUANT_SPECS = [f"w{b}g16" for b in range(1, 9)] + [
    "w3g16:sym", "w5g8:axis=in", "w4", "f4e2m1g16", "f6e3m2g16", "f6e2m3g0", "f8e4m3g32",
    "f8e5m2g16", "f3e1m1g16"]
QUANT_DEFAULT_RUN = {"w1g16", "w3g16", "w4g16", "w8g16", "w5g8:axis=in", "w4", "f4e2m1g16",
                     "f6e2m3g0"}
"""The widths and formats the default run takes through the generic template (Triton's
interpreter: about a second each); every one of them is also checked on the dequant tiles
template (test_triton_tiles.py), and all of them here under -m slow."""


@pytest.mark.parametrize("spec", [s if s in QUANT_DEFAULT_RUN else
                                  pytest.param(s, marks=pytest.mark.slow) for s in QUANT_SPECS])
def test_quantized_linear_every_width_and_format(spec: str) -> None:
    """K=70 is not a multiple of the group: the last group is short."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(70, 21), torch.nn.GELU(),
                                torch.nn.Linear(21, 9))
    module = from_torch(model, (torch.randn(3, 70),), {}, name="q")
    passes.run(module, f"canonicalize,cse,{quant_pipeline_entry(spec)}")
    assert sum(op.name == "quant.linear" for op in module.ops) == 2
    assert check_module(module, pipeline=GPU, template=GENERIC) >= 2


def test_quantized_conv() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 13, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(13, 7, (3, 2), dilation=(2, 1)))
    module = from_torch(model, (torch.randn(2, 5, 17, 15),), {}, name="qc")
    passes.run(module, f"canonicalize,cse,{quant_pipeline_entry('w3g16')}")
    assert sum(op.name == "quant.conv2d" for op in module.ops) == 2
    assert check_module(module, pipeline=GPU, template=GENERIC) >= 2
