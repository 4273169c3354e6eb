"""A decoder's forward step as a bitsmith IR module, built from its config and weights.

One step takes a token-flattened (ragged) batch: `T` rows of tokens from `B` sequences, each
sequence's rows contiguous (`seq_indptr`), at the positions the host gives. It appends their
K/V to the paged cache (`kv.paged_attention`, which reads and writes the cache in place) and
returns the logits of one row per sequence (`last`: the row of its last token). A prefill
chunk and a decode step are the same module at different sizes: decode is T = B.

The weights keep their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), so the
quantize pass, its report and the loaders all speak of the same tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelLoadError, UnsupportedModelError
from ..ir import Builder, Module, TensorType, Value, graph, verify
from ..ir.attributes import DenseAttr
from ..ir.dialects import quant
from ..ir.dialects.func import ReturnOp
from ..ir.dialects.graph.elementwise import BINARY_OPS, UNARY_OPS
from ..ir.dialects.kv import PagedAttentionOp, cache_type, scales_type
from ..ir.dtypes import DType, f16, f32, i32, parse_dtype
from ..ir.packing import pack_rows
from ..ir.types import QuantType
from .archs import ARCHS, canonical_config

STEP_INPUTS = ("tokens", "positions", "seq_indptr", "kv_len", "page_indptr", "page_indices",
               "last", "cache")
"""The step's inputs, in order; `cache` is read and written in place (an i8 cache is followed
by `cache_scales`, written in place too)."""

STATE_INPUTS = ("cache", "cache_scales")


@dataclass(frozen=True)
class LlmSpec:
    """What the graph builder needs of a decoder's config (Hugging Face names in comments)."""

    arch: str  # model_type
    vocab: int  # vocab_size
    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int
    intermediate: int  # intermediate_size
    norm_eps: float  # rms_norm_eps
    rope_theta: float
    max_positions: int  # max_position_embeddings
    tie_embeddings: bool  # tie_word_embeddings
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    rope_scaling: Mapping[str, Any] | None = None
    sliding_window: int = 0
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    norm: str = "rms"  # "rms", or "layer" (LayerNorm with a bias: GPT-2)
    act: str = "silu"  # the MLP's activation: "silu", or "gelu_tanh"
    gated: bool = True  # act(gate) * up (SwiGLU/GeGLU), or act(up) (GPT-2)
    embed_scale: float = 1.0  # Gemma: sqrt(hidden)
    learned_positions: bool = False  # GPT-2: a position table instead of RoPE
    out_bias: bool = False  # GPT-2: biases on o_proj and the MLP
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LlmSpec:
        """The spec of a Hugging Face config (as a dict: `config.to_dict()` or config.json)."""
        config = canonical_config(config)
        arch = str(config["model_type"])
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
            theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
            kind = rope.get("rope_type", rope.get("type", "default"))
            eos = config.get("eos_token_id")
            window = config.get("sliding_window") if config.get(
                "use_sliding_window", arch in ("mistral", "phi3")) else None
            return cls(
                arch=arch, vocab=int(config["vocab_size"]), hidden=hidden,
                layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
                intermediate=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                max_positions=int(config.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
                rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
                sliding_window=int(window or 0),
                bos_id=config.get("bos_token_id"),
                eos_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
                norm=str(config.get("norm", "rms")), act=str(config.get("act", "silu")),
                gated=bool(config.get("gated", True)),
                embed_scale=float(config.get("embed_scale", 1.0)),
                learned_positions=bool(config.get("learned_positions", False)),
                out_bias=bool(config.get("out_bias", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"the model config is incomplete or malformed ({exc!r}); "
                                 "expected a Hugging Face decoder config") from None

    def stacked_shapes(self) -> dict[str, tuple[int, ...]]:
        """The layers the step runs stacked: q/k/v (and gate/up), by their stacked names."""
        rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        out: dict[str, tuple[int, ...]] = {}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "self_attn.qkv_proj.weight"] = (rows, self.hidden)
            if self.gated:
                out[p + "mlp.gate_up_proj.weight"] = (2 * self.intermediate, self.hidden)
        return out

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the step reads, by Hugging Face name, with its shape."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab,
                                                                           self.hidden),
                                              "model.norm.weight": (self.hidden,)}
        layer_norm = self.norm == "layer"
        if layer_norm:
            shapes["model.norm.bias"] = (self.hidden,)
        if self.learned_positions:
            shapes["model.embed_positions.weight"] = (self.max_positions, self.hidden)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (self.hidden,),
                p + "post_attention_layernorm.weight": (self.hidden,),
                p + "self_attn.q_proj.weight": (q, self.hidden),
                p + "self_attn.k_proj.weight": (kv, self.hidden),
                p + "self_attn.v_proj.weight": (kv, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, q),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate)})
            if self.gated:
                shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, self.hidden)
            if layer_norm:
                shapes.update({p + "input_layernorm.bias": (self.hidden,),
                               p + "post_attention_layernorm.bias": (self.hidden,)})
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,),
                               p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.out_bias:
                shapes.update({p + "self_attn.o_proj.bias": (self.hidden,),
                               p + "mlp.up_proj.bias": (self.intermediate,),
                               p + "mlp.down_proj.bias": (self.hidden,)})
        return shapes


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear layer's weight already quantized (a GGUF file's Q4_0/Q4_1/Q8_0 blocks): bit
    codes `[N, K]` (the storage format's `to_bits`), scales and zero points or minimums."""

    qtype: QuantType
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None = None
    rotation: np.ndarray | None = None  # R_b: the layer runs on x R (blocks of b), `rot` specs

    def dequantize(self) -> np.ndarray:
        """The float32 weight it stands for (the quant dialect's semantics)."""
        return quant.dequantize(self.codes, self.scale, self.zero, self.qtype)


@dataclass(frozen=True)
class StepShape:
    """The static sizes one compiled step is specialised to."""

    tokens: int  # T: query rows (padded)
    batch: int  # B: sequences
    page_slots: int  # capacity of page_indices
    page_size: int
    max_positions: int  # rows of the RoPE tables
    rows: int = 0  # R: rows whose logits come out (`last`); 0 means one per sequence (B)

    @property
    def out_rows(self) -> int:
        """R, the logits' rows."""
        return self.rows or self.batch


def rope_tables(spec: LlmSpec, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin `[positions, head_dim / 2]` as transformers computes them in float32
    (inverse frequencies, scaled per `rope_scaling`, times the position; then cos/sin)."""
    dim = spec.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(spec.rope_theta), exponent)
                ).astype(np.float32)
    attention_scale = 1.0
    scaling = dict(spec.rope_scaling or {})
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind != "default":
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported yet; supported: "
                                    "default, linear, llama3")
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = (np.cos(freqs) * np.float32(attention_scale)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(attention_scale)).astype(np.float32)
    return cos, sin


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`)."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class _Graph:
    """Builds ops at the end of a module's body: thin names over `Builder`."""

    def __init__(self, module: Module, weights: Mapping[str, np.ndarray],
                 quantized: Mapping[str, QuantizedWeight], memo: dict[str, Any],
                 act: str = "f32") -> None:
        self.module = module
        self.act_type = act
        self.b = Builder.at_end(module.body)
        self.weights = weights
        self.quantized = quantized
        self.memo = memo

    def constant(self, name: str, array: np.ndarray, type: TensorType) -> Value:
        self.module.weights[name] = array
        return self.b.value(graph.ConstantOp, result_types=[type], weight=name)

    def weight(self, name: str) -> Value:
        array = self.module.weights[name]
        type = TensorType(array.shape, parse_dtype(str(array.dtype).replace("float", "f")))
        return self.b.value(graph.ConstantOp, result_types=[type], weight=name)

    def literal(self, value: float, dtype: DType = f32) -> Value:
        type = TensorType((), dtype)
        return self.b.value(graph.ConstantOp, result_types=[type],
                            value=DenseAttr(type, dtype.cast(np.asarray(value))))

    def linears(self, x: Value, names: list[str], name: str, bias: bool = False) -> list[Value]:
        """x times each of `names`' weights, as one linear layer of their rows stacked (one
        kernel reads them all: a decode step's q/k/v, or gate/up, in one GEMV), cut apart."""
        if name in self.quantized:  # quantized as one stacked layer (by the quantize pass)
            q = self.quantized[name]
            y = self.quant_linear(x, name, q)
            if bias:
                if name + ".bias" not in self.memo:
                    self.memo[name + ".bias"] = _stack(names, self.weights, {}, True)[1]
                self.module.weights.setdefault(name + ".bias", self.memo[name + ".bias"])
                y = self.binary("add", y, self.weight(name + ".bias"))
            return self._cut(y, [self.weights[n].shape[0] if n not in self.quantized
                                 else self.quantized[n].codes.shape[0] for n in names])
        rows = [self.quantized[n].codes.shape[0] if n in self.quantized
                else self.weights[n].shape[0] for n in names]
        kinds = {self.quantized[n].qtype if n in self.quantized else None for n in names}
        if len(kinds) != 1:  # stored in different formats: one layer each
            for n in names:  # the float ones (and biases) step_module left to the stack
                if n not in self.quantized:
                    self.module.weights.setdefault(n, np.ascontiguousarray(self.weights[n],
                                                                           np.float32))
                if bias:
                    b = n.replace(".weight", ".bias")
                    self.module.weights.setdefault(b, np.ascontiguousarray(self.weights[b],
                                                                           np.float32))
            return [self.linear(x, n, bias) for n in names]
        if name not in self.memo:  # stacked once per compile, shared by every step size
            self.memo[name] = _stack(names, self.weights, self.quantized, bias)
        stacked, stacked_bias = self.memo[name]
        if isinstance(stacked, QuantizedWeight):
            y = self.quant_linear(x, name, stacked)
        else:
            self.module.weights.setdefault(name, stacked)
            y = self.b.value(graph.LinearOp, x, self.weight(name))
        if stacked_bias is not None:
            self.module.weights.setdefault(name + ".bias", stacked_bias)
            y = self.binary("add", y, self.weight(name + ".bias"))
        return self._cut(y, rows)

    def _cut(self, y: Value, rows: list[int]) -> list[Value]:
        out, at = [], 0
        for n in rows:
            out.append(self.slice(y, 1, at, at + n))
            at += n
        return out

    def quant_linear(self, x: Value, name: str, q: QuantizedWeight) -> Value:
        shape = tuple(int(d) for d in q.codes.shape)
        if q.rotation is not None:  # x R, block by block (as the quantize pass builds it)
            rb, k = q.rotation.shape[0], shape[1]
            lead = tuple(x.type.shape[:-1])
            rot = self.constant(f"quantize.rotation{rb}", q.rotation,
                                TensorType(q.rotation.shape, f32))
            blocks = self.reshape(x, (*lead, k // rb, rb))
            x = self.reshape(self.b.value(graph.MatmulOp, blocks, rot), (*lead, k))
        scales = tuple(int(d) for d in q.scale.shape)
        w = self.constant(f"{name}.codes", pack_rows(q.codes, q.qtype.bits),
                          TensorType(shape, q.qtype))
        s = self.constant(f"{name}.scale", q.scale, TensorType(scales, q.qtype.scale_dtype))
        zdt = quant.zero_dtype(q.qtype)
        z = None if q.zero is None or zdt is None else self.constant(
            f"{name}.zero", q.zero, TensorType(scales, zdt))
        return self.b.value(quant.LinearOp, x, w, s, z, act=self.act_type)

    def linear(self, x: Value, name: str, bias: bool = False) -> Value:
        b = self.weight(name.replace(".weight", ".bias")) if bias else None
        q = self.quantized.get(name)
        if q is None:
            return self.b.value(graph.LinearOp, x, self.weight(name), b)
        y = self.quant_linear(x, name, q)
        return y if b is None else self.binary("add", y, b)

    def binary(self, kind: str, a: Value, b: Value) -> Value:
        return self.b.value(BINARY_OPS[kind], a, b)

    def unary(self, kind: str, x: Value) -> Value:
        return self.b.value(UNARY_OPS[kind], x)

    def reshape(self, x: Value, shape: tuple) -> Value:
        return self.b.value(graph.ReshapeOp, x, result_types=[x.type.with_shape(shape)])

    def norm(self, x: Value, name: str, spec: LlmSpec) -> Value:
        """RMSNorm, or LayerNorm with its bias (`{name}.weight`, `{name}.bias`)."""
        if spec.norm == "layer":
            return self.b.value(graph.LayerNormOp, x, self.weight(name + ".weight"),
                                self.weight(name + ".bias"), eps=spec.norm_eps)
        return self.b.value(graph.RmsNormOp, x, self.weight(name + ".weight"),
                            eps=spec.norm_eps)

    def act(self, x: Value, kind: str) -> Value:
        if kind == "gelu_tanh":
            return self.b.value(graph.GeluOp, x, approximate="tanh")
        return self.unary(kind, x)

    def slice(self, x: Value, axis: int, start: int, end: int) -> Value:
        return self.b.value(graph.SliceOp, x, axis=axis, start=start, end=end)

    def rope(self, x: Value, cos: Value, sin: Value, half: int) -> Value:
        """Rotate-half RoPE over head dims of 2 * half: (x1, x2) -> (x1 cos - x2 sin,
        x2 cos + x1 sin)."""
        x1, x2 = self.slice(x, 2, 0, half), self.slice(x, 2, half, 2 * half)
        lo = self.binary("sub", self.binary("mul", x1, cos), self.binary("mul", x2, sin))
        hi = self.binary("add", self.binary("mul", x2, cos), self.binary("mul", x1, sin))
        return self.b.value(graph.ConcatOp, lo, hi, axis=2)


def _stack(names: list[str], weights: Mapping[str, np.ndarray],
           quantized: Mapping[str, QuantizedWeight], bias: bool) -> tuple[Any, Any]:
    """The weights (and biases) of `names` stacked along the output rows."""
    biases = (np.concatenate([weights[n.replace(".weight", ".bias")] for n in names])
              .astype(np.float32) if bias else None)
    if names[0] not in quantized:
        return np.ascontiguousarray(np.concatenate([weights[n] for n in names]),
                                    np.float32), biases
    parts = [quantized[n] for n in names]
    zero = None if parts[0].zero is None else np.concatenate([p.zero for p in parts
                                                              if p.zero is not None])
    return QuantizedWeight(parts[0].qtype, np.concatenate([p.codes for p in parts]),
                           np.concatenate([p.scale for p in parts]), zero), biases


def step_module(spec: LlmSpec, weights: Mapping[str, np.ndarray], shape: StepShape, *,
                cache_dtype: DType = f16, name: str = "step",
                quantized: Mapping[str, QuantizedWeight] | None = None,
                memo: dict[str, Any] | None = None, act: str = "f32") -> Module:
    """The forward step of `spec` at `shape` as a verified IR module (inputs `STEP_INPUTS`,
    one output: logits `[R, vocab]`). `weights` are float32 arrays by Hugging Face name;
    linear layers named in `quantized` read those codes instead (`quant.linear`), and their
    float weights are not read (a tied embedding's still is, for the token lookup). q/k/v and
    gate/up run as one stacked layer each; `memo` keeps the stacked weights across calls (one
    dict per compile, so that every step size shares them). `act="i8"` runs the quantized
    layers on int8 activation blocks (`quant.linear`'s act: W4A8 / W8A8)."""
    quantized = dict(quantized or {})
    shapes = {**spec.weight_shapes(), **spec.stacked_shapes()}
    for key, q in quantized.items():
        want = shapes.get(key)
        if want is None or tuple(q.codes.shape) != want:
            raise ModelLoadError(f"quantized weight {key} has shape {list(q.codes.shape)}, "
                                 f"the config implies {want}")
    missing = sorted(set(spec.weight_shapes()) - set(weights))
    if missing:
        raise ModelLoadError(f"the weights lack {len(missing)} tensor(s) the "
                             f"{spec.arch} config needs, e.g. {missing[:3]}")
    needed = {k: v for k, v in spec.weight_shapes().items() if k not in quantized
              or k == "model.embed_tokens.weight"}
    for key, want in needed.items():
        if tuple(weights[key].shape) != want:
            raise ModelLoadError(f"weight {key} has shape {list(weights[key].shape)}, the "
                                 f"config implies {list(want)}")
    t, b = shape.tokens, shape.batch
    idx = TensorType
    types = [idx((t,), i32), idx((t,), i32), idx((b + 1,), i32), idx((b,), i32),
             idx((b + 1,), i32), idx((shape.page_slots,), i32), idx((shape.out_rows,), i32),
             cache_type(spec.layers, "P", spec.kv_heads, shape.page_size, spec.head_dim,
                        cache_dtype)]
    names: list[str] = list(STEP_INPUTS)
    if str(cache_dtype) in ("i8", "u8"):  # the scales of the int8 / int4 rows
        types.append(scales_type(types[-1], spec.head_dim))
        names.append("cache_scales")
    module = Module(name, types, names)
    stacked = ("q_proj", "k_proj", "v_proj", "gate_proj") + (("up_proj",) if spec.gated else ())
    module.weights.update({k: np.ascontiguousarray(weights[k], np.float32) for k in needed
                           if not any(f".{s}." in k for s in stacked)})
    tokens, positions, seq_indptr, kv_len, page_indptr, page_indices, last, cache = \
        module.inputs[:8]
    cache_scales = module.inputs[8] if len(module.inputs) > 8 else None
    g = _Graph(module, weights, quantized, {} if memo is None else memo, act)
    half = spec.head_dim // 2
    h = g.b.value(graph.EmbeddingOp, g.weight("model.embed_tokens.weight"), tokens)
    if spec.embed_scale != 1.0:  # Gemma
        h = g.binary("mul", h, g.literal(spec.embed_scale))
    cos_t = sin_t = None
    if spec.learned_positions:  # GPT-2
        h = g.binary("add", h, g.b.value(graph.EmbeddingOp, g.weight(
            "model.embed_positions.weight"), positions))
    else:
        cos, sin = rope_tables(spec, shape.max_positions)
        module.weights.update({"rope.cos": cos, "rope.sin": sin})
        cos_t = g.reshape(g.b.value(graph.EmbeddingOp, g.weight("rope.cos"), positions),
                          (t, 1, half))
        sin_t = g.reshape(g.b.value(graph.EmbeddingOp, g.weight("rope.sin"), positions),
                          (t, 1, half))
    scale = 1.0 / math.sqrt(spec.head_dim)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        x = g.norm(h, p + "input_layernorm", spec)
        q, k, v = g.linears(x, [p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                            p + "self_attn.qkv_proj.weight", spec.qkv_bias)
        q = g.reshape(q, (t, spec.heads, spec.head_dim))
        k = g.reshape(k, (t, spec.kv_heads, spec.head_dim))
        v = g.reshape(v, (t, spec.kv_heads, spec.head_dim))
        if cos_t is not None and sin_t is not None:
            q, k = g.rope(q, cos_t, sin_t, half), g.rope(k, cos_t, sin_t, half)
        a = g.b.value(PagedAttentionOp, q, k, v, cache, seq_indptr, kv_len, page_indptr,
                      page_indices, cache_scales, layer=i, scale=scale,
                      window=spec.sliding_window)
        a = g.reshape(a, (t, spec.heads * spec.head_dim))
        h = g.binary("add", h, g.linear(a, p + "self_attn.o_proj.weight", spec.out_bias))
        x = g.norm(h, p + "post_attention_layernorm", spec)
        if spec.gated:
            gate, up = g.linears(x, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                                 p + "mlp.gate_up_proj.weight")
            mlp = g.binary("mul", g.act(gate, spec.act), up)
        else:
            mlp = g.act(g.linear(x, p + "mlp.up_proj.weight", spec.out_bias), spec.act)
        h = g.binary("add", h, g.linear(mlp, p + "mlp.down_proj.weight", spec.out_bias))
    h = g.b.value(graph.IndexSelectOp, h, last, axis=0)
    h = g.norm(h, "model.norm", spec)
    head = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
    logits = g.linear(h, head)
    g.b.create(ReturnOp, logits)
    module.metadata["output_names"] = ["logits"]
    verify(module)
    return module


__all__ = ["ARCHS", "STEP_INPUTS", "LlmSpec", "StepShape", "rope_tables", "step_module", "f16",
           "f32"]
