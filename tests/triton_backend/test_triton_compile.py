"""`bitsmith.compile(..., target="cuda")`: Triton sources in the artifact, one per kernel,
that save, load and run (on the GPU, or through Triton's interpreter without one)."""
import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.autotune.candidates import MeasureOptions
from bitsmith.autotune.database import TuningDatabase
from bitsmith.autotune.measure_triton import TritonRunner
from bitsmith.autotune.tuner import Tuner
from bitsmith.codegen.triton.templates import cuda_target
from bitsmith.frontend import from_torch


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


def test_tuning_triton_kernels_measures_caches_and_ships_the_winners(tmp_path) -> None:
    """Under the interpreter the times say nothing of a GPU, but the path is the GPU's: each
    candidate is built, checked against the interpreter and timed; the winners go to the
    database and cache of this device, and a second compile measures nothing."""
    model, x = mlp()
    module = from_torch(model, (x,), {}, name="mlp")
    bitsmith.passes.run(module, bitsmith.passes.default_pipeline("cuda"))
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    target = cuda_target()
    quick = MeasureOptions(warmup=0, repeats=2, min_seconds=0.0)
    with TuningDatabase(tmp_path / "db.sqlite") as db:
        tuner = Tuner(target=target, database=db, runner=TritonRunner(target, quick),
                      bindings={"B": 3}, timing="hot")
        tasks = tuner.tasks(kernels)
        assert {t.template.name for t in tasks} <= {"triton.matmul", "triton.gemv",
                                                     "triton.rows", "triton.generic"}
        configs = tuner.tune(kernels, 3 * len(tasks))
        assert set(configs) == {op.kernel_name for op in kernels}
        measured = db.count()
        assert measured >= len(tasks)
        for task in tasks:
            best = db.best(task.key, tuner.fp)
            assert best is not None and best.median < float("inf")
        assert tuner.tune(kernels, 5) == configs and db.count() == measured  # cached
        assert tuner.fingerprint["kind"] == "cuda"
        assert tuner.fingerprint["toolchain"]["triton"] == "3.6.0"
        assert all(name.startswith("triton.") for name in tuner.fingerprint["templates"])


def test_torch_tensors_stay_on_the_kernels_device() -> None:
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda")
    y = cm(x.to(cm.executor.device))
    assert isinstance(y, torch.Tensor) and y.device.type == cm.executor.device
    torch.testing.assert_close(y.cpu(), model(x).detach(), rtol=1e-5, atol=1e-5)
    y.add_(1.0)  # outputs are fresh tensors, not the plan's buffers that the next run reuses
    torch.testing.assert_close(cm(x).cpu(), model(x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu(), model(x).detach() + 1.0, rtol=1e-5, atol=1e-5)


def test_compile_with_tune_on_cuda() -> None:
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda", tune=2)
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    steps = cm.artifact.manifest.plan["steps"]
    assert all(step["template"].startswith("triton.") for step in steps)


@pytest.mark.gpu
def test_runs_on_the_gpu() -> None:
    from bitsmith.runtime.triton_executor import device  # noqa: PLC0415

    assert device() == "cuda", "run GPU tests on a machine with an NVIDIA GPU, no interpreter"
    model, x = mlp()
    cm = bitsmith.compile(model, (x,), target="cuda", quant="w4g32")
    assert cm.executor.device == "cuda"
    want = model(x).detach().numpy()
    assert np.abs(cm(x.numpy()) - want).max() / np.abs(want).max() < 0.1
