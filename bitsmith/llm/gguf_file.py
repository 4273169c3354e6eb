"""Reading a GGUF file (llama.cpp's format) into a Hugging Face style config, tokenizer and weights.

The file is memory-mapped and its header parsed here, bounds-checked at every read: a count or
length is believed only once the bytes it claims are in the file, so a crafted file costs at
most its own size in memory and gives `ModelLoadError`, never a hang or a crash. (gguf's own
`GGUFReader` loops on an array length it never checks against the file.) Nothing is
dequantized until a tensor's `dequantize()` is called.

Names and values follow what transformers loads for the same file (its legacy GGUF loader,
`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, which `from_pretrained` uses for these
architectures):
- Tensors get their Hugging Face names: `blk.3.attn_q.weight` is
  `model.layers.3.self_attn.q_proj.weight`, `token_embd` `model.embed_tokens`, `output`
  `lm_head` (absent when the embedding is tied), `output_norm` `model.norm`. A Llama 3 file's
  `rope_freqs.weight` (its RoPE scaling, per frequency) keeps its GGUF name, and the config
  says `rope_scaling={"rope_type": "freq_factors"}` so that no consumer ignores it silently.
- llama.cpp's converter permutes the rows of a Llama q/k projection (weight and bias) for its
  rotate-pairs RoPE: HF row `h*D + i*D/2 + j` (head h, half i, j < D/2) is stored at
  `h*D + 2*j + i`. `GgufTensor.permute = (heads, D)` records it (heads: the query heads for q,
  the KV heads for k), and `dequantize()` / `blocks()` move the rows back. Qwen2 is stored
  unpermuted. Rows are whole quantization blocks, so the move is exact.
- `dequantize()` is gguf's own dequantizer, so values equal transformers' bit for bit.
"""
from __future__ import annotations

import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ..errors import ModelLoadError

SUPPORTED_ARCHS = ("llama", "qwen2")
"""`general.architecture` values read here: the Llama family (Mistral-style files are
`llama`), and Qwen2, whose tensors have the same names plus q/k/v biases."""

VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Caps well above any real model (the largest vocabularies, with their scores, types and
# merges, hold under 800k array items; a dense model has a few thousand tensors). They bound
# what a crafted file costs here and in transformers, whose gguf reader spends ~1 kB of memory
# per array item: 2 GiB at most.
MAX_ARRAY_ITEMS = 1 << 21
MAX_ENTRIES = 1 << 16  # metadata keys, and tensors
DEFAULT_ALIGNMENT = 32
DAMAGED = "the file is damaged, truncated or not a GGUF file"

_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # GGUF value type -> struct/numpy format
_RAW_FLOATS = {"F32": "<f4", "F16": "<f2"}  # kept as float arrays; the rest as bytes
_BLOCK_LAYOUT = {"Q4_0": (None, 2), "Q4_1": (2, 4), "Q8_0": (None, 2)}  # byte of m, of codes

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")
_KEEP_NAMES = ("rope_freqs.weight",)


@dataclass(frozen=True, slots=True, eq=False)
class GgufTensor:
    """One weight: its HF name and shape, and its bytes as the file stores them (mapped)."""

    name: str
    shape: tuple[int, ...]  # torch order: [out_features, in_features]
    ggml_type: str  # "F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q6_K", ...
    raw: np.ndarray  # F32/F16: the values, in `shape`; others: uint8 [*shape[:-1], row bytes]
    permute: tuple[int, int] | None = None  # (heads, head_dim): rows stored in llama.cpp order

    def dequantize(self) -> np.ndarray:
        """The float32 values in HF shape and row order (transformers' values, bit for bit)."""
        values = gguf_dequantize(self.raw, GGMLQuantizationType[self.ggml_type])
        return self._unpermute(np.array(values, dtype=np.float32).reshape(self.shape))

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`(codes, scale, minimum)` of a Q4_0/Q4_1/Q8_0 tensor, in HF shape and row order.

        codes: uint8 0..15 (Q4) or int8 (Q8_0), `shape`; scale and minimum: float32,
        `[*shape[:-1], shape[-1] // 32]`, exact from the file's f16. A weight is
        `scale*q + minimum` (Q4_1), `scale*(q - 8)` (Q4_0), `scale*q` (Q8_0; minimum None).
        """
        layout = _BLOCK_LAYOUT.get(self.ggml_type)
        if layout is None:
            raise ModelLoadError(f"tensor {self.name!r} is {self.ggml_type}; blocks() reads "
                                 f"{', '.join(_BLOCK_LAYOUT)} only, dequantize() reads any type")
        min_at, codes_at = layout
        block, type_size = _block_size(self.ggml_type)
        groups = (*self.shape[:-1], self.shape[-1] // block)
        data = self.raw.reshape(*groups, type_size)
        scale = _f16_to_f32(data[..., 0:2])
        minimum = _f16_to_f32(data[..., 2:4]) if min_at else None
        if self.ggml_type == "Q8_0":
            codes = data[..., codes_at:].view(np.int8)
        else:  # byte j holds element j in its low nibble, element j + 16 in its high one
            packed = data[..., codes_at:]
            codes = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
        codes = self._unpermute(np.ascontiguousarray(codes).reshape(self.shape))
        if minimum is not None:
            minimum = self._unpermute(minimum)
        return codes, self._unpermute(scale), minimum

    def _unpermute(self, rows: np.ndarray) -> np.ndarray:
        """Rows back from llama.cpp's RoPE order (transformers' `_reverse_permute_weights`)."""
        if self.permute is None:
            return rows
        heads, head_dim = self.permute
        split = rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:])
        return np.ascontiguousarray(split.swapaxes(1, 2).reshape(rows.shape))


@dataclass(frozen=True, slots=True, eq=False)
class GgufModel:
    """A GGUF file read: HF config keys, HF-named tensors (mapped, not dequantized), tokenizer."""

    path: str
    arch: str  # general.architecture
    config: dict[str, Any]
    tensors: dict[str, GgufTensor]
    tokenizer_json: str  # a `tokenizers` JSON document
    chat_template: str | None
    special: dict[str, Any]  # bos/eos/pad/unk ids and tokens, add_bos_token/add_eos_token


def read_gguf(path: str | os.PathLike[str]) -> GgufModel:
    """Read a GGUF file: parse and check its header, map its tensors, convert its tokenizer."""
    path = os.fspath(path)
    data = _map(path)
    header = _HeaderReader(data, path).read()
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHS)}")
    infos = {info.name: info for info in header.tensors}
    config = _config(path, arch, meta, infos)
    tensors = _tensors(path, data, header, config)
    special = _special(path, meta, config["vocab_size"])
    template = meta.get("tokenizer.chat_template")
    return GgufModel(path=path, arch=arch, config=config, tensors=tensors,
                     tokenizer_json=_tokenizer_json(path), special=special,
                     chat_template=template if isinstance(template, str) else None)


# --- the header -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml's dims reversed)
    ggml_type: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True, slots=True)
class _Header:
    metadata: dict[str, Any]
    tensors: list[_TensorInfo]
    data_start: int


class _StringArray:
    """A metadata array of strings, decoded on access: a vocabulary can be 150k strings."""

    def __init__(self, data: memoryview, starts: np.ndarray, path: str) -> None:
        self._data, self._starts, self._path = data, starts, path

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        start = int(self._starts[index])
        (length,) = struct.unpack_from("<Q", self._data, start)
        return _decode(self._data[start + 8:start + 8 + length], self._path, f"string {index}")


class _HeaderReader:
    """Walks the header with a bounds check on every read."""

    def __init__(self, data: np.ndarray, path: str) -> None:
        self.data = data.data  # a memoryview: struct reads it without copying
        self.size = len(data)
        self.path = path
        self.pos = 0
        self.array_items = 0

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}; {DAMAGED}")

    def take(self, count: int, what: str) -> int:
        """Claim `count` bytes for `what`; returns where they start."""
        start = self.pos
        if count > self.size - start:
            raise self.fail(f"{what} needs {count} bytes at offset {start}, but the file "
                            f"has {self.size} bytes")
        self.pos = start + count
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"the length of {what}")
        start = self.take(length, what)
        return _decode(self.data[start:start + length], self.path, what)

    def read(self) -> _Header:
        if self.size < 4 or bytes(self.data[:4]) != b"GGUF":
            got = bytes(self.data[:4])
            raise self.fail(f"expected the magic bytes b'GGUF' at the start, got {got!r}")
        self.pos = 4
        version = self.scalar("<I", "the version")
        if version not in VERSIONS and version & 0xFFFF == 0:
            raise self.fail("the file is big-endian, which is not supported")
        if version not in VERSIONS:
            raise self.fail(f"GGUF version {version} is not supported (expected one of "
                            f"{VERSIONS})")
        n_tensors = self.scalar("<Q", "the tensor count")
        n_keys = self.scalar("<Q", "the metadata count")
        if max(n_tensors, n_keys) > MAX_ENTRIES:
            raise self.fail(f"the file declares {n_tensors} tensors and {n_keys} metadata "
                            f"keys; no model has more than {MAX_ENTRIES} of either")
        metadata = self.metadata(n_keys)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a power of two, got {alignment!r}")
        self.enough(n_tensors, 32, "tensor infos")
        tensors = [self.tensor_info(i, n_tensors, alignment) for i in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        self.check_layout(tensors, data_start)
        return _Header(metadata, tensors, data_start)

    def enough(self, count: int, least: int, what: str) -> bool:
        """Refuse a count whose items cannot fit in what is left of the file."""
        if count * least > self.size - self.pos:
            raise self.fail(f"{count} {what} of at least {least} bytes each do not fit in the "
                            f"{self.size - self.pos} bytes left after offset {self.pos}")
        return True

    def metadata(self, count: int) -> dict[str, Any]:
        self.enough(count, 12, "metadata entries")
        metadata: dict[str, Any] = {}
        for i in range(count):
            key = self.string(f"metadata key {i}")
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            kind = self.scalar("<I", f"the type of metadata {key!r}")
            metadata[key] = self.value(kind, f"metadata {key!r}")
        return metadata

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise self.fail(f"{what} has unknown value type {kind}")
        item = self.scalar("<I", f"the item type of {what}")
        count = self.scalar("<Q", f"the length of {what}")
        self.array_items += count
        if self.array_items > MAX_ARRAY_ITEMS:
            raise self.fail(f"{what} brings the metadata arrays to {self.array_items} items, "
                            f"more than the {MAX_ARRAY_ITEMS} any tokenizer needs")
        if item == _STRING:
            self.enough(count, 8, f"strings of {what}")
            starts = np.empty(count, dtype=np.int64)
            for i in range(count):
                starts[i] = self.pos
                self.take(self.scalar("<Q", f"{what}[{i}]"), f"{what}[{i}]")
            return _StringArray(self.data, starts, self.path)
        if item not in _SCALARS:
            raise self.fail(f"{what} is an array of value type {item}, expected numbers or "
                            "strings (nested arrays, which llama.cpp refuses too)")
        dtype = np.dtype(_SCALARS[item])
        self.enough(count, dtype.itemsize, f"items of {what}")
        start = self.take(count * dtype.itemsize, what)
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=start)

    def tensor_info(self, index: int, count: int, alignment: int) -> _TensorInfo:
        name = self.string(f"the name of tensor {index} of {count}")
        n_dims = self.scalar("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has rank {n_dims}, expected 1 to {MAX_DIMS}")
        dims = [self.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = self.scalar("<I", f"the type of tensor {name!r}")
        offset = self.scalar("<Q", f"the offset of tensor {name!r}")
        ggml_type = self.ggml_type(name, type_id)
        block, type_size = _block_size(ggml_type)
        if min(dims) < 1 or dims[0] % block:
            raise self.fail(f"tensor {name!r} ({ggml_type}) has shape {dims[::-1]}; every dim "
                            f"must be positive and the last a multiple of {block}")
        if offset % alignment:
            raise self.fail(f"tensor {name!r} starts at data offset {offset}, which is not a "
                            f"multiple of the alignment {alignment}")
        nbytes = math.prod(dims) // block * type_size
        return _TensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)

    def ggml_type(self, name: str, type_id: int) -> str:
        try:
            ggml_type = GGMLQuantizationType(type_id).name
        except ValueError:
            raise self.fail(f"tensor {name!r} has unknown ggml type {type_id}") from None
        if not _can_dequantize(ggml_type):
            raise ModelLoadError(f"{self.path}: tensor {name!r} is stored as {ggml_type}, which "
                                 "cannot be read as weights (gguf has no dequantizer for it)")
        return ggml_type

    def check_layout(self, tensors: list[_TensorInfo], data_start: int) -> None:
        """Each tensor's bytes lie in the file and overlap no other's: a shape that claims more
        data than the file holds for it is caught here."""
        names = [info.name for info in tensors]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise self.fail(f"tensor names appear twice: {', '.join(twice[:5])}")
        ordered = sorted(tensors, key=lambda info: info.offset)
        for index, info in enumerate(ordered):
            after = ordered[index + 1] if index + 1 < len(ordered) else None
            end = data_start + info.offset + info.nbytes
            limit, bound = (self.size, "the end of the file") if after is None else (
                data_start + after.offset, f"the start of tensor {after.name!r}")
            if end > limit:
                raise self.fail(
                    f"tensor {info.name!r} ({info.ggml_type}, shape {list(info.shape)}) needs "
                    f"{info.nbytes} bytes from file offset {data_start + info.offset}, which "
                    f"run {end - limit} bytes past {bound}: its shape disagrees with its data")


def _map(path: str) -> np.ndarray:
    """The file as read-only uint8 pages, read from disk only when touched."""
    try:
        if os.path.getsize(path) == 0:
            raise ModelLoadError(f"{path}: the file is empty; {DAMAGED}")
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _f16_to_f32(pairs: np.ndarray) -> np.ndarray:
    """Little-endian f16 byte pairs (last axis) as float32, exactly."""
    return np.ascontiguousarray(pairs).view("<f2")[..., 0].astype(np.float32)


def _decode(raw: memoryview, path: str, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: {what} is not UTF-8; {DAMAGED}") from None


def _block_size(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]


@cache
def _can_dequantize(ggml_type: str) -> bool:
    """Whether gguf can turn this type into floats (asked of gguf with one zero block): not
    the integer types, F64 or the activation-only Q8_1/Q8_K."""
    if ggml_type in _RAW_FLOATS:
        return True
    _, type_size = _block_size(ggml_type)
    try:
        gguf_dequantize(np.zeros((1, type_size), np.uint8), GGMLQuantizationType[ggml_type])
    except NotImplementedError:
        return False
    return True


# --- config, tensors, tokenizer -------------------------------------------------------------


def _config(path: str, arch: str, meta: dict[str, Any],
            infos: dict[str, _TensorInfo]) -> dict[str, Any]:
    """The HF config keys this file's metadata gives (transformers' GGUF_CONFIG_MAPPING)."""
    hyper = _Hyperparameters(path, arch, meta)
    hidden, heads = hyper.integer("embedding_length"), hyper.integer("attention.head_count")
    head_dim = hyper.integer("attention.key_length", max(hidden // heads, 1))
    if arch == "llama" and hyper.integer("rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: llama.rope.dimension_count must equal the head size "
                             f"{head_dim} (llama rotates whole heads)")
    kv_heads = hyper.integer("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise ModelLoadError(f"{path}: {heads} query heads do not split into {kv_heads} KV "
                             f"heads; {DAMAGED}")
    tokens = meta.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        # transformers' rule: a llama file whose name says mistral is a Mistral model
        "model_type": "mistral" if arch == "llama" and "mistral" in str(
            meta.get("general.name", "")) else arch,
        "hidden_size": hidden, "intermediate_size": hyper.integer("feed_forward_length"),
        "num_hidden_layers": hyper.integer("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": hyper.number("attention.layer_norm_rms_epsilon"),
        "rope_theta": hyper.number("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(arch, meta, "rope_freqs.weight" in infos),
        "max_position_embeddings": hyper.integer("context_length"),
        "vocab_size": hyper.integer(
            "vocab_size", len(tokens) if isinstance(tokens, _StringArray) else None),
        "tie_word_embeddings": "output.weight" not in infos,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if f"{arch}.attention.sliding_window" in meta:
        config["sliding_window"] = hyper.integer("attention.sliding_window")
    return config


@dataclass(frozen=True, slots=True)
class _Hyperparameters:
    """`{arch}.*` metadata numbers, checked to be positive and of the right kind."""

    path: str
    arch: str
    meta: dict[str, Any]

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.meta.get(f"{self.arch}.{key}", default)
        if type(value) is not int or value <= 0:  # bool is an int: refused as well
            raise self._wrong(key, value, "a positive integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.meta.get(f"{self.arch}.{key}", default)
        if type(value) not in (int, float) or not 0 < value < math.inf:
            raise self._wrong(key, value, "a positive number")
        return float(value)

    def _wrong(self, key: str, value: Any, expected: str) -> ModelLoadError:
        got = "nothing" if value is None else repr(value)
        return ModelLoadError(f"{self.path}: metadata {self.arch}.{key} must be {expected}, "
                              f"got {got}; {DAMAGED}")


def _rope_scaling(arch: str, meta: dict[str, Any], freq_factors: bool) -> dict | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`)."""
    if freq_factors:  # Llama 3: per-frequency factors in a tensor, not in the metadata
        return {"rope_type": "freq_factors"}
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor not in (None, 1.0):
        kind = "linear"
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind)}
    if factor is not None:
        scaling["factor"] = factor
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _hf_name(name: str, layers: int) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it has none."""
    if name in _KEEP_NAMES:
        return name
    if (m := _LAYER_TENSOR.fullmatch(name)) and int(m[1]) < layers and m[2] in _LAYER_NAMES:
        return f"model.layers.{int(m[1])}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    if (m := _GLOBAL_TENSOR.fullmatch(name)) and m[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
    return None


def _tensors(path: str, data: np.ndarray, header: _Header,
             config: dict[str, Any]) -> dict[str, GgufTensor]:
    """The file's tensors under HF names, as views of the mapped file."""
    tensors: dict[str, GgufTensor] = {}
    for info in header.tensors:
        name = _hf_name(info.name, config["num_hidden_layers"])
        if name is None:
            raise ModelLoadError(f"{path}: tensor {info.name!r} has no Hugging Face name for "
                                 f"{config['model_type']} (expected token_embd, output_norm, "
                                 f"output or blk.N.{{{','.join(_LAYER_NAMES)}}})")
        start = header.data_start + info.offset
        raw = data[start:start + info.nbytes]
        if info.ggml_type in _RAW_FLOATS:
            raw = raw.view(_RAW_FLOATS[info.ggml_type]).reshape(info.shape)
        else:
            raw = raw.reshape(*info.shape[:-1], -1)
        if name in tensors:
            raise ModelLoadError(f"{path}: two tensors are named {name!r} (the second is "
                                 f"{info.name!r}); {DAMAGED}")
        tensors[name] = GgufTensor(name, info.shape, info.ggml_type, raw,
                                   _permutation(path, name, info.shape, config))
    return tensors


