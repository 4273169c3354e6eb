"""torch.export -> `graph` dialect."""
from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import ConversionError, ModelError, UnsupportedOpError
from ..ir import Builder, Module, TensorType, Value, graph, symbol, verify
from ..ir.dialects.func import ReturnOp
from . import (  # noqa: F401 - importing registers the converters
    aten,
    aten_more,
    aten_nn,
    aten_resample,
    aten_shape,
)
from .context import CONVERTERS, ImportContext, ir_dtype
from .refusals import (
    constant_output_error,
    export_error,
    held_back_output,
    refuse_lost_structure,
    refuse_mutations,
)

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
    # upsampling: torch's decompositions of these give NaN where its kernels give inf (linear,
    # trilinear) or round differently (nearest); aten_resample converts them as the kernels do
    *aten_resample.NEAREST, torch.ops.aten.upsample_linear1d.vec,
    torch.ops.aten.upsample_trilinear3d.vec,
]


def decomposition_table() -> dict[Any, Any]:
    """Core-ATen decompositions minus the high-level ops bitsmith imports directly."""
    table = torch.export.default_decompositions()
    for target in KEEP:
        if target in table:
            table.pop(target)
    return table


def export(model: torch.nn.Module, args: Sequence[torch.Tensor],
           kwargs: dict[str, Any] | None = None, dynamic_batch: bool = False,
           dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None) -> ExportedProgram:
    """torch.export the model: dim 0 of every input tensor symbolic (B) when `dynamic_batch`,
    and the dims `dynamic_dims` names ({input: {axis: torch.export.Dim}}) symbolic, each
    imported under its Dim's name (a sequence dim: `Dim("S", min=1, max=512)`)."""
    kwargs = dict(kwargs or {})
    dynamic_shapes = None
    labels: dict[str, dict[int, str]] = {}
    if dynamic_batch or dynamic_dims:
        names = _positional_names(model, len(args))
        inputs = {**dict(zip(names, args, strict=True)), **kwargs}
        wanted = _wanted_dims(inputs, dynamic_batch, dynamic_dims or {})
        # torch.export specializes size-1 dims: trace one as two copies of itself
        inputs = {k: _widen(v, wanted.get(k, {})) for k, v in inputs.items()}
        args, kwargs = [inputs[n] for n in names], {k: inputs[k] for k in kwargs}
        dynamic_shapes = {k: wanted.get(k) for k in inputs}
        labels = {k: {axis: dim.__name__ for axis, dim in dims.items()}
                  for k, dims in wanted.items()}
    try:
        with torch.no_grad(), held_back_output():  # a failure is our one line, not torch's dump
            ep = torch.export.export(model.eval(), tuple(args), kwargs,
                                     dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch.export's own errors are many types; the model is the cause
        raise export_error(model, exc) from exc
    ep = ep.run_decompositions(decomposition_table())
    _label_dims(ep, labels)
    return ep


def _wanted_dims(inputs: dict[str, Any], dynamic_batch: bool,
                 dynamic_dims: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[int, Any]]:
    """{input: {axis: Dim}} for every tensor input: the batch dim, then `dynamic_dims`."""
    batch = torch.export.Dim(BATCH, min=1, max=1 << 16)
    wanted: dict[str, dict[int, Any]] = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim():
            wanted[name] = {0: batch} if dynamic_batch else {}
    for name, dims in dynamic_dims.items():
        if name not in wanted:
            raise ModelError(f"dynamic dims name input '{name}', which is not a tensor input "
                             f"of the model (tensor inputs: {', '.join(wanted) or 'none'})")
        rank = inputs[name].dim()
        for axis, dim in dims.items():
            if not 0 <= axis < rank:
                raise ModelError(f"dynamic dim {axis} of input '{name}' is out of range: "
                                 f"it has {rank} dims")
            wanted[name][axis] = dim
    return {name: dims for name, dims in wanted.items() if dims}


def _widen(value: Any, dims: Mapping[int, Any]) -> Any:
    for axis in dims:
        if value.shape[axis] == 1:
            value = torch.cat([value, value], dim=axis)
    return value


DIM_LABELS = "bitsmith_dim_labels"  # user-input placeholder meta: {axis: symbol name}


def _label_dims(ep: ExportedProgram, labels: dict[str, dict[int, str]]) -> None:
    """Record on each user input's placeholder the names `_name_symbols` gives its dims."""
    user = {s.arg.name for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT}
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in user and node.name in labels:
            node.meta[DIM_LABELS] = labels[node.name]


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    params = list(inspect.signature(model.forward).parameters.values())
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        raise ModelError(f"{type(model).__name__}.forward takes {len(names)} positional "
                         f"input(s), got {count}")
    return names[:count]


def from_torch(model: torch.nn.Module, args: Sequence[torch.Tensor] | torch.Tensor,
               kwargs: dict[str, Any] | None = None, *, dynamic_batch: bool = False,
               dynamic_dims: Mapping[str, Mapping[int, Any]] | None = None,
               name: str | None = None, flatten_outputs: bool = False) -> Module:
    """Import a torch.nn.Module traced on example inputs into a verified `graph` module
    (`dynamic_batch`, `dynamic_dims`: see `export`; `flatten_outputs`: see `import_program`)."""
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    ep = export(model, args, kwargs, dynamic_batch, dynamic_dims)
    return import_program(ep, name or type(model).__name__, flatten_outputs=flatten_outputs)


def import_program(ep: ExportedProgram, name: str,
                   origins: dict[Value, fx.Node] | None = None, *,
                   flatten_outputs: bool = False) -> Module:
    """Convert an ExportedProgram (already decomposed) into a module; `origins`, when given,
    receives the node each converted value first came from (to compare with torch's).

    The module returns the model's output tensors as one flat tuple: nested tuples and lists
    (and a transformers ModelOutput) flatten in order. Refused (UnsupportedModelError): in-place
    updates of inputs or buffers, and, unless `flatten_outputs` asks to flatten on purpose,
    outputs a flat tuple would misrepresent (a dict, a namedtuple, a constant such as None)."""
    refuse_mutations(ep, name)
    if not flatten_outputs:
        refuse_lost_structure(ep, name)
    gm = ep.graph_module
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    user_inputs = [n for n in gm.graph.nodes
                   if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT
                   and isinstance(n.meta.get("val"), torch.Tensor)]
    symbols = _name_symbols(user_inputs)
    types = [ImportContext.type_of_val_with(symbols, n.meta["val"]) for n in user_inputs]
    module = Module(_safe_name(name), types, [n.name for n in user_inputs])
    ctx = ImportContext(Builder.at_end(module.body), symbols, weights=module.weights)
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
        elif node.op == "get_attr":  # a subgraph (torch.cond's branches): its user is missing
            env[node] = None
        elif node.op == "call_function":
            env[node] = _convert(ctx, node, env, missing)
            if origins is not None and isinstance(env[node], Value):
                origins.setdefault(env[node], node)
        elif node.op == "output":
            if missing:
                raise UnsupportedOpError(missing)
            outputs = _flatten_outputs(node.args[0], env, name, flatten_outputs)
            ctx.builder.create(ReturnOp, *outputs)
            names = output_names(ep.call_spec.out_spec, len(outputs))
            if names is not None:
                module.metadata["output_names"] = names
    verify(module)
    return module


def output_names(spec: Any, count: int) -> list[str] | None:
    """The names a Hugging Face ModelOutput gives its `count` tensors (`logits`, ...), when it
    holds exactly those, each a tensor; else None (outputs are then output0, output1, ...)."""
    keys = getattr(spec, "context", None)
    if (spec is None or not isinstance(keys, list) or len(keys) != count
            or not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_]\w*", k) for k in keys)
            or not all(child.is_leaf() for child in spec.children())):
        return None
    return list(keys)


