"""LLM generation, side by side in one run: bitsmith's variants, transformers' `generate`
(torch eager, f32) and llama.cpp (llama-cpp-python) on the same GGUF file, and the
bytes/bandwidth limit.

    python bench/llm.py [--model smollm2] [--variants gguf gguf/int8 f32 w4g128:gptq ...]
                        [--batch 1 8] [--prompt-len 128 512] [--gen-len 64] [--rounds 3]
                        [--ppl-tokens 8192] [--no-rivals] [--no-hf]

A variant is a quant spec (`gguf`: the file's own blocks; `f32`; `w4g128:gptq`, ...),
optionally `+a8` (the quantized layers on int8 activation blocks: `act="int8"`) and `/KV`, the
cache's element type (default --kv). Per variant: prefill tokens/s
of a --prompt-len prompt (and the time to its first token),
decode tokens/s at each --batch (B sequences stepping together, --gen-len steps after a
32-token prompt each). Rounds interleave every variant and rival; the table shows medians.
Every rival's greedy tokens are checked against bitsmith's before it is timed. The bandwidth
limit of a decode step is (bytes of the weights it reads + its KV bytes) / DRAM read bandwidth
measured in the same run (`quant_gemv.DramMeter`); weights that fit the last-level cache beat
it. Then perplexity on the first --ppl-tokens tokens of `pydoc_data.topics` in windows of 512,
per variant. Threads: 2 everywhere (torch, llama.cpp, TVM's pool from the machine's cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import bitsmith.llm as bllm
from bitsmith.llm.measure import decode_rate, prefill_seconds
from bitsmith.llm.sources import smollm2_path

sys.path.insert(0, os.path.dirname(__file__))
from quant_gemv import DramMeter  # noqa: E402

THREADS = 2


def _text_ids(llm: Any, count: int) -> list[int]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    return llm.tokenizer.encode(text)[:count]


def decode_bytes(llm: Any, context: int) -> int:
    """Bytes a batch-1 decode step reads: the weights its kernels take, and the KV cache of
    `context` positions."""
    entry = min(llm.engine.entries, key=lambda e: (e.tokens, e.batch))
    plan, weights = entry.executor.plan, entry.executor.artifact.weights
    used = {plan["weights"][v] for step in plan["steps"] for v in step["inputs"]
            if v in plan["weights"]}
    layout = llm.engine.layout
    kv = layout.page_bytes() // layout.page_size * context
    return sum(weights[n].nbytes for n in used) + kv


class HfRival:
    """transformers' model on the same GGUF file, float32, torch eager."""

    def __init__(self, path: Any) -> None:
        import torch
        import transformers
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()

    def greedy(self, ids: list[int], new: int) -> list[int]:
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=new,
                                      do_sample=False)
        return out[0, len(ids):].tolist()

    def prefill(self, ids: list[int]) -> float:
        with self.torch.no_grad():
            start = time.perf_counter()
            self.model(self.torch.tensor([ids]))
            return time.perf_counter() - start

    def decode(self, batch: int, steps: int) -> float:
        torch = self.torch
        ids = torch.arange(10, 42).repeat(batch, 1)
        with torch.no_grad():
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=steps, min_new_tokens=steps,
                                do_sample=False)
            total = time.perf_counter() - start
            start = time.perf_counter()
            self.model(ids)
            prefill = time.perf_counter() - start
        return batch * steps / max(total - prefill, 1e-9)


