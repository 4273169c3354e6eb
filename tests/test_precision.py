"""compile(precision="bf16" | "int8"): linear layers on AMX tiles, checked against torch at
the precision's tolerance, reported, saved and loaded; a CPU without AMX keeps f32 and says
so; an artifact with AMX kernels refuses a process that Linux denies the tile state."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.codegen.template import Target
from bitsmith.codegen.tvm.amx import has_amx, has_amx_bf16
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates_a8 import has_vnni
from bitsmith.errors import ArtifactError, InputError
from bitsmith.runtime.host import request_amx
from bitsmith.runtime.model import CompiledModel

AMX = has_amx_bf16(host_target()) and request_amx()
needs_amx = pytest.mark.skipif(not AMX, reason="needs a CPU with AMX-BF16 (and Linux 5.16+)")
needs_amx_int8 = pytest.mark.skipif(not (AMX and has_amx(host_target(), "int8")),
                                    reason="needs a CPU with AMX-INT8 (and Linux 5.16+)")


class Block(torch.nn.Module):
    """Odd sizes (none a multiple of the 32-wide AMX block), a residual, a 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(45, 70)
        self.down = torch.nn.Linear(70, 45)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    return Block().eval(), torch.randn(2, 19, 45)


def _compiled_below_f32(model: torch.nn.Module, x: torch.Tensor, precision: str,
                        allowed: str, sums: str) -> tuple[CompiledModel, float]:
    """The Block compiled at `precision`: checked at its bound, both linears on its AMX
    template, its tile flags required, the report saying so; and its measured error."""
    cm = bitsmith.compile(model, (x,), precision=precision)
    assert f"allowed {allowed} in {precision}" in (cm.checked or "")
    steps = cm.artifact.manifest.plan["steps"]
    assert sum(s["template"] == f"dense_{precision}_amx" for s in steps) == 2
    assert {"amx_tile", f"amx_{precision}"} <= set(cm.artifact.manifest.requires["isa"])
    assert f"precision: {precision} ({sums}) in 2 of" in cm.report()
    return cm, cm.artifact.manifest.metadata["precision"]["error"]


@needs_amx
def test_bf16_model_matches_torch_reports_and_round_trips(tmp_path) -> None:
    model, x = _model()
    cm, error = _compiled_below_f32(model, x, "bf16", "0.03", "f32 accumulation")
    assert 0 < error < 3e-2  # bf16 rounding shows, within the bound
    with torch.no_grad():
        want = model(x).numpy()
    cm.save(tmp_path / "m.bsm")
    loaded = bitsmith.load(tmp_path / "m.bsm")
    got = loaded(x.numpy())
    got = got[0] if isinstance(got, (list, tuple)) else got
    got = np.asarray(got)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    assert "precision: bf16" in loaded.report()
    # the f32 compile of the same model is far closer to torch: the bf16 kernels did run
    f32 = bitsmith.compile(model, (x,))
    assert "precision: f32 in all" in f32.report()
    f32_got = np.asarray(f32.executor.run(x.numpy())[0])
    assert np.abs(f32_got - want).max() < np.abs(got - want).max()


@needs_amx_int8
def test_int8_model_matches_torch_within_its_bound_and_reports_it() -> None:
    """Rows of activations quantized as the model runs, weights per channel: the check holds
    it to the int8 bound, the report says so, and the error is int8's, not bf16's."""
    model, x = _model()
    cm, error = _compiled_below_f32(model, x, "int8", "0.08", "int32 sums")
    bf16 = bitsmith.compile(model, (x,), precision="bf16")
    assert bf16.artifact.manifest.metadata["precision"]["error"] < error < 8e-2
    with torch.no_grad():
        big = torch.randn(2, 19, 45) * 30  # inputs unlike the example's: scales follow them
        want = model(big).numpy()
    got = np.asarray(cm.executor.run(big.numpy())[0])
    assert np.abs(got - want).max() <= 8e-2 * np.abs(want).max()


@needs_amx
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_nan_and_inf_in_the_input_reach_the_output_as_torchs(precision: str) -> None:
    if precision == "int8" and not has_amx(host_target(), "int8"):
        pytest.skip("needs a CPU with AMX-INT8")
    model, x = _model()
    cm = bitsmith.compile(model, (x,), precision=precision)
    x = x.clone()
    x[0, 3, 7], x[1, 5, 0] = float("nan"), float("inf")
    with torch.no_grad():
        want = model(x).numpy()
    got = np.asarray(cm.executor.run(x.numpy())[0])
    assert (np.isnan(got) == np.isnan(want)).all()
    finite = np.isfinite(want)
    assert (np.isinf(got) == np.isinf(want)).all()
    bound = 8e-2 if precision == "int8" else 3e-2
    assert np.abs(got[finite] - want[finite]).max() <= bound * np.abs(want[finite]).max()


