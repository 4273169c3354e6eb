"""Does bitsmith compile models nobody wrote for it, and match torch? A survey of architectures:
transformers encoders, decoders, vision and audio models and mixtures of experts (tiny configs,
random weights, built offline), CNNs, RNNs and plain torch modules.

For each model: compile with a static batch (the compile checks itself against torch), then
compile with a dynamic batch and compare with torch at two other batch sizes. A model is
"refused" when bitsmith raises its own error (unsupported op, refusal), "wrong" when an output
differs from torch, "crash" for anything else.

    python bench/survey.py                 # every model
    python bench/survey.py --only bert swin --batches 1 5
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
import warnings
from collections.abc import Callable

import torch
import transformers
from rich.console import Console
from rich.table import Table
from torch import nn

import bitsmith
from bitsmith import selfcheck
from bitsmith.errors import BitsmithError, MismatchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = transformers
Inputs = Callable[[int], tuple]


def ids(seq: int = 11, vocab: int = 97, mask: bool = False) -> Inputs:
    def make(batch: int) -> tuple:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randint(1, vocab, (batch, seq), generator=gen)
        if not mask:
            return (x,)
        m = torch.ones(batch, seq, dtype=torch.int64)
        m[-1, -3:] = 0
        return x, m
    return make


def randn(*shape: int) -> Inputs:
    return lambda batch: (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(
        batch)),)


TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=97, max_position_embeddings=64)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
               max_position_embeddings=64, use_cache=False)


class Encoder(nn.Module):
    """An encoder-decoder's encoder, returning its hidden states."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, return_dict=False)[0]


def hf(cls: str, config: str, **kw: object) -> Callable[[], nn.Module]:
    return lambda: getattr(T, cls)(getattr(T, config)(**kw))


# ---- plain torch -----------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.LeakyReLU(0.1))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear")
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(x)
        u = self.up(self.mid(self.pool(d)))
        y = self.out(torch.cat([d, u], 1))
        return self.up2(y)


class MobileBlock(nn.Module):
    """MobileNetV3's inverted residual with squeeze-excite and hard activations."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24),
                                nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 6, 1), nn.ReLU(),
                                nn.Conv2d(6, 24, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        return x + self.project(y * self.se(y))


class DenseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(4 + 4 * i), nn.ReLU(), nn.Conv2d(4 + 4 * i, 4, 3,
                                                                          padding=1))
            for i in range(3))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(x.mean((2, 3)))


class RNNClassifier(nn.Module):
    def __init__(self, cell: str, bidirectional: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.rnn = getattr(nn, cell)(12, 16, num_layers=2, batch_first=True,
                                     bidirectional=bidirectional)
        self.head = nn.Linear(16 * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


class SeqFirstEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(24, 4, 48, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.transpose(0, 1)).transpose(0, 1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(24, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class BagClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(97, 16, mode="mean")
        self.head = nn.Sequential(nn.Linear(16, 8), nn.ELU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(x))


class MoE(nn.Module):
    """Top-2 routing over 8 expert MLPs, as mixture-of-experts layers write it."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(16, 8)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(),
                                                   nn.Linear(32, 16)) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            gate = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + gate * expert(x)
        return out


