"""The shared test helpers (tests/support) catch what they are there to catch."""
from __future__ import annotations

import numpy as np
import pytest

from bitsmith import ir

from .support import (
    BF16,
    assert_imports_without,
    assert_outputs_match,
    randn,
    random_inputs,
    tolerance,
)

MIXED = """module @m {
  func.func @main(%x: tensor<Bx3xf16>, %i: tensor<Bxi32>) -> (tensor<Bx3xf16>) {
    "func.return"(%x) : (tensor<Bx3xf16>) -> ()
  }
}
"""


def test_outputs_match_within_the_dtype_tolerance_of_the_largest_magnitude() -> None:
    want = np.array([100.0, 1.0, 0.0], np.float32)
    near = want + np.float32(100 * tolerance(np.float32) / 2)  # within, for every element
    assert_outputs_match([near], [want])
    with pytest.raises(AssertionError, match="relative error"):
        assert_outputs_match([want + np.float32(100 * tolerance(np.float32) * 2)], [want])
    with pytest.raises(AssertionError, match="output 0"):
        assert_outputs_match([near], [want], rtol=0)


def test_outputs_match_demands_shapes_dtypes_and_nan_inf_where_want_has_them() -> None:
    want = np.array([np.nan, np.inf, 1.0], np.float32)
    assert_outputs_match([want.copy()], [want])
    for got, message in [(np.array([np.nan, 1.0, 1.0], np.float32), "NaN/inf positions"),
                         (np.array([np.nan, np.inf, np.nan], np.float32), "where the expected"),
                         (want.astype(np.float16), "dtype float16"),
                         (want[:2], "shape")]:
        with pytest.raises(AssertionError, match=message):
            assert_outputs_match([got], [want])
    bf16 = np.array([np.nan, 2.0], BF16)  # numpy alone does not see bfloat16 NaNs
    assert_outputs_match([bf16.copy()], [bf16])
    with pytest.raises(AssertionError):
        assert_outputs_match([np.array([1, 2], np.int32)], [np.array([1, 3], np.int32)])


def test_random_inputs_bind_the_batch_and_repeat_from_a_seed() -> None:
    module = ir.parse(MIXED)
    x, i = random_inputs(module, batch=5)
    assert (x.shape, x.dtype, i.shape, i.dtype) == ((5, 3), np.float16, (5,), np.int32)
    assert i.min() >= -5 and i.max() < 6
    again = random_inputs(module, batch=5)
    assert all(np.array_equal(a, b) for a, b in zip([x, i], again, strict=True))
    x32, small = random_inputs(module, 5, ints=(0, 5), floats_as=np.float32)
    assert x32.dtype == np.float32 and small.min() >= 0 and small.max() < 5
    assert randn(2, 3, dtype=np.float16, seed=1).dtype == np.float16


def test_imports_without_sees_a_forbidden_submodule() -> None:
    assert_imports_without(["json"], ["email"])
    with pytest.raises(AssertionError, match=r"imported email\.mime, .*email\.mime\.text$"):
        assert_imports_without(["json"], ["email.mime"], then="import email.mime.text\n")
