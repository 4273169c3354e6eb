"""`bitsmith generate` and `bitsmith chat` on the zoo decoder: compile, save, run the saved
artifact, and the one-line refusals."""
from __future__ import annotations

import io
import sys

import pytest

from bitsmith.cli.main import main


def _run(argv: list[str], monkeypatch: pytest.MonkeyPatch, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv), out.getvalue()


def test_generate_save_then_run_the_artifact(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "zoo.bsm")
    common = ["--prompt", "Hello", "--max-tokens", "6"]
    code, first = _run(["generate", "llama", *common, "--max-seq", "200", "--kv", "f32",
                        "--save", path], monkeypatch)
    assert code == 0 and first.strip()
    code, again = _run(["generate", path, *common], monkeypatch)
    assert code == 0 and again == first  # greedy: the same text from the saved artifact
    code, chat = _run(["chat", path, "--max-tokens", "4"], monkeypatch, stdin="hi\nhow?\n\n")
    assert code == 0 and len(chat.strip().splitlines()) == 2  # one reply per message


def test_refusals_are_one_line_errors(tmp_path, monkeypatch, capsys) -> None:
    code, _ = _run(["generate", "llama", "--prompt", "x", "--system", "s", "--max-seq", "64"],
                   monkeypatch)
    assert code == 2 and "--system needs --chat" in capsys.readouterr().err
    code, _ = _run(["generate", str(tmp_path / "none.bsm"), "--prompt", "x"], monkeypatch)
    assert code == 2 and "no such artifact" in capsys.readouterr().err
    code, _ = _run(["generate", "nosuchmodel", "--prompt", "x"], monkeypatch)
    assert code == 2 and "zoo name" in capsys.readouterr().err


def test_bench_generate_reports_prefill_and_decode(monkeypatch, capsys) -> None:
    code, _ = _run(["bench", "llama", "--generate", "--batch", "1", "2", "--prompt-len", "20",
                    "--gen-len", "4", "--repeat", "1"], monkeypatch)
    table = capsys.readouterr().err
    assert code == 0
    for row in ("prefill 20 tokens", "decode, batch 1", "decode, batch 2"):
        assert row in table
