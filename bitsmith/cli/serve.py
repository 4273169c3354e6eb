"""`bitsmith serve` and `bitsmith loadtest`: the runtime only (no torch, no compiler)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import CliError
from .console import err, parse_size, read_key

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?\Z")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def add_parsers(sub: Any) -> None:
    """Register `serve` and `loadtest` on the CLI's subparsers."""
    serve = sub.add_parser("serve", help="serve .bsm artifacts over HTTP (KServe v2; LLMs: "
                                         "OpenAI's /v1 API with continuous batching)")
    serve.add_argument("artifacts", nargs="+", metavar="MODEL.bsm")
    serve.add_argument("--name", action="append", default=[],
                       help="the name of the matching artifact, in order (default: file stem)")
    serve.add_argument("--ray", metavar="ADDRESS",
                       help="serve as Ray Serve replicas on the Ray cluster at ADDRESS ('auto': "
                            "the one 'ray start' made; 'local': a new one in this process; "
                            "needs bitsmith[cluster]); every replica serves every artifact, "
                            "shipped by content digest. For the least overhead per request, "
                            "start the cluster with RAY_SERVE_ENABLE_HA_PROXY=1 "
                            "RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    serve.add_argument("--replicas", type=int, default=1,
                       help="with --ray: how many replicas")
    serve.add_argument("--autoscale", metavar="LOW:HIGH",
                       help="with --ray: between LOW and HIGH replicas, scaled on the requests "
                            "in flight per replica")
    serve.add_argument("--replica-cpus", type=int, default=1, metavar="N",
                       help="with --ray: CPUs each replica reserves and computes on")
    serve.add_argument("--route", choices=("auto", "direct", "prefix", "round-robin"),
                       default=None,
                       help="with --ray: how requests reach replicas. 'prefix': through a "
                            "gateway that sends LLM requests sharing a prompt prefix to the "
                            "replica holding it (with --prefix-cache), unless it is busier than "
                            "the others; 'round-robin': through the gateway, each to the next; "
                            "'direct': Serve's proxy to the least loaded of two replicas, one "
                            "hop less. Default 'auto': prefix when an artifact is an LLM")
    serve.add_argument("--route-slack", type=int, default=4, metavar="N",
                       help="with --route prefix: send a request to the replica holding its "
                            "prefix while that replica has at most N more requests in flight "
                            "than the least busy one")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=32,
                       help="most batch rows run at once (dynamic-batch artifacts); for an "
                            "LLM, most sequences a step runs (at most what it was compiled "
                            "for)")
    serve.add_argument("--token-budget", type=int,
                       help="LLM: tokens a step runs, decodes first then prompt chunks "
                            "(default: its largest compiled prefill chunk)")
    serve.add_argument("--itl-slo-ms", type=float,
                       help="LLM: inter-token latency target: each step's prompt chunks are "
                            "sized from the step latency measured at start-up so that the "
                            "decodes in flight meet it (within --token-budget)")
    serve.add_argument("--policy", default="chunked",
                       choices=("chunked", "prefill-first", "whole"),
                       help="LLM: how steps are filled: chunked (decodes first, then prompt "
                            "chunks), prefill-first (no chunked prefill) or whole (requests "
                            "batched whole); the last two to measure the first against")
    serve.add_argument("--prefix-cache", action="store_true",
                       help="LLM: keep full KV pages for later prompts that start the same way "
                            "(a shared system prompt skips its prefill)")
    serve.add_argument("--kv-memory", type=parse_size, metavar="SIZE",
                       help="LLM: KV cache budget, e.g. 512MiB or 2GiB (a bare number is MiB; "
                            "default: what it was saved with)")
    serve.add_argument("--batch-sizes", metavar="1,2,4,...",
                       help="batch sizes to pad to and warm up (default: powers of two up to "
                            "--max-batch, and --max-batch)")
    serve.add_argument("--max-delay-ms", type=float, default=2.0,
                       help="under load, how long a batch may wait to fill")
    serve.add_argument("--queue-size", type=int, default=256,
                       help="queued requests per model before 503s")
    serve.add_argument("--timeout-ms", type=float, default=1000.0,
                       help="a request's deadline from arrival (504 after it)")
    serve.add_argument("--max-body-mb", type=float, default=64.0,
                       help="largest request body (413 over it)")
    serve.add_argument("--max-pending-body-mb", type=float, default=1024.0,
                       help="most request body bytes being read at once, all connections "
                            "together, each body counted from its Content-Length (503 over "
                            "it); at least --max-body-mb")
    serve.add_argument("--max-response-mb", type=float, default=64.0,
                       help="largest response, bounded before encoding with every number at "
                            "its widest JSON text (413 over it)")
    serve.add_argument("--body-timeout-s", type=float, default=10.0,
                       help="a body must arrive within this, plus 1 s per --min-body-rate-kb "
                            "KiB of it (408 after it, and the connection closed)")
    serve.add_argument("--min-body-rate-kb", type=float, default=64.0,
                       help="KiB/s: a client sending its body at least this fast never times "
                            "out")
    serve.add_argument("--header-timeout-s", type=float, default=10.0,
                       help="a connection whose request headers have not arrived this long "
                            "after it opened (or after the request's first byte) is closed "
                            "(408 if part of a request came)")
    serve.add_argument("--drain-grace-ms", type=float, default=500.0,
                       help="on SIGTERM, how long the server keeps listening while it drains "
                            "(answering 503 with Connection: close) before it closes the "
                            "listener and finishes the requests it accepted")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--key", metavar="KEYFILE",
                       help="refuse any artifact not signed with the key in KEYFILE "
                            "(bitsmith compile --sign KEYFILE)")
    serve.set_defaults(func=cmd_serve)

    load = sub.add_parser("loadtest", help="load-test a bitsmith (or any KServe v2) server on "
                                           "this machine")
    load.add_argument("target", help="host:port or URL, e.g. localhost:8000")
    load.add_argument("--model", required=True)
    load.add_argument("--concurrency", type=int, default=32,
                      help="closed loop: clients each sending when answered (default 32)")
    load.add_argument("--rate", type=float,
                      help="open loop instead: requests per second, whatever the answers")
    load.add_argument("--max-inflight", type=int, default=1024,
                      help="open loop: most outstanding requests (more are counted not sent)")
    load.add_argument("--duration", default="30s", help="e.g. 30s, 2m, 500ms")
    load.add_argument("--rows", type=int, default=1, help="batch rows per request")
    load.add_argument("--dim", action="append", default=[], metavar="INPUT=SIZE",
                      help="size of an input's variable non-batch dim")
    load.add_argument("--body", metavar="REQUEST.json",
                      help="send this request body instead of one built from the metadata")
    load.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    load.add_argument("--allow-remote", action="store_true",
                      help="allow a target that is not a loopback address")
    load.add_argument("--openai", action="store_true",
                      help="an OpenAI-compatible LLM server: streamed /v1/completions; reports "
                           "output tokens/s, TTFT and inter-token latency")
    load.add_argument("--prompt-len", default="64:512",
                      help="--openai: prompt words, N or LOW:HIGH (uniform)")
    load.add_argument("--gen-len", default="16:256",
                      help="--openai: max_tokens of each request, N or LOW:HIGH (uniform)")
    load.add_argument("--shared-prefix", type=int, default=0,
                      help="--openai: words of a system prompt every request starts with")
    load.set_defaults(func=cmd_loadtest)


