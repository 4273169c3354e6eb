"""`bitsmith generate` and `bitsmith chat`: compile a decoder, then text out, streamed."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import CliError
from .console import err, parse_size, read_key


def add_parsers(sub: Any) -> None:
    """Register `generate` and `chat` on the CLI's subparsers."""
    gen = sub.add_parser("generate", help="compile an LLM and generate text from a prompt")
    _model_args(gen)
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat: the "
                                                     "user's message)")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    gen.add_argument("--system", help="with --chat: a system message first")
    _sampling_args(gen)
    gen.set_defaults(func=run_generate)
    chat = sub.add_parser("chat", help="compile an LLM and chat with it on the terminal")
    _model_args(chat)
    chat.add_argument("--system", help="a system message first")
    _sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="an LLM artifact (.bsm, from --save), or, compiled now: a zoo "
                             "name (llama), an installed model (smollm2), a .gguf file or a "
                             "Hugging Face model directory")
    parser.add_argument("--save", metavar="FILE.bsm",
                        help="write the compiled LLM here (run it later with MODEL=FILE.bsm)")
    parser.add_argument("--key", metavar="KEYFILE",
                        help="sign --save's artifact with this key, or refuse a .bsm that is "
                             "not signed with it")
    parser.add_argument("--kv-memory", type=parse_size, metavar="SIZE",
                        help="KV cache budget, e.g. 512MiB or 2GiB (a bare number is MiB; "
                             "default: what max-batch sequences of max-seq tokens need, at "
                             "most 1GiB)")
    parser.add_argument("--quant", help="quantize the linear layers (e.g. w4g128, w8g128)")
    parser.add_argument("--kv", default="f16", help="KV cache element type: f32, f16, "
                        "bf16, int8 (per token and head scales), int4 (groups of 32)")
    parser.add_argument("--act", default="f32", choices=("f32", "int8"),
                        help="int8: quantized layers run on int8 activation blocks (W4A8 on "
                        "AVX-512 VNNI, as llama.cpp does; about 0.5%% error a layer)")
    parser.add_argument("--max-seq", type=int, default=2048,
                        help="longest sequence, prompt and reply together")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="most sequences a step runs (compile for serving with --save: "
                             "e.g. 8)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="seed of the sampler (default: random)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeat)")


def _compile(args: argparse.Namespace) -> Any:
    key = read_key(args.key) if args.key else None
    memory = args.kv_memory
    start = time.perf_counter()
    if args.model.endswith(".bsm"):
        given = [flag for flag, value, default in (
            ("--quant", args.quant, None), ("--save", args.save, None), ("--kv", args.kv, "f16"),
            ("--act", args.act, "f32"), ("--max-seq", args.max_seq, 2048),
            ("--max-batch", args.max_batch, 1),
            ("--page-size", args.page_size, 16))
            if value != default]
        if given:
            raise CliError(f"{args.model} is compiled already: {', '.join(given)} apply to a "
                           "model compiled now")
        from ..llm.artifact import load  # noqa: PLC0415 - the runtime alone

        llm = load(args.model, key=key, kv_memory=memory)
        err.print(f"[dim]loaded {llm.name} in {time.perf_counter() - start:.1f} s[/]",
                  highlight=False)
        return llm
    from ..llm import compile as compile_llm  # noqa: PLC0415 - the compiler, torch: lazily

    llm = compile_llm(args.model, quant=args.quant, kv=args.kv, act=args.act,
                      max_batch=args.max_batch,
                      max_seq=args.max_seq, page_size=args.page_size, score_chunk=0,
                      kv_memory=memory, progress=sys.stderr.isatty())
    err.print(f"[dim]compiled {llm.name} in {time.perf_counter() - start:.1f} s[/]",
              highlight=False)
    if args.save:
        llm.save(args.save, key=key)
        err.print(f"[dim]saved {args.save}[/]", highlight=False)
    return llm


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": tuple(args.stop)}


def _stream(llm: Any, prompt: Any, params: dict[str, Any]) -> str:
    """Print the reply as it comes; report speed on stderr; return the text."""
    start = time.perf_counter()
    first = None
    count = 0
    text = []
    for delta in llm.stream(prompt, **params):
        if first is None:
            first = time.perf_counter() - start
        count += 1
        text.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    total = time.perf_counter() - start
    if first is not None:
        err.print(f"[dim]first text after {first * 1e3:.0f} ms; {count} pieces of text in "
                  f"{total:.2f} s[/]", highlight=False)
    return "".join(text)


def run_generate(args: argparse.Namespace) -> int:
    """`bitsmith generate`."""
    params = _params(args)
    if args.system and not args.chat:
        raise CliError("--system needs --chat")
    llm = _compile(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt: Any = llm.chat_prompt([*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    _stream(llm, prompt, params)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """`bitsmith chat`: read a message per line from stdin until EOF or an empty line."""
    params = _params(args)
    llm = _compile(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _stream(llm, llm.chat_prompt(messages), params)
        messages.append({"role": "assistant", "content": reply})
