"""Memory planning: lifetimes, reuse, no aliasing of live buffers, sizes, symbolic batch."""
from __future__ import annotations

import itertools
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmith import ir, models, passes
from bitsmith.frontend import from_torch
from bitsmith.ir import dtypes, graph
from bitsmith.ir.dialects.func import ReturnOp
from bitsmith.ir.types import TensorType
from bitsmith.passes import PipelineError
from bitsmith.passes.memory import Buffer, MemoryPlan, MemoryPlanError, plan_memory, tensor_bytes


@ir.register_op
class NodeOp(ir.Operation):
    """Test-only op: any operands, any number of results of any type."""

    name = "test.memory_node"
    OPERANDS = ("*inputs",)
    RESULT_TYPES_GIVEN = True
    NUM_RESULTS = None


@ir.register_op
class KernelOp(ir.Operation):
    """Test-only op with a body, like `kernel.fused`: its region may use outer values."""

    name = "test.memory_kernel"
    OPERANDS = ("*inputs",)
    ATTRS: ClassVar = {}
    NUM_REGIONS = 1
    RESULT_TYPES_GIVEN = True


T = "tensor<4x8xf32>"  # 128 bytes, two 64-byte alignment units


def module_text(body: list[str], inputs: str = f"%x: {T}", outputs: str = T) -> ir.Module:
    """A verified module from the op lines of its body."""
    lines = "\n".join(f"    {line}" for line in body)
    return ir.parse(f"module @m {{\n  func.func @main({inputs}) -> ({outputs}) {{\n{lines}\n"
                    "  }\n}\n")


def unary(result: str, kind: str, operand: str, type: str = T) -> str:
    """One `%r = "graph.kind"(%a)` line."""
    return f'{result} = "graph.{kind}"({operand}) : ({type}) -> {type}'


def ret(*values: str, type: str = T) -> str:
    """The `func.return` line."""
    return f'"func.return"({", ".join(values)}) : ({", ".join([type] * len(values))}) -> ()'


def buffers_by_op(module: ir.Module, plan: MemoryPlan) -> list[Buffer]:
    """The buffers of single-result ops, in op order."""
    return [plan.buffer_of(op.result) for op in module.ops if op.name != "func.return"]


def check_plan(module: ir.Module, plan: MemoryPlan, alignment: int = 64) -> None:
    """Invariants every plan keeps, checked against the IR rather than the plan's own intervals."""
    for a, b in itertools.combinations(plan.buffers, 2):
        if a.start <= b.end and b.start <= a.end:
            assert not a.overlaps_in_space(b), (a, b)
    for buffer in plan.buffers:
        assert buffer.offset % alignment == 0 and buffer.size % alignment == 0
        assert buffer.start <= buffer.end
    for op in module.ops:
        ins = [plan.buffer_of(v) for v in op.operands if isinstance(v, ir.OpResult)
               and v.op.name != "graph.constant"]
        outs = [plan.buffer_of(r) for r in op.results if op.name != "graph.constant"]
        assert not any(i.overlaps_in_space(o) for i in ins for o in outs), op
    assert plan.peak_live_bytes <= plan.arena_bytes <= plan.naive_bytes


def test_chain_reuses_memory() -> None:
    module = module_text([unary("%0", "relu", "%x"), unary("%1", "neg", "%0"),
                          unary("%2", "exp", "%1"), ret("%2")])
    plan = plan_memory(module)
    a, b, c = buffers_by_op(module, plan)
    assert [(x.start, x.end, x.size) for x in (a, b, c)] == [(0, 1, 128), (1, 2, 128),
                                                             (2, 3, 128)]
    assert plan.naive_bytes == 384 and plan.arena_bytes == 256 == plan.peak_live_bytes
    assert a.offset == c.offset != b.offset
    check_plan(module, plan)


def test_diamond_keeps_both_branches_apart() -> None:
    module = module_text([unary("%0", "relu", "%x"), unary("%1", "neg", "%0"),
                          unary("%2", "exp", "%0"),
                          f'%3 = "graph.add"(%1, %2) : ({T}, {T}) -> {T}', ret("%3")])
    plan = plan_memory(module)
    a, left, right, total = buffers_by_op(module, plan)
    assert (a.end, left.end, right.end, total.end) == (2, 3, 3, 4)
    assert len({a.offset, left.offset, right.offset}) == 3
    assert plan.peak_live_bytes == 3 * 128 == plan.arena_bytes
    check_plan(module, plan)


