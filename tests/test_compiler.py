"""bitsmith.compile -> CompiledModel: matches torch, saves, loads (also in a process without
torch), and validates its inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

import bitsmith
from bitsmith import models
from bitsmith.errors import CodegenError
from bitsmith.models.hf import ARCHS

from .support import assert_imports_without

warnings.filterwarnings("ignore", category=FutureWarning)


def compiled(name: str, dynamic_batch: bool = True) -> tuple:
    spec = models.get(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    return model, spec, bitsmith.compile(model, spec.example_inputs(2), name=name,
                                         dynamic_batch=dynamic_batch)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def bert():
    return compiled("bert")


@pytest.mark.parametrize("batch", [1, 8, 3])
def test_bert_matches_torch_at_compiled_and_unseen_batches(bert, batch: int) -> None:
    model, spec, cm = bert
    inputs = spec.example_inputs(batch)
    with torch.no_grad():
        want = model(*inputs)
    got = cm(*inputs)
    assert isinstance(got, tuple) and len(got) == 2  # several outputs -> a tuple of tensors
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, torch.Tensor) and g.shape == w.shape
        assert rel_err(g, w) < 1e-4


def _model(kind: str, name: str) -> tuple:
    torch.manual_seed(0)
    if kind == "zoo":
        spec = models.get(name)
        return spec.build().eval(), spec.example_inputs
    build, make_inputs = ARCHS[name]
    return build().eval(), make_inputs


SLOW_ARCHS = {"gpt2", "llama", "mobilenet_v2"}  # over 50 s each on two loaded cores


@pytest.mark.parametrize("kind, name", [("zoo", n) for n in models.names()] + [
    pytest.param("transformers", a, marks=[pytest.mark.slow] if a in SLOW_ARCHS else [])
    for a in sorted(ARCHS)])
def test_every_model_matches_torch_at_batch_1_8_and_an_unseen_batch(kind: str, name: str) -> None:
    model, make_inputs = _model(kind, name)
    cm = bitsmith.compile(model, make_inputs(2), name=name, dynamic_batch=True)
    for batch in (1, 8, 3):
        inputs = make_inputs(batch)
        with torch.no_grad():
            want = [t for t in tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
        got = cm(*inputs)
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert rel_err(g, w.to(g.dtype)) < 1e-4, (name, batch)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_zoo_model_matches_torch_with_numpy_in_and_out(name: str) -> None:
    model, spec, cm = compiled(name)
    (x,) = spec.example_inputs(5)
    with torch.no_grad():
        want = model(x)
    got = cm(x.numpy())
    assert isinstance(got, np.ndarray)  # numpy in -> numpy out, one output -> not a tuple
    assert rel_err(torch.from_numpy(got), want) < 1e-4


def test_save_load_round_trip_and_a_process_without_torch(bert, tmp_path: Path) -> None:
    model, spec, cm = bert
    path = tmp_path / "bert.bsm"
    cm.save(path)
    loaded = bitsmith.load(path)
    ids, mask = (t.numpy() for t in spec.example_inputs(4))
    want = cm(ids, mask)
    for a, b in zip(loaded(ids, mask), want, strict=True):
        np.testing.assert_array_equal(a, b)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "want.npy", want[1])
    run = f"""
import numpy as np
cm = bitsmith.load({str(path)!r})
out = cm(np.load({str(tmp_path / 'ids.npy')!r}), np.load({str(tmp_path / 'mask.npy')!r}))
np.testing.assert_array_equal(out[1], np.load({str(tmp_path / 'want.npy')!r}))
"""
    assert_imports_without(["bitsmith"], ["torch", "bitsmith.frontend", "bitsmith.passes",
                                          "bitsmith.compiler", "bitsmith.codegen"], then=run)


def test_inputs_are_validated_with_expected_vs_got(bert) -> None:
    _, spec, cm = bert
    ids, mask = (t.numpy() for t in spec.example_inputs(2))
    with pytest.raises(ValueError, match=r"expected 2 input\(s\) \(input_ids, attention_mask\), "
                                         r"got 1"):
        cm(ids)
    with pytest.raises(ValueError, match=r"input 'attention_mask': dim 0 is B = 2 from an "
                                         r"earlier input, got 3"):
        cm(ids, np.ones((3, 16), np.int64))
    with pytest.raises(ValueError, match="input 'input_ids': expected dtype i64, got float32"):
        cm(ids.astype(np.float32), mask)


def test_static_batch_and_unknown_target() -> None:
    model, spec, cm = compiled("mlp", dynamic_batch=False)
    with pytest.raises(ValueError, match=r"dim 0 should be 2"):
        cm(spec.example_inputs(3)[0].numpy())
    with pytest.raises(CodegenError, match="target 'tpu' is not supported yet; valid: cpu"):
        bitsmith.compile(model, spec.example_inputs(1), target="tpu")
    assert "CompiledModel mlp(x: tensor<2x64xf32>)" in repr(cm)


LIBRARY_SCRIPT = """
import sys, torch, bitsmith
from bitsmith import models
from bitsmith.codegen.tvm import lower
spec = models.get("mlp")
torch.manual_seed(0)
model = spec.build().eval()
x = spec.example_inputs(3)[0]
if sys.argv[1] == "warm":  # the library must come from the cache: LLVM is not to be called
    def refuse(*args, **kwargs):
        raise AssertionError("compiled again")
    lower.compile_funcs = refuse
    import bitsmith.compiler as c
    c.compile_funcs = refuse
