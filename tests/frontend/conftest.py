"""Shared checks for import tests: interpreter vs torch, and text round trips."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bitsmith import ir

from ..support import assert_outputs_match

warnings.filterwarnings("ignore", category=FutureWarning)
RTOL = 1e-4  # f32: the interpreter must match torch to this relative error


def torch_outputs(model: torch.nn.Module, inputs: tuple) -> list[np.ndarray]:
    """The model's outputs flattened to numpy arrays."""
    with torch.no_grad():
        out = model(*inputs)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    flat = [out] if isinstance(out, torch.Tensor) else list(out)
    return [t.detach().numpy() for t in flat if isinstance(t, torch.Tensor)]


def assert_matches_torch(module: ir.Module, model: torch.nn.Module, inputs: tuple) -> None:
    """Interpreter outputs equal torch's within RTOL (relative to each output's max)."""
    got = ir.interpret(module, *[t.numpy() for t in inputs])
    assert_outputs_match(got, torch_outputs(model, inputs), RTOL)


def assert_round_trips(module: ir.Module, inputs: tuple) -> None:
    """print -> parse -> print is identical, and the parsed module computes the same."""
    text = str(module)
    parsed = ir.parse(text, weights=module.weights)
    assert str(parsed) == text
    arrays = [t.numpy() for t in inputs]
    for a, b in zip(ir.interpret(module, *arrays), ir.interpret(parsed, *arrays), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(autouse=True)
def _single_thread_torch() -> None:
    torch.set_num_threads(1)
