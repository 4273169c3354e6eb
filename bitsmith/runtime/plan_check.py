"""The execution plan checked before any executor builds from it.

An artifact's manifest is covered by its digest (and signature), so a plan that fails here was
written by another version or damaged together with its digest. Every check names the field:
the values' shapes and dtypes, the inputs and outputs against the signature, the weights
against the stored arrays (present, same dtype and size), and the steps in order: each reads
only values already defined (an input, a weight or an earlier step's output), defines each of
its outputs once, and names a library the artifact holds. What passes here cannot make an
executor fail with a KeyError or run a kernel on a buffer of the wrong size.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .artifact import NUMPY_DTYPES, Artifact, ArtifactError, TensorSpec
from .dims import dim_symbols

MAX_ITEMS = 1_000_000
"""More values or steps than any model has; bounds the work a crafted plan can ask for."""


def check_plan(artifact: Artifact) -> None:
    """Raise ArtifactError naming the first thing in the plan that cannot run."""
    plan, manifest = artifact.manifest.plan, artifact.manifest
    try:
        values = _mapping(plan, "values")
        symbols = {d for spec in manifest.inputs for d in spec.shape if isinstance(d, str)}
        for vid, spec in values.items():
            unbound = _value(vid, spec) - symbols
            if unbound:
                raise ArtifactError(f"value {vid!r} has a dim over {', '.join(sorted(unbound))}, "
                                    "which no input binds")
        inputs = _ids(plan, "inputs", values)
        outputs = _ids(plan, "outputs", values)
        _against(inputs, manifest.inputs, values, "input")
        _against(outputs, manifest.outputs, values, "output")
        weights = _mapping(plan, "weights")
        for vid, name in weights.items():
            _weight(vid, name, values, artifact.weights)
        defined = set(inputs) | set(weights)
        if len(defined) != len(inputs) + len(weights):
            raise ArtifactError("a value is both an input and a weight, or an input twice")
        steps = plan.get("steps")
        if not isinstance(steps, list) or len(steps) > MAX_ITEMS:
            raise ArtifactError("'steps' should be a list of kernel calls")
        for index, step in enumerate(steps):
            _step(index, step, values, defined, artifact.libraries)
        undefined = [v for v in outputs if v not in defined]
        if undefined:
            raise ArtifactError(f"output value {undefined[0]!r} is computed by no step")
    except ArtifactError as exc:
        raise ArtifactError(f"the execution plan cannot run: {exc}; recompile the model") from None


def _mapping(plan: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = plan.get(key)
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise ArtifactError(f"'{key}' should be an object, got {type(value).__name__}")
    return value


def _value(vid: str, spec: Any) -> set[str]:
    """Check one value's shape and dtype; the symbols its dims use."""
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
        raise ArtifactError(f"value {vid!r} should have a shape list and a dtype")
    if not isinstance(spec.get("dtype"), str) or spec["dtype"] not in NUMPY_DTYPES:
        raise ArtifactError(f"value {vid!r} has dtype {str(spec.get('dtype'))[:40]!r}; this "
                            f"runtime stores {', '.join(NUMPY_DTYPES)}")
    if len(spec["shape"]) > 64:
        raise ArtifactError(f"value {vid!r} has {len(spec['shape'])} dims (at most 64)")
    return set().union(*(dim_symbols(dim) for dim in spec["shape"]))


def _ids(plan: Mapping[str, Any], key: str, values: Mapping[str, Any]) -> list[str]:
    ids = plan.get(key)
    if not isinstance(ids, list) or not all(isinstance(v, str) and v in values for v in ids):
        raise ArtifactError(f"'{key}' should list value ids the plan defines")
    return ids