class Audio1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 8, 5, stride=2), nn.GroupNorm(4, 8), nn.GELU(),
                                 nn.Conv1d(8, 16, 3, stride=2), nn.ReLU(),
                                 nn.ConvTranspose1d(16, 4, 4, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS: dict[str, tuple[str, Callable[[], nn.Module], Inputs]] = {
    # transformers encoders
    "bert-seqcls": ("encoder", hf("BertForSequenceClassification", "BertConfig", **TEXT),
                    ids(mask=True)),
    "distilbert": ("encoder", hf("DistilBertModel", "DistilBertConfig", dim=32, n_layers=2,
                                 n_heads=4, hidden_dim=64, vocab_size=97), ids(mask=True)),
    "albert": ("encoder", hf("AlbertModel", "AlbertConfig", embedding_size=16, **TEXT),
               ids(mask=True)),
    "electra": ("encoder", hf("ElectraModel", "ElectraConfig", embedding_size=16, **TEXT),
                ids(mask=True)),
    "roberta-mlm": ("encoder", hf("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1,
                                  **TEXT), ids()),
    "deberta-v2": ("encoder", hf("DebertaV2Model", "DebertaV2Config", **TEXT), ids(mask=True)),
    "mpnet": ("encoder", hf("MPNetModel", "MPNetConfig", **TEXT), ids(mask=True)),
    "t5-encoder": ("encoder", hf("T5EncoderModel", "T5Config", d_model=32, d_kv=8, d_ff=64,
                                 num_layers=2, num_heads=4, vocab_size=97), ids()),
    "bart-encoder": ("encoder", lambda: Encoder(T.BartModel(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=97,
        max_position_embeddings=64))), ids()),
    # transformers decoders
    "gpt2": ("decoder", hf("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4,
                           vocab_size=97, n_positions=64, use_cache=False, bos_token_id=0,
                           eos_token_id=0), ids()),
    "llama": ("decoder", hf("LlamaForCausalLM", "LlamaConfig", **DECODER), ids()),
    "mistral": ("decoder", hf("MistralForCausalLM", "MistralConfig", **DECODER), ids()),
    "qwen2": ("decoder", hf("Qwen2ForCausalLM", "Qwen2Config", **DECODER), ids()),
    "gemma": ("decoder", hf("GemmaForCausalLM", "GemmaConfig", head_dim=8, **DECODER), ids()),
    "phi": ("decoder", hf("PhiForCausalLM", "PhiConfig", **DECODER), ids()),
    "opt": ("decoder", hf("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=64,
                          num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
                          max_position_embeddings=64, word_embed_proj_dim=32,
                          use_cache=False), ids()),
    "gpt-neox": ("decoder", hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **{
        k: v for k, v in DECODER.items() if k != "num_key_value_heads"}), ids()),
    "bloom": ("decoder", hf("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2,
                            n_head=4, vocab_size=97, use_cache=False), ids()),
    # mixtures of experts
    "mixtral": ("moe", hf("MixtralForCausalLM", "MixtralConfig", num_local_experts=4,
                          num_experts_per_tok=2, experts_implementation="batched_mm",
                          **DECODER), ids()),
    "qwen2-moe": ("moe", hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32,
                            experts_implementation="batched_mm", **DECODER), ids()),
    "moe-layer": ("moe", MoE, randn(5, 16)),
    # vision
    "vit": ("vision", hf("ViTModel", "ViTConfig", hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, image_size=32,
                         patch_size=8), randn(3, 32, 32)),
    "deit": ("vision", hf("DeiTModel", "DeiTConfig", hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64, image_size=32,
                          patch_size=8), randn(3, 32, 32)),
    "swin": ("vision", hf("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                          depths=[2, 2], num_heads=[2, 4], window_size=4), randn(3, 32, 32)),
    "convnext": ("vision", hf("ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32],
                              depths=[1, 1], num_stages=2), randn(3, 64, 64)),
    "resnet-hf": ("vision", hf("ResNetModel", "ResNetConfig", embedding_size=16,
                               hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
                  randn(3, 64, 64)),
    "mobilenet-v2": ("vision", hf("MobileNetV2Model", "MobileNetV2Config", image_size=64,
                                  depth_multiplier=0.35), randn(3, 64, 64)),
    "clip-vision": ("vision", hf("CLIPVisionModel", "CLIPVisionConfig", hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8),
                    randn(3, 32, 32)),
    "segformer": ("vision", hf("SegformerForSemanticSegmentation", "SegformerConfig",
                               hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2,
                               num_attention_heads=[1, 2], sr_ratios=[2, 1],
                               decoder_hidden_size=32, strides=[4, 2], patch_sizes=[7, 3],
                               mlp_ratios=[2, 2]), randn(3, 32, 32)),
    # audio
    "whisper-encoder": ("audio", lambda: Encoder(T.WhisperModel(T.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=20, vocab_size=97, pad_token_id=1, bos_token_id=0,
        eos_token_id=0, decoder_start_token_id=0))), randn(16, 40)),
    "wav2vec2": ("audio", hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                             do_stable_layer_norm=False), randn(400)),
    "audio-conv1d": ("audio", Audio1d, randn(1, 101)),
    # CNNs
    "resnet-zoo": ("cnn", lambda: bitsmith.models.get("resnet").build(),
                   lambda b: tuple(bitsmith.models.get("resnet").example_inputs(b))),
    "unet": ("cnn", UNet, randn(3, 16, 16)),
    "mobilenet-v3-block": ("cnn", MobileBlock, randn(8, 13, 13)),
    "densenet-block": ("cnn", DenseBlock, randn(4, 9, 9)),
    # RNNs
    "lstm": ("rnn", lambda: RNNClassifier("LSTM", False), ids(vocab=50)),
    "bi-lstm": ("rnn", lambda: RNNClassifier("LSTM", True), ids(vocab=50)),
    "bi-gru": ("rnn", lambda: RNNClassifier("GRU", True), ids(vocab=50)),
    # plain modules
    "transformer-seq-first": ("plain", SeqFirstEncoder, randn(7, 24)),
    "multihead-attention": ("plain", Attention, randn(7, 24)),
    "embedding-bag": ("plain", BagClassifier, ids(seq=6)),
}


