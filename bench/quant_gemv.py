"""Batch-1 dequant-GEMV against the memory-bandwidth limit and torch, all in one run.

    python bench/quant_gemv.py [--bits 2 3 4 5 6 8] [--shapes 4096x4096 11008x4096]
                               [--group 128] [--repeat 5] [--rounds 7]

For each shape and width, a module of C independent `quant.linear` layers (random codes and
scales, asymmetric, groups of --group along K) is compiled through bitsmith's normal path and
run as a decode step would: layer after layer, each reading its own weights, C chosen so the
weights total at least 4x the last-level cache; every layer call is timed (median over
--repeat runs of the whole chain). Bytes moved = packed codes + scales + zero points (+ x and y).

The DRAM read bandwidth is measured in the same run by a TVM kernel that sums a 1 GiB buffer
with every core (the best of 3 passes). The machine is shared, and what neighbours leave of
the bandwidth drifts, so each row is --rounds rounds of (bandwidth, then the kernel): the
fraction reported is the median of the per-round fractions, the time the median time.
torch's f32 and bf16 `F.linear` at batch 1 run over
rotating weights of the same total size (at least 4x the LLC as well).

With f32 activations every weight costs at least one f32 FMA, so a width's bandwidth fraction
is also bounded by compute: "FMA ceiling" is (the machine's f32 FMA rate, taken from torch's
cache-resident f32 GEMM in the same run) x (bytes per weight) / (DRAM bandwidth), capped at
100%: the fraction a kernel doing nothing but one FMA per weight would reach.
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch
import tvm
from tvm import te

from bitsmith.autotune.fingerprint import cache_sizes
from bitsmith.codegen.backend import kernels_of
from bitsmith.codegen.template import Config
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates import select
from bitsmith.compiler import build_artifact
from bitsmith.ir import Builder, Module, TensorType, graph
from bitsmith.ir.dialects import func, quant
from bitsmith.ir.dtypes import IntType, f16, f32, u8
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint
from bitsmith.passes import run
from bitsmith.runtime.executor import Executor


class DramMeter:
    """Bytes/s of a parallel, vectorised sum over a 1 GiB buffer (the best of `passes`)."""

    def __init__(self, cores: int) -> None:
        rows, cols = 1 << 14, 1 << 14  # 2**28 floats = 1 GiB
        a = te.placeholder((rows, cols), "float32", name="a")
        r16 = te.reduce_axis((0, cols // 16), name="c")
        part = te.compute((rows, 16), lambda r, lane: te.sum(a[r, r16 * 16 + lane], axis=r16),
                          name="part")
        sch = tvm.s_tir.Schedule(te.create_prim_func([a, part]))
        r, lane, c = sch.get_loops(sch.get_sblock("part"))
        sch.reorder(r, c, lane)
        sch.parallel(r)
        sch.vectorize(lane)
        lib = tvm.compile(sch.mod, target=tvm.target.Target(
            {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
             "num-cores": cores}))
        self.nbytes = rows * cols * 4
        self.data = tvm.runtime.tensor(np.ones((rows, cols), np.float32))
        self.out = tvm.runtime.tensor(np.zeros((rows, 16), np.float32))
        self.fn = lib["main"]
        self.fn(self.data, self.out)

    def measure(self, passes: int = 3) -> float:
        return self.nbytes / min(_timed(lambda: self.fn(self.data, self.out))
                                 for _ in range(passes))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def qgemv_module(n: int, k: int, bits: int, group: int, copies: int, seed: int = 0) -> Module:
    """x [1, K] -> C quant.linear layers, each with its own random packed weight."""
    rng = np.random.default_rng(seed)
    qt = QuantType(IntType(bits, False), group, GroupAxis.OUT, f16, ZeroPoint.INT)
    shape = quant.scale_shape(qt, (n, k))
    module = Module(f"qgemv_w{bits}", [TensorType((1, k), f32)], ["x"])
    b = Builder.at_end(module.body)
    outs = []
    for c in range(copies):
        codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
        module.weights[f"w{c}"] = pack_rows(codes, bits)
        module.weights[f"s{c}"] = (rng.random(shape, np.float32) * 0.01).astype(np.float16)
        module.weights[f"z{c}"] = rng.integers(0, 1 << bits, shape, dtype=np.uint8)
        w = b.value(graph.ConstantOp, weight=f"w{c}", result_types=[TensorType((n, k), qt)])
        s = b.value(graph.ConstantOp, weight=f"s{c}", result_types=[TensorType(shape, f16)])
        z = b.value(graph.ConstantOp, weight=f"z{c}", result_types=[TensorType(shape, u8)])
        outs.append(b.value(quant.LinearOp, module.inputs[0], w, s, z))
    b.create(func.ReturnOp, *outs)
    return module


def rounds(meter: DramMeter, timed, count: int) -> tuple[float, float, float]:
    """`count` rounds of (DRAM bandwidth, then `timed()` seconds), side by side so that both
    see the same neighbours: the median time, the median of the per-round ratios of achieved
    bytes/s to bandwidth (as seconds * bandwidth) and the median bandwidth."""
    times, ratios, bws = [], [], []
    for _ in range(count):
        bw = meter.measure()
        t = timed()
        times.append(t)
        ratios.append(t * bw)
        bws.append(bw)
    return statistics.median(times), statistics.median(ratios), statistics.median(bws)


def fma_rate(size: int = 1024, passes: int = 5) -> float:
    """f32 multiply-adds per second of torch's GEMM on cache-resident [size, size] matrices
    (the best of `passes`): what a tuned library reaches on this machine's FMA units."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return size ** 3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(passes))