def _against(ids: Sequence[str], specs: Sequence[TensorSpec], values: Mapping[str, Any],
             what: str) -> None:
    if len(ids) != len(specs):
        raise ArtifactError(f"{len(ids)} {what} value(s), the signature has {len(specs)}")
    for vid, spec in zip(ids, specs, strict=True):
        shape, dtype = values[vid]["shape"], values[vid]["dtype"]
        if what == "input" and (list(spec.shape) != shape or spec.dtype != dtype):
            raise ArtifactError(f"{what} {spec.name!r} is {spec} in the signature, "
                                f"{shape} {dtype} in the plan")
        if what == "output" and (len(spec.shape) != len(shape) or spec.dtype != dtype):
            raise ArtifactError(f"{what} {spec.name!r} is {spec} in the signature, "
                                f"{shape} {dtype} in the plan")


def _weight(vid: str, name: Any, values: Mapping[str, Any],
            stored: Mapping[str, np.ndarray]) -> None:
    if vid not in values or not isinstance(name, str) or name not in stored:
        raise ArtifactError(f"weight value {vid!r} names {str(name)[:60]!r}, which the "
                            "artifact does not hold")
    spec, array = values[vid], stored[name]
    if not all(isinstance(d, int) for d in spec["shape"]):
        raise ArtifactError(f"weight {name!r} has a symbolic shape {spec['shape']}")
    if array.size != math.prod(spec["shape"]):
        raise ArtifactError(f"weight {name!r} holds {array.size} element(s), the plan "
                            f"expects shape {spec['shape']}")
    if array.dtype != np.dtype(NUMPY_DTYPES[spec["dtype"]]):
        raise ArtifactError(f"weight {name!r} is stored as {array.dtype.name}, the plan "
                            f"reads it as {spec['dtype']}")


def _step(index: int, step: Any, values: Mapping[str, Any], defined: set[str],
          libraries: Mapping[str, bytes]) -> None:
    if not isinstance(step, dict) or not isinstance(step.get("kernel"), str):
        raise ArtifactError(f"step {index} should be an object naming its kernel")
    name = step["kernel"]
    if not isinstance(step.get("library"), str) or step["library"] not in libraries:
        raise ArtifactError(f"step {index} ({name}) needs library "
                            f"{str(step.get('library'))[:60]!r}, which the artifact lacks")
    for key in ("inputs", "outputs"):
        ids = step.get(key)
        if not isinstance(ids, list) or not all(isinstance(v, str) and v in values
                                                for v in ids):
            raise ArtifactError(f"step {index} ({name}): '{key}' should list value ids the "
                                "plan defines")
    missing = [v for v in step["inputs"] if v not in defined]
    if missing:
        raise ArtifactError(f"step {index} ({name}) reads {missing[0]!r} before any step "
                            "computes it (steps out of order?)")
    for vid in step["outputs"]:
        if vid in defined:
            raise ArtifactError(f"step {index} ({name}) writes {vid!r}, which is already "
                                "defined (an input, a weight or an earlier step's output)")
        defined.add(vid)
    checks = step.get("index_checks", [])
    if not isinstance(checks, list):
        raise ArtifactError(f"step {index} ({name}): 'index_checks' should be a list")
    for check in checks:
        _index_check(index, name, check, step["inputs"])


def _index_check(index: int, name: str, check: Any, inputs: Sequence[str]) -> None:
    """One index check: what (str), size (a dim), negative (bool), axis (an int) and either
    the value it reads (one of the step's inputs) or the constant indices' [min, max]."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**62
    ok = (isinstance(check, dict) and isinstance(check.get("what"), str)
          and isinstance(check.get("negative"), bool) and whole(check.get("axis")))
    value, extremes = (check.get("value"), check.get("extremes")) if ok else (None, None)
    ok = ok and ((value is None) != (extremes is None)) and (
        value in inputs if value is not None else
        isinstance(extremes, list) and len(extremes) == 2 and all(map(whole, extremes)))
    if not ok:
        raise ArtifactError(f"step {index} ({name}): a malformed index check (expected what, "
                            "size, negative, axis, and a value the step reads or [min, max])")
    dim_symbols(check.get("size"))
