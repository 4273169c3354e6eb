"""Compile checks itself: the built model runs on the example inputs and must give what torch
gives, or compile fails and says where the two part.

Where they differ, the diagnosis walks the pipeline backwards:
1. every kernel, fed the interpreter's inputs of its call, against the interpreter's results
   (the first kernel that diverges is a codegen bug);
2. where every kernel agrees, the imported module, op by op, against torch's own value of the
   node each op came from (the first op that diverges is an import bug);
3. where both agree, a pass changed the model's meaning.

A quantized model is checked against the interpreter of its quantized graph (torch computes
the unquantized one; the quantization's own error is `CompiledModel.report()`'s business).
"""
from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import fx
from torch.utils import _pytree

from .errors import BitsmithError, MismatchError
from .ir import Module, Value
from .ir.interpreter import EvalContext, bind_input, evaluate_op, interpret, kernel_calls
from .runtime.artifact import NUMPY_DTYPES, bind_inputs
from .runtime.dims import eval_dim
from .runtime.executor import ALIGNMENT, as_tvm
from .runtime.model import CompiledModel

TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-3), "float64": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2),
}
"""Error allowed per float dtype, as (a share of the output's largest finite magnitude, a share
of the element's own magnitude): a whole model's f32 rounding (sums reordered by tiling, fused
exp/erf approximations) stays far below 1e-4 of the largest output; an import or codegen bug
does not. Integers and booleans must be equal; NaN and infinities must sit where torch's are."""

PRECISION_TOLERANCES: dict[str, tuple[float, float]] = {
    "bf16": TOLERANCES["bfloat16"], "int8": (8e-2, 8e-2)}
"""The same for a model whose contractions `compile(precision=)` computed below f32: bf16 as
the dtype; int8 (8-bit rows and columns, each on its own scale) about 2.5x that, as its
measured model-level error is about 5x bf16's (BERT-base, 12 layers: 2.4e-2 of the largest
output against bf16's 4.4e-3)."""

SCALE_FLOOR = 1e-6
"""An all-zero output still allows this much absolute error, times the dtype's share."""


def check(cm: CompiledModel, module: Module, arrays: Sequence[np.ndarray], *,
          model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
          quantized: bool, dynamic_batch: bool,
          dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None,
          precision: str = "f32") -> str:
    """Raise MismatchError when `cm` (built from the fused `module`) and the model disagree on
    the example inputs; `arrays` are those inputs in the artifact's order. `dynamic_batch`
    and `dynamic_dims` are the import's, for a fresh import that the diagnosis walks. Returns
    a one-line summary of the agreement. With `precision="bf16"` (some contractions computed
    in bf16, or int8) the model is held to that precision's tolerance."""
    got = cm.executor.run(*arrays)
    tolerance = PRECISION_TOLERANCES.get(precision)
    if quantized:
        want, reference = interpret(module, *arrays), "the interpreter of the quantized graph"
    else:
        want, reference = torch_outputs(model, args, kwargs), "torch"
    if len(got) != len(want):
        raise MismatchError(f"{cm.name}: the compiled model returns {len(got)} output(s), "
                            f"{reference} {len(want)}; the model's outputs were not kept as "
                            "they are (report it with the model)")
    diffs = [d for d in (difference(g, w, f"output {i}", tolerance)
                         for i, (g, w) in enumerate(zip(got, want, strict=True))) if d]
    if not diffs:
        return agreement(got, want, reference, precision)
    head = f"{cm.name}: the compiled model differs from {reference} on the example inputs: "
    kernel = first_diverging_kernel(cm, module, arrays)
    if kernel is not None:
        where = f"first kernel that diverges from the interpreter: {kernel}"
    elif quantized:
        where = "every kernel agrees with the interpreter: a pass changed the model's meaning"
    else:
        op = first_diverging_import(model, args, kwargs, arrays, cm.name,
                                    dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims)
        low = sum(o.attributes.get("precision") == precision for o in module.ops)
        instead = "precision='bf16' or 'f32'" if precision == "int8" else "precision='f32'"
        where = (f"every kernel agrees with the interpreter; the first imported op that "
                 f"differs from torch: {op}" if op is not None else
                 f"every kernel agrees with the interpreter within the {precision} bound and "
                 f"the import with torch: the {precision} rounding of {low} kernels adds up "
                 f"past the model's {precision} tolerance on these inputs; compile it with "
                 f"{instead}" if precision != "f32" else
                 "every kernel agrees with the interpreter and the import with torch: a pass "
                 "changed the model's meaning")
    raise MismatchError(f"{head}{diffs[0]}\n{where}\nnothing was written; compile with "
                        "check=False (--no-check) to get the artifact anyway")


