"""Device fingerprints: fields, a stable hash that sees every field, caches, descriptors."""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest

import bitsmith
from bitsmith.autotune import fingerprint as fpmod
from bitsmith.autotune.fingerprint import (
    CACHE_ROOT,
    cache_sizes,
    device_descriptors,
    device_fingerprint,
    fingerprint_hash,
)
from bitsmith.codegen.template import TEMPLATES, Target
from bitsmith.codegen.tvm.target import host_target

from ..support import assert_imports_without


@pytest.fixture(scope="module")
def fp() -> dict:
    return device_fingerprint(host_target())


def test_fields_are_present_and_typed(fp: dict) -> None:
    assert fp["kind"] == "llvm"
    assert isinstance(fp["cpu"], str) and isinstance(fp["machine"], str) and fp["machine"]
    assert fp["mcpu"] == host_target().mcpu
    assert fp["isa"] == sorted(fp["isa"]) and all(isinstance(f, str) for f in fp["isa"])
    assert isinstance(fp["cores"], int) and fp["cores"] >= 1
    assert set(fp["cache"]) == {"l1d", "l2", "l3"}
    assert all(isinstance(v, int) for v in fp["cache"].values())
    assert fp["gpu"] == {}  # a CPU target describes no GPU
    tools = fp["toolchain"]
    assert isinstance(tools["tvm"], str) and tools["tvm"].startswith("0.")
    assert isinstance(tools["llvm"], int) and tools["llvm"] >= 10
    assert tools["bitsmith"] == bitsmith.__version__


def test_template_versions_cover_the_registered_templates(fp: dict) -> None:
    assert fp["templates"]["dense"] == TEMPLATES["dense"].version
    assert {"dense", "conv2d_nhwc", "attention", "elementwise", "rows"} <= set(fp["templates"])


@pytest.mark.skipif(not CACHE_ROOT.is_dir(), reason="no sysfs cache description")
def test_cache_sizes_are_read_on_linux(fp: dict) -> None:
    assert fp["cache"]["l1d"] > 0 and fp["cache"]["l2"] > 0
    assert fp["cache"]["l1d"] < fp["cache"]["l2"]


def test_cache_sizes_parse_sysfs_and_skip_instruction_caches(tmp_path: Path) -> None:
    for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "64K"),
                                             ("2", "Unified", "2048K"), ("3", "Unified", "1M")]):
        index = tmp_path / f"index{i}"
        index.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(text + "\n")
    assert cache_sizes(tmp_path) == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 1 << 20}
    assert cache_sizes(tmp_path / "missing") == {"l1d": 0, "l2": 0, "l3": 0}


def test_hash_is_stable_and_sees_every_field(fp: dict) -> None:
    digest = fingerprint_hash(fp)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert fingerprint_hash(device_fingerprint(host_target())) == digest
    assert fingerprint_hash(dict(reversed(list(fp.items())))) == digest  # key order is moot
    changes = {"kind": "cuda", "cpu": "other", "machine": "aarch64", "mcpu": "other",
               "isa": fp["isa"] + ["sve"], "cores": fp["cores"] + 1,
               "gpu": {"name": "H100"}}
    for key, value in changes.items():
        assert fingerprint_hash({**fp, key: value}) != digest, key
    for key, inner in (("cache", "l2"), ("toolchain", "llvm"), ("templates", "dense")):
        changed = copy.deepcopy(fp)
        changed[key][inner] += 1
        assert fingerprint_hash(changed) != digest, (key, inner)


def test_cuda_without_nvidia_smi_has_an_empty_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpmod.shutil, "which", lambda name: None)
    fp = device_fingerprint(Target(kind="cuda"))
    assert fp["gpu"] == {} and "triton" in fp["toolchain"]


def test_cuda_gpu_fields_come_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd: tuple, **kwargs: object) -> subprocess.CompletedProcess:
        assert "--query-gpu=name,compute_cap,driver_version" in cmd
        return subprocess.CompletedProcess(cmd, 0, "NVIDIA H100 80GB HBM3, 9.0, 550.54.15\n", "")
    monkeypatch.setattr(fpmod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(fpmod.subprocess, "run", run)
    fp = device_fingerprint(Target(kind="cuda"))
    assert fp["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_cap": "9.0",
                         "driver": "550.54.15"}
    assert device_descriptors(fp)["device.compute_capability"] == 9.0


def test_descriptors_are_numbers_from_the_fingerprint() -> None:
    fp = {"isa": ["avx2", "avx512f", "avx512_vnni"], "cores": 8,
          "cache": {"l1d": 32 << 10, "l2": 1 << 20, "l3": 0}, "gpu": {}}
    d = device_descriptors(fp)
    assert d == {"device.cores": 8.0, "device.l1d_log2": 15.0, "device.l2_log2": 20.0,
                 "device.l3_log2": 0.0, "device.lanes_f32": 16.0, "device.has_vnni": 1.0,
                 "device.has_bf16": 0.0}
    assert device_descriptors({**fp, "isa": ["avx2"]})["device.lanes_f32"] == 8.0
    assert device_descriptors({**fp, "isa": ["asimd"]})["device.lanes_f32"] == 4.0
    assert device_descriptors({**fp, "isa": ["amx_bf16"]})["device.has_bf16"] == 1.0


def test_fingerprint_imports_without_torch() -> None:
    assert_imports_without(["bitsmith.autotune.fingerprint", "bitsmith.autotune.cost_model"],
                           ["torch"])
