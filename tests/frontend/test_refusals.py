"""What the importer refuses, on one line naming the culprit, and its supported neighbours."""
from __future__ import annotations

import collections
import inspect
import logging
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import _pytree

import bitsmith
from bitsmith.cli.main import main
from bitsmith.errors import ModelError, UnsupportedModelError
from bitsmith.frontend import from_torch

from .conftest import assert_matches_torch

X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
Pair = collections.namedtuple("Pair", "doubled shifted")
TORCH_LOGGERS = ("torch", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


@pytest.fixture
def torch_log() -> Iterator[list[logging.LogRecord]]:
    """The records torch's loggers pass to their handlers during a test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in TORCH_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def line_of(fn: object, text: str) -> str:
    """'file:line' of the first source line of `fn` that holds `text`."""
    lines, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    offset = next(i for i, line in enumerate(lines) if text in line)
    return f"{inspect.getsourcefile(fn)}:{first + offset}"  # type: ignore[arg-type]


def refusal(model: torch.nn.Module, **kwargs: object) -> str:
    """The one-line message of the UnsupportedModelError that importing `model` raises."""
    with pytest.raises(UnsupportedModelError) as info:
        from_torch(model, (X.clone(),), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


# --- data-dependent control flow ------------------------------------------------------------


class Branch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class ItemBranch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.max().item()
        return x * 2 if top > 0.5 else x - 1


class ItemSize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[: int(x.abs().sum().long())]


@pytest.mark.parametrize(("model", "culprit", "construct"), [
    (Branch, "if x.sum() > 0", "a Python branch on a tensor value"),
    (ItemBranch, "if top > 0.5", "a Python branch on a tensor value"),
    (ItemSize, "int(x.abs()", "a tensor value read as a Python number"),
])
def test_data_dependent_control_flow_is_one_line_naming_the_line(
        model: type[torch.nn.Module], culprit: str, construct: str,
        capfd: pytest.CaptureFixture[str], torch_log: list[logging.LogRecord]) -> None:
    message = refusal(model())
    assert "data-dependent control flow" in message and construct in message
    assert line_of(model.forward, culprit) in message
    assert "torch.where" in message
    assert capfd.readouterr().err == ""  # torch's partial graph is held back
    assert torch_log == []  # and so are its warnings


def test_other_export_failures_keep_torchs_first_line(capfd: pytest.CaptureFixture[str]) -> None:
    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("no forward today\nsecond line")

    with pytest.raises(ModelError, match="could not trace Raises: ValueError: no forward today$"):
        from_torch(Raises(), (X,))
    assert capfd.readouterr().err == ""


def test_what_torch_says_during_a_working_trace_is_let_out(
        capfd: pytest.CaptureFixture[str], torch_log: list[logging.LogRecord]) -> None:
    class Says(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logging.getLogger("torch.export").warning("torch says hello")
            print("printed while tracing", file=sys.stderr)
            return x + 1

    from_torch(Says(), (X,))
    assert [r.getMessage() for r in torch_log] == ["torch says hello"]
    assert "printed while tracing" in capfd.readouterr().err


def test_other_threads_write_through_while_a_failing_trace_is_held(
        capfd: pytest.CaptureFixture[str]) -> None:
    class Spins(torch.nn.Module):  # as a progress spinner would, from its own thread
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            spinner = threading.Thread(target=print, args=("spinning",),
                                       kwargs={"file": sys.stderr})
            spinner.start()
            spinner.join()
            return x * 2 if x.sum() > 0 else x

    refusal(Spins())
    assert capfd.readouterr().err == "spinning\n"


# --- in-place updates -----------------------------------------------------------------------


class BumpsBuffer(torch.nn.Module):
    count: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return x + self.count


class ScalesInput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


@pytest.mark.parametrize(("model", "culprit", "named"), [
    (BumpsBuffer, "self.count.add_(1)", "buffer 'count'"),
    (ScalesInput, "x.mul_(2)", "input 'x'"),
])
def test_in_place_update_of_an_input_or_buffer_is_refused(
        model: type[torch.nn.Module], culprit: str, named: str) -> None:
    message = refusal(model())
    assert f"updates its {named} in place" in message
    assert line_of(model.forward, culprit) in message
    assert ".clone()" in message


class InPlaceIntermediate(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 3
        y.add_(1)
        y.relu_()
        y[:, 0].mul_(-2)
        return y


def test_in_place_ops_on_intermediates_compile_and_match_torch() -> None:
    model = InPlaceIntermediate()
    module = from_torch(model, (X,))
    assert_matches_torch(module, model, (X,))
    cm = bitsmith.compile(model, [X])
    with torch.no_grad():
        want = model(X)
    np.testing.assert_allclose(cm(X.numpy()), want.numpy(), rtol=1e-5, atol=1e-6)


# --- output structure -----------------------------------------------------------------------


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return (x * 2, [x + 1, (x - 1,)]), x.relu()


def test_nested_tuples_and_lists_flatten_in_order() -> None:
    model = Nested()
    with torch.no_grad():
        want = _pytree.tree_leaves(model(X))
    got = bitsmith.compile(model, [X])(X.numpy())
    assert isinstance(got, tuple) and len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)


class TopTwo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(x, 2)  # torch.return_types.topk: a positional tuple of two tensors


def test_torchs_positional_return_tuples_flatten_as_tuples() -> None:
    model = TopTwo()
    values, indices = bitsmith.compile(model, [X])(X.numpy())
    want = model(X)
    np.testing.assert_array_equal(values, want.values.numpy())
    np.testing.assert_array_equal(indices, want.indices.numpy())


class Keyed(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"doubled": x * 2, "shifted": x + 1}


class Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x * 2, x + 1)


class WithNone(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return x * 2, None


@pytest.mark.parametrize(("model", "named"), [
    (Keyed, "a dict (keys 'doubled', 'shifted')"),
    (Named, "a namedtuple Pair (fields doubled, shifted)"),
    (WithNone, "None as output 1"),
])
def test_outputs_a_flat_tuple_would_misrepresent_are_refused(
        model: type[torch.nn.Module], named: str) -> None:
    message = refusal(model())
    assert named in message and "flatten_outputs=True" in message


@pytest.mark.parametrize("model", [Keyed, Named, WithNone])
def test_flattening_on_purpose_keeps_the_tensors_in_order(model: type[torch.nn.Module]) -> None:
    module = from_torch(model(), (X,), flatten_outputs=True)
    got = bitsmith.ir.interpret(module, X.numpy())
    with torch.no_grad():
        want = [t for t in _pytree.tree_leaves(model()(X))
                if isinstance(t, torch.Tensor)]
    assert len(got) == len(want) == (1 if model is WithNone else 2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6)


def test_a_transformers_model_output_flattens_like_its_to_tuple() -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class Hf(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> object:
            return outputs.BaseModelOutputWithPooling(last_hidden_state=x * 2,
                                                      pooler_output=x.sum(1))

    model = Hf()
    module = from_torch(model, (X,))
    assert_matches_torch(module, model, (X,))  # against out.to_tuple()


# --- the command line -----------------------------------------------------------------------

MODEL_SOURCE = textwrap.dedent("""\
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.mean() > 0:
                return x * 2
            return x - 1

        def example_inputs(self, batch):
            return (torch.randn(batch, 4),)
""")


def test_cli_prints_a_refusal_on_one_line(tmp_path: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "branchy.py"
    source.write_text(MODEL_SOURCE)
    out = tmp_path / "branchy.bsm"
    assert main(["compile", f"{source}:Branchy", "--batch", "2", "-o", str(out)]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # no partial graph, no torch warnings
    assert "data-dependent control flow" in lines[0] and f"{source}:5" in lines[0]
    assert not out.exists()