def parse_duration(text: str) -> float:
    """'30s', '2m', '500ms', '1.5h' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise CliError(f"expected a duration such as 30s, 2m or 500ms, got {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the artifacts and serve them until SIGTERM/Ctrl-C (then drain)."""
    from ..serving.loading import LoadOptions, load_served  # noqa: PLC0415 - TVM's runtime
    from ..serving.ray_serve import resolve_route, serve_until_signalled  # noqa: PLC0415
    from ..serving.server import ServeOptions, make_server  # noqa: PLC0415

    if (args.replicas != 1 or args.autoscale or args.route or args.replica_cpus != 1) \
            and not args.ray:
        raise CliError("--replicas, --autoscale, --replica-cpus and --route are Ray Serve's: "
                       "give --ray ADDRESS too")
    if args.route_slack < 0:
        raise CliError(f"--route-slack must be >= 0, got {args.route_slack}")
    if args.replica_cpus < 1:
        raise CliError(f"--replica-cpus must be >= 1, got {args.replica_cpus}")
    if args.replicas < 1:
        raise CliError(f"--replicas must be >= 1, got {args.replicas}")
    if len(args.name) > len(args.artifacts):
        raise CliError(f"expected at most one --name per artifact ({len(args.artifacts)}), "
                       f"got {len(args.name)}")
    if not args.max_pending_body_mb > 0 or args.max_pending_body_mb < args.max_body_mb:
        raise CliError(f"--max-pending-body-mb must be > 0 and >= --max-body-mb "
                       f"({args.max_body_mb:g}), got {args.max_pending_body_mb:g}")
    sizes = _int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None
    key = read_key(args.key) if args.key else None
    slo = None
    if args.itl_slo_ms is not None:
        if not args.itl_slo_ms > 0 or args.policy != "chunked":
            raise CliError(f"--itl-slo-ms must be > 0 ms with --policy chunked, got "
                           f"{args.itl_slo_ms:g} with --policy {args.policy}")
        slo = args.itl_slo_ms / 1e3
    load = LoadOptions(max_batch=args.max_batch, batch_sizes=tuple(sizes) if sizes else None,
                       key=key, kv_memory=args.kv_memory, token_budget=args.token_budget,
                       queue_size=args.queue_size, prefix_cache=args.prefix_cache,
                       policy=args.policy, itl_slo=slo)
    named = [(args.name[i] if i < len(args.name) else Path(path).stem, path)
             for i, path in enumerate(args.artifacts)]
    models, llms = [], []
    for name, path in ([] if args.ray else named):
        kind, served = load_served(path, name, load)
        if kind == "llm":
            llms.append(served)
            blocks = served.llm.engine.blocks
            err.print(f"LLM [bold]{name}[/] from {path}: up to "
                      f"{served.scheduler.max_batch} sequences a step, "
                      f"{served.scheduler.token_budget} tokens a step"
                      f"{'' if slo is None else f' within an ITL of {args.itl_slo_ms:g} ms'}, "
                      f"{blocks.num_pages} KV "
                      f"pages of {blocks.page_size} tokens (OpenAI API at /v1)", highlight=False)
            continue
        models.append(served)
        batching = (f"batch sizes {', '.join(map(str, served.sizes))}" if served.batchable
                    else "no batching (dim 0 is not a batch dim of every input and output)")
        err.print(f"model [bold]{name}[/] from {path}: {batching}", highlight=False)
    options = ServeOptions(max_delay_ms=args.max_delay_ms, queue_size=args.queue_size,
                           timeout_ms=args.timeout_ms, max_body_bytes=int(args.max_body_mb * 2**20),
                           max_pending_body_bytes=max(int(args.max_pending_body_mb * 2**20), 1),
                           max_response_bytes=int(args.max_response_mb * 2**20),
                           body_timeout_s=args.body_timeout_s,
                           min_body_rate=int(args.min_body_rate_kb * 2**10),
                           header_timeout_s=args.header_timeout_s,
                           drain_grace_ms=args.drain_grace_ms)
    if args.ray:
        scaling = ({"autoscale": _autoscale(args.autoscale)} if args.autoscale
                   else {"replicas": args.replicas})
        route = resolve_route(args.route or "auto", named)
        how = {"direct": "Serve's proxy to the less busy of two replicas",
               "prefix": f"a gateway, LLM requests by prompt prefix (slack "
                         f"{args.route_slack} requests)",
               "round-robin": "a gateway, each request to the next replica"}[route]
        err.print(f"deploying {len(named)} artifact(s) on the Ray cluster at {args.ray}, "
                  + (f"{args.autoscale} replicas (autoscaled)" if args.autoscale
                     else f"{args.replicas} replica(s)") + f" of {args.replica_cpus} CPU(s)"
                  + f", at http://{args.host}:{args.port}; routed by {how}", highlight=False)
        if route == "prefix" and not args.prefix_cache:
            err.print("note: without --prefix-cache no replica keeps a prompt's prefix, so "
                      "prefix routing only balances load", highlight=False)
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            err.print("note: Serve's own HTTP proxy adds milliseconds to each request; a "
                      "cluster started with RAY_SERVE_ENABLE_HA_PROXY=1 "
                      "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 puts HAProxy in front of the replicas "
                      "instead (see bench/scale_out.py --serving)", highlight=False)
        serve_until_signalled(named, load, options, address=args.ray, host=args.host,
                              port=args.port, route=route, cpus=args.replica_cpus,
                              slack=args.route_slack, **scaling)
        return 0
    server = make_server(models, options, host=args.host, port=args.port,
                         log_level=args.log_level, access_log=args.access_log, llms=llms)
    server.run()
    return 0


