"""The CPU kernel of `kv.paged_attention` against the interpreter: a ragged batch with a
sequence that has no rows this step, a decode row, a prefill chunk after cached positions,
padding rows, pages in any order, GQA, sliding windows and every cache dtype; and the
interpreter's own refusals of inconsistent page tables."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bitsmith.codegen.tvm.lower import compile_funcs
from bitsmith.codegen.tvm.paged_attention import paged_attention_func
from bitsmith.errors import IndexOutOfRangeError
from bitsmith.ir import Builder, Module, TensorType, interpret
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.dialects.kv import PagedAttentionOp, cache_type, int4_group, scales_type
from bitsmith.ir.dtypes import bf16, f16, f32, i8, i32, u8
from bitsmith.runtime.executor import as_tvm, state_array

T, B, HQ, HK, D, L, S, SLOTS, PAGES = 40, 4, 6, 2, 16, 2, 4, 16, 16
# sequence 0: a chunk of 5 after 2 cached positions; 1: one decode row at position 8;
# 2: no rows this step (a padded batch slot); 3: a fresh prompt of 4; rows 10..39: padding
SEQ_INDPTR = [0, 5, 6, 6, 10]
KV_LEN = [7, 9, 3, 4]
PAGE_INDPTR = [0, 2, 5, 6, 7]
PAGE_INDICES = [3, 0, 8, 1, 5, 6, 2] + [0] * 9
# a long chunk: sequence 0 reads 35 rows after 2 cached positions (three tiles of the
# kernel's 16 rows), sequence 1 decodes at position 8, 2 has no rows, 3 a prompt of 1
LONG = ([0, 35, 36, 36, 37], [37, 9, 3, 1], [0, 10, 13, 14, 15],
        [3, 0, 8, 1, 5, 6, 2, 4, 7, 9, 15, 12, 10, 11, 13, 0])


def _module(window: int, dtype) -> Module:
    cache = cache_type(L, PAGES, HK, S, D, dtype)
    types = [TensorType((T, HQ, D), f32), TensorType((T, HK, D), f32),
             TensorType((T, HK, D), f32), cache,
             TensorType((B + 1,), i32), TensorType((B,), i32), TensorType((B + 1,), i32),
             TensorType((SLOTS,), i32)]
    if dtype in (i8, u8):
        types.append(scales_type(cache, D))
    module = Module("m", types)
    b = Builder.at_end(module.body)
    b.create(ReturnOp, b.value(PagedAttentionOp, *module.inputs, layer=1, scale=0.25,
                               window=window))
    return module


def _inputs(npdtype, seed: int = 0, tables: tuple[list[int], ...] = (
        SEQ_INDPTR, KV_LEN, PAGE_INDPTR, PAGE_INDICES)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    cache = rng.standard_normal((L, PAGES, 2, HK, S, D))
    if npdtype == np.uint8:  # 4-bit codes, two a byte
        held = rng.integers(0, 256, (L, PAGES, 2, HK, S, D // 2)).astype(np.uint8)
    elif npdtype == np.int8:
        held = (cache * 40).clip(-127, 127).astype(npdtype)
    else:
        held = cache.astype(npdtype)
    inputs = [rng.standard_normal((T, HQ, D)).astype(np.float32),
              rng.standard_normal((T, HK, D)).astype(np.float32),
              rng.standard_normal((T, HK, D)).astype(np.float32), held,
              *(np.array(a, np.int32) for a in tables)]
    if npdtype == np.int8:  # the rows already cached, with their scales
        inputs.append((rng.random((L, PAGES, 2, HK, S)) * 0.05).astype(np.float32))
    if npdtype == np.uint8:  # (scale, min) per group
        params = rng.random((L, PAGES, 2, HK, S, D // int4_group(D), 2)).astype(np.float32)
        params[..., 0] *= 0.1
        params[..., 1] -= 0.5
        inputs.append(params)
    inputs[2][3, 1] = 0.0  # a row of zeros: its scale is 1, its codes 0
    inputs[0][1, 2, 5] = np.nan  # a NaN query: its row and head come out NaN, no other
    return inputs


@pytest.mark.parametrize("window, long", [(0, False), (3, False), (0, True), (6, True)])
@pytest.mark.parametrize("dtype, npdtype", [(f32, np.float32), (f16, np.float16),
                                            (bf16, ml_dtypes.bfloat16), (i8, np.int8),
                                            (u8, np.uint8)])
def test_kernel_matches_the_interpreter(window: int, long: bool, dtype, npdtype) -> None:
    inputs = _inputs(npdtype, tables=LONG) if long else _inputs(npdtype)
    end = inputs[4][-1]  # rows past it are padding
    want_cache = inputs[3].copy()
    want_scales = [a.copy() for a in inputs[8:]]
    want = interpret(_module(window, dtype), *inputs[:3], want_cache, *inputs[4:8],
                     *want_scales)[0]
    func = paged_attention_func(tokens=T, batch=B, heads=HQ, kv_heads=HK, head_dim=D,
                                layers=L, page_size=S, page_slots=SLOTS, layer=1, scale=0.25,
                                window=window, cache_dtype=str(dtype))
    kernel = compile_funcs({"pa": func}, "paged attention")["pa"]
    args = [state_array(a.shape, a.dtype) for a in inputs]
    for held, a in zip(args, inputs, strict=True):
        held[...] = a
    out = state_array((T, HQ, D), np.float32)
    out[...] = 7.0  # padding rows must come out as zeros, not what the buffer held
    kernel(*[as_tvm(a) for a in args], as_tvm(out))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.isnan(out[1, 2]).all() and np.isnan(out).sum() == out.shape[-1]
    assert not out[end:].any()
    # every new row is in its page (quantized as the interpreter does), nothing else changed
    assert np.array_equal(args[3].view(np.uint8), want_cache.view(np.uint8))
    assert not np.array_equal(want_cache, inputs[3])
    for got_scales, want_s in zip(args[8:], want_scales, strict=True):
        assert np.array_equal(got_scales, want_s)


@pytest.mark.parametrize("field, value, message", [
    (5, [7, 9, 3, 40], "holds 40 position"),         # more positions than its pages hold
    (5, [2, 9, 3, 4], "after a chunk of 5"),          # fewer positions than its new rows
    (7, [3, 0, 8, 1, 5, 6, 99] + [0] * 9, "names pages"),  # a page past the cache
    (4, [0, 5, 4, 6, 10], "must rise"),               # rows that go backwards
    (6, [0, 2, 5, 6, 17], "must rise"),               # a page table past its entries
])
def test_interpreter_refuses_inconsistent_tables(field: int, value: list[int],
                                                 message: str) -> None:
    inputs = _inputs(np.float32)
    inputs[field] = np.array(value, np.int32)
    with pytest.raises(IndexOutOfRangeError, match=message):
        interpret(_module(0, f32), *inputs)
