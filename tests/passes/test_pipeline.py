"""The pass manager: pipeline strings, typed options, errors, verification, dumps, statistics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitsmith import ir, passes
from bitsmith.passes import PassError, PipelineError
from bitsmith.passes.manager import PASS_REGISTRY, ModulePass, PassContext, register_pass

T = "tensor<3x5xf32>"
TEXT = f"""module @m {{
  func.func @main(%x: {T}) -> ({T}) {{
    %0 = "graph.exp"(%x) : ({T}) -> {T}
    %1 = "graph.exp"(%x) : ({T}) -> {T}
    %2 = "graph.add"(%0, %1) : ({T}, {T}) -> {T}
    %3 = "graph.relu"(%2) : ({T}) -> {T}
    "func.return"(%2) : ({T}) -> ()
  }}
}}
"""


@dataclass(frozen=True)
class OptionsPass(ModulePass):
    """Test-only: one option of each kind, does nothing."""

    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    label: str = "x"

    def run(self, module: ir.Module, ctx: PassContext) -> None:
        ctx.count("runs")


@dataclass(frozen=True)
class BreakIR(ModulePass):
    """Test-only: moves the return in front of the ops it returns, which is invalid."""

    def run(self, module: ir.Module, ctx: PassContext) -> None:
        ret = module.body.ops.pop()
        module.body.ops.insert(0, ret)


@pytest.fixture(autouse=True)
def test_passes():
    """Register the test-only passes for one test, and take them out of the registry after."""
    for name, cls in (("test-options", OptionsPass), ("test-break-ir", BreakIR)):
        register_pass(name)(cls)
    yield
    for name in ("test-options", "test-break-ir"):
        PASS_REGISTRY.pop(name)


@pytest.mark.parametrize("text", [
    "canonicalize",
    "canonicalize,cse,dce",
    "fuse{max-ops=64},layout{conv=nhwc}",
    "test-options{count=3,ratio=0.25,flag=true,mode=slow,label=abc}",
    "layout{conv=nchw},plan-memory{alignment=32,batch=8}",
])
def test_pipeline_prints_back_as_spelled(text: str) -> None:
    assert str(passes.parse_pipeline(text)) == text


def test_spacing_is_normalized_and_options_typed() -> None:
    pipeline = passes.parse_pipeline(" canonicalize , test-options{ count = 007 , flag=true } ")
    assert str(pipeline) == "canonicalize,test-options{count=7,flag=true}"
    options = pipeline.passes[1]
    assert (options.count, options.flag, options.mode) == (7, True, "fast")


@given(count=st.integers(0, 10**6), ratio=st.floats(0.01, 100.0), flag=st.booleans(),
       mode=st.sampled_from(["fast", "slow"]))
def test_typed_options_round_trip(count: int, ratio: float, flag: bool, mode: str) -> None:
    text = (f"test-options{{count={count},ratio={ratio},flag={str(flag).lower()},"
            f"mode={mode}}}")
    pipeline = passes.parse_pipeline(text)
    assert str(pipeline) == text
    assert pipeline.passes[0] == OptionsPass(count, ratio, flag, mode)
    again = passes.parse_pipeline(str(pipeline))
    assert again.passes == pipeline.passes


def test_pass_objects_print_their_non_default_options() -> None:
    assert passes.print_pipeline([OptionsPass(count=2), OptionsPass()]) == \
        "test-options{count=2},test-options"


@pytest.mark.parametrize("text, message", [
    ("canonicalise", r"unknown pass 'canonicalise' \(did you mean 'canonicalize'\?\); valid "
                     r"passes: .*canonicalize, cse, dce, fuse, layout, plan-memory"),
    ("fuse{max_ops=3}", r"pass 'fuse' has no option 'max_ops' \(did you mean 'max-ops'\?\); "
                        r"valid options: max-ops"),
    ("cse{x=1}", r"pass 'cse' has no option 'x'; valid options: none"),
    ("fuse{max-ops=many}", r"pass 'fuse': option 'max-ops' expected int, got 'many'"),
    ("fuse{max-ops=0}", r"pass 'fuse': max-ops must be >= 1, got 0"),
    ("layout{conv=nwhc}", r"pass 'layout': option 'conv' expected one of nchw, nhwc; got 'nwhc'"),
    ("test-options{flag=yes}", r"option 'flag' expected bool, got 'yes'"),
    ("fuse{max-ops}", r"pass 'fuse': option 'max-ops' should be `key=value`"),
    ("cse,,dce", r"bad pipeline syntax at column 5 of 'cse,,dce': expected `name`"),
    ("cse dce", r"bad pipeline syntax at column 5 .* got 'dce'"),
    ("fuse{max-ops=3", r"bad pipeline syntax at column 5 .* got '\{max-ops=3'"),
    ("fuse{max-ops=3,max-ops=5}", r"pass 'fuse': option 'max-ops' is given twice"),
    ("canonicalize{max-iterations=0}", r"max-iterations must be >= 1, got 0"),
])
def test_pipeline_errors_say_what_is_valid(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        passes.parse_pipeline(text)


def test_passes_hold_no_state_and_are_frozen() -> None:
    first = passes.parse_pipeline("test-options{count=2}").passes[0]
    with pytest.raises(AttributeError):
        first.count = 3  # type: ignore[misc]
    module = ir.parse(TEXT)
    report = passes.PassManager([first, first]).run(module)
    assert [r.stats for r in report.records] == [{"runs": 1}, {"runs": 1}]


def test_verification_after_each_pass_names_the_pass() -> None:
    with pytest.raises(PassError, match="pass 'test-break-ir' left invalid IR: .*func.return"):
        passes.run(ir.parse(TEXT), "cse,test-break-ir")
    module = ir.parse(TEXT)
    passes.run(module, "test-break-ir", verify=False)  # production may switch it off
    assert module.body.ops[0].name == "func.return"


def test_report_has_times_op_counts_and_statistics() -> None:
    module = ir.parse(TEXT)
    report = passes.PassManager("cse,dce,fuse").run(module)
    cse, dce, fuse = report.records
    assert (cse.name, cse.ops_before, cse.ops_after, cse.stats) == \
        ("cse", 4, 3, {"ops-removed": 1})
    assert (dce.ops_after, dce.stats["ops-removed"]) == (2, 1)
    assert fuse.stats["kernels-formed"] == 1
    assert report.seconds == sum(r.seconds for r in report.records)
    table = report.table()
    assert table.splitlines()[0].split() == ["pass", "ms", "ops", "statistics"]
    assert "kernels-formed=1" in table and "4->3" in table


def test_print_ir_after_named_pass_and_all() -> None:
    seen: list[str] = []
    passes.PassManager("cse,dce,cse", print_ir_after=["cse"], printer=seen.append).run(
        ir.parse(TEXT))
    assert [s.splitlines()[0] for s in seen] == ["// ----- IR after cse -----"] * 2
    seen.clear()
    passes.PassManager("cse,dce", print_ir_after=True, printer=seen.append).run(ir.parse(TEXT))
    assert [s.splitlines()[0] for s in seen] == ["// ----- IR after cse -----",
                                                  "// ----- IR after dce -----"]
    assert ir.parse(seen[-1].split("\n", 1)[1]).name == "m"  # the dump is parseable IR
    with pytest.raises(PipelineError, match=r"--print-ir-after names pass\(es\) \['fuse'\] "
                                            r"that the pipeline 'cse,dce' does not run; it "
                                            r"runs: cse, dce"):
        passes.PassManager("cse,dce", print_ir_after=["fuse"])


def test_run_returns_the_module_rewritten_in_place() -> None:
    module = ir.parse(TEXT)
    assert passes.run(module, "cse,dce") is module
    assert [op.name for op in module.ops] == ["graph.exp", "graph.add", "func.return"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_default_pipelines_parse_and_end_in_fusion_and_planning(target: str) -> None:
    pipeline = passes.parse_pipeline(passes.default_pipeline(target))
    names = [p.NAME for p in pipeline.passes]
    assert names[-2:] == ["fuse", "plan-memory"] and names[0] == "canonicalize"
    with pytest.raises(PipelineError, match="no default pipeline for target 'tpu'; valid: cpu"):
        passes.default_pipeline("tpu")
