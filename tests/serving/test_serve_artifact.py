"""A compiled artifact behind the real server; SIGTERM drains a server process; the CLI."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest

import bitsmith
from bitsmith import cli
from bitsmith.frontend import load_model
from bitsmith.serving.kserve import decode_response, encode_request
from bitsmith.serving.served import ServedModel
from bitsmith.serving.server import ServeOptions

from .fakes import expected
from .live import LiveServer, arrived, get, metric, post_many, wait_for


@pytest.fixture(scope="module")
def bert_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    loaded = load_model("bert")
    args, kwargs = loaded.call_args(2)
    cm = bitsmith.compile(loaded.module, args, example_kwargs=kwargs, dynamic_batch=True,
                          name="bert")
    path = tmp_path_factory.mktemp("serve") / "bert.bsm"
    cm.save(path)
    return path


def bert_inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, (n, 16))
    mask = np.ones((n, 16), np.int64)
    mask[:, 16 - seed % 5:] = 0  # a different padded tail per request
    return [ids, mask]


def held(run: Callable[..., list[np.ndarray]], gate: threading.Event) -> Callable:
    """`run`, waiting for `gate` first: the test decides when the worker may go on."""
    def run_when_open(*arrays: np.ndarray) -> list[np.ndarray]:
        gate.wait(60)
        return run(*arrays)
    return run_when_open


def test_concurrent_answers_equal_single_request_results(bert_artifact: Path) -> None:
    """The first request holds the worker until all have arrived, so the rest are batched
    (and padded) together whatever the load; each answer equals the request run alone."""
    cm = bitsmith.load(bert_artifact)
    gate = threading.Event()
    gate.set()
    model = ServedModel.from_compiled("bert", cm, max_batch=16)
    model.run = held(model.run, gate)
    names = [s.name for s in cm.artifact.manifest.inputs]
    requests = [bert_inputs(1 + i % 3, i) for i in range(48)]
    with LiveServer([model], ServeOptions(timeout_ms=120_000)) as server:
        gate.clear()
        result: list = []
        sender = threading.Thread(target=lambda: result.extend(post_many(
            server.infer_url("bert"), [encode_request(names, r) for r in requests])))
        sender.start()
        wait_for(lambda: arrived(server, "bert") >= len(requests), "every request arrived")
        gate.set()
        sender.join(120)
        batches = metric(server, "bitsmith_batch_rows_count", model="bert")
    assert batches < len(requests), "requests queued together must share batches"
    assert len(result) == len(requests)
    for answer, inputs in zip(result, requests, strict=True):
        assert answer.status == 200, answer.body
        got = decode_response(answer.body)
        alone = cm(*inputs)
        for spec, want in zip(cm.artifact.manifest.outputs, alone, strict=True):
            np.testing.assert_array_equal(got[spec.name], want)


def test_sigterm_drains_every_accepted_request(tmp_path: Path) -> None:
    script = Path(__file__).with_name("slow_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "0.15"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(url + "/v2/health/ready").status == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        xs = [np.full((1, 3), i, np.float32) for i in range(12)]
        result: list = []
        sender = threading.Thread(target=lambda: result.extend(post_many(
            url + "/v2/models/fake/infer", [encode_request(["x"], [x]) for x in xs])))
        sender.start()
        # every request accepted (queued or started) before the signal: 12 at 2 per 0.15 s
        wait_for(lambda: queued_or_started(get(url + "/metrics").body) >= len(xs),
                 "every request reached the queue")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not listening(url), "the listening socket closed")
        sender.join(60)
        # drained, it ends by the signal it was sent (uvicorn re-raises it), as supervisors expect
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()
        log = proc.stderr.read()
    assert len(result) == 12, log
    for answer, x in zip(result, xs, strict=True):
        assert answer.status == 200, (answer.body, log)
        got = decode_response(answer.body)
        np.testing.assert_array_equal(got["y"], expected(x)[0])
    assert "draining" in log and "Finished server process" in log


def queued_or_started(metrics: bytes) -> float:
    """Requests queued or started, read from a /metrics page of the fake model."""
    values = {}
    for line in metrics.decode().splitlines():
        for name in ("bitsmith_queue_depth", "bitsmith_queue_seconds_count"):
            if line.startswith(name + '{model="fake"} '):
                values[name] = float(line.split()[-1])
    return sum(values.values())


def listening(url: str) -> bool:
    """Whether the server still accepts connections."""
    try:
        get(url + "/v2/health/live")
    except aiohttp.ClientConnectionError:
        return False
    return True


def test_cli_serve_and_loadtest(bert_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    """`bitsmith serve` in a process of its own, `bitsmith loadtest` against it."""
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith", "serve", str(bert_artifact),
                             str(bert_artifact), "--name", "enc", "--port", "0",
                             "--max-batch", "8", "--timeout-ms", "60000"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        lines = []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "Uvicorn running on" in line:
                port = int(line.split(":")[-1].split()[0])
        assert port, "".join(lines)
        url = f"http://127.0.0.1:{port}"
        while get(url + "/v2/health/ready").status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for name in ("enc", "bert"):  # --name for the first, the file stem for the second
            assert get(url + f"/v2/models/{name}").json()["inputs"][0] == {
                "name": "input_ids", "datatype": "INT64", "shape": [-1, 16]}
        # how many requests fit in a second, and whether a busy machine makes the server shed
        # some, is up to the load; what holds: answers are 200s or documented refusals, and
        # with a deadline of a minute at least one request is served
        code = cli.main(["loadtest", f"localhost:{port}", "--model", "enc", "--concurrency",
                         "4", "--duration", "1s", "--json"])
        assert code == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["ok"] > 0 and set(report["errors"]) <= {"503", "504"}, report
        assert report["p50_ms"] <= report["p99_ms"]
        code = cli.main(["loadtest", f"localhost:{port}", "--model", "enc", "--rate", "50",
                         "--duration", "1s", "--rows", "2", "--json"])
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and report["ok"] > 0 and set(report["errors"]) <= {"503", "504"}, report
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["serve", str(tmp_path / "none.bsm")]) == 2
    assert "no such artifact" in capsys.readouterr().err
    assert cli.main(["serve", "a.bsm", "--name", "x", "--name", "y"]) == 2
    assert "at most one --name per artifact (1), got 2" in capsys.readouterr().err
    assert cli.main(["serve", "a.bsm", "--replicas", "2"]) == 2
    assert "give --ray ADDRESS too" in capsys.readouterr().err
    assert cli.main(["serve", "a.bsm", "--route", "prefix"]) == 2
    assert "give --ray ADDRESS too" in capsys.readouterr().err
    assert cli.main(["serve", "a.bsm", "--ray", "auto", "--autoscale", "3:1"]) == 2
    assert "expected LOW:HIGH replicas with 1 <= LOW <= HIGH, got '3:1'" in capsys.readouterr().err
    assert cli.main(["loadtest", "10.1.2.3:8000", "--model", "m", "--duration", "1s"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert cli.main(["loadtest", "localhost:1", "--model", "m", "--duration", "1 minute"]) == 2
    assert "expected a duration such as 30s" in capsys.readouterr().err
    assert cli.main(["loadtest", "127.0.0.1:1", "--model", "m", "--duration", "1s"]) == 2
    assert "cannot reach http://127.0.0.1:1" in capsys.readouterr().err
