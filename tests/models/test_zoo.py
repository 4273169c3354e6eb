"""The model zoo: every model builds, runs, is deterministic and exports."""

import pytest
import torch
from torch.export import Dim

from bitsmith import models
from bitsmith.errors import ModelLoadError

ALL = models.names()

# name -> expected output shapes as functions of the batch size
EXPECTED_SHAPES = {
    "mlp": lambda b: [(b, 10)],
    "resnet": lambda b: [(b, 10)],
    "vit": lambda b: [(b, 10)],
    "bert": lambda b: [(b, 16, 64), (b, 64)],
    "llama": lambda b: [(b, 16, 1000)],
}


def run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Model outputs as a flat list."""
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    """One instance of each model, shared by the read-only tests."""
    return {name: models.get(name).build() for name in ALL}


def test_registry_lists_the_five_models() -> None:
    assert ALL == ["bert", "llama", "mlp", "resnet", "vit"]
    for name in ALL:
        spec = models.get(name)
        assert spec.name == name
        assert spec.description


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelLoadError, match="nope.*bert, llama, mlp, resnet, vit"):
        models.get("nope")


@pytest.mark.parametrize("name", ALL)
def test_model_is_small_and_in_eval_mode(name: str, built: dict[str, torch.nn.Module]) -> None:
    model = built[name]
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_runs_with_finite_outputs_of_expected_shape(
        name: str, batch: int, built: dict[str, torch.nn.Module]) -> None:
    spec = models.get(name)
    inputs = spec.example_inputs(batch)
    assert len(inputs) == len(spec.input_names)
    outputs = run(built[name], inputs)
    assert [tuple(o.shape) for o in outputs] == EXPECTED_SHAPES[name](batch)
    for out in outputs:
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_builds_and_inputs_are_deterministic(name: str) -> None:
    spec = models.get(name)
    rng_before = torch.random.get_rng_state()
    first = spec.build()
    assert torch.equal(rng_before, torch.random.get_rng_state()), "build() used the global RNG"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # weights must not depend on the global seed either
        second = spec.build()
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for a, b in zip(spec.example_inputs(3), spec.example_inputs(3), strict=True):
        assert torch.equal(a, b)
    inputs = spec.example_inputs(3)
    for a, b in zip(run(first, inputs), run(second, inputs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_export_matches_eager(name: str, built: dict[str, torch.nn.Module]) -> None:
    spec = models.get(name)
    inputs = spec.example_inputs(3)
    exported = torch.export.export(built[name], inputs)
    for got, want in zip(run(exported.module(), inputs), run(built[name], inputs), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ALL)
def test_export_with_symbolic_batch(name: str, built: dict[str, torch.nn.Module]) -> None:
    spec = models.get(name)
    inputs = spec.example_inputs(3)
    batch = Dim("batch")
    exported = torch.export.export(built[name], inputs,
                                   dynamic_shapes=tuple({0: batch} for _ in inputs))
    other = spec.example_inputs(2)
    for got, want in zip(run(exported.module(), other), run(built[name], other), strict=True):
        torch.testing.assert_close(got, want)


def test_resnet_batchnorm_statistics_are_not_defaults(built: dict[str, torch.nn.Module]) -> None:
    norms = [m for m in built["resnet"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert bn.running_mean.abs().min() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_bert_ignores_padded_tokens(built: dict[str, torch.nn.Module]) -> None:
    input_ids, mask = models.get("bert").example_inputs(3)
    assert (mask[:, -1] == 0).all()
    changed = input_ids.masked_fill(mask == 0, 7)
    hidden, pooled = run(built["bert"], (input_ids, mask))
    hidden2, pooled2 = run(built["bert"], (changed, mask))
    keep = mask.bool()
    torch.testing.assert_close(hidden2[keep], hidden[keep])
    torch.testing.assert_close(pooled2, pooled)


def test_llama_is_causal(built: dict[str, torch.nn.Module]) -> None:
    (input_ids,) = models.get("llama").example_inputs(2)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 1000
    (logits,) = run(built["llama"], (input_ids,))
    (logits2,) = run(built["llama"], (changed,))
    torch.testing.assert_close(logits2[:, :-1], logits[:, :-1])
    assert not torch.allclose(logits2[:, -1], logits[:, -1])
