"""Unsupported models list every missing op at once; loaders accept every MODEL form."""
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from bitsmith import ir
from bitsmith.frontend import (
    ModelLoadError,
    UnsupportedOpError,
    from_torch,
    import_program,
    load_model,
)

from .conftest import assert_matches_torch


class KthValue(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(x, 2, dim=-1).values


class Median(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.median(x, dim=-1).values


class Unsupported(torch.nn.Module):
    """Two unsupported ops in two submodules, and one supported op after them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = KthValue()
        self.second = Median()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).unsqueeze(-1)).relu()


def test_unsupported_ops_are_listed_all_at_once_with_module_paths() -> None:
    with pytest.raises(UnsupportedOpError) as info:
        from_torch(Unsupported(), (torch.randn(2, 5),))
    message = str(info.value)
    assert message.startswith("2 unsupported ATen op(s) in the model:")
    assert "aten.kthvalue.default  at first" in message
    assert "aten.median.dim  at second" in message
    assert set(info.value.missing) == {"aten.kthvalue.default", "aten.median.dim"}


def test_training_mode_dropout_is_refused_not_ignored() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    ep = torch.export.export(model.train(), (torch.randn(2, 3),))
    with pytest.raises(UnsupportedOpError, match="dropout|native_dropout|bernoulli"):
        import_program(ep.run_decompositions({}), "train")


def test_load_model_rejects_unknown_names_with_the_valid_forms() -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'nope': expected a zoo name"):
        load_model("nope")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model("missing.py:Model")


def test_load_model_from_a_file_class_and_function(tmp_path: Path) -> None:
    source = tmp_path / "user_model.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(6, 3)

            def forward(self, features):
                return torch.tanh(self.fc(features))

            def example_inputs(self, batch):
                return (torch.randn(batch, 6),)

        def make():
            return Tiny(), torch.randn(2, 6)
    """))
    by_class = load_model(f"{source}:Tiny")
    assert by_class.input_names == ("features",)
    inputs = by_class.inputs(4)
    module = from_torch(by_class.module, inputs)
    assert module.input_names == ["features"]
    assert_matches_torch(module, by_class.module, inputs)
    by_function = load_model(f"{source}:make")
    assert by_function.inputs(3)[0].shape == (3, 6)
    with pytest.raises(ModelLoadError, match="has no attribute 'Nope'"):
        load_model(f"{source}:Nope")


def test_load_model_from_a_hugging_face_directory(tmp_path: Path) -> None:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=200,
                                     max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.input_names == ("input_ids", "attention_mask")
    inputs = loaded.inputs(2)
    module = from_torch(loaded.module, inputs, name=loaded.name)
    assert_matches_torch(module, loaded.module, inputs)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_hugging_face_decoder_is_called_by_keyword(tmp_path: Path) -> None:
    """GPT-2's second positional parameter is past_key_values: inputs must go by name."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    args, kwargs = loaded.call_args(1)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}
    module = from_torch(loaded.module, args, kwargs, dynamic_batch=True, name=loaded.name)
    assert module.input_names == ["input_ids", "attention_mask"]
    three = loaded.inputs(3)
    got = ir.interpret(module, *[t.numpy() for t in three])[0]
    with torch.no_grad():
        want = loaded.module(**dict(zip(loaded.input_names, three, strict=True)))[0].numpy()
    assert float(abs(got - want).max()) / float(abs(want).max()) < 1e-4
