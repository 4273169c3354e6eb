"""Helpers the tests share: tolerances and output comparison, random inputs from fixed seeds,
and import-boundary checks in a fresh interpreter."""
from .imports import assert_imports_without
from .inputs import randint, randn, random_inputs
from .numerics import (
    BF16,
    TOLERANCES,
    assert_matches_interpreter,
    assert_outputs_match,
    is_float,
    tolerance,
)

__all__ = [
    "BF16",
    "TOLERANCES",
    "assert_imports_without",
    "assert_matches_interpreter",
    "assert_outputs_match",
    "is_float",
    "randint",
    "randn",
    "random_inputs",
    "tolerance",
]
