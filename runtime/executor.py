"""Run a loaded artifact: kernels from its library, called in plan order on TVM tensors.

The execution plan (`manifest.plan`) names every value (`values`: shape with symbolic dims as
text, dtype), which values are the model inputs, outputs and weights, and the `steps`: one
kernel call each, with its input and output value ids. Nothing here imports torch or the
compiler; TVM is needed only for its runtime (loading the library and its tensors).
"""
from __future__ import annotations

import ast
import operator
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from .artifact import NUMPY_DTYPES, Artifact, ArtifactError, bind_inputs
from .tvm_runtime import tvm

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv}


def eval_dim(dim: int | str, bindings: Mapping[str, int]) -> int:
    """An int dim, or the value of a dim expression such as "B" or "(16*B)" under `bindings`."""
    if isinstance(dim, int):
        return dim
    return _eval(ast.parse(dim, mode="eval").body, bindings, dim)


def _eval(node: ast.AST, bindings: Mapping[str, int], text: str) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in bindings:
            raise ArtifactError(f"dim {text!r} uses symbol {node.id}, which no input binds")
        return bindings[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, bindings, text),
                                   _eval(node.right, bindings, text))
    raise ArtifactError(f"dim {text!r} is not an integer expression over symbols")


class Executor:
    """Loads an artifact's kernels and weights once; `run` maps numpy inputs to outputs."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        plan = artifact.manifest.plan
        for key in ("values", "inputs", "outputs", "weights", "steps"):
            if key not in plan:
                raise ArtifactError(f"execution plan lacks '{key}'; recompile the model")
        self.plan = plan
        self._dir = tempfile.TemporaryDirectory(prefix="bitsmith-")
        paths = artifact.extract_libraries(self._dir.name)
        self.libraries = {name: tvm.runtime.load_module(str(path))
                          for name, path in paths.items()}
        self.steps = [(self._kernel(step), step["inputs"], step["outputs"])
                      for step in plan["steps"]]
        self.weights = {vid: tvm.runtime.tensor(self._weight(name))
                        for vid, name in plan["weights"].items()}

    def _kernel(self, step: Mapping[str, Any]) -> Any:
        library = self.libraries.get(step["library"])
        if library is None:
            raise ArtifactError(f"step {step['kernel']} needs library {step['library']}, which "
                                "the artifact lacks")
        return library[step["kernel"]]

    def _weight(self, name: str) -> np.ndarray:
        if name not in self.artifact.weights:
            raise ArtifactError(f"the plan uses weight {name!r}, which the artifact lacks")
        return np.ascontiguousarray(self.artifact.weights[name])

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Validate inputs against the signature, run every step, return the outputs."""
        specs = self.artifact.manifest.inputs
        arrays = [np.asarray(a) for a in arrays]
        bindings = bind_inputs(specs, arrays)
        env: dict[str, Any] = dict(self.weights)
        for vid, array in zip(self.plan["inputs"], arrays):
            env[vid] = tvm.runtime.tensor(np.ascontiguousarray(array))
        values = self.plan["values"]
        for kernel, inputs, outputs in self.steps:
            outs = [self._empty(values[vid], bindings) for vid in outputs]
            kernel(*[env[vid] for vid in inputs], *outs)
            env.update(zip(outputs, outs))
        return [env[vid].numpy() for vid in self.plan["outputs"]]

    @staticmethod
    def _empty(spec: Mapping[str, Any], bindings: Mapping[str, int]) -> Any:
        shape = [eval_dim(d, bindings) for d in spec["shape"]]
        return tvm.runtime.empty(shape, NUMPY_DTYPES[spec["dtype"]])


def value_spec(shape: Sequence[int | str], dtype: str) -> dict[str, Any]:
    """The plan's description of one value."""
    if dtype not in NUMPY_DTYPES:
        raise ArtifactError(f"values of type {dtype} cannot be stored by this runtime")
    return {"shape": list(shape), "dtype": dtype}
