"""transformers architectures (small random configs) and MiniLM with real weights."""
import os

import pytest
import torch

from bitsmith.frontend import from_torch, load_model
from bitsmith.models.hf import ARCHS

from .conftest import assert_matches_torch, assert_round_trips

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_imports_and_matches_torch(arch: str) -> None:
    build, make_inputs = ARCHS[arch]
    torch.manual_seed(0)
    model = build().eval()
    module = from_torch(model, make_inputs(2), name=arch, dynamic_batch=True)
    assert_matches_torch(module, model, make_inputs(3))
    assert_round_trips(module, make_inputs(1))


def test_minilm_with_real_weights_matches_torch() -> None:
    loaded = load_model("minilm")
    inputs = loaded.inputs(3)
    assert int(inputs[1].sum()) < inputs[1].numel()  # tokenizer padding is exercised
    module = from_torch(loaded.module, inputs, name="minilm", dynamic_batch=True)
    assert module.weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert_matches_torch(module, loaded.module, inputs)
    assert_matches_torch(module, loaded.module, loaded.inputs(1))
