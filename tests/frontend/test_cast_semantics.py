"""`Tensor.to(dtype)` as torch computes it on x86 CPU, bit for bit: NaN, +-inf and out-of-range
floats to every int type (int64/int32 give their minimum, int16/int8 the low bits of int32's,
uint8 wraps, bool is x != 0), int to f16/bf16 rounding through f32, float to float. Checked
through the interpreter, the TVM kernels and the Triton kernels (under the interpreter here),
against torch itself; and T5's relative position buckets, whose `.to(torch.long)` of log(0)
once made the interpreter refuse a model that compiled."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import bitsmith
from bitsmith import ir
from bitsmith.frontend import from_torch

SPECIAL = [math.nan, math.inf, -math.inf, 3e9, -3e9, 1e20, -1e20, 2.7, -2.7, 0.5, -0.5, -0.0,
           127.9, -128.9, 255.9, 300.0, -300.0, 40000.0, -40000.0, 70000.0, 65535.9, 2.0**31,
           -(2.0**31), 2147483520.0, -2147483904.0, 2.0**63, -(2.0**63), 1e-30, 7.0]
"""Each float -> int rule shows on one of these: in range, just outside int8/int16/int32/int64,
the f16 overflow (70000), a value exactly at -2**31, and the NaN/inf ones."""

INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """SPECIAL and a spread of random magnitudes, as `dtype`, in an odd shape [5, 13]."""
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(65 - len(SPECIAL), generator=gen, dtype=torch.float64)
    rand = rand * torch.logspace(0, 12, len(rand), dtype=torch.float64)
    return torch.cat([torch.tensor(SPECIAL, dtype=torch.float64), rand]).to(dtype).reshape(5, 13)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bf16 through its bits, which numpy cannot take from torch)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_bits_equal(got: object, want: torch.Tensor) -> None:
    """Same dtype, same values, zeros' signs too; NaN where torch has NaN (its sign and payload
    are not compared)."""
    g, w = np.asarray(got), as_numpy(want)
    assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
    if w.dtype.kind in "biu":
        bad = g != w
    else:
        gf, wf = g.astype(np.float64), w.astype(np.float64)
        nan = np.isnan(wf)
        bad = np.where(nan, ~np.isnan(gf), (gf != wf) | (np.signbit(gf) != np.signbit(wf)))
    assert not bad.any(), (f"{int(bad.sum())} element(s) differ, first: got {g[bad][0]!r}, "
                           f"torch {w[bad][0]!r}")


class CastToEveryInt(torch.nn.Module):
    """x.to(d) for every int dtype; `via` first rounds x through another float type."""

    def __init__(self, via: torch.dtype | None = None) -> None:
        super().__init__()
        self.via = via

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.via is not None:
            x = x.to(self.via)
        return tuple(x.to(d) for d in INT_DTYPES)


class IntToFloats(torch.nn.Module):
    """An int tensor to f32, f16 and bf16 (bf16 returned as f32, which is exact)."""

    def forward(self, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return n.to(torch.float32), n.to(torch.float16), n.to(torch.bfloat16).to(torch.float32)


class FloatToFloats(torch.nn.Module):
    """f32 to f16 and bf16 and back, stored or not (overflow, ties, subnormals, NaN)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.to(torch.float16), x.to(torch.float16).to(torch.float32),
                x.to(torch.bfloat16).to(torch.float32),
                x.to(torch.float16).to(torch.bfloat16).to(torch.float32))


def int_values(dtype: torch.dtype) -> torch.Tensor:
    """Ints where int -> f32 -> bf16 (torch) and int -> bf16 (one rounding) differ, f16's
    overflow edge, and the extremes, in an odd shape."""
    values = [2**30 + 2**22 + 1, -(2**30 + 2**22 + 1), 16777217, 65519, 65520, 2**24 + 2**16 + 1,
              2**31 - 1, -(2**31), 0, -1, 7]
    if dtype == torch.int64:
        values += [2**62 + 2**38 + 1, 2**53 + 1, 2**63 - 1, -(2**63)]
    return torch.tensor(values + [3] * (15 - len(values)), dtype=dtype).reshape(3, 5)


FLOATS = torch.tensor([65519.0, 65520.0, 65504.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8,
                       1 + 3 * 2**-8, 3.3895e38, 3.4e38, 1e-40, 6e-8, -0.0, math.nan, math.inf,
                       -math.inf, 1e-8, 0.1, -7.0, 1 + 2**-8 + 2**-20, -65519.0, 2.0**-126,
                       ]).reshape(3, 7)
"""f16's overflow and ties, bf16's ties and overflow, subnormals of both, NaN, inf, -0."""


