"""The tiled Triton templates (`triton.matmul`, `triton.gemv`) kernel by kernel against the
interpreter on odd shapes, under TRITON_INTERPRET=1 without a GPU: linear with epilogues,
batched and broadcast matmul with transposes, implicit-GEMM conv, every quantized weight format,
split-K, f16, several tile configs each."""
import pytest
import torch
import torch.nn.functional as F

from bitsmith import passes
from bitsmith.codegen.template import TEMPLATES, Config
from bitsmith.codegen.triton.templates import select
from bitsmith.frontend import from_torch
from bitsmith.passes.quant_spec import quant_pipeline_entry

from .triton_checks import check_module

GPU = "canonicalize,cse,dce,fuse"


def tile(bm: int = 16, bn: int = 16, bk: int = 16, group: int = 1, split: int = 1) -> Config:
    return Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group,
                   "SPLIT_K": split, "num_warps": 4, "num_stages": 2})


def gemv(bn: int = 8, bk: int = 32, split: int = 1) -> Config:
    return Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                   "num_stages": 2})


def module_of(model: torch.nn.Module, *args: torch.Tensor, quant: str | None = None,
              dynamic: bool = False):
    torch.manual_seed(0)
    module = from_torch(model.eval(), args, {}, name="m", dynamic_batch=dynamic)
    if quant:
        passes.run(module, f"canonicalize,cse,{quant_pipeline_entry(quant)}")
    return module


def checked(model: torch.nn.Module, *args: torch.Tensor, template: str = "triton.matmul",
            config: Config | None = None, quant: str | None = None, dynamic: bool = False,
            batches: tuple[int, ...] = (1,)) -> int:
    return check_module(module_of(model, *args, quant=quant, dynamic=dynamic), pipeline=GPU,
                        batches=batches, config=config, template=template)


class Mlp(torch.nn.Module):
    def __init__(self, k: int = 37, n: int = 19) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(k, n)
        self.fc2 = torch.nn.Linear(n, 11, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)) * 2.0 - 0.5).sigmoid()


@pytest.mark.parametrize("config", [None, tile(), tile(32, 16, 32, group=4), tile(16, 16, 32, 2)])
def test_linear_with_epilogue_every_tile(config: Config | None) -> None:
    assert checked(Mlp(), torch.randn(3, 7, 37), config=config) == 2


def test_linear_dynamic_batch() -> None:
    assert checked(Mlp(), torch.randn(2, 5, 37), dynamic=True, batches=(1, 3),
                   config=tile(16, 16, 16, group=2)) == 2


def test_split_k_adds_into_a_zeroed_output() -> None:
    model = torch.nn.Linear(70, 21)
    assert checked(model, torch.randn(5, 70), config=tile(16, 16, 16, split=2)) == 1
    problem = TEMPLATES["triton.matmul"].match(
        next(op for op in _fused(module_of(Mlp(), torch.randn(3, 37)))))
    assert not TEMPLATES["triton.matmul"].valid(problem, tile(split=2)), \
        "split-K must be refused for a kernel with an epilogue"


def _fused(module):
    passes.run(module, GPU)
    return [op for op in module.ops if op.name == "kernel.fused"]


class Bmm(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s = torch.matmul(a, b.transpose(-1, -2)) * 0.25 + 1.0  # b broadcasts over a's batch
        return torch.relu(torch.matmul(s.transpose(-1, -2), c))


def test_batched_broadcast_and_transposed_matmul() -> None:
    a, b, c = torch.randn(2, 3, 21, 9), torch.randn(3, 19, 9), torch.randn(2, 3, 21, 5)
    assert checked(Bmm(), a, b, c) >= 1
    assert checked(Bmm(), a, b, c, config=tile(32, 16, 16)) >= 1


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 10, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(10, 7, (3, 2), dilation=(2, 1), padding=(2, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.c2(F.relu(self.c1(x))))


@pytest.mark.parametrize("config", [None, tile(32, 16, 16)])
def test_conv_as_implicit_gemm(config: Config | None) -> None:
    assert checked(Conv(), torch.randn(2, 3, 17, 13), config=config) == 2


def test_f16_linear() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU()).half()
    assert checked(model, torch.randn(5, 40).half(), config=tile(16, 16, 16)) == 1


def test_gemv_matches_few_static_rows_only() -> None:
    one = _fused(module_of(Mlp(), torch.randn(1, 37)))[0]
    many = _fused(module_of(Mlp(), torch.randn(9, 37)))[0]
    dyn = _fused(module_of(Mlp(), torch.randn(2, 37), dynamic=True))[0]
    gemv_t = TEMPLATES["triton.gemv"]
    assert gemv_t.match(one) is not None and gemv_t.match(many) is None
    assert gemv_t.match(dyn) is None
    assert select(one, None)[0].name == "triton.gemv"
    assert select(many, None)[0].name == "triton.matmul"
    assert select(dyn, None)[0].name == "triton.matmul"


@pytest.mark.parametrize("rows,config", [(1, None), (3, gemv(8, 32)), (1, gemv(16, 32, 2))])
def test_gemv(rows: int, config: Config | None) -> None:
    model = torch.nn.Linear(70, 21) if config and config["SPLIT_K"] > 1 else Mlp(70, 21)
    assert checked(model, torch.randn(rows, 70), template="triton.gemv", config=config) >= 1


SPECS = [f"w{b}g16" for b in range(1, 9)] + [
    "w3g16:sym", "w5g8:axis=in", "w4", "f4e2m1g16", "f6e3m2g16", "f6e2m3g0", "f8e4m3g32",
    "f8e5m2g16", "f3e1m1g16"]


@pytest.mark.parametrize("spec", SPECS)
def test_dequant_gemm_and_gemv_every_width_and_format(spec: str) -> None:
    """K=70 is not a multiple of the group: the last group is short."""
    model = torch.nn.Sequential(torch.nn.Linear(70, 21), torch.nn.GELU(),
                                torch.nn.Linear(21, 9))
    assert checked(model, torch.randn(5, 70), quant=spec, config=tile()) == 2
    assert checked(model, torch.randn(1, 70), quant=spec, template="triton.gemv",
                   config=gemv(8, 32)) == 2


def test_quantized_conv_as_implicit_gemm() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 13, 3, stride=2, padding=1), torch.nn.ReLU())
    assert checked(model, torch.randn(2, 5, 9, 11), quant="w4g16", config=tile()) == 1
