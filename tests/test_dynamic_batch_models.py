"""Models compiled with `dynamic_batch=True` run at batch 1, 3 and 5 as torch computes them, and
0-d tensors (inputs, outputs, weights, values between kernels) pass through compiled models.

Two bugs these hold down: a kernel whose buffers held the batch `B` only as `7*B` (a linear
layer, norm or conv after `x.reshape(-1, ...)`) did not compile ("variables (B,) are used, but
are not passed in as API arguments"); a 0-d weight reached its kernel as shape [1], and TVM's
FFI raised a bare ValueError from `CompiledModel.__call__`.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers as T

import bitsmith
from bitsmith import models
from bitsmith.errors import ArtifactError
from bitsmith.models.hf import ARCHS
from bitsmith.runtime.model import CompiledModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCHES = (1, 3, 5)
Inputs = Callable[[int], tuple]


def _flat(out: object) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()  # pyright: ignore[reportAttributeAccessIssue] - a ModelOutput
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]  # pyright: ignore


def assert_close(got: object, want: list[torch.Tensor]) -> None:
    got_list = list(got) if isinstance(got, tuple) else [got]
    assert len(got_list) == len(want)
    for g, w in zip(got_list, want, strict=True):
        w_np = w.detach().numpy()
        g_np = g.numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        assert g_np.shape == w_np.shape and g_np.dtype == w_np.dtype
        scale = float(np.abs(w_np).max()) if w_np.size else 1.0
        np.testing.assert_allclose(g_np, w_np, rtol=1e-5, atol=1e-5 * max(scale, 1e-30))


def check_dynamic(model: torch.nn.Module, inputs: Inputs) -> None:
    """Compile at batch 2 with a symbolic batch, run at 1, 3 and 5 against torch."""
    model = model.eval()
    cm = bitsmith.compile(model, inputs(2), dynamic_batch=True)
    for batch in BATCHES:
        args = inputs(batch)
        with torch.no_grad():
            want = _flat(model(*args))
        assert_close(cm(*args), want)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + shape[0]))


# ---- B only as a multiple in a kernel's buffers ------------------------------------------

class FlatLinear(torch.nn.Module):
    """[B, 7, 6] -> [7B, 6] -> linear (the dense template): its buffers hold 7B, never B."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(-1, 6))


class FlatMatmulRelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(_randn(6, 11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1, 6) @ self.w).relu()


class FlatNormSoftmax(torch.nn.Module):
    """Rows kernels (layer norm, softmax, a sum over the 7B rows) after the flattening."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(x.reshape(-1, 6)).softmax(-1)
        return y, y.sum(0)


class FlatConv(torch.nn.Module):
    """A conv over [2B, 3, 5, 5] (samples and frames flattened together)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.reshape(-1, 3, 5, 5)).flatten(0, 1).mean(-1)


class HeadsAttention(torch.nn.Module):
    """Attention by bmm over [B*heads, n, d], as hand-written transformer blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4).reshape(3, b * 4, n,
                                                                                       4)
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.5, -1)
        return torch.bmm(a, v).reshape(b, 4, n, 4).transpose(1, 2).reshape(b, n, 16)


FLATTENED: dict[str, tuple[Callable[[], torch.nn.Module], Inputs]] = {
    "linear": (FlatLinear, lambda b: (_randn(b, 7, 6),)),
    "matmul_relu": (FlatMatmulRelu, lambda b: (_randn(b, 7, 6),)),
    "norm_softmax": (FlatNormSoftmax, lambda b: (_randn(b, 7, 6),)),
    "conv": (FlatConv, lambda b: (_randn(b, 2, 3, 5, 5),)),
    "heads_attention": (HeadsAttention, lambda b: (_randn(b, 5, 16),)),
}


@pytest.mark.parametrize("name", [
    "linear", "norm_softmax", "conv",  # the dense, rows and conv templates: fast
    *[pytest.param(n, marks=pytest.mark.slow) for n in ("matmul_relu", "heads_attention")]])
def test_kernels_on_flattened_batch(name: str) -> None:
    build, inputs = FLATTENED[name]
    check_dynamic(build(), inputs)


def test_linear_on_flattened_batch_and_sequence() -> None:
    """[B, S, 6] -> [B*S, 6] -> linear: the kernel's buffers hold only the product B*S."""
    model = FlatLinear().eval()
    seq = torch.export.Dim("S", min=2, max=64)
    cm = bitsmith.compile(model, (_randn(2, 7, 6),), dynamic_batch=True,
                          dynamic_dims={"x": {1: seq}})
    for batch, length in [(1, 3), (3, 7), (5, 11)]:
        x = _randn(batch, length, 6)
        with torch.no_grad():
            assert_close(cm(x), _flat(model(x)))