def _outputs(result: object) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check_interpreter(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = _outputs(model(x))
    got = ir.interpret(from_torch(model, (x,)), as_numpy(x))
    for g, w in zip(got, want, strict=True):
        assert_bits_equal(g, w)


def check_compiled(model: torch.nn.Module, x: torch.Tensor, target: str) -> None:
    with torch.no_grad():
        want = _outputs(model(x))
    got = _outputs(bitsmith.compile(model, (x,), target=target)(as_numpy(x)))
    for g, w in zip(got, want, strict=True):
        assert_bits_equal(g, w)


# ---- the interpreter ----------------------------------------------------------------------

@pytest.mark.parametrize("src", FLOAT_DTYPES, ids=str)
def test_interpreter_float_to_every_int_as_torch(src: torch.dtype) -> None:
    check_interpreter(CastToEveryInt(), special_values(src))


@pytest.mark.parametrize("src", [torch.int64, torch.int32], ids=str)
def test_interpreter_int_to_floats_as_torch(src: torch.dtype) -> None:
    check_interpreter(IntToFloats(), int_values(src))


def test_interpreter_float_to_floats_as_torch() -> None:
    check_interpreter(FloatToFloats(), FLOATS)


# ---- TVM (the CPU target must match x86 torch bit for bit) --------------------------------

@pytest.mark.parametrize("src", FLOAT_DTYPES, ids=str)
def test_tvm_float_to_every_int_as_torch(src: torch.dtype) -> None:
    # bf16 arrives through an f32 input: the runtime's arena cannot hand bf16 to TVM by DLPack
    if src == torch.bfloat16:
        check_compiled(CastToEveryInt(via=torch.bfloat16), special_values(torch.float32), "cpu")
    else:
        check_compiled(CastToEveryInt(), special_values(src), "cpu")


@pytest.mark.parametrize("src", [torch.int64, torch.int32], ids=str)
def test_tvm_int_to_floats_as_torch(src: torch.dtype) -> None:
    check_compiled(IntToFloats(), int_values(src), "cpu")


def test_tvm_float_to_floats_as_torch() -> None:
    check_compiled(FloatToFloats(), FLOATS, "cpu")


# ---- Triton (here through its interpreter: the x86 values; see the cast rule on GPUs) -----

@pytest.mark.parametrize("src", [torch.float32, torch.float16], ids=str)
def test_triton_float_to_every_int_as_x86_torch(src: torch.dtype) -> None:
    check_compiled(CastToEveryInt(via=None if src == torch.float32 else torch.float16),
                   special_values(torch.float32), "cuda")


def test_triton_int_to_floats_as_torch() -> None:
    check_compiled(IntToFloats(), int_values(torch.int32), "cuda")


def test_triton_float_to_floats_as_torch() -> None:
    check_compiled(FloatToFloats(), FLOATS, "cuda")


# ---- T5's relative position buckets ------------------------------------------------------

def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """transformers' T5Attention._relative_position_bucket (5.x), line for line."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


class RelativeBias(torch.nn.Module):
    """Scores plus T5's position bias (T5Attention.compute_bias; bidirectional: the encoder,
    not: the decoder); the buckets are an output too, so that they are compared exactly. T5
    takes the positions from arange (the compiler folds the buckets); given as an input they
    are computed by the kernels."""

    def __init__(self, bidirectional: bool, heads: int) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.relative_attention_bias = torch.nn.Embedding(32, heads)
        torch.nn.init.normal_(self.relative_attention_bias.weight,
                              generator=torch.Generator().manual_seed(2))

    def forward(self, scores: torch.Tensor, positions: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = scores.shape[-2], scores.shape[-1]
        if positions is None:
            context = torch.arange(q, dtype=torch.long)[:, None]
            memory = torch.arange(k, dtype=torch.long)[None, :]
        else:
            context, memory = positions[:q, None], positions[None, :k]
        buckets = relative_position_bucket(memory - context, self.bidirectional)
        bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
        return scores + bias, buckets


@pytest.mark.parametrize("positions", [False, True], ids=["arange", "input"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_t5_relative_position_buckets_compile_as_torch(bidirectional: bool,
                                                        positions: bool) -> None:
    model = RelativeBias(bidirectional, heads=3).eval()
    scores = torch.randn(2, 3, 37, 41, generator=torch.Generator().manual_seed(1))
    args = (scores, torch.arange(41) * 3 - 5) if positions else (scores,)
    with torch.no_grad():
        want_scores, want_buckets = model(*args)
    assert int(want_buckets.max()) > 16  # the log branch is taken, not only the exact one
    arrays = [a.numpy() for a in args]
    for got_scores, got_buckets in (ir.interpret(from_torch(model, args), *arrays),
                                    bitsmith.compile(model, args)(*arrays)):
        assert_bits_equal(got_buckets, want_buckets)
        np.testing.assert_allclose(got_scores, want_scores.numpy(), rtol=1e-6, atol=1e-6)
