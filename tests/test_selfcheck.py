"""Compile checks itself: a wrong kernel or a wrong import makes compile fail, naming the kernel
or the op, and nothing is written; `check=False` / `--no-check` skip it. The bugs are planted
(a TVM rule and an ATen converter swapped for wrong ones) so that the check has something real
to find."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith import selfcheck
from bitsmith.cli.main import main
from bitsmith.codegen.tvm import lower
from bitsmith.codegen.tvm.typed import compute
from bitsmith.errors import MismatchError
from bitsmith.frontend import context
from bitsmith.ir import graph

MODEL_SOURCE = '''
import torch


class Planted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(5, 7)

    def forward(self, x):
        return torch.relu(-self.proj(x)) + 1.0

    def example_inputs(self, batch):
        return (torch.randn(batch, 3, 5),)
'''


class Planted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(-self.proj(x)) + 1.0


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library cache of this test's own: a planted rule must not reach other tests."""
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def wrong_kernel(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    """relu's TVM rule doubles its input instead."""
    monkeypatch.setitem(lower.RULES, "graph.relu", lambda op, args, lo: compute(
        lo.shape(op.result.type), lambda *i: args[0](*i) * 2, name="relu"))


@pytest.fixture
def wrong_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """aten.neg imports as abs."""
    monkeypatch.setitem(context.CONVERTERS, torch.ops.aten.neg.default,
                        lambda ctx, x: ctx.value(graph.UNARY_OPS["abs"], x))


def test_a_correct_model_passes_its_check() -> None:
    model, x = Planted().eval(), torch.randn(3, 3, 5)
    cm = bitsmith.compile(model, [x])
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert cm.checked is not None and cm.checked.startswith("matches torch")
    assert bitsmith.compile(model, [x], check=False).checked is None


@pytest.mark.usefixtures("wrong_kernel")
def test_a_wrong_kernel_is_named() -> None:
    with pytest.raises(MismatchError, match=r"first kernel that diverges from the "
                                            r"interpreter: k0_\w*relu\w* \(dense"):
        bitsmith.compile(Planted().eval(), [torch.randn(3, 3, 5)])


@pytest.mark.usefixtures("wrong_kernel")
def test_check_false_returns_the_wrong_model() -> None:
    model, x = Planted().eval(), torch.randn(3, 3, 5)
    cm = bitsmith.compile(model, [x], check=False)
    assert not np.allclose(cm(x.numpy()), model(x).detach().numpy(), atol=1e-3)


@pytest.mark.usefixtures("wrong_import")
def test_a_wrong_import_is_named() -> None:
    with pytest.raises(MismatchError, match=r"every kernel agrees with the interpreter; the "
                                            r"first imported op that differs from torch: "
                                            r"aten\.neg\.default .*'graph\.abs'"):
        bitsmith.compile(Planted().eval(), [torch.randn(3, 3, 5)])


@pytest.mark.usefixtures("wrong_kernel")
def test_cli_writes_nothing_when_the_check_fails(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "planted.py"
    source.write_text(MODEL_SOURCE)
    out = tmp_path / "planted.bsm"
    assert main(["compile", f"{source}:Planted", "--batch", "3", "-o", str(out)]) == 2
    message = capsys.readouterr().err
    assert "differs from torch" in message and "first kernel that diverges" in message
    assert not out.exists()
    assert main(["compile", f"{source}:Planted", "--batch", "3", "-o", str(out),
                 "--no-check"]) == 0
    assert out.exists()
    assert "not checked against torch" in capsys.readouterr().err


def test_cli_says_what_it_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "planted.py"
    source.write_text(MODEL_SOURCE)
    assert main(["compile", f"{source}:Planted", "--batch", "2", "-o",
                 str(tmp_path / "p.bsm")]) == 0
    assert "checked: matches torch on the example inputs" in capsys.readouterr().err


def test_difference_finds_what_torch_would_not_accept() -> None:
    want = np.array([[1.0, np.nan, np.inf], [-2.0, 0.5, 4.0]], np.float32)
    assert selfcheck.difference(want.copy(), want, "out") is None
    close = want + np.float32(1e-6)
    assert selfcheck.difference(close, want, "out") is None
    swallowed = want.copy()
    swallowed[0, 1] = 0.0  # NaN turned into a number
    assert "[0, 1]" in (selfcheck.difference(swallowed, want, "out") or "")
    off = want.copy()
    off[1, 0] = -2.01
    assert "[1, 0]" in (selfcheck.difference(off, want, "out") or "")
    ints = np.array([3, 1, 4], np.int64)
    assert selfcheck.difference(ints, ints, "ids") is None
    assert "1 element(s) differ" in (selfcheck.difference(ints + (ints == 1), ints, "ids") or "")
    assert "shape" in (selfcheck.difference(ints[:2], ints, "ids") or "")