class LlamaCppRival:
    """llama.cpp through llama-cpp-python on the same GGUF file."""

    def __init__(self, path: Any, n_ctx: int) -> None:
        from llama_cpp import Llama
        self.llm = Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=n_ctx,
                         n_batch=512, verbose=False, logits_all=False)

    def greedy(self, ids: list[int], new: int) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == new:
                break
        return out

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def perplexity(self, ids: list[int], window: int) -> float:
        """As `LLM.perplexity`: independent windows, each window's first token context only
        (a second context that keeps every position's logits)."""
        import numpy as np
        from llama_cpp import Llama
        scorer = Llama(self.llm.model_path, n_threads=THREADS, n_threads_batch=THREADS,
                       n_ctx=window, n_batch=window, verbose=False, logits_all=True)
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                break
            scorer.reset()
            scorer.eval(chunk)
            logits = np.asarray(scorer.scores[:len(chunk) - 1], np.float64)
            top = logits.max(axis=1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
        return float(np.exp(nll / count))

    def decode(self, batch: int, steps: int) -> float:
        if batch != 1:
            return float("nan")  # one sequence per context in llama-cpp-python
        self.llm.reset()
        self.llm.eval(list(range(10, 42)))
        start = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([7])
        return steps / (time.perf_counter() - start)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", nargs="+", default=[
        "gguf", "gguf+a8", "gguf/int8", "f32", "w8g128", "w4g128", "w4g128:gptq",
        "w3g128:gptq:rot"])
    parser.add_argument("--kv", default="f16")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--no-rivals", action="store_true")
    parser.add_argument("--no-hf", action="store_true",
                        help="leave transformers out (a model too large for its f32 decode)")
    args = parser.parse_args()
    max_batch = max(args.batch)
    max_seq = max(max(args.prompt_len), 512) + args.gen_len + 64
    llms: dict[str, Any] = {}
    for variant in args.variants:
        start = time.perf_counter()
        spec, _, kv = variant.partition("/")
        spec, a8, _ = spec.partition("+a8")
        quant = None if spec == "gguf" else spec
        llms[variant] = bllm.compile(args.model, quant=quant, kv=kv or args.kv,
                                     act="int8" if a8 else "f32",
                                     max_batch=max_batch, max_seq=max_seq, prefill=(128,),
                                     score_chunk=128)
        print(f"compiled {variant} in {time.perf_counter() - start:.0f} s", flush=True)
    reference = next(iter(llms.values()))
    prompts = {n: _text_ids(reference, n) for n in args.prompt_len}
    rivals: dict[str, Any] = {}
    if not args.no_rivals and (args.model == "smollm2" or args.model.endswith(".gguf")):
        path = smollm2_path() if args.model == "smollm2" else args.model
        check = reference.tokenizer.encode("The capital of France is")
        ours = reference.complete([check], max_new_tokens=8, ignore_eos=True)[0].token_ids
        makers = [("transformers f32", lambda: HfRival(path)),
                  ("llama.cpp", lambda: LlamaCppRival(path, max_seq))]
        for name, make in makers[1:] if args.no_hf else makers:
            rival = make()
            theirs = rival.greedy(check, 8)
            agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(f"{name}: greedy tokens {theirs} vs bitsmith {args.variants[0]} {ours}: "
                  f"{agree}/8 agree", flush=True)
            if agree < 4:
                print(f"  {name} disagrees with bitsmith on the first tokens: not timed")
                continue
            rivals[name] = rival
    meter = DramMeter(os.cpu_count() or 1)
    timings: dict[tuple[str, str], list[float]] = {}
    bandwidth: list[float] = []

    def record(key: tuple[str, str], fn: Callable[[], float]) -> None:
        timings.setdefault(key, []).append(fn())

    for r in range(args.rounds):
        bandwidth.append(meter.measure())
        for name, llm in llms.items():
            for n, ids in prompts.items():
                record((name, f"prefill{n}"), lambda llm=llm, ids=ids: prefill_seconds(llm, ids))
            for b in args.batch:
                record((name, f"decode{b}"), lambda llm=llm, b=b: decode_rate(
                    llm, b, args.gen_len))
        for name, rival in rivals.items():
            for n, ids in prompts.items():
                record((name, f"prefill{n}"), lambda rival=rival, ids=ids: rival.prefill(ids))
            for b in args.batch:
                record((name, f"decode{b}"), lambda rival=rival, b=b: rival.decode(
                    b, args.gen_len))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print_table(args, llms, rivals, timings, median(bandwidth))
    if args.ppl_tokens:
        print_perplexity(_text_ids(reference, args.ppl_tokens), llms, rivals)


def print_perplexity(ids: list[int], llms: dict[str, Any], rivals: dict[str, Any]) -> None:
    """Perplexity of every variant, and llama.cpp's on the same GGUF file."""
    print(f"\nperplexity, first {len(ids)} tokens of pydoc_data.topics, windows of 512")
    print("| model | perplexity |\n|---|---|")
    for name, llm in llms.items():
        print(f"| {name} | {llm.perplexity(ids, window=512):.3f} |", flush=True)
    if "llama.cpp" in rivals:  # its own Q8 activation blocks, on the same file
        print(f"| llama.cpp | {rivals['llama.cpp'].perplexity(ids, 512):.3f} |", flush=True)


def print_table(args: argparse.Namespace, llms: dict[str, Any], rivals: dict[str, Any],
                timings: dict[tuple[str, str], list[float]], bw: float) -> None:
    """The speed table: one row per bitsmith variant and rival."""
    print(f"\n{args.model}, KV {args.kv}; DRAM read bandwidth {bw / 1e9:.1f} GB/s (median of "
          f"{args.rounds}); medians of {args.rounds} interleaved rounds; {THREADS} threads")
    heads = ([f"prefill {n} tok/s" for n in args.prompt_len]
             + [f"TTFT {n} ms" for n in args.prompt_len]
             + [f"decode b{b} tok/s" for b in args.batch] + ["decode b1 vs llama.cpp",
                                                             "decode b1 % of limit"])
    print("| model | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    cpp = median(timings.get(("llama.cpp", "decode1"), []))
    for name in [*llms, *rivals]:
        cells = [f"{n / median(timings[(name, f'prefill{n}')]):.0f}" for n in args.prompt_len]
        cells += [f"{1e3 * median(timings[(name, f'prefill{n}')]):.0f}" for n in args.prompt_len]
        cells += [f"{median(timings[(name, f'decode{b}')]):.1f}" for b in args.batch]
        d1 = median(timings.get((name, "decode1"), []))
        cells.append(f"{d1 / cpp:.2f}x" if cpp == cpp else "-")
        if name in llms:
            limit = bw / decode_bytes(llms[name], 32 + args.gen_len // 2)
            cells.append(f"{100 * d1 / limit:.0f}% of {limit:.0f}")
        else:
            cells.append("-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
