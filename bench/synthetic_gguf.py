"""A GGUF file of TinyLlama-1.1B's shapes with random weights, for measuring decode on weights
larger than this machine's last-level cache, with bitsmith and llama.cpp on the same file.

    python bench/synthetic_gguf.py OUT.gguf [--type Q4_0|Q4_1|Q8_0] [--layers 22]
    python bench/llm.py --model OUT.gguf --variants gguf gguf+a8 --no-hf --ppl-tokens 0

Llama architecture, hidden 2048, FFN 5632, 32 query and 4 KV heads of 64, untied head, and
SmolLM2's tokenizer (its GGUF metadata copied, vocabulary 49152), so that both engines read
text the same way. Linear layers and the head in `--type`, the embedding in Q8_0, norms f32;
weights N(0, 0.02) (seed 0), norms 1.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from bitsmith.llm.sources import smollm2_path

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 2048, 5632, 32, 4, 64


def copy_tokenizer(writer: GGUFWriter, source: Path) -> int:
    """Every `tokenizer.*` key of `source` into `writer`; returns the vocabulary size."""
    reader = GGUFReader(source)
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            sub = field.types[1]
            if sub == GGUFValueType.STRING:
                values = [bytes(v).decode("utf-8") for v in items]
            else:
                values = [v.tolist()[0] for v in items]
            writer.add_array(key, values)
            if key == "tokenizer.ggml.tokens":
                vocab = len(values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            value = field.parts[field.data[0]].tolist()[0]
            writer.add_key_value(key, value, kind)
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="Q4_0", choices=("Q4_0", "Q4_1", "Q8_0"))
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    qtype = GGMLQuantizationType[args.type]
    writer = GGUFWriter(args.out, "llama")
    vocab = copy_tokenizer(writer, smollm2_path())
    writer.add_name("synthetic TinyLlama-1.1B shapes")
    writer.add_block_count(args.layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def linear(name: str, rows: int, cols: int, kind: GGMLQuantizationType = qtype) -> None:
        w = (rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float32)
        writer.add_tensor(name, quantize(w, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(HIDDEN, np.float32))

    linear("token_embd.weight", vocab, HIDDEN, GGMLQuantizationType.Q8_0)
    for i in range(args.layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        linear(p + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        linear(p + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear(p + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear(p + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        norm(p + "ffn_norm.weight")
        linear(p + "ffn_gate.weight", FFN, HIDDEN)
        linear(p + "ffn_up.weight", FFN, HIDDEN)
        linear(p + "ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    linear("output.weight", vocab, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
