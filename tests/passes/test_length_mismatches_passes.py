"""Calibration batches with the wrong number of inputs give a PassError that says expected vs
got, not a raw ValueError from zip(strict=True)."""
import numpy as np
import pytest
import torch

from bitsmith.frontend import from_torch
from bitsmith.passes import PassError, run
from bitsmith.passes.quant_spec import quant_pipeline_entry


@pytest.mark.parametrize("count", [0, 2])
def test_a_calibration_batch_with_another_input_count_is_a_pass_error(count: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    module = from_torch(model, (torch.randn(4, 32),), {}, name="mlp")
    run(module, "canonicalize,cse")
    x = np.zeros((4, 32), np.float32)
    module.calibration = [(x,), tuple([x] * count)]
    with pytest.raises(PassError, match=rf"calibration batch 1 has {count} input\(s\); the "
                                        r"model takes 1 \(input\)") as info:
        run(module, quant_pipeline_entry("w4g16:gptq"))
    assert "ValueError" not in str(info.value)