cm = bitsmith.compile(model, (x,), name="mlp")
with torch.no_grad():
    assert float((cm(x) - model(x)).abs().max()) < 1e-4
print("ok")
"""


@pytest.mark.slow  # four processes that import torch and compile: 85 s on two loaded cores
def test_a_recompile_in_another_process_reuses_the_compiled_library(tmp_path: Path) -> None:
    """The scheduled IR's hash keys the library, so it is stable across processes; a corrupt
    library file is deleted and rebuilt."""
    script = tmp_path / "lib.py"
    script.write_text(LIBRARY_SCRIPT)
    env = {**os.environ, "BITSMITH_CACHE_DIR": str(tmp_path / "cache")}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), mode], capture_output=True,
                              text=True, timeout=300, env=env)
    cold = run("cold")
    assert cold.returncode == 0 and cold.stdout.strip() == "ok", cold.stderr[-1500:]
    (library,) = (tmp_path / "cache" / "libraries").iterdir()
    warm = run("warm")
    assert warm.returncode == 0 and warm.stdout.strip() == "ok", warm.stderr[-1500:]
    library.write_bytes(library.read_bytes()[:-8] + b"corrupt!")
    again = run("warm")  # refuses to compile, so a corrupt library must fail loudly...
    assert again.returncode != 0 and "compiled again" in again.stderr
    assert "failed its checksum" in again.stderr
    rebuilt = run("cold")  # ...and a normal compile rebuilds it
    assert rebuilt.returncode == 0 and rebuilt.stdout.strip() == "ok", rebuilt.stderr[-1500:]
    assert len(list((tmp_path / "cache" / "libraries").iterdir())) == 1


def test_quantized_compile_runs_reports_and_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 10))
    x = torch.randn(2, 200)
    calib = [torch.randn(3, 200) for _ in range(40)]  # re-cut into batches of the static 2
    cm = bitsmith.compile(model, (x,), quant="w4g32:gptq", calib=calib)
    want = model(x).detach().numpy()
    got = cm(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 0.2  # 4-bit weights
    report = cm.report()
    assert "0.weight" in report and "u4" in report and "gptq" in report
    assert "MiB" in report
    steps = cm.artifact.manifest.plan["steps"]
    assert {s["template"] for s in steps if "linear" in s["kernel"]} == {"qdense"}
    path = tmp_path / "q.bsm"
    cm.save(path)
    again = bitsmith.load(path)
    np.testing.assert_array_equal(again(x.numpy()), got)
    assert again.report() == report


def test_quant_spec_errors_reach_the_user() -> None:
    model = torch.nn.Linear(8, 4)
    with pytest.raises(bitsmith.passes.PipelineError, match="integer weights take 1..8 bits"):
        bitsmith.compile(model, (torch.randn(1, 8),), quant="w12g128")


def test_quantized_convnet_compiles_and_reports_the_conv_it_kept() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, groups=16), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 9 * 7, 5)).eval()
    x = torch.randn(1, 3, 11, 9)
    cm = bitsmith.compile(model, (x,), quant="w8")
    want = model(x).detach().numpy()
    assert np.abs(cm(x).numpy() - want).max() / np.abs(want).max() < 0.02
    report = cm.report()
    assert "0.weight" in report and "u8" in report  # the first conv, [16, 3*3*3]
    assert "16x27" in report and "grouped conv (groups=16): not quantized" in report
