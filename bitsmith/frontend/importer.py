"""torch.export -> `graph` dialect."""
from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import ConversionError, ModelError, UnsupportedOpError
from ..ir import Builder, Module, TensorType, Value, graph, symbol, verify
from ..ir.dialects.func import ReturnOp
from . import aten, aten_nn, aten_shape  # noqa: F401 - importing registers the converters
from .context import CONVERTERS, ImportContext, ir_dtype

BATCH = "B"

# Ops whose default decompositions we skip: bitsmith keeps them as single graph ops so that
# fusion and kernel templates see them whole.
KEEP = [
    torch.ops.aten.linear.default, torch.ops.aten.gelu.default, torch.ops.aten.silu.default,
    torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default,
    torch.ops.aten.native_layer_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
    torch.ops.aten.max_pool2d_with_indices.default, torch.ops.aten.avg_pool2d.default,
    torch.ops.aten._adaptive_avg_pool2d.default, torch.ops.aten.embedding.default,
    torch.ops.aten.hardtanh.default, torch.ops.aten.matmul.default,
    torch.ops.aten.rms_norm.default, torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.layer_norm.default, torch.ops.aten.softmax.int, torch.ops.aten.conv2d.default,
    torch.ops.aten.max_pool2d.default, torch.ops.aten.adaptive_avg_pool2d.default,
]


def decomposition_table() -> dict[Any, Any]:
    """Core-ATen decompositions minus the high-level ops bitsmith imports directly."""
    table = torch.export.default_decompositions()
    for target in KEEP:
        if target in table:
            table.pop(target)
    return table


def export(model: torch.nn.Module, args: Sequence[torch.Tensor],
           kwargs: dict[str, Any] | None = None, dynamic_batch: bool = False) -> ExportedProgram:
    """torch.export the model (dim 0 of every input tensor symbolic when `dynamic_batch`)."""
    kwargs = dict(kwargs or {})
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH, min=1, max=1 << 16)
        args, kwargs = [_two_rows(a) for a in args], {k: _two_rows(v) for k, v in kwargs.items()}
        dynamic_shapes = {**dict(zip(_positional_names(model, len(args)),
                                     [_batch_dim(a, batch) for a in args], strict=True)),
                          **{k: _batch_dim(v, batch) for k, v in kwargs.items()}}
    try:
        with torch.no_grad():
            ep = torch.export.export(model.eval(), tuple(args), kwargs,
                                     dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch.export's own errors are many types; the model is the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"torch.export could not trace {type(model).__name__}: "
                         f"{type(exc).__name__}: {first}") from exc
    return ep.run_decompositions(decomposition_table())


def _two_rows(value: Any) -> Any:
    # torch.export specializes size-1 dims, so trace a batch of 1 as two copies of it
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def _batch_dim(value: Any, batch: Any) -> Any:
    return {0: batch} if isinstance(value, torch.Tensor) and value.dim() else None


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        raise ModelError(f"{type(model).__name__}.forward takes {len(names)} positional "
                         f"input(s), got {count}")
    return names[:count]


def from_torch(model: torch.nn.Module, args: Sequence[torch.Tensor] | torch.Tensor,
               kwargs: dict[str, Any] | None = None, *, dynamic_batch: bool = False,
               name: str | None = None) -> Module:
    """Import a torch.nn.Module traced on example inputs into a verified `graph` module."""
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    ep = export(model, args, kwargs, dynamic_batch)
    return import_program(ep, name or type(model).__name__)