def _flatten_outputs(args: Any, env: dict[fx.Node, Any], name: str,
                     flatten: bool = False) -> list[Value]:
    """The output node's values in order; a constant among them is refused unless `flatten`
    (which drops it)."""
    out: list[Value] = []
    for position, item in enumerate(_leaves(args)):
        if isinstance(item, fx.Node):
            value = env[item]
            if not isinstance(value, Value):
                raise ConversionError(f"output {item} is not a tensor ({value!r})")
            out.append(value)
        elif not flatten:
            raise constant_output_error(item, position, name)
    return out


def _leaves(args: Any) -> Iterator[Any]:
    if isinstance(args, (tuple, list)):
        for item in args:
            yield from _leaves(item)
    else:
        yield args


def _name_symbols(inputs: list[fx.Node]) -> dict[Any, Any]:
    """Rename torch's size symbols: a dim `export` was asked for keeps its name (B, S, ...);
    of the others, a batch dim becomes B and the rest S0, S1, ..."""
    symbols: dict[Any, Any] = {}
    for labelled in (True, False):  # the asked-for names first, so that none is taken
        for node in inputs:
            labels = node.meta.get(DIM_LABELS, {})
            for axis, size in enumerate(node.meta["val"].shape):
                if not isinstance(size, torch.SymInt) or (axis in labels) != labelled:
                    continue
                free = sorted(size.node.expr.free_symbols, key=str)
                for sym in free:
                    if sym not in symbols:
                        label = labels.get(axis) if len(free) == 1 else None
                        symbols[sym] = symbol(_free_label(symbols, label, axis))
    return symbols


def _free_label(symbols: dict[Any, Any], label: str | None, axis: int) -> str:
    taken = set(map(str, symbols.values()))
    if label is not None and label not in taken:
        return label
    if axis == 0 and BATCH not in taken:
        return BATCH
    index = len(taken)
    while f"S{index}" in taken:
        index += 1
    return f"S{index}"


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