def _own_models() -> dict[str, tuple[str, Callable[[], nn.Module], Inputs]]:
    """The project's own test models: the zoo and the transformers configs tests use."""
    from bitsmith import models  # noqa: PLC0415
    from bitsmith.models.hf import ARCHS  # noqa: PLC0415

    own: dict[str, tuple[str, Callable[[], nn.Module], Inputs]] = {}
    for name in models.names():
        spec = models.get(name)
        own[f"zoo-{name}"] = ("own", spec.build,
                              lambda b, spec=spec: tuple(spec.example_inputs(b)))
    for name, (build, make) in ARCHS.items():
        own[f"own-hf-{name}"] = ("own", build, make)
    return own


MODELS = {**_own_models(), **{k: v for k, v in MODELS.items() if k != "resnet-zoo"}}


def outcome(fn: Callable[[], None]) -> str:
    try:
        fn()
    except MismatchError as exc:
        return "wrong: " + str(exc).splitlines()[0][:160]
    except BitsmithError as exc:
        return f"refused: {type(exc).__name__}: " + " ".join(str(exc).split())[:200]
    except Exception as exc:  # noqa: BLE001 - a survey records every failure
        trace = traceback.extract_tb(exc.__traceback__)[-1]
        return (f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"
                f" ({os.path.basename(trace.filename)}:{trace.lineno})")
    return "ok"


def survey(name: str, build: Callable[[], nn.Module], inputs: Inputs, static: int,
           batches: list[int]) -> tuple[str, str]:
    torch.manual_seed(0)
    try:
        model = build().eval()
    except Exception as exc:  # noqa: BLE001 - the config, not bitsmith: say so and go on
        return f"not built: {type(exc).__name__}: {exc}", "-"
    static_result = outcome(lambda: bitsmith.compile(model, inputs(static), name=name))

    def dynamic() -> None:
        cm = bitsmith.compile(model, inputs(2), name=name, dynamic_batch=True)
        for batch in batches:
            args = inputs(batch)
            got = cm.executor.run(*[a.numpy() for a in args])
            want = selfcheck.torch_outputs(model, args, {})
            diffs = [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                     if (d := selfcheck.difference(g, w, f"batch {batch} output {i}"))]
            if diffs:
                raise MismatchError(diffs[0])
    return static_result, outcome(dynamic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="survey these models only")
    parser.add_argument("--static", type=int, default=3, help="the static compile's batch")
    parser.add_argument("--batches", type=int, nargs=2, default=[1, 5],
                        help="batches the dynamic-batch model runs at")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    table = Table(title=f"survey: static batch {args.static}; dynamic batch at "
                        f"{args.batches[0]} and {args.batches[1]}")
    for col in ("model", "kind", "static", "dynamic", "s"):
        table.add_column(col, overflow="fold")
    counts: dict[str, list[int]] = {}  # "own" / "others": [models, static ok, dynamic ok]
    chosen = args.only or list(MODELS)
    for name in chosen:
        kind, build, inputs = MODELS[name]
        start = time.perf_counter()
        static, dynamic = survey(name, build, inputs, args.static, args.batches)
        row = counts.setdefault("the project's own models" if kind == "own" else
                                "architectures from elsewhere", [0, 0, 0])
        row[0] += 1
        row[1] += static == "ok"
        row[2] += dynamic == "ok"
        seconds = time.perf_counter() - start
        console.print(f"{name}: static {static}; dynamic {dynamic} ({seconds:.0f} s)",
                      highlight=False)
        table.add_row(name, kind, static, dynamic, f"{seconds:.0f}")
    console.print(table)
    for group, (total, static_ok, dynamic_ok) in counts.items():
        console.print(f"{group}: {static_ok}/{total} compile and match torch with a static "
                      f"batch of {args.static}; {dynamic_ok}/{total} with a dynamic batch at "
                      f"batches 2 (the compile's check), {args.batches[0]} and "
                      f"{args.batches[1]}", highlight=False)


if __name__ == "__main__":
    main()
