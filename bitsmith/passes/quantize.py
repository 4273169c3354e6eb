"""The `quantize` pass: linear layers and convs with constant f32 weights -> `quant.linear` /
`quant.conv2d` on packed low-bit weights (RTN or GPTQ; per-output- or per-input-channel groups;
per-layer choices).

Targets are `graph.linear` and `graph.matmul` whose weight operand is a 2-d f32 module weight
(a matmul's [K, N] weight is quantized as its transpose), and `graph.conv2d` with a constant
weight and groups=1 (its OIHW weight quantized as [O, I*KH*KW], whose input rows are the
conv's im2col windows; grouped convs stay f32 and say so in the report). Each becomes
`quant.linear(x, codes, scale[, zero])` or `quant.conv2d` (+ `graph.add` of the bias), with
the codes stored packed (`ir.packing` rows layout) and the f32 weight dropped when nothing
else reads it.

Calibration (`module.calibration`: input tuples, set by `bitsmith.compile(calib=...)`) is run
through the interpreter op by op, and the layers are quantized in program order, each from the
inputs it sees when every earlier layer is already quantized (GPTQ's sequential mode). GPTQ
needs calibration; RTN uses it, when given, to weight its clipping search and its reported
error by the layer inputs.

Per layer: `keep` patterns (fnmatch on the weight's name) stay f32; `axis=auto` quantizes with
both groupings and keeps the one with the smaller reconstruction error (AdaDim); `promote=p`
gives the fraction p of the layers with the largest RTN error 2 more bits (FlexQ-style mixed
precision); `rotate=b` quantizes W R and feeds the layer x R, R block-diagonal with a
randomized Hadamard block of b (the largest power of two up to b that divides K), inserted as
reshape -> matmul -> reshape before the `quant.linear` (see `quant_methods`). The report
(`module.metadata["quantization"]`) lists every layer: format, grouping, method, rotation,
relative error and bytes.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import PassError
from ..ir import Module, Operation, OpResult, Value, graph
from ..ir.builder import Builder
from ..ir.dialects import quant
from ..ir.dialects.graph.linalg import Window2dOp, conv_windows, to_nchw, window_out
from ..ir.dtypes import DTypeError, IntType, LowFloatType, parse_dtype
from ..ir.interpreter import EvalContext, bind_input, evaluate_op
from ..ir.packing import pack_rows
from ..ir.types import GroupAxis, QuantType, TensorType, ZeroPoint
from .cleanup import prune_weights
from .manager import ModulePass, PassContext, register_pass
from .quant_methods import (
    GPTQ_DAMP,
    Quantized,
    gptq,
    relative_error,
    rotate_columns,
    rotate_hessian,
    rotation_block,
    rtn,
)

PROMOTE_BITS = 2
"""Extra bits a promoted (sensitive) layer gets, up to 8."""


@dataclass
class _Layer:
    op: Operation
    name: str
    weight: np.ndarray  # [N, K] f32
    rows: Callable[[np.ndarray], np.ndarray]  # the layer's input -> the rows [M, K] W sees
    operand: Callable[[np.ndarray], np.ndarray]  # a weight [N, K] -> the op's weight operand
    hessian: np.ndarray | None = None
    bits: int = 0
    rotation: np.ndarray | None = None  # R_b when the layer runs on rotated inputs


def _constant_weight(module: Module, op: Operation, rank: int) -> str | None:
    """The module weight name of op's f32 weight operand (of `rank`) fed by a constant."""
    x, w = op.operands[0], op.operands[1]
    src = getattr(w, "op", None)
    f32 = parse_dtype("f32")
    if (src is None or src.name != "graph.constant" or src.weight is None
            or w.type.rank != rank or w.type.dtype != f32 or x.type.dtype != f32
            or x.type.rank < 1 or src.weight not in module.weights):
        return None
    return src.weight


def _target(op: Operation, module: Module) -> _Layer | str | None:
    """The layer when `op` is a linear layer or an ungrouped conv2d with a constant f32
    weight (W as [N, K]: a conv's OIHW weight flattened to [O, I*KH*KW]); why not, when it
    is a conv that cannot be quantized; None for anything else."""
    if op.name == "graph.conv2d" and isinstance(op, Window2dOp):
        return _conv_target(op, module)
    if op.name == "graph.linear":
        transposed = True
    elif op.name == "graph.matmul" and not op.transpose_lhs:
        transposed = op.transpose_rhs
    else:
        return None
    name = _constant_weight(module, op, 2)
    if name is None:
        return None
    array = np.asarray(module.weights[name], np.float32)
    k = array.shape[1 if transposed else 0]
    return _Layer(op, name, array if transposed else array.T,
                  rows=lambda x: x.reshape(-1, k),
                  operand=lambda w: w if transposed else w.T)