def test_a_cpu_without_amx_keeps_f32_and_says_so(monkeypatch) -> None:
    from bitsmith.codegen.tvm import build, templates_amx

    plain = Target(kind="llvm", mcpu=host_target().mcpu, cores=host_target().cores,
                   isa=tuple(f for f in host_target().isa if not f.startswith("amx")),
                   attrs=host_target().attrs)
    monkeypatch.setattr(build, "host_target", lambda: plain)
    assert not templates_amx.has_amx(plain, "bf16")
    model, x = _model()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cm = bitsmith.compile(model, (x,), precision="bf16")
    assert any("no AMX-BF16 tile unit" in str(w.message) for w in said)
    assert all(s["template"] != "dense_bf16_amx" for s in cm.artifact.manifest.plan["steps"])
    assert "precision: f32 in all" in cm.report()
    assert "allowed 0.0001 in f32" in (cm.checked or "")


def test_an_unknown_precision_is_refused() -> None:
    model, x = _model()
    with pytest.raises(InputError, match=r"precision expected one of \['f32', 'bf16', 'int8'\], "
                                         r"got 'fp8'"):
        bitsmith.compile(model, (x,), precision="fp8")


@needs_amx
def test_an_amx_artifact_refuses_a_process_denied_the_tile_state(tmp_path, monkeypatch) -> None:
    model, x = _model()
    cm = bitsmith.compile(model, (x,), precision="bf16")
    cm.save(tmp_path / "m.bsm")
    from bitsmith.runtime import executor

    monkeypatch.setattr(executor, "request_amx", lambda: False)
    with pytest.raises(ArtifactError, match="Linux refused this process the tile state"):
        bitsmith.load(tmp_path / "m.bsm")


@needs_amx_int8
def test_int8_error_that_adds_up_past_the_bound_says_what_to_do(monkeypatch) -> None:
    """Every kernel within its bound but the model past its own: the error names the
    precision's rounding, not a pass, and says to compile with bf16 or f32."""
    from bitsmith import selfcheck
    from bitsmith.errors import MismatchError

    monkeypatch.setitem(selfcheck.PRECISION_TOLERANCES, "int8", (1e-7, 1e-7))
    monkeypatch.setattr(selfcheck, "first_diverging_kernel", lambda *args: None)
    model, x = _model()
    with pytest.raises(MismatchError, match=r"the int8 rounding of 2 kernels adds up past the "
                                            r"model's int8 tolerance.*precision='bf16' or 'f32'"):
        bitsmith.compile(model, (x,), precision="int8")


