"""The command line: `bitsmith ir` output, --check, and one-line errors with exit code 2."""
import subprocess
import sys

from bitsmith import ir
from bitsmith.cli import main


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
