"""Fusion on a real model (BERT) and on random DAGs of ops: meaning kept, refusals explained."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmith import models
from bitsmith.frontend import from_torch
from bitsmith.passes.manager import PassManager

from .fusion_checks import (
    LINEAR_WEIGHTS,
    R,
    T,
    W,
    assert_every_refusal_has_a_reason,
    fuse,
    kernels,
    parse,
    ret,
)


# ---- the zoo --------------------------------------------------------------------------------
def test_bert_fuses_into_two_attention_kernels_and_few_others() -> None:
    spec = models.get("bert")
    inputs = spec.example_inputs(1)
    module = from_torch(spec.build(), inputs, name="bert")
    arrays = [t.numpy() for t in inputs]
    PassManager("canonicalize,cse,dce").run(module)
    graph_ops = sum(1 for op in module.ops if op.name.startswith("graph.")
                    and op.name != "graph.constant")
    report = fuse(module, inputs=arrays)
    found = kernels(module)
    assert [kind for kind, _ in found].count("attention") == 2
    assert report.records[0].stats["kernels-attention"] == 2
    assert len(found) < graph_ops / 2, f"{len(found)} kernels for {graph_ops} ops"
    assert all(ops.count("graph.softmax") == 1 and ops.count("graph.matmul") == 2
               for kind, ops in found if kind == "attention")
    assert_every_refusal_has_a_reason(report)


# ---- property: any DAG of ops keeps its meaning ---------------------------------------------
@st.composite
def op_dags(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Body lines of a random DAG over 3x5x7 values, and the values it returns."""
    values, body = ["%x", "%y"], [f'%0 = "graph.constant"() {{weight = "w"}} : () -> {W}']
    for _ in range(draw(st.integers(1, 10))):
        n = len(body)
        a, b = (draw(st.sampled_from(values)) for _ in range(2))
        kind = draw(st.sampled_from(["unary", "binary", "softmax", "cumsum", "linear",
                                     "center"]))
        if kind == "unary":
            name = draw(st.sampled_from(["tanh", "neg", "sigmoid"]))
            body.append(f'%{n} = "graph.{name}"({a}) : ({T}) -> {T}')
        elif kind == "binary":
            name = draw(st.sampled_from(["add", "mul", "sub"]))
            body.append(f'%{n} = "graph.{name}"({a}, {b}) : ({T}, {T}) -> {T}')
        elif kind in ("softmax", "cumsum"):
            axis = draw(st.integers(1, 2))
            body.append(f'%{n} = "graph.{kind}"({a}) {{axis = {axis}}} : ({T}) -> {T}')
        elif kind == "linear":
            body.append(f'%{n} = "graph.linear"({a}, %0) : ({T}, {W}) -> {T}')
        else:
            axis = draw(st.integers(1, 2))
            kept = "tensor<3x1x7xf32>" if axis == 1 else R
            body.append(f'%{n} = "graph.reduce_mean"({a}) {{axes = [{axis}], keepdim = true}} '
                        f": ({T}) -> {kept}")
            body.append(f'%{n + 1} = "graph.sub"({b}, %{n}) : ({T}, {kept}) -> {T}')
        values.append(f"%{len(body) - 1}")
    returned = [values[-1]] + draw(st.lists(st.sampled_from(values[2:]), max_size=2))
    return body + [ret(*returned)], [T] * len(returned)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=op_dags(), max_ops=st.sampled_from([1, 2, 3, 64]))
def test_fusion_keeps_meaning_of_any_dag(dag: tuple[list[str], list[str]], max_ops: int) -> None:
    body, outputs = dag
    module = parse(body, {"x": T, "y": T}, outputs, LINEAR_WEIGHTS)
    report = fuse(module, f"fuse{{max-ops={max_ops}}}")
    for _, ops in kernels(module):
        assert 1 <= len([name for name in ops if name != "graph.constant"]) <= max_ops
    assert_every_refusal_has_a_reason(report)