def test_outputs_live_to_the_end_and_unused_results_only_at_their_op() -> None:
    module = module_text([unary("%0", "relu", "%x"), unary("%1", "neg", "%x"),
                          unary("%2", "neg", "%0"), unary("%3", "exp", "%2"), ret("%0", "%3")],
                         outputs=f"{T}, {T}")
    plan = plan_memory(module)
    a, dead, b, c = buffers_by_op(module, plan)
    assert a.end == c.end == 4 == len(module.ops) - 1
    assert (dead.start, dead.end) == (1, 1)
    assert a.offset not in (b.offset, c.offset)
    check_plan(module, plan)


def test_constants_and_inputs_are_not_planned() -> None:
    module = module_text(['%0 = "graph.constant"() {weight = "w"} : () -> ' + T,
                          f'%1 = "graph.add"(%x, %0) : ({T}, {T}) -> {T}', ret("%1")])
    plan = plan_memory(module)
    assert [b.value for b in plan.buffers] == [module.ops[1].result]
    with pytest.raises(MemoryPlanError, match="block argument 'x'"):
        plan.offset_of(module.inputs[0])
    with pytest.raises(MemoryPlanError, match="graph.constant"):
        plan.offset_of(module.ops[0].result)


def test_a_value_used_inside_a_region_lives_until_the_enclosing_op() -> None:
    type = TensorType((4, 8), dtypes.f32)
    module = ir.Module("k", [type], ["x"])
    b = ir.Builder.at_end(module.body)
    a = b.value(graph.UNARY_OPS["relu"], module.inputs[0])
    c = b.value(graph.UNARY_OPS["neg"], module.inputs[0])
    body = ir.Block([type])
    inner = ir.Builder.at_end(body).value(graph.BINARY_OPS["add"], body.args[0], a)
    ir.Builder.at_end(body).create(NodeOp, inner, result_types=[])
    fused = b.value(KernelOp, c, result_types=[type], regions=[ir.Region([body])])
    b.create(ReturnOp, fused)
    plan = plan_memory(module)
    assert plan.buffer_of(a).end == 2 == plan.buffer_of(c).end
    assert plan.offset_of(a) != plan.offset_of(fused) != plan.offset_of(c)
    check_plan(module, plan)


@pytest.mark.parametrize("type, raw", [("tensor<3xi4>", 2), ("tensor<5xu3>", 2),
                                       ("tensor<4xf6e3m2>", 3), ("tensor<3xbool>", 3),
                                       ("tensor<2x3xbf16>", 12), ("tensor<0x7xf32>", 0)])