def import_program(ep: ExportedProgram, name: str) -> Module:
    """Convert an ExportedProgram (already decomposed) into a module."""
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    user_inputs = [n for n in gm.graph.nodes
                   if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT
                   and isinstance(n.meta.get("val"), torch.Tensor)]
    symbols = _name_symbols(user_inputs)
    types = [ImportContext.type_of_val_with(symbols, n.meta["val"]) for n in user_inputs]
    module = Module(_safe_name(name), types, [n.name for n in user_inputs])
    ctx = ImportContext(Builder.at_end(module.body), symbols)
    env: dict[fx.Node, Any] = dict(zip(user_inputs, module.inputs, strict=True))
    missing: dict[str, list[str]] = {}
    state = {**ep.state_dict, **ep.constants}
    for node in gm.graph.nodes:
        ctx.node = node
        ctx.builder.loc = _location(node)
        if node.op == "placeholder" and node not in env:
            spec = specs[node.name]
            if spec.kind == InputKind.USER_INPUT:  # a Python constant such as use_cache=False
                env[node] = node.meta.get("val")
            elif spec.target is None:
                raise ConversionError(f"input '{node.name}' ({spec.kind.name}) names no tensor")
            else:
                env[node] = _weight(ctx, module, spec.target, state[spec.target], node)
        elif node.op == "call_function":
            env[node] = _convert(ctx, node, env, missing)
        elif node.op == "output":
            if missing:
                raise UnsupportedOpError(missing)
            outputs = _flatten_outputs(node.args[0], env)
            ctx.builder.create(ReturnOp, *outputs)
    verify(module)
    return module


def _flatten_outputs(args: Any, env: dict[fx.Node, Any]) -> list[Value]:
    out: list[Value] = []
    for item in args if isinstance(args, (tuple, list)) else [args]:
        if isinstance(item, (tuple, list)):
            out.extend(_flatten_outputs(item, env))
        elif isinstance(item, fx.Node):
            value = env[item]
            if not isinstance(value, Value):
                raise ConversionError(f"output {item} is not a tensor ({value!r})")
            out.append(value)
    return out


def _name_symbols(inputs: list[fx.Node]) -> dict[Any, Any]:
    """Rename torch's size symbols: the batch dim becomes B, others S0, S1, ..."""
    symbols: dict[Any, Any] = {}
    for node in inputs:
        for axis, size in enumerate(node.meta["val"].shape):
            if not isinstance(size, torch.SymInt):
                continue
            for sym in sorted(size.node.expr.free_symbols, key=str):
                if sym not in symbols:
                    taken = set(map(str, symbols.values()))
                    label = BATCH if axis == 0 and BATCH not in taken else f"S{len(taken)}"
                    symbols[sym] = symbol(label)
    return symbols


def _weight(ctx: ImportContext, module: Module, target: str, tensor: torch.Tensor,
            node: fx.Node) -> Value:
    array = _to_numpy(tensor.detach())
    module.weights[target] = array
    type = TensorType(tuple(array.shape), ir_dtype(tensor.dtype))
    return ctx.value(graph.ConstantOp, result_types=[type], weight=target,
                     loc=_location(node) or target.rsplit(".", 1)[0])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    dtype = ir_dtype(tensor.dtype)
    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype.numpy_dtype)
    return dtype.cast(t.numpy())


def _convert(ctx: ImportContext, node: fx.Node, env: dict[fx.Node, Any],
             missing: dict[str, list[str]]) -> Any:
    # the args with each node replaced by what it converted to (Values and such: Any, although
    # map_arg's annotation keeps them fx Arguments)
    args: tuple[Any, ...] = fx.map_arg(node.args, lambda n: env[n])
    kwargs: dict[str, Any] = fx.map_arg(node.kwargs, lambda n: env[n])
    if node.target is operator.getitem:
        container, index = args
        return None if container is None else container[index]
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
        return ctx.dim(val)  # shape arithmetic: the result types already carry it
    converter = CONVERTERS.get(node.target)
    if converter is None or _depends_on_missing(node.args, node.kwargs, env):
        if converter is None:
            missing.setdefault(str(node.target), []).append(_location(node) or "<model>")
        return None
    try:
        return converter(ctx, *args, **kwargs)
    except ConversionError as exc:
        missing.setdefault(f"{node.target} ({exc})", []).append(_location(node) or "<model>")
        return None


def _depends_on_missing(args: Any, kwargs: Any, env: dict[fx.Node, Any]) -> bool:
    found = []
    fx.map_arg((args, kwargs), lambda n: found.append(
        env[n] is None and isinstance(n.meta.get("val"), torch.Tensor)))
    return any(found)


def _location(node: fx.Node) -> str | None:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    for path, _ in reversed(stack):
        if path:
            return _clean_path(path)
    if stack:  # the root module's own forward: name it by its class
        cls = stack[0][1]
        return str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
    return None


def _clean_path(path: str) -> str:
    # torch writes some paths as "L['self'].layers[0].attn" or "layers.0.attn"
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "model"
