"""A compiled model: call it like the torch model it came from, save it, load it back."""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .artifact import Artifact, load_artifact, save_artifact
from .executor import Executor
from .host import host_description


class CompiledModel:
    """Runs an artifact. torch tensors in -> torch tensors out; numpy in -> numpy out; one
    output is returned alone, several as a tuple."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.executor = Executor(artifact)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.artifact.manifest.name

    def __call__(self, *inputs: Any) -> Any:
        torch = sys.modules.get("torch")  # torch tensors can only come from a loaded torch
        as_torch = torch is not None and any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if as_torch and isinstance(x, torch.Tensor)
                  else np.asarray(x) for x in inputs]
        outs = self.executor.run(*arrays)
        if as_torch:
            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact (`.bsm`) to `path`."""
        save_artifact(path, self.artifact.manifest, weights=self.artifact.weights,
                      libraries=self.artifact.libraries)

    def __repr__(self) -> str:
        m = self.artifact.manifest
        sig = ", ".join(map(str, m.inputs))
        return f"<CompiledModel {m.name}({sig}) -> {len(m.outputs)} output(s)>"


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a `.bsm` artifact, checking it and that this host can run its kernels."""
    return CompiledModel(load_artifact(path, host=host_description()))
