"""The kernel-template interface: knobs, spaces, configs, problems, matching and pruning."""
from __future__ import annotations

import json

import pytest

from bitsmith import ir, passes
from bitsmith.codegen.template import (
    TEMPLATES,
    CodegenError,
    Config,
    KernelTemplate,
    Knob,
    KnobSpace,
    Problem,
    Target,
    match_templates,
    register_template,
)

SPACE = KnobSpace(Knob("TILE_N", (8, 16, 32), default=16), Knob("UNROLL_K", (1, 2, 4)),
                  Knob("PARALLEL", ("n", "nk")))


def test_knobs_refuse_bad_choices() -> None:
    with pytest.raises(CodegenError, match="knob X has no choices"):
        Knob("X", ())
    with pytest.raises(CodegenError, match=r"knob X repeats a choice: \[1, 1\]"):
        Knob("X", (1, 1))
    with pytest.raises(CodegenError, match=r"knob X: default 3 is not one of \[1, 2\]"):
        Knob("X", (1, 2), default=3)
    with pytest.raises(CodegenError, match=r"knob names repeat: \['A', 'A'\]"):
        KnobSpace(Knob("A", (1,)), Knob("A", (2,)))


def test_space_size_default_and_enumeration() -> None:
    assert SPACE.size == 18
    assert SPACE.default() == Config({"TILE_N": 16, "UNROLL_K": 1, "PARALLEL": "n"})
    configs = list(SPACE.configs())
    assert len(configs) == len(set(configs)) == 18
    assert configs[0] == Config({"TILE_N": 8, "UNROLL_K": 1, "PARALLEL": "n"})
    assert KnobSpace().size == 1 and list(KnobSpace().configs()) == [Config({})]


def test_config_is_a_hashable_canonical_mapping() -> None:
    a = Config({"UNROLL_K": 2, "TILE_N": 8})
    b = Config({"TILE_N": 8, "UNROLL_K": 2})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert str(a) == "TILE_N=8,UNROLL_K=2" and a["TILE_N"] == 8 and dict(a) == dict(b)
    assert json.loads(a.to_json()) == {"TILE_N": 8, "UNROLL_K": 2}
    with pytest.raises(KeyError):
        a["TILE_M"]


def test_space_checks_configs_and_prints_canonically() -> None:
    ok = SPACE.check({"TILE_N": 32, "UNROLL_K": 4, "PARALLEL": "nk"})
    assert ok["PARALLEL"] == "nk"
    with pytest.raises(CodegenError, match=r"missing \['PARALLEL'\], unknown \['TILE_M'\]"):
        SPACE.check({"TILE_N": 32, "UNROLL_K": 4, "TILE_M": 2})
    with pytest.raises(CodegenError, match=r"knob TILE_N=12 is not one of \[8, 16, 32\]"):
        SPACE.check({"TILE_N": 12, "UNROLL_K": 4, "PARALLEL": "nk"})
    assert json.loads(SPACE.to_json())[0] == ["TILE_N", [8, 16, 32], 16]
    changed = KnobSpace(Knob("TILE_N", (8, 16)), Knob("UNROLL_K", (1, 2, 4)),
                        Knob("PARALLEL", ("n", "nk")))
    assert changed.to_json() != SPACE.to_json()  # a changed space changes the cache key


class ScaledRows(KernelTemplate):
    """Test-only template: elementwise kernels, tiled over the last dim."""

    name = "test_scaled_rows"
    space = KnobSpace(Knob("TILE_N", (4, 8, 16)), Knob("VECTOR", (1, 4)))
    key = ("N", "dtype")

    def match(self, op: ir.Operation) -> Problem | None:
        if op.name != "kernel.fused" or op.kind != "elementwise":
            return None
        out = op.results[0].type
        return Problem(self.name, {"N": out.shape[-1], "dtype": str(out.dtype)}, op)

    def valid(self, problem: Problem, config: Config) -> bool:
        return config["TILE_N"] <= problem["N"] and config["TILE_N"] % config["VECTOR"] == 0


def fused_module(n: int) -> ir.Module:
    t = f"tensor<3x{n}xf32>"
    module = ir.parse(f"""module @m {{
  func.func @main(%x: {t}) -> ({t}) {{
    %0 = "graph.exp"(%x) : ({t}) -> {t}
    %1 = "graph.neg"(%0) : ({t}) -> {t}
    "func.return"(%1) : ({t}) -> ()
  }}
}}
""")
    return passes.run(module, "fuse")


@pytest.fixture
def registered():
    register_template(ScaledRows)
    yield TEMPLATES["test_scaled_rows"]
    del TEMPLATES["test_scaled_rows"]


def test_registered_template_matches_prunes_and_keys(registered: KernelTemplate) -> None:
    (kernel,) = [op for op in fused_module(7).ops if op.name == "kernel.fused"]
    ((template, problem),) = [m for m in match_templates(kernel) if m[0] is registered]
    assert problem.params == {"N": 7, "dtype": "f32"} and problem.op is kernel
    assert template.problem_key(problem) == (7, "f32")
    assert [str(c) for c in template.valid_configs(problem)] == ["TILE_N=4,VECTOR=1",
                                                                 "TILE_N=4,VECTOR=4"]
    with pytest.raises(CodegenError, match=r"template test_scaled_rows: problem lacks key "
                                           r"parameter 'dtype'; has \['N'\]"):
        template.problem_key(Problem(template.name, {"N": 7}))


def test_registration_errors(registered: KernelTemplate) -> None:
    class Other(ScaledRows):
        """A different class under a name already taken."""

    with pytest.raises(CodegenError, match="template 'test_scaled_rows' registered twice"):
        register_template(Other)

    class Nameless(KernelTemplate):
        """No name."""

    with pytest.raises(CodegenError, match="Nameless has no name"):
        register_template(Nameless)


def test_target_defaults() -> None:
    target = Target("llvm", mcpu="znver4", isa=("avx512f",), cores=2)
    assert (target.kind, target.cores, dict(target.attrs)) == ("llvm", 2, {})
