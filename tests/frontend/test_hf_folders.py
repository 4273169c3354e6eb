"""Hugging Face model folders: the class `config.architectures` names (task head and all), the
encoder of an encoder-decoder, `seq` and a dynamic sequence dim S; compiled and run against
torch running the same class."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import bitsmith
from bitsmith import ir
from bitsmith.cli import main
from bitsmith.errors import IndexOutOfRangeError, ModelError, ModelLoadError
from bitsmith.frontend import LoadedModel, from_torch, load_model
from bitsmith.runtime.model import CompiledModel, load

from ..support import assert_outputs_match
from .conftest import assert_matches_torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = transformers
RTOL = 1e-4
BERT: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=100, max_position_embeddings=64)

# folder name -> (model built from a tiny config, the class it must load as)
FOLDERS = {
    "bert_cls": (lambda: T.BertForSequenceClassification(T.BertConfig(**{**BERT, "num_labels": 3})),
                 "BertForSequenceClassification"),
    "gpt2_lm": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0)), "GPT2LMHeadModel"),
    "roberta_mlm": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(
        **{**BERT, "max_position_embeddings": 70}, pad_token_id=1)), "RobertaForMaskedLM"),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=100)), "T5Stack"),
    "no_architectures": (lambda: T.BertModel(T.BertConfig(**BERT)), "BertModel"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved with its weights; one config.json without `architectures`."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (build, _) in FOLDERS.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        out[name] = root / name
    config = root / "no_architectures" / "config.json"
    data = json.loads(config.read_text())
    data.pop("architectures")
    config.write_text(json.dumps(data))
    return out


def torch_reference(loaded: LoadedModel, kwargs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """What the loaded class itself returns (logits for a task head), flattened; called by
    keyword (GPT-2's second positional parameter is past_key_values)."""
    with torch.no_grad():
        out = loaded.module(**kwargs)
    return [t.numpy() for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def assert_interpreter_matches(module: ir.Module, loaded: LoadedModel,
                               kwargs: dict[str, torch.Tensor]) -> None:
    got = ir.interpret(module, *[kwargs[n].numpy() for n in module.input_names])
    assert_outputs_match(got, torch_reference(loaded, kwargs), RTOL)


def compiled_outputs(cm: CompiledModel, loaded: LoadedModel,
                     kwargs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    out = cm(*[kwargs[n] for n in loaded.input_names])
    return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


# each compile takes about 5 s: seq 16 (the default) runs with the slow tests
@pytest.mark.parametrize("seq", [7, pytest.param(16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_folder_compiles_its_task_head_and_matches_torch(folders: dict[str, Path], name: str,
                                                         seq: int) -> None:
    loaded = load_model(str(folders[name]), seq=seq)
    assert type(loaded.module).__name__ == FOLDERS[name][1]
    args, kwargs = loaded.call_args(2)
    assert kwargs["input_ids"].shape == (2, seq)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name)
    want = torch_reference(loaded, kwargs)
    got = compiled_outputs(cm, loaded, kwargs)
    assert_outputs_match(got, want, RTOL)
    head = {"bert_cls": (2, 3), "gpt2_lm": (2, seq, 100), "roberta_mlm": (2, seq, 100)}
    if name in head:  # the task head's logits, not hidden states
        assert got[0].shape == head[name]
    with torch.no_grad():  # outputs carry the ModelOutput's names
        keys = [k for k, v in loaded.module(**kwargs).items() if isinstance(v, torch.Tensor)]
    assert [spec.name for spec in cm.artifact.manifest.outputs] == keys


@pytest.mark.slow  # about 13 s; the import tests below check dynamic S against torch too
def test_dynamic_seq_runs_at_other_lengths_and_matches_torch(folders: dict[str, Path]) -> None:
    loaded = load_model(str(folders["gpt2_lm"]), seq=7)
    args, kwargs = loaded.call_args(2)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name,
                          dynamic_batch=True, dynamic_dims=loaded.dynamic_dims())
    assert [spec.shape for spec in cm.artifact.manifest.inputs] == [("B", "S"), ("B", "S")]
    for batch, seq in [(3, 12), (2, 5), (1, 1)]:
        kwargs = loaded.call_args(batch, seq)[1]
        got = compiled_outputs(cm, loaded, kwargs)
        assert got[0].shape == (batch, seq, 100)
        assert_outputs_match(got, torch_reference(loaded, kwargs), RTOL)


@pytest.mark.parametrize("name", ["t5", "roberta_mlm"])
def test_dynamic_seq_imports_encoders_and_masked_lms(folders: dict[str, Path],
                                                     name: str) -> None:
    loaded = load_model(str(folders[name]), seq=6)
    args, kwargs = loaded.call_args(2)
    module = from_torch(loaded.module, args, kwargs, dynamic_batch=True,
                        dynamic_dims=loaded.dynamic_dims(), name=loaded.name)
    assert [str(v.type) for v in module.inputs] == ["tensor<BxSxi64>"] * 2
    for batch, seq in [(3, 11), (1, 2)]:
        assert_interpreter_matches(module, loaded, loaded.call_args(batch, seq)[1])


def test_dynamic_seq_slices_a_position_buffer(folders: dict[str, Path]) -> None:
    """BERT cuts its position_ids (and token_type_ids) buffer to the length S: rows picked by
    an arange of S, compiled and run at other lengths against torch."""
    loaded = load_model(str(folders["bert_cls"]), seq=7)
    args, kwargs = loaded.call_args(2)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name,
                          dynamic_batch=True, dynamic_dims=loaded.dynamic_dims())
    for batch, seq in [(3, 12), (1, 1)]:
        kwargs = loaded.call_args(batch, seq)[1]
        assert_outputs_match(compiled_outputs(cm, loaded, kwargs),
                             torch_reference(loaded, kwargs), RTOL)
    too_long = {n: torch.ones(1, 70, dtype=torch.int64) for n in loaded.input_names}
    with pytest.raises(IndexOutOfRangeError, match=r"S is longer than the table .* \[0, 64\)"):
        compiled_outputs(cm, loaded, too_long)


def test_dynamic_dims_name_their_symbols() -> None:
    """A general per-input dims map: dim 1 of x is S, B from dynamic_batch, y's dim 2 is T."""

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=1, keepdim=True) * 2 + y.mean(dim=2, keepdim=True)

    x, y = torch.randn(1, 1, 3), torch.randn(1, 1, 5, 3)[:, 0]  # size-1 dims are widened
    dims = {"x": {1: torch.export.Dim("S", max=64)}, "y": {1: torch.export.Dim("T", max=64)}}
    module = from_torch(Net(), (x, y), dynamic_batch=True, dynamic_dims=dims)
    assert [str(v.type) for v in module.inputs] == ["tensor<BxSx3xf32>", "tensor<BxTx3xf32>"]
    assert_matches_torch(module, Net(), (torch.randn(2, 9, 3), torch.randn(2, 4, 3)))
    with pytest.raises(ModelError, match="dynamic dims name input 'z', which is not a "
                                         "tensor input of the model \\(tensor inputs: x, y\\)"):
        from_torch(Net(), (x, y), dynamic_dims={"z": {1: torch.export.Dim("S")}})


def test_notes_say_what_was_loaded(folders: dict[str, Path],
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bitsmith.frontend.loaders"):
        load_model(str(folders["no_architectures"]))
        load_model(str(folders["t5"]))
        load_model(str(folders["gpt2_lm"]))
    assert "names no architectures: loading the base model (AutoModel)" in caplog.text
    assert "gpt2_lm is compiled without its KV cache" in caplog.text
    assert "encoder-decoder (T5ForConditionalGeneration): only its encoder" in caplog.text


def test_t5_encoder_model_folder_loads_directly(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    T.T5EncoderModel(T.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                                vocab_size=100)).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bitsmith.frontend.loaders"):
        loaded = load_model(str(tmp_path), seq=5)
    assert type(loaded.module).__name__ == "T5EncoderModel"
    assert "encoder-decoder" not in caplog.text
    args, kwargs = loaded.call_args(2)
    module = from_torch(loaded.module, args, kwargs, name=loaded.name)
    assert_interpreter_matches(module, loaded, kwargs)


def test_bad_folders_and_flags_are_clear_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    data = json.loads((folders["bert_cls"] / "config.json").read_text())
    for bad in ("NoSuchModelForThings", "os.system('true')", "AutoConfig"):
        (tmp_path / "config.json").write_text(json.dumps({**data, "architectures": [bad]}))
        with pytest.raises(ModelLoadError, match=r"architectures \[.*\] names '.*', which is "
                                                 "not a model class of transformers"):
            load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="--seq 65 is longer than .* holds 64 positions"):
        load_model(str(folders["bert_cls"]), seq=65)
    with pytest.raises(ModelLoadError, match="--seq must be >= 1, got 0"):
        load_model(str(folders["gpt2_lm"]), seq=0)
    with pytest.raises(ModelLoadError, match="'mlp' has fixed example inputs: drop --seq"):
        load_model("mlp", seq=8)
    with pytest.raises(ModelLoadError, match="mlp takes x: drop --dynamic-seq"):
        load_model("mlp").dynamic_dims()


def test_cli_compile_with_seq_then_run_matches_torch(folders: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    art = tmp_path / "cls.bsm"
    argv = ["compile", str(folders["bert_cls"]), "--seq", "7", "--batch", "2", "-o", str(art)]
    assert main(argv) == 0
    cm = load(art)
    assert [spec.shape for spec in cm.artifact.manifest.inputs] == [(2, 7), (2, 7)]
    loaded = load_model(str(folders["bert_cls"]), seq=7)
    kwargs = loaded.call_args(2)[1]
    got = cm.executor.run(*[kwargs[n].numpy() for n in loaded.input_names])
    assert_outputs_match(got, torch_reference(loaded, kwargs), RTOL)
    assert got[0].shape == (2, 3)
    assert main(["ir", str(folders["gpt2_lm"]), "--seq", "5", "--dynamic-seq"]) == 0
    module = ir.parse(capsys.readouterr().out)
    assert [str(v.type) for v in module.inputs] == ["tensor<1xSxi64>"] * 2
    assert main(["ir", "mlp", "--dynamic-seq"]) == 2
    assert "drop --dynamic-seq" in capsys.readouterr().err


@pytest.mark.slow  # about 20 s
def test_a_mixture_of_experts_folder_compiles_its_routing_exactly(tmp_path: Path) -> None:
    """Mixtral's default experts count tokens per expert with histc (data-dependent shapes);
    the loader switches to the batched formulation (each token's top-k experts' weights
    gathered), which is exact: logits against torch's default path."""
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, use_cache=False)).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), seq=7)
    args, kwargs = loaded.call_args(3)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, name=loaded.name)
    with torch.no_grad():
        want = model(**kwargs).logits.numpy()  # the model as saved: grouped_mm experts
    assert_outputs_match(compiled_outputs(cm, loaded, kwargs), [want], RTOL)