def _permutation(path: str, name: str, shape: tuple[int, ...],
                 config: dict[str, Any]) -> tuple[int, int] | None:
    """(heads, head_dim) of a Llama q/k projection that llama.cpp stored permuted."""
    if config["model_type"] not in ("llama", "mistral"):
        return None
    if ".self_attn.q_proj." in name:
        heads = config["num_attention_heads"]
    elif ".self_attn.k_proj." in name:
        heads = config["num_key_value_heads"]
    else:
        return None
    if shape[0] % (2 * heads):
        raise ModelLoadError(f"{path}: {name} has {shape[0]} rows, which do not split into "
                             f"{heads} heads of an even size; {DAMAGED}")
    return heads, shape[0] // heads


def _special(path: str, meta: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Special token ids, their strings, and whether the tokenizer adds BOS/EOS."""
    tokens = meta.get("tokenizer.ggml.tokens")
    special: dict[str, Any] = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        size = len(tokens) if isinstance(tokens, _StringArray) else vocab
        if not isinstance(token_id, int) or not 0 <= token_id < size:
            raise ModelLoadError(f"{path}: tokenizer.ggml.{key} is {token_id!r}, expected a "
                                 f"token id below {size}; {DAMAGED}")
        special[f"{role}_token_id"] = token_id
        if isinstance(tokens, _StringArray):
            special[f"{role}_token"] = tokens[token_id]
    for flag in ("add_bos_token", "add_eos_token"):
        if isinstance(meta.get(f"tokenizer.ggml.{flag}"), bool):
            special[flag] = meta[f"tokenizer.ggml.{flag}"]
    return special


def _tokenizer_json(path: str) -> str:
    """The file's tokenizer as `tokenizers` JSON, converted by transformers.

    The file is linked alone into an empty folder first: transformers prefers a
    `tokenizer.json` or `tokenizer_config.json` that happens to sit beside it.
    """
    from transformers import AutoTokenizer  # heavy, and needed only here

    with tempfile.TemporaryDirectory(prefix="bitsmith-gguf-") as folder:
        name = os.path.basename(path)
        try:
            os.symlink(os.path.abspath(path), os.path.join(folder, name))
        except OSError:  # no symlinks here: read it where it is
            folder, name = os.path.dirname(os.path.abspath(path)), name
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, gguf_file=name, local_files_only=True, trust_remote_code=False)
            return tokenizer.backend_tokenizer.to_str()
        except Exception as exc:  # third-party code reading a hostile file: any error
            raise ModelLoadError(f"{path}: transformers cannot build the tokenizer "
                                 f"({type(exc).__name__}: {exc})") from exc
