"""Random test inputs from fixed seeds: arrays by shape, and one array per module input."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from bitsmith import ir


def randn(*shape: int, dtype: npt.DTypeLike = np.float32, seed: int = 0) -> np.ndarray:
    """Standard normal values, rounded to float32 and then into `dtype`."""
    x = np.asarray(np.random.default_rng(seed).standard_normal(shape), np.float32)
    return x.astype(dtype)


def randint(*shape: int, lo: int = -9, hi: int = 10, dtype: npt.DTypeLike = np.int32,
            seed: int = 0) -> np.ndarray:
    """Uniform integers in [lo, hi)."""
    return np.asarray(np.random.default_rng(seed).integers(lo, hi, shape)).astype(dtype)


def random_inputs(module: ir.Module, batch: int = 2, seed: int = 0, *,
                  ints: tuple[int, int] = (-5, 6),
                  floats_as: npt.DTypeLike | None = None) -> list[np.ndarray]:
    """One array per input of `module`, in order, from one generator seeded with `seed`:
    symbolic dims are `batch`; floats standard normal, rounded into the input's dtype (or,
    with `floats_as`, into that numpy dtype, e.g. float32 arrays that a kernel's caller
    converts); ints and bools uniform in [ints[0], ints[1]), cast into the input's dtype."""
    rng = np.random.default_rng(seed)
    arrays = []
    for arg in module.inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in arg.type.shape)
        dtype = arg.type.dtype
        if dtype.is_float:
            x = rng.standard_normal(shape)
            arrays.append(dtype.cast(x) if floats_as is None else x.astype(floats_as))
        else:
            arrays.append(dtype.cast(rng.integers(*ints, shape)))
    return arrays