# ---- plain modules ------------------------------------------------------------------------

class Bmm(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)


class BroadcastMatmul(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(_randn(6, 3))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b) + torch.matmul(a, self.w).sum(-1, keepdim=True)


class BatchReductions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.sum(0), x.mean(), x.amax(dim=(0, 2)), x.softmax(0)


PLAIN: dict[str, tuple[Callable[[], torch.nn.Module], Inputs]] = {
    "linear_3d": (lambda: torch.nn.Linear(6, 5), lambda b: (_randn(b, 7, 6),)),
    "bmm": (Bmm, lambda b: (_randn(b, 4, 6), _randn(b, 6, 3, seed=1))),
    "broadcast_matmul": (BroadcastMatmul,
                         lambda b: (_randn(b, 2, 4, 6), _randn(b, 1, 6, 3, seed=1))),
    "batch_reductions": (BatchReductions, lambda b: (_randn(b, 5, 7),)),
}


@pytest.mark.parametrize("name", ["linear_3d", "batch_reductions"])
def test_plain_modules(name: str) -> None:
    build, inputs = PLAIN[name]
    check_dynamic(build(), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bmm", "broadcast_matmul"])
def test_plain_matmuls(name: str) -> None:
    build, inputs = PLAIN[name]
    check_dynamic(build(), inputs)


# ---- 0-d tensors ----------------------------------------------------------------------------

class ScalarWeight(torch.nn.Module):
    """A 0-d parameter and a 0-d buffer read by the kernels."""

    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(5, 3)
        self.scale = torch.nn.Parameter(torch.tensor(2.5))
        self.register_buffer("shift", torch.tensor(-0.75))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale + self.shift.exp()


class ScalarInputOutput(torch.nn.Module):
    """A 0-d input, 0-d outputs (float, int, bool), and a 0-d value between two kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, s: torch.Tensor, n: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        total = x.sum()  # a 0-d value, then read by the linear's epilogue
        return self.proj(x) * total + s, total, n * 3, (x > s).any()


def _scalar_inputs(b: int) -> tuple[torch.Tensor, ...]:
    return _randn(b, 5), torch.tensor(0.3), torch.tensor(7)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_zero_d_weights(dynamic: bool, tmp_path) -> None:
    model = ScalarWeight().eval()
    x = _randn(3, 5)
    cm = bitsmith.compile(model, (x,), dynamic_batch=dynamic)
    with torch.no_grad():
        want = _flat(model(x))
    assert_close(cm(x), want)
    path = tmp_path / "scalar.bsm"  # a saved artifact stores the 0-d weight as [1]
    cm.save(path)
    assert_close(bitsmith.load(path)(x), want)
    if dynamic:
        for batch in BATCHES:
            xb = _randn(batch, 5)
            with torch.no_grad():
                assert_close(cm(xb), _flat(model(xb)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_zero_d_inputs_outputs_and_intermediates(dynamic: bool) -> None:
    model = ScalarInputOutput().eval()
    cm = bitsmith.compile(model, _scalar_inputs(3), dynamic_batch=dynamic)
    for batch in BATCHES if dynamic else (3,):
        args = _scalar_inputs(batch)
        with torch.no_grad():
            assert_close(cm(*args), _flat(model(*args)))


class ReturnsScalarWeight(torch.nn.Module):
    """A 0-d parameter returned as it is (an output that no kernel writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.scale, self.scale


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_zero_d_on_each_target(target: str) -> None:
    """The TVM and Triton executors alike (Triton's through its interpreter here)."""
    x = _randn(3, 5)
    for model, args in [(ScalarWeight(), (x,)), (ScalarInputOutput(), _scalar_inputs(3)),
                        (ReturnsScalarWeight(), (x,))]:
        model = model.eval()
        cm = bitsmith.compile(model, args, target=target)
        with torch.no_grad():
            assert_close(cm(*args), _flat(model(*args)))


def test_a_kernel_refusing_its_arguments_is_our_error() -> None:
    """What TVM's FFI raises on a buffer of another rank than the kernel's becomes an
    ArtifactError naming the kernel (here the plan is corrupted to say [1] for a 0-d weight)."""
    model = ScalarWeight().eval()
    x = _randn(3, 5)
    cm = bitsmith.compile(model, (x,), check=False)
    plan = cm.artifact.manifest.plan
    zero_d = [vid for vid in plan["weights"] if plan["values"][vid]["shape"] == []]
    assert zero_d
    plan["values"][zero_d[0]]["shape"] = [1]
    broken = CompiledModel(cm.artifact)
    with pytest.raises(ArtifactError, match=r"kernel \w+ refused its arguments.*recompile"):
        broken(x)


# ---- the zoo and transformers models --------------------------------------------------------

def _text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 500, (batch, 12), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 12, dtype=torch.int64)
    mask[batch - 1, -3:] = 0
    return ids, mask


def _mel(batch: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 16, 64, generator=torch.Generator().manual_seed(batch)),)


