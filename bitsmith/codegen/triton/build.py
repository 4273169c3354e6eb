"""The GPU backend: the Triton source of every kernel (one file each) and its launches; the GPU
compiles them when the artifact is loaded. Without a GPU, Triton's interpreter runs them."""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from rich.progress import Progress

from ...errors import CodegenError
from ...ir import Module, Operation
from ...runtime.artifact import Artifact
from ..backend import kernels_of, package
from ..template import Config, Target
from .templates import TritonKernel, build_kernel, cuda_target


class TritonBackend:
    """`target="cuda"`: Triton templates for the GPU torch sees (or Triton's interpreter)."""

    name = "cuda"

    def target(self) -> Target:
        triton_version()  # a clear error without Triton, before anything is built
        return cuda_target()

    def build(self, module: Module, configs: Mapping[str, Config] | None = None, *,
              progress: bool = False, target: Target | None = None) -> Artifact:
        target = target or self.target()
        kernels = kernels_of(module)
        configs = configs or {}
        built: dict[Operation, TritonKernel] = {}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"generating Triton kernels for {module.name}",
                                total=len(kernels))
            for op in kernels:
                built[op] = build_kernel(op, target, configs.get(op.kernel_name))
                bar.advance(task)
        files = {f"{op.kernel_name}.py": k.source.encode() for op, k in built.items()}
        return package(module, built, lambda op, kernel: {
            "library": f"{op.kernel_name}.py", "launches": kernel.launches}, files,
            requires={"device": "cuda"},
            toolchain={"triton": triton_version(), "device": target.mcpu})


def triton_version() -> str:
    """Triton's version; CodegenError saying how to install it when it is missing."""
    try:
        return importlib.import_module("triton").__version__
    except ImportError:
        raise CodegenError("target 'cuda' needs Triton: pip install -e \".[gpu]\" "
                           "(triton==3.6.0)") from None