def _conv_target(op: Window2dOp, module: Module) -> _Layer | str | None:
    name = _constant_weight(module, op, 4)
    if name is None:
        return None
    if op.groups != 1:
        return f"grouped conv (groups={op.groups}): not quantized"
    array = np.asarray(module.weights[name], np.float32)
    hwio = op.layout == "NHWC"
    oihw = np.transpose(array, (3, 2, 0, 1)) if hwio else array
    o, _, kh, kw = oihw.shape

    def rows(x: np.ndarray) -> np.ndarray:  # im2col: one row per output pixel
        x = to_nchw(x, op.layout)
        oh, ow = (int(window_out(x.shape[2 + i], (kh, kw)[i], op.stride[i], op.padding[i],
                                 op.dilation[i])) for i in range(2))
        win = conv_windows(op, x, (kh, kw), (oh, ow))  # [B, C, OH, OW, KH, KW]
        return np.moveaxis(win, 1, 3).reshape(-1, oihw[0].size)

    def operand(w: np.ndarray) -> np.ndarray:
        w = w.reshape(oihw.shape)
        return np.transpose(w, (2, 3, 1, 0)) if hwio else w
    return _Layer(op, name, oihw.reshape(o, -1), rows=rows, operand=operand)


def _run_calibration(module: Module, layers: dict[Operation, _Layer],
                     on_layer: Callable[[_Layer], np.ndarray] | None) -> None:
    """Feed the calibration batches through the module op by op, accumulating each layer's
    Hessian X^T X; `on_layer` (called when a layer's Hessian is complete) returns the weight
    [N, K] that layer then runs with (the quantized one), so later layers see its output."""
    envs = []
    for i, batch in enumerate(module.calibration):
        if len(batch) != len(module.inputs):
            raise PassError(f"quantize: calibration batch {i} has {len(batch)} input(s); the "
                            f"model takes {len(module.inputs)} ({', '.join(module.input_names)})")
        ctx = EvalContext(module.weights)
        args = [bind_input(ctx, arg, np.asarray(x), name)
                for arg, x, name in zip(module.inputs, batch, module.input_names, strict=True)]
        envs.append((ctx, dict(zip(module.inputs, args, strict=True))))
    for op in list(module.body.ops):
        if op.name == "func.return":
            break
        layer = layers.get(op)
        if layer is not None:
            k = layer.weight.shape[1]
            h = np.zeros((k, k), np.float64)
            for _, env in envs:
                x = layer.rows(env[op.operands[0]]).astype(np.float64)
                h += x.T @ x
            layer.hessian = h
        weight = on_layer(layer) if (layer is not None and on_layer is not None) else None
        for ctx, env in envs:
            operands = [env[v] for v in op.operands]
            if weight is not None and layer is not None:
                operands[1] = layer.operand(weight)
            env.update(zip(op.results, evaluate_op(op, ctx, operands), strict=True))
        for _ctx, env in envs:  # drop values nothing later reads
            for v in op.operands:
                if all(u is op or _before(u, op) for u in v.users):
                    env.pop(v, None)


def _before(user: Operation, op: Operation) -> bool:
    block = op.parent
    return block is not None and user.parent is block and block.index(user) < block.index(op)


def _defining_op(value: Value) -> Operation:
    """The op whose result `value` is (every weight `_target` accepts is one)."""
    if not isinstance(value, OpResult):
        raise PassError(f"quantize: expected an op's result, got block argument "
                        f"'{value.name_hint or '?'}'")
    return value.op


