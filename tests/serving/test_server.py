"""The server on loopback with fake models whose timing and failures the tests control:
batching, every bad input, queue overflow, timeouts, failure isolation, readiness, metrics."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bitsmith.errors import ServingError
from bitsmith.serving.kserve import decode_response, encode_request
from bitsmith.serving.server import ServeOptions

from .fakes import POISON, expected, fake_model
from .live import LiveServer, get, metric, post, post_many


def body(x: np.ndarray, **extra: object) -> bytes:
    return encode_request(["x"], [np.asarray(x, np.float32)], **extra)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)


def check_answer(answer, x: np.ndarray) -> None:
    assert answer.status == 200, answer.body
    out = decode_response(answer.body)
    want = expected(x)
    np.testing.assert_array_equal(out["y"], want[0])
    np.testing.assert_array_equal(out["s"], want[1])


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows() -> None:
    model, recorder = fake_model(max_batch=8, delay=0.02)
    xs = [rows(1 + i % 3, i) for i in range(40)]
    with LiveServer([model]) as server:
        answers = post_many(server.infer_url("fake"), [body(x) for x in xs])
        for answer, x in zip(answers, xs, strict=True):
            check_answer(answer, x)
        assert metric(server, "bitsmith_requests_total", model="fake", code="200",
                      reason="ok") == 40
        runs = metric(server, "bitsmith_batch_rows_count", model="fake")
        assert metric(server, "bitsmith_batch_rows_sum", model="fake") == sum(len(x) for x in xs)
    served = recorder.calls[len(model.sizes):]  # after the warm-up runs
    assert len(served) == runs < 40, "concurrent requests must share batches"
    assert max(served) <= 8 and set(served) <= set(model.sizes)


def test_warm_up_runs_every_batch_size_before_ready() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=6, gate=gate)
    assert model.sizes == (1, 2, 4, 6)
    with LiveServer([model], wait_ready=False) as server:
        assert get(server.url + "/v2/health/live").status == 200
        assert get(server.url + "/v2/health/ready").status == 503
        assert get(server.url + "/v2/models/fake/ready").status == 503
        early = post(server.infer_url("fake"), body(rows(1, 0)))
        assert early.status == 503 and early.headers["Retry-After"] == "1"
        assert "warming up" in early.json()["error"]
        gate.set()
        deadline = time.monotonic() + 10
        while get(server.url + "/v2/health/ready").status != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.02)
        assert recorder.calls == [1, 2, 4, 6]
        assert get(server.url + "/v2/models/fake/ready").json() == {"name": "fake",
                                                                    "ready": True}
        check_answer(post(server.infer_url("fake"), body(rows(2, 1))), rows(2, 1))
        assert metric(server, "bitsmith_requests_total", model="fake", code="503",
                      reason="not_ready") == 1


def test_metadata_health_and_unknown_models() -> None:
    model, _ = fake_model()
    other, _ = fake_model("other")
    with LiveServer([model, other]) as server:
        meta = get(server.url + "/v2/models/fake").json()
        assert meta["name"] == "fake" and meta["platform"] == "bitsmith"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "s", "datatype": "FP32", "shape": [-1]}]
        assert get(server.url + "/v2").json()["name"] == "bitsmith"
        assert get(server.url + "/v2/health/live").json() == {"live": True}
        missing = get(server.url + "/v2/models/nope")
        assert missing.status == 404
        assert missing.json()["error"] == ("model 'nope' is not served here; served: fake, "
                                           "other")
        assert post(server.infer_url("nope"), body(rows(1, 0))).status == 404
        check_answer(post(server.infer_url("other"), body(rows(1, 3))), rows(1, 3))


BAD_INPUTS = [
    (b"{", 400, "malformed JSON"),
    (b"[1, 2]", 400, "expected a JSON object with 'inputs', got list"),
    (b'{"inputs": []}', 400, "expected 'inputs': a non-empty list of tensors, got []"),
    (b'{"inputs": [{"shape": [1, 3]}]}', 400, "every input needs a string 'name'"),
    (encode_request(["z"], [np.zeros((1, 3), np.float32)]), 400,
     "expected inputs x, got z (unknown: z) (missing: x)"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},'
     b' {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}', 400,
     "input 'x' is given twice"),
    (encode_request(["x"], [np.zeros((1, 3), np.int64)]), 400,
     "input 'x': expected datatype FP32, got 'INT64'"),
    (body(np.zeros((1, 4))), 400, "input 'x': expected shape [-1, 3], got [1, 4] (dim 1 must "
                                  "be 3)"),
    (body(np.zeros((1, 3, 1))), 400, "input 'x': expected shape [-1, 3] (rank 2), got [1, 3, 1]"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}', 400,
     "input 'x': shape [1, 3] holds 3 values, got 2"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, "a", 2]}]}',
     400, "input 'x': expected FP32 values, got values of kind <U"),
    (b'{"inputs": [{"name": "x", "shape": [-1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}',
     400, "'shape' must be a list of ints >= 0, got [-1, 3]"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": "AAAA"}]}', 400,
     "'data' must be a JSON list"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [[1], [2, 3]]}]}',
     400, "ragged"),
    (body(np.zeros((9, 3))), 400, "expected 1..8 batch rows (dim 0), got 9"),
    (body(np.zeros((0, 3))), 400, "expected 1..8 batch rows (dim 0), got 0"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], '
     b'"outputs": [{"name": "w"}]}', 400,
     "output 'w' is not an output of this model; expected one of y, s"),
    (b'{"id": 3, "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", '
     b'"data": [1, 2, 3]}]}', 400, "'id' must be a string, got 3"),
    (b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}'
     + b" " * 2048, 413, "bytes is over the limit of 2048 bytes (--max-body-mb)"),
]


def test_every_bad_input_is_refused_before_queuing_with_expected_vs_got() -> None:
    model, recorder = fake_model()
    options = ServeOptions(max_body_bytes=2048)
    with LiveServer([model], options) as server:
        warm = len(recorder.calls)
        answers = post_many(server.infer_url("fake"), [b for b, _, _ in BAD_INPUTS])
        for (_, status, message), answer in zip(BAD_INPUTS, answers, strict=True):
            assert answer.status == status, (message, answer.body)
            assert message in answer.json()["error"], (message, answer.body)
        assert recorder.calls[warm:] == [], "a bad request reached the model"
        assert metric(server, "bitsmith_requests_total", model="fake", code="400",
                      reason="invalid") == len(BAD_INPUTS) - 1
        assert metric(server, "bitsmith_requests_total", model="fake", code="413",
                      reason="too_large") == 1


def test_requests_may_pick_outputs_nest_data_and_carry_an_id() -> None:
    model, _ = fake_model()
    doc = (b'{"id": "r-7", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", '
           b'"data": [[1, 2, 3], [4, 5, 6]]}], "outputs": [{"name": "s"}]}')
    with LiveServer([model]) as server:
        answer = post(server.infer_url("fake"), doc)
    assert answer.status == 200, answer.body
    got = answer.json()
    assert got["id"] == "r-7" and got["model_name"] == "fake"
    assert got["outputs"] == [{"name": "s", "datatype": "FP32", "shape": [2],
                               "data": [6.0, 15.0]}]


def test_a_full_queue_answers_503_with_retry_after_and_loses_nothing() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=1, gate=gate)
    gate.set()  # warm-up passes; then every run waits for the gate
    options = ServeOptions(queue_size=3, timeout_ms=30_000)
    xs = [rows(1, i) for i in range(12)]
    with LiveServer([model], options) as server:
        gate.clear()
        result: list = []
        sender = threading.Thread(target=lambda: result.extend(
            post_many(server.infer_url("fake"), [body(x) for x in xs])))
        sender.start()
        deadline = time.monotonic() + 10

        def accounted() -> tuple[float, float, float]:  # refused, queued, started
            return (metric(server, "bitsmith_requests_total", model="fake", code="503",
                           reason="queue_full"),
                    metric(server, "bitsmith_queue_depth", model="fake"),
                    metric(server, "bitsmith_queue_seconds_count", model="fake"))
        while sum(accounted()) < 12:
            assert time.monotonic() < deadline, f"requests unaccounted for: {accounted()}"
            time.sleep(0.01)
        refused, queued, started = accounted()
        # one runs, three queue, eight are refused; or, when the worker takes its first request
        # only after the queue filled, nine are refused and two queue
        assert started == 1 and queued == 3 - (refused - 8)
        gate.set()
        sender.join(30)
    assert len(result) == 12
    ok = [(a, x) for a, x in zip(result, xs, strict=True) if a.status == 200]
    full = [a for a in result if a.status == 503]
    assert len(ok) == 1 + queued and len(full) == refused, "a request was lost"
    for answer, x in ok:
        check_answer(answer, x)
    for answer in full:
        assert int(answer.headers["Retry-After"]) >= 1
        assert "queue of model fake is full (3 requests)" in answer.json()["error"]
    assert len(recorder.calls) == 1 + len(ok)  # warm-up, then exactly the accepted requests


def test_timeouts_drop_queued_work_and_discard_running_work() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=1, gate=gate)
    gate.set()
    with LiveServer([model], ServeOptions(timeout_ms=300)) as server:
        gate.clear()
        runs_before = len(recorder.calls)
        result: list = []
        sender = threading.Thread(target=lambda: result.extend(
            post_many(server.infer_url("fake"), [body(rows(1, 0)), body(rows(1, 1))])))
        sender.start()
        sender.join(10)
        gate.set()
        deadline = time.monotonic() + 5
        while metric(server, "bitsmith_queue_depth", model="fake") or len(recorder.calls) == \
                runs_before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # let the worker look at the queue again
        assert metric(server, "bitsmith_requests_total", model="fake", code="504",
                      reason="timeout") == 2
    errors = sorted(a.json()["error"].split(" (")[0] for a in result)
    assert [a.status for a in result] == [504, 504]
    assert errors == ["timed out after 300 ms running; result discarded",
                      "timed out after 300 ms waiting in the queue; it was not run"]
    assert len(recorder.calls) == runs_before + 1, "the timed-out queued request ran"


def test_a_failing_request_fails_alone_and_its_batch_mates_are_answered() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    xs = [rows(1, i) for i in range(6)]
    xs[3] = np.full((1, 3), POISON, np.float32)
    with LiveServer([model], ServeOptions(timeout_ms=30_000)) as server:
        gate.clear()  # hold the first request so the rest queue into one batch
        result: list = []
        sender = threading.Thread(target=lambda: result.extend(
            post_many(server.infer_url("fake"), [body(x) for x in xs])))
        sender.start()
        deadline = time.monotonic() + 10
        while metric(server, "bitsmith_queue_depth", model="fake") + metric(
                server, "bitsmith_queue_seconds_count", model="fake") < 6:  # queued or running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        sender.join(30)
        assert metric(server, "bitsmith_retried_batches_total", model="fake") >= 1
        assert metric(server, "bitsmith_requests_total", model="fake", code="500",
                      reason="failed") == 1
    for i, (answer, x) in enumerate(zip(result, xs, strict=True)):
        if i == 3:
            assert answer.status == 500
            assert answer.json()["error"] == ("model 'fake' failed on this request: "
                                              "ValueError: poison row")
        else:
            check_answer(answer, x)


def test_a_lone_request_does_not_wait_for_company() -> None:
    model, _ = fake_model(max_batch=8)
    options = ServeOptions(max_delay_ms=20_000, timeout_ms=60_000)
    with LiveServer([model], options) as server:
        start = time.monotonic()
        check_answer(post(server.infer_url("fake"), body(rows(1, 5))), rows(1, 5))
        assert time.monotonic() - start < 10, "an idle server made a request wait max-delay"


def test_metrics_endpoint_reports_queue_compute_batches_and_padding() -> None:
    model, _ = fake_model(max_batch=8)
    with LiveServer([model]) as server:
        check_answer(post(server.infer_url("fake"), body(rows(3, 0))), rows(3, 0))
        post(server.infer_url("fake"), b"{")
        text = get(server.url + "/metrics").body.decode()
    assert 'bitsmith_requests_total{code="200",model="fake",reason="ok"} 1.0' in text
    assert 'bitsmith_requests_total{code="400",model="fake",reason="invalid"} 1.0' in text
    assert 'bitsmith_padded_rows_total{model="fake"} 1.0' in text  # 3 rows padded to 4
    assert 'bitsmith_batch_rows_sum{model="fake"} 3.0' in text
    assert 'bitsmith_queue_depth{model="fake"} 0.0' in text
    for name in ("bitsmith_queue_seconds_count", "bitsmith_compute_seconds_count",
                 "bitsmith_request_seconds_count"):
        assert f'{name}{{model="fake"}} 1.0' in text, name


def test_two_models_with_one_name_are_refused() -> None:
    a, _ = fake_model("same")
    b, _ = fake_model("same")
    with pytest.raises(ServingError, match="two models are named same"):
        LiveServer([a, b])


def test_a_standing_queue_is_refused_before_it_would_time_out() -> None:
    model, recorder = fake_model(max_batch=1, delay=0.1)
    with LiveServer([model], ServeOptions(timeout_ms=450, queue_size=64)) as server:
        check_answer(post(server.infer_url("fake"), body(rows(1, 0))), rows(1, 0))  # 0.1 s/batch
        xs = [rows(1, i) for i in range(10)]
        answers = post_many(server.infer_url("fake"), [body(x) for x in xs])
    statuses = sorted(a.status for a in answers)
    # a batch takes 0.1 s and half the deadline is 0.225 s: a request arriving behind one
    # queued is refused, so some are served, the rest refused, and none times out
    assert set(statuses) == {200, 503}, statuses
    for answer, x in zip(answers, xs, strict=True):
        if answer.status == 200:
            check_answer(answer, x)
        else:
            assert "is overloaded: a new request would wait about" in answer.json()["error"]
            assert "over half its 450 ms deadline" in answer.json()["error"]


def test_under_load_a_batch_waits_for_company_until_max_delay() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    options = ServeOptions(max_delay_ms=1500, timeout_ms=30_000)
    xs = [np.full((1, 3), i, np.float32) for i in range(5)]
    with LiveServer([model], options) as server:
        warm = len(recorder.calls)
        gate.clear()  # the first request runs and holds the worker; three more queue behind it
        result: list = []
        first = threading.Thread(target=lambda: result.extend(
            post_many(server.infer_url("fake"), [body(x) for x in xs[:4]])))
        first.start()
        deadline = time.monotonic() + 10
        while metric(server, "bitsmith_queue_depth", model="fake") + metric(
                server, "bitsmith_queue_seconds_count", model="fake") < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()  # the queued ones arrived under load: their batch may wait for company
        late = post(server.infer_url("fake"), body(xs[4]))
        first.join(30)
    check_answer(late, xs[4])
    for answer, x in zip(result, xs, strict=True):
        check_answer(answer, x)
    # two batches: the 5th request joined the queued ones (without the wait it would have run
    # in a third), and that batch ran after max_delay without waiting to be full (8 rows)
    batches = [set(rows[:, 0].tolist()) for rows in recorder.rows_seen[warm:]]
    assert len(batches) == 2, batches
    assert 4.0 in batches[1] and batches[0] | batches[1] == {0.0, 1.0, 2.0, 3.0, 4.0}