def chain_timer(executor: Executor, x: np.ndarray, repeat: int):
    """Median seconds of one layer call, over `repeat` runs of the whole chain."""
    return lambda: statistics.median(t for _, t in executor.profile(x, repeat=repeat))


def torch_timer(n: int, k: int, dtype: torch.dtype, llc: int, repeat: int):
    """Median seconds of F.linear at batch 1 over weights rotating through >= 4x the LLC."""
    size = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, -(-4 * llc // size))
    ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k).to(dtype)

    def timed() -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeat):
                for w in ws:
                    times.append(_timed(partial(torch.nn.functional.linear, x, w)))
        return statistics.median(times)
    timed()
    return timed


def decode_configs(module: Module, decode: str) -> dict[str, Config] | None:
    """Each kernel's default config with DECODE set to `decode` (None: the defaults)."""
    if decode == "default":
        return None
    target = host_target()
    configs = {}
    for op in kernels_of(module):
        template, problem = select(op, target)
        config = template.default_config(problem, target)
        if "DECODE" in config:
            configs[op.kernel_name] = Config({**config, "DECODE": decode})
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode", nargs="+", default=["default"],
                        choices=["default", "subnormal", "magic", "convert"],
                        help="qdense DECODE to run (default: the template's default for this "
                             "host); several give one row each, side by side")
    args = parser.parse_args()
    llc, cores = cache_sizes()["l3"] or 32 << 20, host_target().cores
    torch.set_num_threads(cores)
    meter = DramMeter(cores)
    fmas = fma_rate()
    rows: list[tuple] = []
    for text in args.shapes:
        n, k = map(int, text.split("x"))
        t32, c32, _ = rounds(meter, torch_timer(n, k, torch.float32, llc, 3), args.rounds)
        t16, c16, _ = rounds(meter, torch_timer(n, k, torch.bfloat16, llc, 3), args.rounds)
        rows.append((f"{n}x{k}", "torch f32", "", n * k * 4, t32, c32, None, None, None))
        rows.append((f"{n}x{k}", "torch bf16", "", n * k * 2, t16, c16, None, None, None))
        for bits, decode in [(b, d) for b in args.bits for d in args.decode]:
            probe = qgemv_module(n, k, bits, args.group, 1)
            layer_bytes = sum(a.nbytes for a in probe.weights.values()) + (k + n) * 4
            copies = max(2, -(-4 * llc // layer_bytes))
            module = qgemv_module(n, k, bits, args.group, copies)
            run(module, "fuse", verify=False)
            executor = Executor(build_artifact(module, configs=decode_configs(module, decode)))
            x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
            t, cost, bw = rounds(meter, chain_timer(executor, x, args.repeat), args.rounds)
            ceiling = min(1.0, fmas * layer_bytes / (n * k) / bw)
            templates = {s["template"] for s in executor.plan["steps"]}
            label = ",".join(sorted(templates)) + ("" if decode == "default" else f" {decode}")
            rows.append((f"{n}x{k}", f"{bits} ({label})", copies,
                         layer_bytes, t, cost, t32 / t, t16 / t, ceiling))
            print(f"{n}x{k} w{bits}: {t * 1e6:.0f} us", flush=True)
    print(f"\nLLC {llc >> 20} MiB, {cores} cores; {args.rounds} rounds of (DRAM read "
          f"bandwidth, kernel) per row, medians; f32 FMA rate (torch GEMM) "
          f"{fmas / 1e9:.0f} G/s\n")
    print("| weight | bits | layers | MiB/layer | us/layer | GB/s | % of DRAM BW "
          "| vs torch f32 | vs torch bf16 | FMA ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, what, copies, nbytes, t, cost, r32, r16, ceiling in rows:
        ratios = "| | | |" if r32 is None else \
            f"| {r32:.1f}x | {r16:.1f}x | {ceiling:.0%} |"
        print(f"| {shape} | {what} | {copies} | {nbytes / 2**20:.2f} | {t * 1e6:.0f} | "
              f"{nbytes / t / 1e9:.1f} | {nbytes / cost:.0%} {ratios}")

if __name__ == "__main__":
    main()