class Wide(Block):
    """Output widths of whole 16-row VNNI tiles; K=48 is not a whole number of 32-wide
    activation blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(48, 80)
        self.down = torch.nn.Linear(80, 48)


needs_vnni = pytest.mark.skipif(not has_vnni(host_target()), reason="needs AVX-512 VNNI")


@needs_vnni
def test_w4a8_runs_quantized_layers_on_int8_activation_blocks() -> None:
    """quant= with precision="int8": the 4-bit codes multiply int8 activation blocks (both
    layers on `qdense_i8`, the GELU one with its epilogue fused), within the int8 bound of
    torch and of the same model with f32 activations, which it does differ from."""
    torch.manual_seed(5)
    model, x = Wide().eval(), torch.randn(2, 19, 48)
    cm = bitsmith.compile(model, (x,), quant="w4g32", precision="int8")
    f32 = bitsmith.compile(model, (x,), quant="w4g32")
    steps = cm.artifact.manifest.plan["steps"]
    assert [s["template"] for s in steps].count("qdense_i8") == 2
    assert "qdense_i8" not in [s["template"] for s in f32.artifact.manifest.plan["steps"]]
    assert "allowed 0.08 in int8" in (cm.checked or "")
    assert "precision: int8 (int32 sums) in 2 of" in cm.report()
    with torch.no_grad():
        want = model(x).numpy()
    got, ref = (np.asarray(c.executor.run(x.numpy())[0]) for c in (cm, f32))
    scale = np.abs(want).max()
    assert 0 < np.abs(got - ref).max() <= 8e-2 * scale  # int8 activations did run
    assert np.abs(got - want).max() <= 8e-2 * scale
    x[1, 4, 7] = float("nan")
    with torch.no_grad():
        want = model(x).numpy()
    got = np.asarray(cm.executor.run(x.numpy())[0])
    assert (np.isnan(got) == np.isnan(want)).all() and np.isnan(got[1, 4]).all()


def test_w4a8_on_a_cpu_without_vnni_keeps_f32_activations_and_says_so(monkeypatch) -> None:
    from bitsmith.codegen.tvm import build

    plain = Target(kind="llvm", mcpu=host_target().mcpu, cores=host_target().cores,
                   isa=tuple(f for f in host_target().isa
                             if f != "avx512_vnni" and not f.startswith("amx")),
                   attrs=host_target().attrs)
    monkeypatch.setattr(build, "host_target", lambda: plain)
    torch.manual_seed(5)
    model, x = Wide().eval(), torch.randn(2, 19, 48)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        cm = bitsmith.compile(model, (x,), quant="w4g32", precision="int8")
    assert any("no AVX-512 VNNI (2 kernels)" in str(w.message) for w in said)
    assert "qdense_i8" not in [s["template"] for s in cm.artifact.manifest.plan["steps"]]
    assert "precision: f32 in all" in cm.report()


@needs_amx_int8
def test_int8_linear_layers_are_smoothquant_calibrated_on_calib_or_the_examples(
        monkeypatch) -> None:
    """Outlier channels in x: compile calibrates each int8 linear layer's factors on the
    example inputs (or `calib=`), which brings it nearer torch than without; reported."""
    from bitsmith import compiler

    torch.manual_seed(7)
    model, x = Wide().eval(), torch.randn(2, 19, 48)
    x[..., 5] *= 60
    x[..., 40] *= 30
    cm = bitsmith.compile(model, (x,), precision="int8")
    assert sorted(cm.artifact.manifest.metadata["precision"]["smoothed"]) == sorted(
        cm.artifact.manifest.metadata["precision"]["kernels"])
    assert "(SmoothQuant-calibrated)" in cm.report()
    calibrated = bitsmith.compile(model, (x,), precision="int8", calib=[x[:1] * 2, x[1:]])
    with torch.no_grad():
        want = model(x).numpy()
    errors = [np.abs(np.asarray(c.executor.run(x.numpy())[0]) - want).max()
              for c in (cm, calibrated)]
    monkeypatch.setattr(compiler, "_calibrate_int8", lambda *args: [])
    plain = bitsmith.compile(model, (x,), precision="int8")
    assert plain.artifact.manifest.metadata["precision"]["smoothed"] == []
    unsmoothed = np.abs(np.asarray(plain.executor.run(x.numpy())[0]) - want).max()
    assert max(errors) < unsmoothed
    assert cm.artifact.weights.keys() != calibrated.artifact.weights.keys()  # other factors


@needs_amx_int8
def test_smoothed_twin_layers_share_one_function_with_their_own_factors(monkeypatch) -> None:
    """Two layers of one shape smoothed on different activations: one compiled function, each
    layer's weight packed with its own factors: the same outputs as built apart."""
    from bitsmith.codegen.tvm import build

    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)).eval()
    x = torch.randn(2, 19, 48)
    x[..., 7] *= 40
    cm = bitsmith.compile(model, (x,), precision="int8")
    steps = cm.artifact.manifest.plan["steps"]
    assert len(steps) == 2 and steps[0]["function"] == steps[1]["function"]
    assert len(cm.artifact.manifest.metadata["precision"]["smoothed"]) == 2
    monkeypatch.setattr(build, "_function_signature", build.kernel_signature)
    apart = bitsmith.compile(model, (x,), precision="int8")
    assert len({s["function"] for s in apart.artifact.manifest.plan["steps"]}) == 2
    got, want = (np.asarray(c.executor.run(x.numpy())[0]) for c in (cm, apart))
    assert np.array_equal(got, want)


@needs_amx_int8
def test_smoothed_twin_layers_are_one_tuning_task() -> None:
    """The factors stay out of the task's text (what workers build and time): one task for
    both layers; the kernels keep their factors."""
    from bitsmith import compiler
    from bitsmith.autotune.candidates import kernel_text
    from bitsmith.autotune.tuner import group_tasks
    from bitsmith.frontend import from_torch
    from bitsmith.passes import default_pipeline, run

    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)).eval()
    x = torch.randn(2, 19, 48)
    x[..., 7] *= 40
    module = from_torch(model, (x,), {}, name="twins")
    run(module, default_pipeline("cpu"), verify=False)
    compiler._lower_precision(module, "int8", "cpu", host_target())
    assert len(compiler._calibrate_int8(module, (x,), {})) == 2
    kernels = [op for op in module.ops if op.name == "kernel.fused"]
    factors = [op.attributes["smooth"] for op in kernels]
    assert factors[0] != factors[1]
    (task,) = group_tasks(kernels, host_target())
    assert len(task.kernels) == 2 and "smooth" not in kernel_text(kernels[0])
    assert [op.attributes["smooth"] for op in kernels] == factors  # left as they were
