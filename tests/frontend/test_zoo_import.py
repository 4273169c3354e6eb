"""Every zoo model imports; the interpreter matches torch at batch 1 and 8 and a symbolic batch."""
import pytest

from bitsmith import models
from bitsmith.frontend import from_torch

from .conftest import assert_matches_torch, assert_round_trips


@pytest.mark.parametrize("name", models.names())
def test_zoo_model_matches_torch(name: str) -> None:
    spec = models.get(name)
    model = spec.build()
    for batch in (1, 8):
        inputs = spec.example_inputs(batch)
        module = from_torch(model, inputs, name=name)
        assert [a.type.shape[0] for a in module.inputs] == [batch] * len(inputs)
        assert module.input_names == list(spec.input_names)
        assert_matches_torch(module, model, inputs)
    assert_round_trips(module, inputs)


@pytest.mark.parametrize("name", models.names())
def test_zoo_model_dynamic_batch_runs_unseen_sizes(name: str) -> None:
    spec = models.get(name)
    model = spec.build()
    module = from_torch(model, spec.example_inputs(2), name=name, dynamic_batch=True)
    assert all(str(a.type).startswith("tensor<B") for a in module.inputs)
    for batch in (1, 5):
        assert_matches_torch(module, model, spec.example_inputs(batch))
    assert_round_trips(module, spec.example_inputs(3))


def test_locations_name_module_paths() -> None:
    spec = models.get("llama")
    module = from_torch(spec.build(), spec.example_inputs(1), name="llama")
    locs = {op.loc for op in module.ops if op.name == "graph.linear"}
    assert "layers.0.self_attn.q_proj" in locs and "lm_head" in locs
    assert all(op.loc for op in module.ops if op.name != "func.return")
