"""Attribute values carried by ops, and their MLIR-like text form."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import cast

import numpy as np

from ..errors import AttributeValueError
from .dtypes import DType
from .types import TensorType


@dataclass(frozen=True, slots=True, eq=False)
class DenseAttr:
    """A small literal tensor printed inline (`dense<tensor<2xf32> [1.0, 2.0]>`)."""

    type: TensorType
    array: np.ndarray

    def __post_init__(self) -> None:
        dtype = self.type.dtype
        if not isinstance(dtype, DType):
            raise AttributeValueError(f"a dense literal needs a plain element type, got {dtype}")
        arr = np.array(self.array, dtype=dtype.numpy_dtype, order="C")
        if tuple(arr.shape) != tuple(self.type.shape):
            raise AttributeValueError(f"dense literal has shape {arr.shape}, type says {self.type}")
        arr.setflags(write=False)
        object.__setattr__(self, "array", arr)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DenseAttr) and self.type == other.type
                and self.array.tobytes() == other.array.tobytes())

    def __hash__(self) -> int:
        return hash((self.type, self.array.tobytes()))

    def __str__(self) -> str:
        items = ", ".join(format_scalar(v) for v in self.array.reshape(-1).tolist())
        return f"dense<{self.type} [{items}]>"


Attribute = bool | int | float | str | DType | DenseAttr | tuple | None
"""What an op attribute may hold; tuples hold further attributes (usually ints)."""


def format_scalar(value: object) -> str:
    """Text of a scalar so that parsing it gives back the same value bit for bit."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    raise AttributeValueError(f"not a scalar attribute: {value!r}")


def format_attr(value: Attribute) -> str:
    """Text of an attribute value."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (bool, int, float)):
        return format_scalar(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, (DType, DenseAttr)):
        return str(value)
    raise AttributeValueError(f"unsupported attribute value {value!r} ({type(value).__name__})")


def normalize_attr(value: object) -> Attribute:
    """Turn lists into tuples and numpy scalars into python ones, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(normalize_attr(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return cast(Attribute, value)  # unchecked here: Operation.verify checks it against ATTRS
