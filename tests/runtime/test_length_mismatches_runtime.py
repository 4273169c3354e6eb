"""An artifact whose execution plan lists another number of inputs than its signature is
refused with an ArtifactError when loaded, not run into a raw ValueError from zip(strict=True)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bitsmith.runtime.artifact import (
    ArtifactError,
    Manifest,
    TensorSpec,
    load_artifact,
    save_artifact,
)

SPEC = TensorSpec("x", ("B", 4), "f32")


def _artifact(tmp_path: Path, plan_inputs: list[str]):
    plan = {"values": {v: {"shape": ["B", 4], "dtype": "f32"} for v in plan_inputs},
            "inputs": plan_inputs, "outputs": [], "weights": {}, "steps": []}
    path = tmp_path / "bad.bsm"
    save_artifact(path, Manifest(name="bad", inputs=(SPEC,), outputs=(), plan=plan),
                  weights={})
    return load_artifact(path)


@pytest.mark.parametrize("plan_inputs", [[], ["v0", "v1"]])
def test_executor_refuses_a_plan_with_another_input_count(tmp_path: Path,
                                                          plan_inputs: list[str]) -> None:
    from bitsmith.runtime.executor import Executor  # noqa: PLC0415 - needs TVM's runtime

    with pytest.raises(ArtifactError, match=rf"execution plan has {len(plan_inputs)} "
                                            r"input\(s\), the signature 1; recompile"):
        Executor(_artifact(tmp_path, plan_inputs))


def test_triton_executor_refuses_a_plan_with_another_input_count(tmp_path: Path) -> None:
    from bitsmith.runtime.triton_executor import TritonExecutor  # noqa: PLC0415

    with pytest.raises(ArtifactError, match=r"execution plan has 2 input\(s\), the signature 1"):
        TritonExecutor(_artifact(tmp_path, ["v0", "v1"]))
