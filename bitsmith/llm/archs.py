"""What makes each decoder family different, read into one form (compile side).

Every family is brought to the Llama layout that `model.step_module` builds: its config to the
Llama config keys plus a few flags (`norm`, `act`, `gated`, `embed_scale`,
`learned_positions`, `out_bias`), and its weights to the Llama names
(`model.layers.{i}.self_attn.q_proj.weight`, ...; torch's [out, in] orientation). The renames
are lazy: a weight is split, transposed or offset when the builder first reads it.

- Llama, Mistral, Qwen2 (q/k/v biases), SmolLM, TinyLlama: as they are.
- Phi-3: fused `qkv_proj` and `gate_up_proj` cut into q/k/v and gate/up.
- Gemma: RMSNorm scales by (1 + w) (folded into the weight), embeddings times sqrt(hidden),
  GELU (tanh) gating.
- GPT-2: LayerNorm with biases, learned absolute positions, one fused `c_attn` (a Conv1D:
  [in, out], transposed here), biases on every projection, an ungated GELU (tanh) MLP.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import ModelLoadError, UnsupportedModelError

LLAMA_LIKE = ("llama", "mistral", "qwen2")
ARCHS = (*LLAMA_LIKE, "phi3", "gemma", "gpt2")


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with the Llama keys, and the family's flags (see the module docstring)."""
    arch = str(config.get("model_type", ""))
    if arch not in ARCHS:
        raise UnsupportedModelError(f"LLM architecture {arch!r} is not supported yet; "
                                    f"supported: {', '.join(ARCHS)}")
    out = dict(config)
    if arch == "phi3":
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedModelError("Phi-3 with partial rotary embeddings is not "
                                        "supported yet")
    elif arch == "gemma":
        act = config.get("hidden_activation") or config.get("hidden_act")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise UnsupportedModelError(f"Gemma with activation {act!r} is not supported")
        out.update(act="gelu_tanh", embed_scale=math.sqrt(float(config["hidden_size"])),
                   tie_word_embeddings=config.get("tie_word_embeddings", True))
    elif arch == "gpt2":
        hidden = int(config["n_embd"])
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"GPT-2 with activation "
                                        f"{config.get('activation_function')!r} is not supported")
        out.update(hidden_size=hidden, num_hidden_layers=int(config["n_layer"]),
                   num_attention_heads=int(config["n_head"]),
                   num_key_value_heads=int(config["n_head"]),
                   intermediate_size=int(config.get("n_inner") or 4 * hidden),
                   max_position_embeddings=int(config["n_positions"]),
                   rms_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                   tie_word_embeddings=config.get("tie_word_embeddings", True),
                   norm="layer", act="gelu_tanh", gated=False, learned_positions=True,
                   out_bias=True, attention_bias=True)
    return out


def canonical_weights(arch: str, weights: Mapping[str, np.ndarray],
                      layers: int) -> Mapping[str, np.ndarray]:
    """`weights` under the Llama names (lazily renamed)."""
    if arch in LLAMA_LIKE:
        return weights
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    if arch == "phi3":
        loaders.update({k: _take(weights, k) for k in weights
                        if ".qkv_proj." not in k and ".gate_up_proj." not in k})
        for i in range(layers):
            p = f"model.layers.{i}."
            loaders.update(_split(weights, p + "self_attn.qkv_proj.weight",
                                  [p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                                  _phi3_qkv_rows))
            loaders.update(_split(weights, p + "mlp.gate_up_proj.weight",
                                  [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                                  None))
    elif arch == "gemma":
        for k in weights:
            norm = k.endswith("norm.weight")
            loaders[k] = (lambda k=k: (np.float32(1) + np.asarray(weights[k], np.float32))) \
                if norm else _take(weights, k)
    else:  # gpt2
        loaders.update(_gpt2(weights, layers))
    return LazyWeights(loaders)


def _take(weights: Mapping[str, np.ndarray], key: str) -> Callable[[], np.ndarray]:
    return lambda: weights[key]


def _split(weights: Mapping[str, np.ndarray], fused: str, names: list[str],
           rows: Callable[[np.ndarray, int], list[int]] | None) -> dict[str, Callable]:
    """Loaders of `names`, the row blocks of the fused weight (equal blocks, or `rows`)."""
    if fused not in weights:
        raise ModelLoadError(f"the weights lack {fused}")

    def part(index: int) -> np.ndarray:
        w = np.asarray(weights[fused], np.float32)
        sizes = rows(w, len(names)) if rows else [w.shape[0] // len(names)] * len(names)
        start = sum(sizes[:index])
        return np.ascontiguousarray(w[start:start + sizes[index]])
    return {name: (lambda i=i: part(i)) for i, name in enumerate(names)}


def _phi3_qkv_rows(w: np.ndarray, count: int) -> list[int]:
    """Phi-3's fused q/k/v rows: q takes hidden rows, k and v the rest in halves."""
    hidden = w.shape[1]
    kv = (w.shape[0] - hidden) // 2
    return [hidden, kv, kv]


def _gpt2(weights: Mapping[str, np.ndarray], layers: int) -> dict[str, Callable]:
    def t(key: str) -> Callable[[], np.ndarray]:  # Conv1D [in, out] -> [out, in]
        return lambda: np.ascontiguousarray(np.asarray(weights[key], np.float32).T)

    def cut(key: str, part: int, transpose: bool) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            w = np.asarray(weights[key], np.float32)
            w = w.T if transpose else w
            size = w.shape[0] // 3
            return np.ascontiguousarray(w[part * size:(part + 1) * size])
        return load

    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    out: dict[str, Callable] = {
        "model.embed_tokens.weight": _take(weights, prefix + "wte.weight"),
        "model.embed_positions.weight": _take(weights, prefix + "wpe.weight"),
        "model.norm.weight": _take(weights, prefix + "ln_f.weight"),
        "model.norm.bias": _take(weights, prefix + "ln_f.bias")}
    for i in range(layers):
        g, p = f"{prefix}h.{i}.", f"model.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[p + ours + ".weight"] = _take(weights, g + theirs + ".weight")
            out[p + ours + ".bias"] = _take(weights, g + theirs + ".bias")
        for j, n in enumerate("qkv"):
            out[p + f"self_attn.{n}_proj.weight"] = cut(g + "attn.c_attn.weight", j, True)
            out[p + f"self_attn.{n}_proj.bias"] = cut(g + "attn.c_attn.bias", j, False)
        out[p + "self_attn.o_proj.weight"] = t(g + "attn.c_proj.weight")
        out[p + "self_attn.o_proj.bias"] = _take(weights, g + "attn.c_proj.bias")
        out[p + "mlp.up_proj.weight"] = t(g + "mlp.c_fc.weight")
        out[p + "mlp.up_proj.bias"] = _take(weights, g + "mlp.c_fc.bias")
        out[p + "mlp.down_proj.weight"] = t(g + "mlp.c_proj.weight")
        out[p + "mlp.down_proj.bias"] = _take(weights, g + "mlp.c_proj.bias")
    return out


class LazyWeights(Mapping[str, np.ndarray]):
    """Weights made on first read (float32, contiguous), then kept."""

    def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]]) -> None:
        self._loaders = dict(loaders)
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._done:
            try:
                loader = self._loaders[key]
            except KeyError:
                raise KeyError(key) from None
            self._done[key] = np.ascontiguousarray(loader(), np.float32)
        return self._done[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)
