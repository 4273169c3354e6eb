"""Small builders shared by the IR tests."""
from __future__ import annotations

import numpy as np

from bitsmith import ir
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import TensorType, symbol

B = symbol("B")


def mlp_module() -> ir.Module:
    """x[B, 4] -> relu(linear(x)) split and reshaped: a little of everything."""
    rng = np.random.default_rng(0)
    module = ir.Module("t", [TensorType((B, 4), dtypes.f32)], ["x"],
                       weights={"fc.weight": rng.standard_normal((3, 4)).astype(np.float32)})
    b = ir.Builder.at_end(module.body)
    w = b.value(graph.ConstantOp, result_types=[TensorType((3, 4), dtypes.f32)],
                weight="fc.weight", loc="fc")
    y = b.value(graph.LinearOp, module.inputs[0], w, loc="fc")
    z = b.value(graph.UNARY_OPS["relu"], y, loc="act")
    parts = b.create(graph.SplitOp, z, axis=1, sizes=(1, 2))
    flat = b.value(graph.ReshapeOp, parts.results[1], result_types=[TensorType((2 * B,),
                                                                               dtypes.f32)])
    b.create(ReturnOp, flat, z)
    ir.verify(module)
    return module
