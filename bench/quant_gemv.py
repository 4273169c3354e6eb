"""Batch-1 dequant-GEMV against the memory-bandwidth limit and torch, all in one run.

    python bench/quant_gemv.py [--bits 2 3 4 5 6 8] [--shapes 4096x4096 11008x4096]
                               [--group 128] [--repeat 30]

For each shape and width, a module of C independent `quant.linear` layers (random codes and
scales, asymmetric, groups of --group along K) is compiled through bitsmith's normal path and
run as a decode step would: layer after layer, each reading its own weights, C chosen so the
weights total at least 4x the last-level cache; every layer call is timed (median over
--repeat runs of the whole chain). Bytes moved = packed codes + scales + zero points (+ x and y).

The DRAM read bandwidth is measured in the same run by a TVM kernel that sums a 1 GiB buffer
with every core (the best of --repeat). torch's f32 and bf16 `F.linear` at batch 1 run over
rotating weights of the same total size (at least 4x the LLC as well).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import tvm
from tvm import te

from bitsmith.autotune.fingerprint import cache_sizes
from bitsmith.codegen.tvm.target import host_target
from bitsmith.compiler import build_artifact
from bitsmith.ir import Builder, Module, TensorType, graph
from bitsmith.ir.dialects import func, quant
from bitsmith.ir.dtypes import IntType, f16, f32, u8
from bitsmith.ir.packing import pack_rows
from bitsmith.ir.types import GroupAxis, QuantType, ZeroPoint
from bitsmith.passes import run
from bitsmith.runtime.executor import Executor


def dram_read_bandwidth(repeat: int, cores: int) -> float:
    """Bytes/s of a parallel, vectorised sum over a 1 GiB buffer."""
    rows, cols = 1 << 14, 1 << 14  # 2**28 floats = 1 GiB
    a = te.placeholder((rows, cols), "float32", name="a")
    r16 = te.reduce_axis((0, cols // 16), name="c")
    part = te.compute((rows, 16), lambda r, lane: te.sum(a[r, r16 * 16 + lane], axis=r16),
                      name="part")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, part]))
    block = sch.get_sblock("part")
    r, lane, c = sch.get_loops(block)
    sch.reorder(r, c, lane)
    sch.parallel(r)
    sch.vectorize(lane)
    lib = tvm.compile(sch.mod, target=tvm.target.Target(
        {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
         "num-cores": cores}))
    data = tvm.runtime.tensor(np.ones((rows, cols), np.float32))
    out = tvm.runtime.tensor(np.zeros((rows, 16), np.float32))
    fn = lib["main"]
    fn(data, out)
    best = min(_timed(lambda: fn(data, out)) for _ in range(max(5, repeat // 3)))
    return rows * cols * 4 / best


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


def time_chain(executor: Executor, x: np.ndarray, repeat: int) -> float:
    """Median seconds of one layer call, over `repeat` runs of the whole chain."""
    per_kernel = executor.profile(x, repeat=repeat)
    return statistics.median(t for _, t in per_kernel)


def torch_gemv(n: int, k: int, dtype: torch.dtype, llc: int, repeat: int) -> float:
    """Median seconds of F.linear at batch 1 over weights rotating through >= 4x the LLC."""
    size = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, -(-4 * llc // size))
    ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k).to(dtype)
    times = []
    with torch.no_grad():
        for w in ws:
            torch.nn.functional.linear(x, w)
        for _ in range(repeat):
            for w in ws:
                times.append(_timed(lambda: torch.nn.functional.linear(x, w)))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    llc, cores = cache_sizes()["l3"] or 32 << 20, host_target().cores
    torch.set_num_threads(cores)
    bw = dram_read_bandwidth(args.repeat, cores)
    print(f"LLC {llc >> 20} MiB, {cores} cores; measured DRAM read bandwidth {bw / 1e9:.1f} GB/s")
    print("| weight | bits | layers | MiB/layer | us/layer | GB/s | % of DRAM BW "
          "| vs torch f32 | vs torch bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for text in args.shapes:
        n, k = map(int, text.split("x"))
        t32 = torch_gemv(n, k, torch.float32, llc, args.repeat)
        t16 = torch_gemv(n, k, torch.bfloat16, llc, args.repeat)
        print(f"| {n}x{k} | torch f32 | | {n * k * 4 / 2**20:.1f} | {t32 * 1e6:.0f} | "
              f"{n * k * 4 / t32 / 1e9:.1f} | {n * k * 4 / t32 / bw:.0%} | | |")
        print(f"| {n}x{k} | torch bf16 | | {n * k * 2 / 2**20:.1f} | {t16 * 1e6:.0f} | "
              f"{n * k * 2 / t16 / 1e9:.1f} | {n * k * 2 / t16 / bw:.0%} | | |")
        for bits in args.bits:
            probe = qgemv_module(n, k, bits, args.group, 1)
            layer_bytes = sum(a.nbytes for a in probe.weights.values()) + (k + n) * 4
            copies = max(2, -(-4 * llc // layer_bytes))
            module = qgemv_module(n, k, bits, args.group, copies)
            run(module, "fuse", verify=False)
            executor = Executor(build_artifact(module))
            x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
            t = time_chain(executor, x, args.repeat)
            templates = {s["template"] for s in executor.plan["steps"]}
            print(f"| {n}x{k} | {bits} ({','.join(sorted(templates))}) | {copies} | "
                  f"{layer_bytes / 2**20:.2f} | {t * 1e6:.0f} | {layer_bytes / t / 1e9:.1f} | "
                  f"{layer_bytes / t / bw:.0%} | {t32 / t:.1f}x | {t16 / t:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
