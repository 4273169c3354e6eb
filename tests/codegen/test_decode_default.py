"""The quantized GEMV's default DECODE follows a measured property of the host, not the CPU the
default was first tuned on: `subnormal` where subnormal floats run at full speed, `magic` where
they cost a microcode assist (30-50x on Intel cores)."""
from __future__ import annotations

import dataclasses

from bitsmith.codegen.template import Target
from bitsmith.codegen.tvm.target import host_target
from bitsmith.codegen.tvm.templates_quant import default_decode
from bitsmith.runtime.host import SLOW_SUBNORMALS, slow_subnormals, subnormal_penalty


def _with(slow: bool) -> Target:
    target = host_target()
    return dataclasses.replace(target, attrs={**target.attrs, "slow_subnormals": slow})


def test_the_default_decode_follows_the_hosts_subnormal_speed() -> None:
    assert default_decode(True, _with(True)) == "magic"
    assert default_decode(True, _with(False)) == "subnormal"
    assert default_decode(False, _with(True)) == "convert"
    assert default_decode(False, _with(False)) == "convert"
    # a target that does not say (an older cache, another backend) gets the safe choice
    assert default_decode(True, Target("llvm")) == "magic"


def test_the_host_target_carries_the_measured_verdict() -> None:
    penalty = subnormal_penalty()
    assert penalty > 0
    assert slow_subnormals() == (penalty > SLOW_SUBNORMALS)
    assert host_target().attrs["slow_subnormals"] == slow_subnormals()