def test_sizes_pack_sub_byte_elements(type: str, raw: int) -> None:
    line = f'%0 = "test.memory_node"(%x) : ({type}) -> {type}'
    module = module_text([line, ret("%0", type=type)], inputs=f"%x: {type}", outputs=type)
    assert tensor_bytes(module.inputs[0].type) == raw
    assert plan_memory(module, alignment=1).buffers[0].size == raw
    assert plan_memory(module).buffers[0].size == -(-raw // 64) * 64


def test_symbolic_batch_needs_bindings() -> None:
    type = "tensor<Bx(2*B)xf16>"
    module = module_text([unary("%0", "relu", "%x", type), ret("%0", type=type)],
                         inputs=f"%x: {type}", outputs=type)
    plan = plan_memory(module, {"B": 8}, alignment=16)
    assert plan.buffers[0].size == 8 * 16 * 2
    with pytest.raises(MemoryPlanError, match=r"result #0 of 'graph.relu'.*tensor<Bx\(2\*B\)"
                                              r"xf16>.*unbound symbolic dim\(s\) B.*"
                                              r'bindings=\{"B": \.\.\.\}'):
        plan_memory(module)
    with pytest.raises(MemoryPlanError, match="B"):
        plan_memory(module, {"S": 3})


@pytest.mark.parametrize("alignment, bindings, message", [
    (0, None, "alignment must be a positive int"), (True, None, "alignment"),
    (64, {"B": -1}, "binding 'B' must be a non-negative int, got -1")])
def test_bad_arguments_are_refused(alignment: object, bindings: object, message: str) -> None:
    module = module_text([unary("%0", "relu", "%x"), ret("%0")])
    with pytest.raises(MemoryPlanError, match=message):
        plan_memory(module, bindings, alignment=alignment)  # type: ignore[arg-type]


def test_plan_is_deterministic_and_summarized() -> None:
    body = [unary("%0", "relu", "%x"), unary("%1", "neg", "%0"), unary("%2", "exp", "%1"),
            ret("%2")]
    first, second = plan_memory(module_text(body)), plan_memory(module_text(body))
    assert [(b.offset, b.size, b.start, b.end) for b in first.buffers] == \
        [(b.offset, b.size, b.start, b.end) for b in second.buffers]
    assert first.summary() == ("intermediates 384 B unplanned -> 256 B planned arena "
                               "(peak live 256 B, 3 buffers)")


def test_empty_module_plans_an_empty_arena() -> None:
    plan = plan_memory(module_text([ret("%x")]))
    assert (plan.buffers, plan.naive_bytes, plan.arena_bytes, plan.peak_live_bytes) == \
        ((), 0, 0, 0)


# ---- hypothesis: random DAGs of generic ops --------------------------------------------------
DTYPES = [dtypes.f32, dtypes.f16, dtypes.i4, dtypes.u3, dtypes.boolean, dtypes.i8]


@st.composite
def dag_modules(draw: st.DrawFn) -> ir.Module:
    """A module of 1..20 generic ops (some weight constants), each using earlier values."""
    x = TensorType((3,), dtypes.f32)
    module = ir.Module("dag", [x], ["x"])
    b = ir.Builder.at_end(module.body)
    values: list[ir.Value] = list(module.inputs)
    for i in range(draw(st.integers(1, 20))):
        types = [TensorType((draw(st.integers(0, 200)),), draw(st.sampled_from(DTYPES)))
                 for _ in range(draw(st.integers(1, 2)))]
        if draw(st.integers(0, 5)) == 0:
            values.append(b.value(graph.ConstantOp, result_types=types[:1], weight=f"w{i}"))
            continue
        uses = draw(st.lists(st.sampled_from(values), max_size=3))
        values.extend(b.create(NodeOp, *uses, result_types=types).results)
    outs = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3))
    b.create(ReturnOp, *outs)
    return module


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(module=dag_modules(), alignment=st.sampled_from([1, 16, 64]))
def test_random_dags_never_alias_live_buffers(module: ir.Module, alignment: int) -> None:
    plan = plan_memory(module, alignment=alignment)
    check_plan(module, plan, alignment)
    results = [r for op in module.ops if op.name != "graph.constant" for r in op.results]
    assert [b.value for b in plan.buffers] == results
    index = {op: i for i, op in enumerate(module.ops)}
    for buffer in plan.buffers:
        users = [index[op] for op in buffer.value.users]
        assert buffer.end == max(users, default=buffer.start)


def test_resnet_from_the_zoo_reuses_memory_before_and_after_fusion() -> None:
    spec = models.get("resnet")
    module = from_torch(spec.build(), spec.example_inputs(2), name="resnet", dynamic_batch=True)
    for pipeline in ("", "fuse"):  # graph ops first (the empty pipeline), then kernels
        passes.run(module, pipeline)
        plan = plan_memory(module, {"B": 4})
        assert plan.arena_bytes < plan.naive_bytes
        check_plan(module, plan)
        with pytest.raises(MemoryPlanError, match="B"):
            plan_memory(module)
    assert {op.name for op in module.ops} == {"graph.constant", "kernel.fused", "func.return"}


# ---- the plan-memory pass: an analysis that reports, and leaves the IR alone -----------------
def test_plan_memory_pass_reports_the_plan() -> None:
    module = module_text([unary("%0", "relu", "%x"), unary("%1", "neg", "%0"),
                          unary("%2", "exp", "%1"), ret("%2")])
    text = str(module)
    (record,) = passes.PassManager("plan-memory{alignment=32}").run(module).records
    assert str(module) == text
    assert record.stats == {"buffers": 3, "naive-bytes": 384, "arena-bytes": 256,
                            "peak-live-bytes": 256}
    assert record.remarks == (plan_memory(module, alignment=32).summary(),)


def test_plan_memory_pass_plans_symbolic_modules_at_the_batch_option() -> None:
    type = "tensor<Bx4xf32>"
    module = module_text([unary("%0", "relu", "%x", type), ret("%0", type=type)],
                         inputs=f"%x: {type}", outputs=type)
    (record,) = passes.PassManager("plan-memory{batch=32}").run(module).records
    assert record.remarks[0] == "planned with B=32"
    assert record.stats["naive-bytes"] == 32 * 4 * 4
    with pytest.raises(PipelineError, match="alignment must be >= 1, got 0"):
        passes.parse_pipeline("plan-memory{alignment=0}")
