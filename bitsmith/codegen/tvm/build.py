"""The CPU backend: every kernel scheduled by its TVM template, all compiled by LLVM into one
shared library (`kernels.so`), weights a template wants pre-packed packed once, here."""
from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path

import tvm
from rich.progress import Progress

from ...ir import Module, Operation
from ...ir.dialects.kernel import FusedOp
from ...ir.hashing import kernel_signature
from ...runtime.artifact import Artifact
from ...runtime.host import code_isa, host_description
from ..backend import LibraryStore, kernels_of, package
from ..template import Config, Target
from .amx import amx_tvm_target
from .lower import compile_funcs, library_key
from .target import host_target, tvm_target
from .templates import TvmKernel, build_kernel

LIBRARY = "kernels.so"


def _function_signature(op: FusedOp) -> str:
    """`kernel_signature` with an int8 kernel's SmoothQuant factors left out: only whether it
    has them shapes its function (they reach it in its packed weight), so the smoothed layers
    of a model share one compiled function as their unsmoothed twins do."""
    smooth = op.attributes.get("smooth")
    if not smooth:
        return kernel_signature(op)
    op.attributes["smooth"] = (1.0,)
    try:
        return kernel_signature(op)
    finally:
        op.attributes["smooth"] = smooth


class TvmBackend:
    """`target="cpu"`: TVM templates for this host's CPU; a compiled library found in
    `libraries` (by the hash of the scheduled functions, target and TVM version) is reused."""

    name = "cpu"

    def __init__(self, libraries: LibraryStore | None = None) -> None:
        self.libraries = libraries

    def target(self) -> Target:
        return host_target()

    def build(self, module: Module, configs: Mapping[str, Config] | None = None, *,
              progress: bool = False) -> Artifact:
        target = self.target()
        kernels = kernels_of(module)
        configs = configs or {}
        built: dict[Operation, TvmKernel] = {}
        # a kernel equal to an earlier one (same region, types and config: a decoder's layers)
        # is scheduled and compiled once, and its steps call the first one's function
        first: dict[tuple[str, str], FusedOp] = {}
        calls: dict[Operation, str] = {}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"scheduling {module.name}", total=len(kernels))
            for op in kernels:
                config = configs.get(op.kernel_name)
                key = (_function_signature(op), str(config))
                if key in first and op.attributes.get("smooth"):
                    # the function is the first one's; the weight is packed with its own
                    # SmoothQuant factors (the function reads them from the packing)
                    own = build_kernel(op, target, config)
                    built[op] = dataclasses.replace(built[first[key]], packs=own.packs)
                    calls[op] = first[key].kernel_name
                elif key in first:
                    built[op], calls[op] = built[first[key]], first[key].kernel_name
                else:
                    bar.update(task, description=f"scheduling {op.kernel_name}")
                    built[op] = build_kernel(op, target, config)
                    first[key], calls[op] = op, op.kernel_name
                bar.advance(task)
            bar.update(task, description=f"compiling {len(first)} kernels with LLVM")
            extra = sorted({f for kernel in built.values() for f in kernel.isa})
            compiled_for = amx_tvm_target(target) if extra else tvm_target(target)
            if extra and "avx512_bf16" in target.isa:
                extra.append("avx512_bf16")  # the AMX target lets LLVM emit its conversions
            library = self._library(module.name, {op.kernel_name: built[op].func
                                                  for op in first.values()}, compiled_for)
        return package(module, built,
                       lambda op, kernel: {"function": calls[op], "library": LIBRARY},
                       {LIBRARY: library},
                       requires={"machine": host_description()["machine"],
                                 "isa": sorted(set(code_isa(target.isa)) | set(extra)),
                                 "mcpu": target.mcpu},
                       toolchain={"tvm": tvm.__version__, "mcpu": target.mcpu})

    def _library(self, name: str, funcs: dict, target: tvm.target.Target) -> bytes:
        """The shared library of `funcs`: from the store, or compiled now (and stored)."""
        key = library_key(funcs, target)
        library = self.libraries.get(key) if self.libraries is not None else None
        if library is not None:
            return library
        executable = compile_funcs(funcs, name, target)
        with tempfile.TemporaryDirectory(prefix="bitsmith-") as tmp:
            path = Path(tmp) / LIBRARY
            executable.export_library(str(path))
            library = path.read_bytes()
        if self.libraries is not None:
            self.libraries.put(key, library)
        return library
