"""The value type describing one zoo model."""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A named model: how to build it and how to make inputs for it."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], tuple[torch.Tensor, ...]]
    input_names: tuple[str, ...]
