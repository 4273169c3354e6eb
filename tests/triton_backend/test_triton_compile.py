"""`bitsmith.compile(..., target="cuda")`: Triton sources in the artifact, one per kernel,
that save, load and run (on the GPU, or through Triton's interpreter without one)."""
import numpy as np
import pytest
import torch

import bitsmith


def mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(),
                                torch.nn.Linear(40, 8)).eval()
    return model, torch.randn(3, 24)


@pytest.mark.parametrize("quant, tol", [(None, 1e-5), ("w4g16", 0.1)])
def test_cuda_artifact_runs_saves_and_loads(tmp_path, quant: str | None, tol: float) -> None:
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda", quant=quant)
    want = model(x).detach().numpy()
    got = cm(x.numpy())
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    manifest = cm.artifact.manifest
    assert manifest.requires == {"device": "cuda"} and "triton" in manifest.toolchain
    steps = manifest.plan["steps"]
    assert sorted(cm.artifact.libraries) == sorted(s["library"] for s in steps)
    for step in steps:  # readable Python, one file per kernel, with its launches
        source = cm.artifact.libraries[step["library"]].decode()
        assert "@triton.jit" in source and step["launches"]
        compile(source, step["library"], "exec")
    path = tmp_path / "m.bsm"
    cm.save(path)
    again = bitsmith.load(path)
    np.testing.assert_array_equal(again(x.numpy()), got)


def test_dynamic_batch_cuda_artifact() -> None:
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda", dynamic_batch=True)
    for batch in (1, 5):
        xb = torch.randn(batch, 24)
        np.testing.assert_allclose(cm(xb.numpy()), model(xb).detach().numpy(), rtol=1e-5,
                                   atol=1e-5)


def test_tuning_triton_kernels_says_it_is_not_written_yet() -> None:
    model, x = mlp()
    with pytest.raises(ValueError, match="tuning Triton kernels is not written yet"):
        bitsmith.compile(model, (x,), target="cuda", tune=4)


@pytest.mark.gpu
def test_runs_on_the_gpu() -> None:
    from bitsmith.runtime.triton_executor import device  # noqa: PLC0415

    assert device() == "cuda", "run GPU tests on a machine with an NVIDIA GPU, no interpreter"
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda", quant="w4g32")
    assert cm.executor.device == "cuda"
    want = model(x).detach().numpy()
    assert np.abs(cm(x.numpy()) - want).max() / np.abs(want).max() < 0.1
