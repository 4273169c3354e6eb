"""The command line: `bitsmith ir` output, --check, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest

from bitsmith import ir
from bitsmith.cli import main

from .support import assert_imports_without, assert_outputs_match


def test_ir_prints_a_module_that_parses(capsys) -> None:
    assert main(["ir", "mlp", "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    module = ir.parse(text)
    assert module.name == "mlp" and str(module.inputs[0].type) == "tensor<Bx64xf32>"


def test_ir_check_compares_with_torch(capsys) -> None:
    assert main(["ir", "resnet", "--check", "--batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "check passed" in err and "output 0: shape [2, 10]" in err


def test_unknown_model_is_one_line_and_exit_2(capsys) -> None:
    assert main(["ir", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unknown model 'no_such_model'")


def test_bad_path_via_python_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "bitsmith", "ir", "/nonexistent/m.py:Net"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no such file: /nonexistent/m.py"
    assert "Traceback" not in proc.stderr


def test_pipeline_with_stats_and_check(capsys) -> None:
    assert main(["ir", "bert", "--pipeline", "canonicalize,cse,layout,fuse{max-ops=64}",
                 "--pass-stats", "--check"]) == 0
    captured = capsys.readouterr()
    module = ir.parse(captured.out)
    assert any(op.name == "kernel.fused" for op in module.ops)
    assert "fuse{max-ops=64}" in captured.err and "kernels-formed=" in captured.err
    assert "check passed" in captured.err


def test_explain_fusion_runs_the_default_pipeline(capsys) -> None:
    assert main(["ir", "resnet", "--explain-fusion"]) == 0
    err = capsys.readouterr().err
    assert "fused    graph.conv2d [stem.1] -> graph.relu [stem.2]" in err
    assert "graph.max_pool2d does not absorb producers" in err


def test_print_ir_after_a_pass(capsys) -> None:
    assert main(["ir", "mlp", "--pipeline", "cse,fuse", "--print-ir-after", "fuse"]) == 0
    err = capsys.readouterr().err
    assert "// ----- IR after fuse -----" in err and "IR after cse" not in err


def test_bad_pipeline_is_one_line_and_exit_2(capsys) -> None:
    for pipeline, message in [
            ("canonicalize,fusion", "error: unknown pass 'fusion' (did you mean 'fuse'?); valid "
                                    "passes:"),
            ("cse dce", "error: bad pipeline syntax at column 5 of 'cse dce'")]:
        assert main(["ir", "mlp", "--pipeline", pipeline]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("imported mlp") and len(err) == 2
        assert err[1].startswith(message)


def test_compile_then_run_matches_torch_and_run_needs_no_torch(tmp_path, capsys) -> None:
    import numpy as np
    import torch

    from bitsmith import models

    art = tmp_path / "mlp.bsm"
    assert main(["compile", "mlp", "--dynamic-batch", "-o", str(art)]) == 0
    err = capsys.readouterr().err
    assert "mlp ->" in err and "kernels by template" in err and "dense" in err
    spec = models.get("mlp")
    torch.manual_seed(0)
    (x,) = spec.example_inputs(5)
    np.save(tmp_path / "x.npy", x.numpy())
    run = ("from bitsmith.cli import main\n"
           f"assert main(['run', {str(art)!r}, '--input', {str(tmp_path / 'x.npy')!r}, "
           f"'--output', {str(tmp_path / 'y.npy')!r}]) == 0\n")
    assert_imports_without(["bitsmith.cli"], ["torch"], then=run)  # run needs no torch
    torch.manual_seed(0)
    with torch.no_grad():
        want = spec.build().eval()(x).numpy()
    assert_outputs_match([np.load(tmp_path / "y.npy")], [want], rtol=1e-4)
    assert main(["run", str(art), "--input", str(tmp_path / "x.npy"), "--input",
                 str(tmp_path / "x.npy"), "--output", str(tmp_path / "z.npy")]) == 2
    assert capsys.readouterr().err.strip().endswith("expected 1 input(s) (x), got 2")
    assert main(["run", str(tmp_path / "missing.bsm"), "--input", "x", "--output", "y"]) == 2
    assert "no such artifact" in capsys.readouterr().err


def test_bench_prints_ratios(capsys) -> None:
    assert main(["bench", "mlp", "--batch", "1", "--repeat", "2", "--profile"]) == 0
    err = capsys.readouterr().err
    assert "bitsmith/eager" in err and "3 kernels" in err
    assert "kernels at batch 1" in err and err.count("dense") == 3  # one row per kernel


def test_compile_with_quant_and_calib(tmp_path, capsys) -> None:
    import numpy as np

    art = tmp_path / "q.bsm"
    calib = tmp_path / "calib.npz"
    np.savez(calib, np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    assert main(["compile", "mlp", "--quant", "w4g32:gptq", "--calib", str(calib),
                 "-o", str(art)]) == 0
    err = capsys.readouterr().err
    assert "group=32" in err and "method=gptq" in err and "qdense" in err and " u4 " in err
    assert main(["compile", "mlp", "--quant", "w4g32:gptq", "-o", str(art)]) == 2
    assert "needs calibration inputs" in capsys.readouterr().err
    assert main(["compile", "mlp", "--quant", "w9"]) == 2
    assert "integer weights take 1..8 bits, got 9" in capsys.readouterr().err


UNSUPPORTED = '''
import torch


class KthValue(torch.nn.Module):
    def forward(self, x):
        return torch.kthvalue(x, 2, dim=1).values * 2

    def example_inputs(self, batch=1):
        return (torch.randn(batch, 4),)
'''


def test_a_model_error_is_the_same_one_line_for_every_command(tmp_path, capsys) -> None:
    """`ir`, `compile`, `tune` and `bench` load and import a model the same way: an unsupported
    op is one line naming it, exit code 2, never a traceback."""
    path = tmp_path / "kthvalue.py"
    path.write_text(UNSUPPORTED)
    model = f"{path}:KthValue"
    lines = []
    for argv in (["ir", model], ["compile", model, "-o", str(tmp_path / "f.bsm")],
                 ["tune", model, "--budget", "1"], ["bench", model]):
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "Traceback" not in err[0], (argv, err)
        lines.append(err[0])
    assert len(set(lines)) == 1
    assert lines[0].startswith("error: 1 unsupported ATen op(s) in the model: aten.kthvalue")


def test_run_inputs_by_name_or_position() -> None:
    import pytest

    from bitsmith.cli.compile import ordered_inputs
    from bitsmith.errors import CliError

    names = ["input_ids", "attention_mask"]
    assert ordered_inputs(["attention_mask=m.npy", "input_ids=i.npy"], names) == ["i.npy",
                                                                                   "m.npy"]
    assert ordered_inputs(["i.npy", "a=b.npy"], names) == ["i.npy", "a=b.npy"]  # positional
    with pytest.raises(CliError, match="name every input"):
        ordered_inputs(["input_ids=i.npy", "m.npy"], names)
    with pytest.raises(CliError, match="each of input_ids, attention_mask once"):
        ordered_inputs(["input_ids=i.npy", "input_ids=j.npy"], names)


def test_compile_with_precision_bf16_reports_what_ran_in_bf16(tmp_path, capsys) -> None:
    from bitsmith.codegen.tvm.amx import has_amx_bf16
    from bitsmith.codegen.tvm.target import host_target

    art = tmp_path / "b.bsm"
    assert main(["compile", "mlp", "--precision", "bf16", "-o", str(art)]) == 0
    err = capsys.readouterr().err
    if has_amx_bf16(host_target()):
        assert "dense_bf16_amx" in err and "precision: bf16 (f32 accumulation)" in err
    else:
        assert "precision: f32 in all" in err
    with pytest.raises(SystemExit) as exit_:
        main(["compile", "mlp", "--precision", "fp8"])
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_compile_sign_and_run_key(tmp_path, capsys) -> None:
    """compile --sign KEYFILE; run --key refuses an unsigned artifact or another key in one
    line (exit 2) and runs the signed one; a short key is refused before compiling."""
    import numpy as np  # noqa: PLC0415

    key, other, short = tmp_path / "k", tmp_path / "other", tmp_path / "short"
    key.write_bytes(b"0123456789abcdef-key\n")
    other.write_bytes(b"another-secret-0123456789")
    short.write_bytes(b"tiny")
    signed, plain = tmp_path / "signed.bsm", tmp_path / "plain.bsm"
    assert main(["compile", "mlp", "--sign", str(short), "-o", str(signed)]) == 2
    assert "at least 16 secret bytes" in capsys.readouterr().err and not signed.exists()
    assert main(["compile", "mlp", "--sign", str(key), "-o", str(signed), "--no-check"]) == 0
    assert main(["compile", "mlp", "-o", str(plain), "--no-check"]) == 0
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float32))
    run = ["--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")]
    capsys.readouterr()
    assert main(["run", str(plain), "--key", str(key), *run]) == 2
    assert "not signed" in capsys.readouterr().err
    assert main(["run", str(signed), "--key", str(other), *run]) == 2
    assert "signature does not match" in capsys.readouterr().err
    assert main(["run", str(signed), "--key", str(key), *run]) == 0
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


def test_sizes_and_durations_parse_with_their_units() -> None:
    import pytest

    from bitsmith.cli.console import parse_size
    from bitsmith.cli.serve import parse_duration
    from bitsmith.errors import CliError
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("512") == 512 * 2**20 and parse_size("64k") == 64 * 2**10
    assert parse_duration("30s") == 30 and parse_duration("500ms") == 0.5
    for bad in ("2XB", "-1G", "0", "GiB", "1e9"):
        with pytest.raises(CliError, match="expected a size"):
            parse_size(bad)
    with pytest.raises(CliError, match="expected a duration"):
        parse_duration("soon")