def _autoscale(text: str) -> tuple[int, int]:
    """--autoscale LOW:HIGH."""
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise CliError(f"--autoscale expected LOW:HIGH replicas with 1 <= LOW <= HIGH, got "
                       f"{text!r}")
    return int(low), int(high)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"{flag}: expected comma-separated ints, got {text!r}") from None


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Run the load and print throughput, latency percentiles and errors by status."""
    from ..serving import loadtest  # noqa: PLC0415 - aiohttp: only this command needs it

    url = loadtest.normalize_url(args.target)
    duration = parse_duration(args.duration)
    if args.openai:
        return _openai_load(args, url, duration)
    dims = dict(_dim(d) for d in args.dim)
    try:
        if not args.allow_remote:
            loadtest.check_loopback(url)
        if args.body:
            body = Path(args.body).read_bytes()
        else:
            metadata = loadtest.run(loadtest.fetch_metadata(url, args.model))
            body = loadtest.request_body(metadata, args.rows, dims)
        mode = (f"{args.rate:g} req/s open loop" if args.rate
                else f"{args.concurrency} concurrent clients")
        with _load_bar(f"{args.model} @ {url}: {mode}", duration) as show:

            def tick(elapsed: float, report: Any) -> None:
                show(elapsed, f"{report.ok / max(elapsed, 1e-9):.0f} ok/s, "
                              f"{sum(report.statuses.values()) - report.ok} errors")

            report = loadtest.run(loadtest.run_load(
                url, args.model, body, duration=duration, concurrency=args.concurrency,
                rate=args.rate, max_inflight=args.max_inflight, on_tick=tick))
    except OSError as exc:
        raise CliError(str(exc)) from None
    doc = report.to_json()
    if args.json:
        print(json.dumps(doc))
    table = Table(title=f"{args.model}: {mode}, {doc['seconds']:.1f} s")
    for col in ("requests", "ok/s", "p50 ms", "p90 ms", "p99 ms", "errors by status"):
        table.add_column(col, justify="right")
    errors = ", ".join(f"{k}: {v}" for k, v in doc["errors"].items()) or "none"
    if doc["not_sent"]:
        errors += f" (not sent, over --max-inflight: {doc['not_sent']})"
    table.add_row(str(doc["requests"]), f"{doc['throughput']:.1f}", _fmt(doc["p50_ms"]),
                  _fmt(doc["p90_ms"]), _fmt(doc["p99_ms"]), errors)
    err.print(table)
    return 0


def _openai_load(args: argparse.Namespace, url: str, duration: float) -> int:
    from ..serving import loadtest, loadtest_openai  # noqa: PLC0415 - aiohttp: this command

    try:
        if not args.allow_remote:
            loadtest.check_loopback(url)
        prompt_len = loadtest_openai.parse_lengths(args.prompt_len, "--prompt-len")
        gen_len = loadtest_openai.parse_lengths(args.gen_len, "--gen-len")
        mode = (f"{args.rate:g} req/s Poisson arrivals" if args.rate
                else f"{args.concurrency} concurrent clients")
        with _load_bar(f"{args.model} @ {url}: {mode}", duration) as show:

            def tick(elapsed: float, report: Any) -> None:
                show(elapsed, f"{report.output_tokens / max(elapsed, 1e-9):.0f} tok/s out, "
                              f"{report.ok} done")

            report = loadtest.run(loadtest_openai.run_openai_load(
                url, args.model, duration=duration, concurrency=args.concurrency,
                rate=args.rate, max_inflight=args.max_inflight, prompt_len=prompt_len,
                gen_len=gen_len, shared_prefix=args.shared_prefix, on_tick=tick))
    except OSError as exc:
        raise CliError(str(exc)) from None
    doc = report.to_json()
    if args.json:
        print(json.dumps(doc))
    table = Table(title=f"{args.model}: {mode}, prompts {args.prompt_len} words, outputs "
                        f"{args.gen_len} tokens, {doc['seconds']:.1f} s")
    for col in ("requests", "req/s", "out tok/s", "TTFT p50/p90/p99 ms",
                "ITL p50/p90/p99 ms", "errors by status"):
        table.add_column(col, justify="right")
    errors = ", ".join(f"{k}: {v}" for k, v in doc["errors"].items()) or "none"
    table.add_row(str(doc["requests"]), f"{doc['requests_per_s']:.2f}",
                  f"{doc['output_tokens_per_s']:.1f}",
                  "/".join(_fmt(doc[f"ttft_p{q}_ms"]) for q in (50, 90, 99)),
                  "/".join(_fmt(doc[f"itl_p{q}_ms"]) for q in (50, 90, 99)), errors)
    err.print(table)
    return 0


@contextlib.contextmanager
def _load_bar(label: str, duration: float) -> Iterator[Callable[[float, str], None]]:
    """A progress bar over a load test's duration; yields show(elapsed, status)."""
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task("load", total=duration, status="")
        yield lambda elapsed, status: progress.update(task, completed=min(elapsed, duration),
                                                      status=status)


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def _dim(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name or not size.isdigit():
        raise CliError(f"--dim: expected INPUT=SIZE, got {text!r}")
    return name, int(size)
