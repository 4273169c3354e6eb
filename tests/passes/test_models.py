"""The default pipeline on every zoo model and the transformers architectures: the interpreter's
outputs are unchanged, and fusion leaves far fewer kernels than there were ops."""
from __future__ import annotations

import pytest
import torch

from bitsmith import ir, models, passes
from bitsmith.frontend import from_torch
from bitsmith.models.hf import ARCHS

from ..support import assert_outputs_match

RTOL = 1e-5
# Most kernels / ops fusion may leave. Attention models fuse to about a third; in a CNN every
# conv is a kernel of its own and a norm after a conv starts another (neither fuses into a conv
# tile), so about half is what is left. ViT's attention is one graph.attention op already at
# import (torch SDPA), so it starts with fewer ops. mlp has only 5 ops (three linears).
MAX_RATIO = {"mlp": 0.6, "resnet": 0.5, "vit": 0.5, "hf-vit": 0.5, "hf-resnet": 0.55,
             "hf-convnext": 0.55, "hf-mobilenet_v2": 0.3}
TRANSFORMER_RATIO = 0.4


def graph_op_count(module: ir.Module) -> int:
    """Ops that compute something (not weights, not the terminator)."""
    return sum(op.name not in ("graph.constant", "func.return") for op in module.walk())


def check_pipeline(module: ir.Module, inputs: tuple, target: str) -> tuple[int, int]:
    """Run the default pipeline; assert outputs unchanged; return (ops before, kernels)."""
    arrays = [t.numpy() for t in inputs]
    want = ir.interpret(module, *arrays)
    before = graph_op_count(module)
    passes.run(module, passes.default_pipeline(target))
    top = {op.name for op in module.ops}
    assert top <= {"kernel.fused", "graph.constant", "func.return"}, top
    assert_outputs_match(ir.interpret(module, *arrays), want, RTOL)
    kernels = sum(op.name == "kernel.fused" for op in module.ops)
    return before, kernels


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_zoo_model_through_default_pipeline(name: str, target: str) -> None:
    spec = models.get(name)
    torch.manual_seed(0)
    module = from_torch(spec.build().eval(), spec.example_inputs(2), name=name,
                        dynamic_batch=True)
    ops, kernels = check_pipeline(module, spec.example_inputs(3), target)
    assert kernels <= MAX_RATIO.get(name, TRANSFORMER_RATIO) * ops, f"{ops} -> {kernels}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_transformers_architecture_through_default_pipeline(arch: str) -> None:
    build, make_inputs = ARCHS[arch]
    torch.manual_seed(0)
    module = from_torch(build().eval(), make_inputs(2), name=arch, dynamic_batch=True)
    ops, kernels = check_pipeline(module, make_inputs(3), "cpu")
    assert kernels <= MAX_RATIO.get(f"hf-{arch}", TRANSFORMER_RATIO) * ops, f"{ops} -> {kernels}"


def test_bert_layer_is_a_handful_of_kernels() -> None:
    spec = models.get("bert")
    module = from_torch(spec.build().eval(), spec.example_inputs(1), name="bert")
    passes.run(module, passes.default_pipeline("cpu"))
    layer0 = [op for op in module.ops if op.name == "kernel.fused"
              and (op.loc or "").startswith("layers.0")]
    kinds = sorted(op.kind for op in layer0)
    # q, k, v projections; attention; out-projection + residual; layer norm; up-projection +
    # gelu; down-projection + residual; layer norm
    assert kinds == ["attention"] + ["matmul"] * 6 + ["reduction"] * 2, kinds