def agreement(got: Sequence[np.ndarray], want: Sequence[np.ndarray], reference: str,
              precision: str = "f32") -> str:
    """'matches torch on the example inputs: ...' with the largest float error, relative to
    its output's largest magnitude."""
    allowed = PRECISION_TOLERANCES.get(precision, TOLERANCES["float32"])[0]
    return (f"matches {reference} on the example inputs: {len(got)} output(s), largest error "
            f"{largest_share(got, want):.1e} of the output's largest magnitude (allowed "
            f"{allowed:g} in {precision})")


def largest_share(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """The largest float error of `got` against `want`, as a share of each output's largest
    finite magnitude."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if _kind(w.dtype) != "float" or not w.size:
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        finite = np.isfinite(w64) & np.isfinite(g64)
        if finite.any():
            scale = max(float(np.abs(w64[finite]).max()), SCALE_FLOOR)
            worst = max(worst, float(np.abs(g64 - w64)[finite].max()) / scale)
    return worst


def largest_error(cm: CompiledModel, arrays: Sequence[np.ndarray], *, model: torch.nn.Module,
                  args: Sequence[Any], kwargs: Mapping[str, Any]) -> float:
    """The compiled model's largest error against torch's f32 on the example inputs."""
    return largest_share(cm.executor.run(*arrays), torch_outputs(model, args, kwargs))


def torch_outputs(model: torch.nn.Module, args: Sequence[Any],
                  kwargs: Mapping[str, Any]) -> list[np.ndarray]:
    """The model's output tensors, flattened as torch.export flattens them."""
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [as_numpy(t) for t in _pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array (bfloat16 as ml_dtypes' bfloat16, bit for bit)."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def difference(got: np.ndarray, want: np.ndarray, what: str,
               tolerance: tuple[float, float] | None = None) -> str | None:
    """Why `got` is not `want` (shape, kind of dtype, NaN/inf positions, an error past the
    tolerance: the dtype's, or `tolerance` for arithmetic done below the dtype's precision),
    or None when it is."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{what}: shape {list(got.shape)}, expected {list(want.shape)}"
    kinds = (_kind(got.dtype), _kind(want.dtype))
    if kinds[0] != kinds[1]:
        return f"{what}: dtype {got.dtype}, expected {want.dtype}"
    if kinds[1] != "float":
        wrong = np.argwhere(got != want)
        if not len(wrong):
            return None
        at = tuple(int(i) for i in wrong[0])
        return (f"{what} ({want.dtype}{list(want.shape)}): {len(wrong)} element(s) differ, "
                f"first at {list(at)}: got {got[at]}, expected {want[at]}")
    g, w = got.astype(np.float64), want.astype(np.float64)
    special = ~np.isfinite(w) | ~np.isfinite(g)
    wrong = np.argwhere(special & ~((g == w) | (np.isnan(g) & np.isnan(w))))
    if len(wrong):
        at = tuple(int(i) for i in wrong[0])
        return (f"{what} ({want.dtype}{list(want.shape)}): got {g[at]} at {list(at)}, "
                f"expected {w[at]} ({len(wrong)} such element(s))")
    share, own = tolerance or TOLERANCES.get(np.dtype(want.dtype).name, TOLERANCES["float16"])
    finite = ~special
    if not finite.any():
        return None
    scale = max(float(np.abs(w[finite]).max()), SCALE_FLOOR)
    with np.errstate(invalid="ignore"):  # inf - inf where not finite: masked out
        excess = np.where(finite, np.abs(g - w) - (share * scale + own * np.abs(w)), -np.inf)
    at = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
    if excess[at] <= 0:
        return None
    return (f"{what} ({want.dtype}{list(want.shape)}): error {abs(g[at] - w[at]):.3g} at "
            f"{list(at)} (got {g[at]:.6g}, expected {w[at]:.6g}); allowed "
            f"{share:g} x {scale:.3g} (largest |expected|) + {own:g} x |expected|")


def _kind(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16):
        return "float"
    return "bool" if dtype.kind == "b" else "int"


# ---- 1. kernels against the interpreter ----------------------------------------------------


def first_diverging_kernel(cm: CompiledModel, module: Module,
                           arrays: Sequence[np.ndarray]) -> str | None:
    """The first kernel whose results, on the interpreter's inputs of its call, differ from
    the interpreter's results; None when all agree."""
    plan = cm.executor.plan
    bindings = bind_inputs(cm.artifact.manifest.inputs, [np.asarray(a) for a in arrays])
    for k, (step, (op, inputs, ctx)) in enumerate(zip(plan["steps"],
                                                      kernel_calls(module, arrays), strict=True)):
        want = evaluate_op(op, ctx, inputs)
        got = run_step(cm.executor, k, inputs, bindings)
        low = PRECISION_TOLERANCES.get(str(op.attributes.get("precision") or "f32"))
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            diff = difference(g, w, f"result {j}", low)
            if diff is not None:
                return f"{step['kernel']} ({step.get('template', '?')}, at {op.loc}): {diff}"
    return None


def run_step(executor: Any, k: int, inputs: Sequence[np.ndarray],
             bindings: Mapping[str, int]) -> list[np.ndarray]:
    """Step `k` of the plan alone, on `inputs` (the kernel's operands in order; its weights
    are the artifact's own, packed as the kernel reads them)."""
    step = executor.plan["steps"][k]
    values = executor.plan["values"]
    shapes = [tuple(eval_dim(d, bindings) for d in values[vid]["shape"])
              for vid in step["outputs"]]
    dtypes = [NUMPY_DTYPES[values[vid]["dtype"]] for vid in step["outputs"]]
    if "launches" in step:  # a Triton kernel, on torch tensors
        from .runtime.triton_executor import as_torch, bind_launches, launch  # noqa: PLC0415
        args = [executor.weights[vid] if vid in executor.weights else
                as_torch(np.asarray(a), values[vid]["dtype"], executor.device)
                for vid, a in zip(step["inputs"], inputs, strict=True)]
        outs = [torch.empty(s, dtype=getattr(torch, d), device=executor.device)
                for s, d in zip(shapes, dtypes, strict=True)]
        launch(bind_launches(executor.modules[step["library"]], step["launches"], args, outs,
                             bindings))
        return [as_numpy(o) for o in outs]
    held = []
    for vid, a in zip(step["inputs"], inputs, strict=True):
        array = _aligned(np.shape(a), NUMPY_DTYPES[values[vid]["dtype"]])
        np.copyto(array, a, casting="unsafe")
        held.append(array)
    results = [_aligned(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    args = [executor.weights[vid] if vid in executor.weights else as_tvm(a)
            for vid, a in zip(step["inputs"], held, strict=True)]
    executor.kernels[k](*args, *(as_tvm(r) for r in results))
    return results


def _aligned(shape: Sequence[int], dtype: str) -> np.ndarray:
    """An empty array whose data starts on the executor's alignment (kernels assume it)."""
    dt = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    first = -raw.ctypes.data % ALIGNMENT
    return raw[first:first + nbytes].view(dt)[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


# ---- 2. the import against torch -----------------------------------------------------------


def first_diverging_import(model: torch.nn.Module, args: Sequence[Any],
                           kwargs: Mapping[str, Any], arrays: Sequence[np.ndarray], name: str,
                           *, dynamic_batch: bool = False,
                           dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None
                           ) -> str | None:
    """The first op of a fresh import whose value differs from torch's value of the node it
    came from, both run on the example inputs; None when all agree."""
    from .frontend.importer import export, import_program  # noqa: PLC0415

    ep = export(model, list(args), dict(kwargs), dynamic_batch, dynamic_dims)
    origins: dict[Value, fx.Node] = {}
    module = import_program(ep, name, origins, flatten_outputs=True)
    expected = _node_values(ep, args, kwargs)
    ctx = EvalContext(module.weights)
    env = {arg: bind_input(ctx, arg, np.asarray(a), n)
           for arg, a, n in zip(module.inputs, arrays, module.input_names, strict=True)}
    for op in module.ops:
        if op.name == "func.return":
            break
        try:
            outs = evaluate_op(op, ctx, [env[v] for v in op.operands])
        except BitsmithError as exc:
            return f"'{op.name}' at {op.loc}: the interpreter fails on it: {exc}"
        env.update(zip(op.results, outs, strict=True))
        for result, array in zip(op.results, outs, strict=True):
            node = origins.get(result)
            value = expected.get(node) if node is not None else None
            if not isinstance(value, torch.Tensor):
                continue
            diff = difference(array, as_numpy(value), "its value")
            if diff is not None:
                return f"{_node_name(node) if node else op.name} at {op.loc} ('{op.name}'): {diff}"
    return None


def _node_name(node: fx.Node) -> str:
    """The ATen op a node calls; output k of a multi-output op as `op[k]`."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return f"{node.args[0].target}[{node.args[1]}]"
    return str(node.target)


def _node_values(ep: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[fx.Node, Any]:
    """torch's value of every node of the exported graph on the example inputs."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        Recorder(ep.graph_module).run(*ep._graph_module_flat_inputs(tuple(args), dict(kwargs)))
    return values
