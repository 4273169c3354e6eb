"""The Triton kernel of `kv.paged_attention` (under TRITON_INTERPRET on the CPU) against the
interpreter: the same ragged batch, padding, GQA, windows and float caches as the CPU kernel's
test, output and cache both."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest

from bitsmith import passes
from bitsmith.codegen.triton.paged_attention import paged_attention_op
from bitsmith.codegen.triton.templates import build_kernel, cuda_target
from bitsmith.ir import interpret
from bitsmith.ir.dtypes import bf16, f16, f32
from bitsmith.ir.packing import to_storage
from bitsmith.runtime.triton_executor import as_torch, bind_launches, device, launch, load_source

from ..codegen.test_paged_attention import _inputs, _module


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype, npdtype", [(f32, np.float32), (f16, np.float16)])
def test_triton_kernel_matches_the_interpreter(window: int, dtype, npdtype) -> None:
    import torch

    inputs = _inputs(npdtype)
    want_cache = inputs[3].copy()
    want = interpret(_module(window, dtype), *inputs[:3], want_cache, *inputs[4:8])[0]
    module = _module(window, dtype)
    passes.run(module, "fuse")
    (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
    built = build_kernel(kernel, cuda_target())
    assert built.template == "triton.paged_attention"
    where = device()
    args = [as_torch(to_storage(t.type, a), str(t.type.dtype), where)
            for a, t in zip(inputs[:8], kernel.operands, strict=True)]
    out = torch.full(want.shape, 7.0, dtype=torch.float32, device=where)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = load_source(kernel.kernel_name, built.source, tmp)
        launch(bind_launches(compiled, built.launches, args, [out],
                             {"P": inputs[3].shape[1]}))
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
    got_cache = args[3].cpu().numpy()
    assert np.array_equal(got_cache.view(np.uint8), want_cache.view(np.uint8))


def test_caches_it_does_not_take_go_elsewhere() -> None:
    """bf16 and int8 caches: no Triton paged-attention kernel (the CPU kernel takes them)."""
    from bitsmith.ir.dtypes import i8

    for dtype in (bf16, i8):
        module = _module(0, dtype)
        passes.run(module, "fuse")
        (kernel,) = [op for op in module.ops if op.name == "kernel.fused"]
        assert paged_attention_op(kernel) is None