@register_pass("quantize")
@dataclass(frozen=True)
class Quantize(ModulePass):
    """Quantize linear-layer weights (options as in `passes.quant_spec`)."""

    bits: int = 4
    format: str = "int"  # "int" (bits 1..8) or a low-bit float name: f4e2m1, f6e3m2, ...
    group: int = 128  # 0: one group per channel
    method: Literal["rtn", "gptq"] = "rtn"
    axis: Literal["out", "in", "auto"] = "out"
    sym: bool = False
    act_order: bool = True
    scale: Literal["f16", "bf16", "f32"] = "f16"
    keep: str = ""  # fnmatch patterns of weight names kept f32, separated by "|"
    promote: float = 0.0
    damp: float = GPTQ_DAMP
    rotate: int = 0  # Hadamard block size (a power of two); 0: no rotation

    def qtype(self, bits: int, axis: GroupAxis) -> QuantType:
        """The quantized type of a layer at `bits` with scales along `axis`."""
        scale = parse_dtype(self.scale)
        if self.format != "int":
            fmt = parse_dtype(self.format)
            if not isinstance(fmt, LowFloatType):
                raise PassError(f"quantize: format must be 'int' or a low-bit float such as "
                                f"f4e2m1, got {self.format!r}")
            return QuantType(fmt, self.group, axis, scale, ZeroPoint.NONE)
        storage = IntType(bits, signed=self.sym)
        return QuantType(storage, self.group, axis, scale,
                         ZeroPoint.NONE if self.sym else ZeroPoint.INT)

    def _check(self) -> None:
        if self.format == "int" and not 1 <= self.bits <= 8:
            raise PassError(f"quantize: bits must be 1..8, got {self.bits}")
        if self.format != "int":
            try:
                parse_dtype(self.format)
            except DTypeError as exc:
                raise PassError(f"quantize: bad format {self.format!r}: {exc}") from None
        if self.group < 0:
            raise PassError(f"quantize: group must be >= 0 (0 = per channel), got {self.group}")
        if not 0.0 <= self.promote <= 1.0:
            raise PassError(f"quantize: promote is a fraction in 0..1, got {self.promote}")
        if self.rotate and (self.rotate < 2 or self.rotate & (self.rotate - 1)):
            raise PassError(f"quantize: rotate is a Hadamard block size, a power of two >= 2 "
                            f"(or 0 for none), got {self.rotate}")

    def run(self, module: Module, ctx: PassContext) -> None:
        self._check()
        keep = [p for p in self.keep.split("|") if p]
        layers: dict[Operation, _Layer] = {}
        kept: list[dict[str, Any]] = []
        for op in module.ops:
            layer = _target(op, module)
            if isinstance(layer, str):
                name = _defining_op(op.operands[1]).weight
                kept.append({"layer": name, "shape": list(op.operands[1].type.shape),
                             "format": "f32", "reason": layer})
                ctx.remark(f"{name}: {layer}")
                continue
            if layer is None:
                continue
            if any(fnmatch.fnmatchcase(layer.name, p) for p in keep):
                kept.append({"layer": layer.name, "shape": list(layer.weight.shape),
                             "format": "f32", "reason": "keep"})
                continue
            layer.bits = self.bits
            layer.rotation = self._rotation(layer, ctx)
            layers[op] = layer
        calibrated = bool(getattr(module, "calibration", None))
        if self.method == "gptq" and not calibrated:
            raise PassError("quantize: method=gptq needs calibration inputs: pass "
                            "calib=[(x, ...), ...] to bitsmith.compile or --calib data.npz "
                            "to the CLI, or use method=rtn")
        if self.promote > 0 and self.format == "int":
            self._promote(module, layers, calibrated, ctx)
        results: dict[Operation, tuple[Quantized, float]] = {}

        def quantize_layer(layer: _Layer) -> np.ndarray:
            q, err = self._quantize(layer)
            results[layer.op] = (q, err)
            r = layer.rotation
            return q.weight() if r is None else rotate_columns(q.weight(), r.T)
        if calibrated:
            _run_calibration(module, layers, quantize_layer)
        else:
            for layer in layers.values():
                quantize_layer(layer)
        rows = [self._rewrite(module, layers[op], q, err) for op, (q, err) in results.items()]
        ctx.count("layers-quantized", len(rows))
        ctx.count("layers-kept", len(kept))
        ctx.count("weights-removed", prune_weights(module))
        before = sum(r["f32_bytes"] for r in rows)
        after = sum(r["bytes"] for r in rows)
        module.metadata["quantization"] = {"spec": str(self), "layers": rows + kept,
                                           "f32_bytes": before, "bytes": after}
        ctx.remark(f"quantized {len(rows)} layer(s): {before / 2**20:.2f} MiB of f32 weights "
                   f"-> {after / 2**20:.2f} MiB; kept {len(kept)} in f32")

    def _promote(self, module: Module, layers: dict[Operation, _Layer], calibrated: bool,
                 ctx: PassContext) -> None:
        """Raise the bits of the most sensitive layers (largest RTN error at base bits)."""
        if calibrated:
            _run_calibration(module, layers, None)
        errors = {op: relative_error(layer.weight,
                                     rtn(layer.weight, self.qtype(self.bits, GroupAxis.OUT)),
                                     layer.hessian) for op, layer in layers.items()}
        count = math.ceil(self.promote * len(layers))
        for op in sorted(errors, key=errors.__getitem__, reverse=True)[:count]:
            layers[op].bits = min(8, self.bits + PROMOTE_BITS)
            ctx.remark(f"promoted {layers[op].name} to {layers[op].bits} bits "
                       f"(RTN error {errors[op]:.2e} at {self.bits})")

    def _rotation(self, layer: _Layer, ctx: PassContext) -> np.ndarray | None:
        """R_b for a linear layer of weight [N, K]: the largest power-of-two block up to
        `rotate` that divides K (none when K is odd, and none for convs: their input is
        rotated per window, which no reshape expresses)."""
        if not self.rotate:
            return None
        k = layer.weight.shape[1]
        if layer.op.name == "graph.conv2d":
            ctx.remark(f"{layer.name}: not rotated: a conv's input windows overlap")
            return None
        block = math.gcd(self.rotate, k)
        if block < 2:
            ctx.remark(f"{layer.name}: not rotated: K={k} has no power-of-two block")
            return None
        return rotation_block(block)

    def _quantize(self, layer: _Layer) -> tuple[Quantized, float]:
        """The layer's quantized weight (of W R when rotated) and its relative error."""
        axes = [GroupAxis.OUT, GroupAxis.IN] if self.axis == "auto" else [GroupAxis(self.axis)]
        best: tuple[Quantized, float] | None = None
        w, h, r = layer.weight, layer.hessian, layer.rotation
        if r is not None:  # the error is the same in the rotated basis: R is orthogonal
            w = rotate_columns(w, r)
            h = None if h is None else rotate_hessian(h, r)
        for axis in axes:
            qtype = self.qtype(layer.bits, axis)
            if self.method == "gptq":
                if h is None:
                    raise PassError(f"quantize: {layer.name}: method=gptq needs the layer's "
                                    "Hessian, from calibration inputs")
                q = gptq(w, h, qtype, act_order=self.act_order, damp=self.damp)
            else:
                q = rtn(w, qtype, None if h is None else np.diag(h))
            err = relative_error(w, q, h)
            if best is None or err < best[1]:
                best = (q, err)
        assert best is not None
        return best

    def _rewrite(self, module: Module, layer: _Layer, q: Quantized, err: float
                 ) -> dict[str, Any]:
        op = layer.op
        n, k = layer.weight.shape
        b = Builder.before_op(op)
        qt = q.qtype

        def constant(suffix: str, array: np.ndarray, type: TensorType) -> Value:
            name, i = f"{layer.name}.{suffix}", 1
            while name in module.weights:
                i += 1
                name = f"{layer.name}.{suffix}{i}"
            module.weights[name] = np.ascontiguousarray(array)
            return b.value(graph.ConstantOp, weight=name, result_types=[type])
        codes = constant("q", pack_rows(q.codes, qt.bits), TensorType((n, k), qt))
        shape = quant.scale_shape(qt, (n, k))
        scale = constant("scale", qt.scale_dtype.cast(q.scale), TensorType(shape, qt.scale_dtype))
        zero = None
        zdt = quant.zero_dtype(qt)
        if q.zero is not None and zdt is not None:
            zero = constant("zero", zdt.cast(q.zero), TensorType(shape, zdt))
        x = op.operands[0]
        r = layer.rotation
        if r is not None:  # x R, block by block: [..., K] -> [..., K/b, b] @ R_b -> [..., K]
            lead, rb = x.type.shape[:-1], r.shape[0]
            name = f"quantize.rotation{rb}"  # one R_b per size, shared by the layers
            module.weights.setdefault(name, r)
            rot = b.value(graph.ConstantOp, weight=name,
                          result_types=[TensorType(r.shape, x.type.dtype)])
            blocks = b.value(graph.ReshapeOp, x, result_types=[
                x.type.with_shape((*lead, k // rb, rb))])
            x = b.value(graph.ReshapeOp, b.value(graph.MatmulOp, blocks, rot),
                        result_types=[x.type])
        if op.name == "graph.conv2d":
            ws = op.weight.type.shape
            out = b.value(quant.Conv2dOp, x, codes, scale, zero,
                          kernel=ws[2:] if op.layout == "NCHW" else ws[:2],
                          **{key: op.attributes[key] for key in
                             ("stride", "padding", "dilation", "groups", "layout")})
        else:
            out = b.value(quant.LinearOp, x, codes, scale, zero)
        bias = op.bias if op.name in ("graph.linear", "graph.conv2d") else None
        if bias is not None:
            if op.name == "graph.conv2d" and op.layout == "NCHW":  # [O] -> [O, 1, 1]
                bias = b.value(graph.ReshapeOp, bias, result_types=[
                    bias.type.with_shape((bias.type.shape[0], 1, 1))])
            out = b.value(graph.BINARY_OPS["add"], out, bias)
        src = _defining_op(op.operands[1])
        op.result.replace_all_uses_with(out)
        op.erase()
        if not src.result.uses:
            src.erase()
        nbytes = sum(module.weights[_defining_op(v).weight].nbytes for v in (codes, scale, zero)
                     if v is not None)
        return {"layer": layer.name, "op": op.name.split(".")[1], "shape": [n, k],
                "format": qt.storage.name,
                "group": qt.group_size, "axis": qt.axis.value, "method": self.method,
                "rotation": 0 if r is None else int(r.shape[0]),
                "error": err, "bytes": int(nbytes), "f32_bytes": int(n * k * 4)}
