"""The .bsm container: save/load round trip, every kind of corruption detected, input checks."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bitsmith.runtime.artifact import (
    FORMAT_VERSION,
    ArtifactError,
    Manifest,
    TensorSpec,
    bind_inputs,
    check_host,
    load_artifact,
    save_artifact,
)
from bitsmith.runtime.host import ISA_FLAGS, cpu_flags, host_description

SPECS = (TensorSpec("input_ids", ("B", 16), "i64"), TensorSpec("mask", ("B", 16), "bool"))
OUTS = (TensorSpec("hidden", ("B", 16, 64), "f32"),)


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w.f32": rng.standard_normal((7, 3), dtype=np.float32),
            "w.f16": rng.standard_normal((5,)).astype(np.float16),
            "w.bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
            "w.bool": rng.random((4,)) > 0.5, "w.i8": np.arange(-3, 4, dtype=np.int8),
            "w.empty": np.zeros((0, 3), np.float32),
            "w.strided": np.arange(12, dtype=np.int32).reshape(3, 4).T}


def manifest(**extra: object) -> Manifest:
    return Manifest(name="bert", inputs=SPECS, outputs=OUTS,
                    plan={"kernels": [{"name": "k0", "library": "k0.so"}]},
                    requires={"machine": "x86_64", "isa": ["avx2"]},
                    toolchain={"tvm": "0.27.0.post1"}, bitsmith_version="0.1.0", **extra)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "bert.bsm"
    save_artifact(path, manifest(), weights=weights(), libraries={"k0.so": b"\x7fELF-kernel"})
    return path


def test_round_trip_keeps_manifest_weights_and_libraries(saved: Path, tmp_path: Path) -> None:
    art = load_artifact(saved)
    m = art.manifest
    assert (m.name, m.inputs, m.outputs, m.format_version) == ("bert", SPECS, OUTS,
                                                               FORMAT_VERSION)
    assert m.plan == manifest().plan and m.toolchain == {"tvm": "0.27.0.post1"}
    assert sorted(m.files) == ["lib/k0.so", "weights.safetensors"]
    want = weights()
    assert sorted(art.weights) == sorted(want)
    for name, array in want.items():
        assert art.weights[name].dtype == array.dtype, name
        np.testing.assert_array_equal(art.weights[name], array)
    assert art.libraries == {"k0.so": b"\x7fELF-kernel"}
    paths = art.extract_libraries(tmp_path)
    assert paths["k0.so"].read_bytes() == b"\x7fELF-kernel"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def _rewrite(path: Path, change) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _set_manifest(members: dict, **fields: object) -> None:
    """Edit the manifest and re-seal its digest (as a careless tool would): the field checks,
    not the digest, must then refuse it."""
    data = json.loads(members["manifest.json"])
    data.update(fields)
    members["manifest.json"] = json.dumps(data).encode()
    digest = hashlib.sha256(members["manifest.json"]).hexdigest()
    members["integrity.json"] = json.dumps({"digest": digest, "signature": None}).encode()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update({"weights.safetensors": _flip_last_byte(m["weights.safetensors"])}),
     r"checksum mismatch for weights\.safetensors .*recompile"),
    (lambda m: m.pop("lib/k0.so"), r"missing member lib/k0\.so \(listed in the manifest\)"),
    (lambda m: m.pop("manifest.json"), r"missing member manifest\.json \(not a bitsmith"),
    (lambda m: m.update({"manifest.json": b"{not json"}),
     r"manifest\.json does not match its digest"),
    (lambda m: _set_manifest(m, format_version=99),
     rf"artifact format version 99, this bitsmith reads version {FORMAT_VERSION}; recompile"),
    (lambda m: _set_manifest(m, inputs=[{"shape": [1]}]), r"lacks field\(s\) name, dtype"),
])
def test_corruption_is_detected_with_the_reason(saved: Path, change, message: str) -> None:
    _rewrite(saved, change)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(saved)


def test_not_a_zip_and_missing_file(tmp_path: Path, saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"not a readable bitsmith artifact \(BadZipFile"):
        load_artifact(saved)
    with pytest.raises(ArtifactError, match="no such artifact"):
        load_artifact(tmp_path / "nope.bsm")


def test_host_mismatch_names_what_is_missing(saved: Path) -> None:
    with pytest.raises(ArtifactError, match="compiled for a CPU with avx2, which this host "
                                            r"lacks \(it has avx\)"):
        load_artifact(saved, host={"machine": "x86_64", "isa": ["avx"]})
    with pytest.raises(ArtifactError, match="compiled for x86_64, this host is aarch64"):
        load_artifact(saved, host={"machine": "aarch64", "isa": ["asimd"]})
    load_artifact(saved, host={"machine": "x86_64", "isa": ["avx", "avx2", "fma"]})
    check_host({}, {"machine": "riscv64"})  # nothing required: anything runs it


def test_bad_specs_and_library_names_are_refused(tmp_path: Path) -> None:
    bad = Manifest(name="m", inputs=(TensorSpec("x", (-1,), "f32"),), outputs=())
    with pytest.raises(ArtifactError, match=r"input 'x': dim -1 must be an int >= 0"):
        save_artifact(tmp_path / "m.bsm", bad, weights={})
    with pytest.raises(ArtifactError, match=r"library name '\.\./evil\.so'"):
        save_artifact(tmp_path / "m.bsm", manifest(), weights={}, libraries={"../evil.so": b""})
    assert not list(tmp_path.iterdir())


def test_bind_inputs_binds_symbols_and_says_expected_vs_got() -> None:
    ids, mask = np.zeros((3, 16), np.int64), np.ones((3, 16), bool)
    assert bind_inputs(SPECS, [ids, mask]) == {"B": 3}
    cases = [
        ([ids], r"expected 2 input\(s\) \(input_ids, mask\), got 1"),
        ([ids[0], mask], r"input 'input_ids': expected rank 2 \(input_ids: tensor<Bx16xi64>\), "
                         r"got shape \[16\]"),
        ([ids[:, :5], mask], r"dim 1 should be 16"),
        ([ids, mask[:2]], r"input 'mask': dim 0 is B = 3 from an earlier input, got 2"),
        ([ids.astype(np.int32), mask], r"input 'input_ids': expected dtype i64, got int32"),
    ]
    for arrays, message in cases:
        with pytest.raises(ValueError, match=message):
            bind_inputs(SPECS, arrays)


def test_host_description_and_flags() -> None:
    host = host_description()
    assert set(host) == {"machine", "isa", "cores", "cpu"} and host["cores"] >= 1
    assert set(host["isa"]) <= set(ISA_FLAGS) and host["isa"] == sorted(host["isa"])
    info = "processor: 0\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512_vnni madeup\n"
    assert cpu_flags(info) == {"sse4_2", "avx", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_flags("Features\t: fp asimd asimddp\n") == {"asimd", "asimddp"}


def test_artifact_loads_without_torch_or_the_compiler(saved: Path) -> None:
    code = ("import sys; from bitsmith.runtime.artifact import load_artifact; "
            f"a = load_artifact({str(saved)!r}); assert a.weights['w.i8'].sum() == 0; "
            "bad = [m for m in ('torch', 'bitsmith.frontend', 'bitsmith.passes', "
            "'bitsmith.autotune', 'bitsmith.codegen') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
