"""A compiled model: call it like the torch model it came from, save it, load it back."""
from __future__ import annotations

import math
import os
import sys
from typing import Any

import ml_dtypes
import numpy as np

from .artifact import Artifact, ArtifactError, load_artifact, save_artifact
from .host import host_description
from .plan_check import check_plan


class CompiledModel:
    """Runs an artifact. torch tensors in -> torch tensors out; numpy in -> numpy out; one
    output is returned alone, several as a tuple."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.checked: str | None = None
        """How the compile's self-check went (None: not checked, e.g. loaded from a file)."""
        if "llm" in artifact.manifest.metadata:  # its steps take page tables that only the
            raise ArtifactError(                   # LLM engine builds (and keeps consistent)
                f"{artifact.manifest.name} is an LLM artifact: load it with bitsmith.llm.load "
                "(or run it with bitsmith generate / chat)")
        check_plan(artifact)
        if artifact.manifest.requires.get("device") == "cuda":  # Triton kernels, torch tensors
            from .triton_executor import TritonExecutor  # noqa: PLC0415 - no TVM needed
            self.executor: Any = TritonExecutor(artifact)
        else:
            from .executor import Executor  # noqa: PLC0415 - no torch needed
            self.executor = Executor(artifact)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.artifact.manifest.name

    def __call__(self, *inputs: Any) -> Any:
        torch = sys.modules.get("torch")  # torch tensors can only come from a loaded torch
        if torch is None or not any(isinstance(x, torch.Tensor) for x in inputs):
            outs = self.executor.run(*[np.asarray(x) for x in inputs])
        elif hasattr(self.executor, "run_torch"):  # GPU tensors stay on the GPU
            outs = self.executor.run_torch(*(torch.as_tensor(x) for x in inputs))
        else:
            arrays = [_from_torch(x, torch) if isinstance(x, torch.Tensor) else np.asarray(x)
                      for x in inputs]
            outs = [_to_torch(o, torch) for o in self.executor.run(*arrays)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def report(self) -> str:
        """What quantization did, per layer: format, grouping, method, relative output error
        (tr(dW H dW^T) / tr(W H W^T) on the calibration inputs, or the weights' relative
        squared error without them) and bytes; then the model's weight bytes before/after."""
        quant = self.artifact.manifest.metadata.get("quantization")
        stored = sum(np.asarray(a).nbytes for a in self.artifact.weights.values())
        lowered = self._precision_lines()
        if not quant:
            return "\n".join([f"{self.name}: not quantized; weights {stored / 2**20:.2f} MiB",
                              *lowered])
        head = (f"{'layer':<48} {'shape':>11} {'format':>7} {'group':>5} {'axis':>4} "
                f"{'method':>6} {'error':>9} {'KiB':>8}")
        lines = [f"{self.name}: {quant['spec']}", head]
        for row in quant["layers"]:
            shape = "x".join(map(str, row["shape"]))
            if row["format"] == "f32":
                lines.append(f"{row['layer']:<48} {shape:>11} {'f32':>7} {'-':>5} {'-':>4} "
                             f"{'-':>6} {'-':>9} {math.prod(row['shape']) * 4 / 1024:8.1f}"
                             f"  ({row.get('reason', 'kept')})")
                continue
            lines.append(f"{row['layer']:<48} {shape:>11} {row['format']:>7} {row['group']:>5} "
                         f"{row['axis']:>4} {row['method']:>6} {row['error']:9.2e} "
                         f"{row['bytes'] / 1024:8.1f}")
        before = stored - quant["bytes"] + quant["f32_bytes"]
        lines.append(f"quantized layers: {quant['f32_bytes'] / 2**20:.2f} MiB f32 -> "
                     f"{quant['bytes'] / 2**20:.2f} MiB; model weights as stored: "
                     f"{before / 2**20:.2f} MiB -> {stored / 2**20:.2f} MiB")
        return "\n".join(lines + lowered)

    def _precision_lines(self) -> list[str]:
        """The kernels computed below f32 (`compile(precision=)`) and the measured error."""
        info = self.artifact.manifest.metadata.get("precision")
        steps = self.artifact.manifest.plan.get("steps", [])
        if not isinstance(info, dict):
            return [f"precision: f32 in all {len(steps)} kernels"]
        kernels = [str(k) for k in info.get("kernels", [])]
        error = info.get("error")
        said = (f"; largest error against torch's f32 on the example inputs {error:.1e} of the "
                f"output's largest magnitude" if isinstance(error, (int, float)) else "")
        mode = info.get("mode")
        sums = "int32 sums" if mode == "int8" else "f32 accumulation"
        smoothed = {str(k) for k in info.get("smoothed", [])}
        return [f"precision: {mode} ({sums}) in {len(kernels)} of "
                f"{len(steps)} kernels{said}",
                *(f"  {k}: {mode}{' (SmoothQuant-calibrated)' if k in smoothed else ''}"
                  for k in kernels)]

    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
        """Write the artifact (`.bsm`) to `path`; with `key` (at least 16 secret bytes), sign
        it, so that `load(path, key=key)` refuses it if anything in it changes."""
        save_artifact(path, self.artifact.manifest, weights=self.artifact.weights,
                      libraries=self.artifact.libraries, key=key)

    def __repr__(self) -> str:
        m = self.artifact.manifest
        sig = ", ".join(map(str, m.inputs))
        return f"<CompiledModel {m.name}({sig}) -> {len(m.outputs)} output(s)>"


def _from_torch(tensor: Any, torch: Any) -> np.ndarray:
    """A CPU copy as numpy; bfloat16 (which torch cannot give numpy) as ml_dtypes' bfloat16."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_torch(array: np.ndarray, torch: Any) -> Any:
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def load(path: str | os.PathLike, *, key: bytes | str | None = None) -> CompiledModel:
    """Load a `.bsm` artifact, checking it (digest, checksums, plan) and that this host can
    run its kernels, before any of its native code is loaded.

    An artifact holds native code, like a pickle: load only artifacts you trust. With `key`,
    an artifact not signed with that key (by `save(..., key=)` or `bitsmith compile --sign`)
    is refused.
    """
    return CompiledModel(load_artifact(path, host=host_description(), key=key))
