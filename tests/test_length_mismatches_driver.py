"""Where a shorter list is meant (inputs that come by keyword, a torch check that reports an
output-count mismatch), the driver and `bitsmith ir --check` do not raise zip's ValueError."""
from __future__ import annotations

import numpy as np
import torch

from bitsmith.cli.ir import check_against_torch
from bitsmith.compiler import example_arrays
from bitsmith.frontend import from_torch
from bitsmith.runtime.artifact import Artifact, Manifest, TensorSpec


class Masked(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask


class MaskedTwice(Masked):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * mask
        return y, y + 1


def test_example_arrays_take_inputs_by_position_and_by_keyword() -> None:
    specs = (TensorSpec("x", ("B", 3), "f32"), TensorSpec("mask", ("B", 3), "f32"))
    artifact = Artifact(Manifest(name="m", inputs=specs, outputs=()), {}, {})
    x, mask = torch.ones(2, 3), torch.zeros(2, 3)
    for args, kwargs in [((), {"x": x, "mask": mask}), ((x,), {"mask": mask}),
                         ((x, mask), {})]:
        got = example_arrays(artifact, args, kwargs)
        assert [a.tolist() for a in got] == [x.tolist(), mask.tolist()]
        assert all(isinstance(a, np.ndarray) for a in got)


def test_check_against_torch_with_keyword_inputs_and_an_output_count_mismatch() -> None:
    kwargs = {"x": torch.randn(2, 3), "mask": torch.ones(2, 3)}
    module = from_torch(Masked(), (), kwargs, name="masked")
    assert check_against_torch(module, Masked(), (), kwargs) == 0
    # torch returns two outputs, the module one: the check fails, it does not raise
    assert check_against_torch(module, MaskedTwice(), (), kwargs) == 1
