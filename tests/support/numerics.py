"""Comparing outputs: one tolerance per dtype, and one check of got against want that every
kind of test uses (kernels against the interpreter, passes before/after, the interpreter
against torch)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from bitsmith import ir

BF16 = np.dtype(ml_dtypes.bfloat16)
TOLERANCES: dict[np.dtype, float] = {
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float16): 1e-3,
    BF16: 8e-3,
}
"""Largest error allowed relative to an output's largest magnitude, by dtype: f32 to f32
rounding of a reordered sum; f16 to about an ulp (tiled kernels round f16 tiles where the
interpreter rounds once at the end); bf16 to two of its 8-bit-mantissa ulps."""

SCALE_FLOOR = 1e-6  # an all-zero output still allows this much absolute error, times rtol


def is_float(dtype: np.dtype) -> bool:
    """numpy's floats and ml_dtypes' bfloat16 (whose kind is 'V', not 'f')."""
    return dtype.kind == "f" or dtype in TOLERANCES


def tolerance(dtype: np.dtype) -> float:
    """The table's tolerance for a float dtype; a clear error for one it lacks."""
    if np.dtype(dtype) not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {np.dtype(dtype).name}; expected one of "
                       f"{', '.join(d.name for d in TOLERANCES)}")
    return TOLERANCES[np.dtype(dtype)]


def assert_outputs_match(got: Sequence[np.ndarray], want: Sequence[np.ndarray],
                         rtol: float | None = None) -> None:
    """Same count, shapes and dtypes; ints and bools equal; floats NaN/inf where want has them
    and finite elsewhere, within `rtol` (default: the dtype's TOLERANCES entry; 0: bit for
    bit) of each output's largest finite magnitude."""
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"output {i}: shape {g.shape}, expected {w.shape}"
        assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype}, expected {w.dtype}"
        if not is_float(w.dtype):
            np.testing.assert_array_equal(g, w, err_msg=f"output {i}")
            continue
        _assert_floats_match(i, g.astype(np.float64), w.astype(np.float64),
                             tolerance(w.dtype) if rtol is None else rtol)


def _assert_floats_match(i: int, g: np.ndarray, w: np.ndarray, rtol: float) -> None:
    """float64 views of one output: specials exactly, the rest relative to the largest."""
    finite = np.isfinite(w)
    np.testing.assert_array_equal(g[~finite], w[~finite],
                                  err_msg=f"output {i}: NaN/inf positions differ")
    assert np.isfinite(g[finite]).all(), f"output {i}: NaN/inf where the expected is finite"
    if rtol == 0:
        np.testing.assert_array_equal(g, w, err_msg=f"output {i}")
        return
    scale = max(float(np.abs(w[finite]).max(initial=0.0)), SCALE_FLOOR)
    err = float(np.abs(g[finite] - w[finite]).max(initial=0.0)) / scale
    assert err <= rtol, f"output {i}: relative error {err:.2e} > {rtol:.0e}"


def assert_matches_interpreter(module: ir.Module, run: Callable[..., object],
                               inputs: Sequence[np.ndarray], rtol: float | None = None) -> None:
    """`run(*inputs)` (a compiled model: one array, or a tuple or list of them) computes what
    the numpy interpreter computes for `module` on the same inputs."""
    want = ir.interpret(module, *inputs)
    got = run(*inputs)
    got = list(got) if isinstance(got, tuple | list) else [got]
    assert_outputs_match([np.asarray(g) for g in got], want, rtol)