def _whisper_encoder() -> torch.nn.Module:
    config = T.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1,
                             encoder_attention_heads=4, decoder_attention_heads=4,
                             encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                             max_source_positions=32, vocab_size=1000, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return T.WhisperModel(config).get_encoder()


MORE_HF: dict[str, tuple[Callable[[], torch.nn.Module], Inputs]] = {
    "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=1000)), _text),
    "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
        dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=1000,
        max_position_embeddings=64)), _text),
    "albert": (lambda: T.AlbertModel(T.AlbertConfig(
        hidden_size=64, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=64)), _text),
    "electra": (lambda: T.ElectraModel(T.ElectraConfig(
        hidden_size=64, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=64)), _text),
    "opt": (lambda: T.OPTModel(T.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=1000, max_position_embeddings=64, word_embed_proj_dim=64,
        use_cache=False)), _text),
    "whisper_encoder": (_whisper_encoder, _mel),
}


def _text_of(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(1, 500, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[batch - 1, -2:] = 0
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("name", ["opt", "t5_encoder", "distilbert"])
def test_transformers_model_dynamic_batch_and_sequence(name: str) -> None:
    """OPT flattens [B, S] tokens into B*S rows: kernels that hold only B*S."""
    torch.manual_seed(0)
    model = MORE_HF[name][0]().eval()
    seq = torch.export.Dim("S", min=2, max=60)
    names = ["input_ids", "attention_mask"]
    cm = bitsmith.compile(model, (), example_kwargs=dict(zip(names, _text_of(2, 12),
                                                             strict=True)),
                          dynamic_batch=True, dynamic_dims={n: {1: seq} for n in names})
    for batch, length in [(1, 5), (3, 12), (2, 17)]:
        args = _text_of(batch, length)
        with torch.no_grad():
            want = _flat(model(**dict(zip(names, args, strict=True))))
        assert_close(cm(*args), want)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.names())
def test_zoo_model(name: str) -> None:
    spec = models.get(name)
    check_dynamic(spec.build(), spec.example_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS) + sorted(MORE_HF))
def test_transformers_model(name: str) -> None:
    build, inputs = ARCHS[name] if name in ARCHS else MORE_HF[name]
    torch.manual_seed(0)
    check_dynamic(build(), inputs)
