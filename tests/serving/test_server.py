"""The server on loopback with fake models whose timing and failures the tests control:
batching, every bad input, queue overflow, timeouts, failure isolation, readiness, metrics."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from bitsmith.errors import DeadlineExceeded, QueueFull, ServingError
from bitsmith.serving.batcher import Batcher
from bitsmith.serving.kserve import decode_response, encode_request
from bitsmith.serving.metrics import ServerMetrics
from bitsmith.serving.server import ServeOptions

from .fakes import POISON, expected, fake_model
from .live import (
    LiveServer,
    answered,
    arrived,
    assert_refused_cleanly,
    get,
    metric,
    post,
    post_many,
    wait_for,
)

LONG = ServeOptions(timeout_ms=30_000)
"""A deadline no request of these tests comes near, where the test is not about deadlines."""


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


def check_answers(answers: list, xs: list[np.ndarray]) -> list[int]:
    """One answer per request: its own rows, or a clean 503/504; the indices answered 200."""
    assert len(answers) == len(xs)
    ok = []
    for i, (answer, x) in enumerate(zip(answers, xs, strict=True)):
        if answer.status == 200:
            check_answer(answer, x)
            ok.append(i)
        else:
            assert_refused_cleanly(answer)
    return ok


def send(server: LiveServer, xs: list[np.ndarray]) -> tuple[threading.Thread, list]:
    """POST every x at once from a thread of its own; the thread, and the list that receives
    the answers in order."""
    result: list = []
    thread = threading.Thread(target=lambda: result.extend(
        post_many(server.infer_url("fake"), [body(x) for x in xs])))
    thread.start()
    return thread, result


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows() -> None:
    """While the worker is held, every request arrives; released, it must batch them."""
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    xs = [rows(1 + i % 3, i) for i in range(40)]
    with LiveServer([model], LONG) as server:
        warm = len(recorder.calls)
        gate.clear()
        sender, result = send(server, xs)
        wait_for(lambda: arrived(server, "fake") >= len(xs), "every request arrived")
        gate.set()
        sender.join(60)
        runs = metric(server, "bitsmith_batch_rows_count", model="fake")
        rows_run = metric(server, "bitsmith_batch_rows_sum", model="fake")
        assert answered(server, "fake") == len(xs)
    ok = check_answers(result, xs)
    served = recorder.calls[warm:]
    assert len(served) == runs, "every batch run is counted once"
    assert max(served) <= 8 and set(served) <= set(model.sizes)
    assert sum(len(xs[i]) for i in ok) <= rows_run <= sum(len(x) for x in xs)
    assert len(served) < len(xs), "requests queued together must share batches"


def test_warm_up_runs_every_batch_size_before_ready() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=6, gate=gate)
    assert model.sizes == (1, 2, 4, 6)
    with LiveServer([model], LONG, wait_ready=False) as server:
        assert get(server.url + "/v2/health/live").status == 200
        assert get(server.url + "/v2/health/ready").status == 503
        assert get(server.url + "/v2/models/fake/ready").status == 503
        early = post(server.infer_url("fake"), body(rows(1, 0)))
        assert early.status == 503 and early.headers["Retry-After"] == "1"
        assert "warming up" in early.json()["error"]
        gate.set()
        wait_for(lambda: get(server.url + "/v2/health/ready").status == 200, "ready")
        assert recorder.calls == [1, 2, 4, 6]
        assert get(server.url + "/v2/models/fake/ready").json() == {"name": "fake",
                                                                    "ready": True}
        check_answer(post(server.infer_url("fake"), body(rows(2, 1))), rows(2, 1))
        assert metric(server, "bitsmith_requests_total", model="fake", code="503",
                      reason="warming") == 1


def test_metadata_health_and_unknown_models() -> None:
    model, _ = fake_model()
    other, _ = fake_model("other")
    with LiveServer([model, other], LONG) as server:
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
    with LiveServer([model], LONG) as server:
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
        sender, result = send(server, xs)
        wait_for(lambda: arrived(server, "fake") >= len(xs), "every request was accounted for")
        refused = metric(server, "bitsmith_requests_total", model="fake", code="503",
                         reason="queue_full")
        # the held worker runs one and the queue holds three: three or four are accepted
        # (four when the worker took its first request before the queue filled)
        assert metric(server, "bitsmith_queue_seconds_count", model="fake") <= 1
        assert 3 <= len(xs) - refused <= 4
        gate.set()
        sender.join(60)
    ok = check_answers(result, xs)
    full = [a for a in result if a.status == 503]
    assert len(full) == refused, "each refusal is one 503"
    for answer in full:
        assert "queue of model fake is full (3 requests)" in answer.json()["error"]
    ran = len(recorder.calls) - 1  # after the warm-up run
    assert len(ok) <= ran <= len(xs) - refused, "a refused request reached the model"


def test_timeouts_drop_queued_work_and_discard_running_work() -> None:
    """The held worker keeps both requests past their deadline: the one it took (if it took
    one in time) times out running, the other waiting, and that one never runs."""
    gate = threading.Event()
    model, recorder = fake_model(max_batch=1, gate=gate)
    gate.set()
    xs = [rows(1, 0), rows(1, 1)]
    with LiveServer([model], ServeOptions(timeout_ms=500)) as server:
        gate.clear()
        runs_before = len(recorder.calls)
        sender, result = send(server, xs)
        sender.join(60)
        assert metric(server, "bitsmith_requests_total", model="fake", code="504",
                      reason="timeout") == 2
        gate.set()
        # the worker takes requests in order: once one sent now is answered, it has passed the
        # timed-out ones (were it answered 504 too, there is only less to check)
        probe = rows(1, 2)
        check_answers([post(server.infer_url("fake"), body(probe))], [probe])
    assert [a.status for a in result] == [504, 504]
    running = "timed out after 500 ms running; result discarded"
    waiting = "timed out after 500 ms waiting in the queue; it was not run"
    errors = [a.json()["error"].split(" (")[0] for a in result]
    assert set(errors) <= {running, waiting} and errors.count(running) <= 1, errors
    seen = recorder.rows_seen[runs_before:]
    for x, error in zip(xs, errors, strict=True):
        runs = sum(np.array_equal(r, x) for r in seen)
        assert runs == (error == running), f"{error!r}, yet run {runs} time(s)"


def test_a_failing_request_fails_alone_and_its_batch_mates_are_answered() -> None:
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    xs = [rows(1, i) for i in range(6)]
    xs[3] = np.full((1, 3), POISON, np.float32)
    with LiveServer([model], LONG) as server:
        warm = len(recorder.calls)
        gate.clear()  # hold the first request so the rest queue into one batch
        first, head = send(server, xs[:1])
        wait_for(lambda: len(recorder.calls) > warm, "the first request started")
        sender, rest = send(server, xs[1:])
        wait_for(lambda: metric(server, "bitsmith_queue_depth", model="fake") == 5,
                 "the other five queued")
        gate.set()
        first.join(60)
        sender.join(60)
        assert metric(server, "bitsmith_retried_batches_total", model="fake") == 1
        assert metric(server, "bitsmith_requests_total", model="fake", code="500",
                      reason="failed") == 1
    result = head + rest
    poisoned = result.pop(3)
    assert poisoned.status == 500, poisoned.body
    assert poisoned.json()["error"] == ("model 'fake' failed on this request: "
                                        "ValueError: poison row")
    for answer, x in zip(result, xs[:3] + xs[4:], strict=True):
        check_answer(answer, x)


def test_a_lone_request_does_not_wait_for_company() -> None:
    """Max-delay is ten times the deadline: a request that waited for company would get a 504,
    so a 200 says it ran at once, with no clock read by the test."""
    model, _ = fake_model(max_batch=8)
    options = ServeOptions(max_delay_ms=600_000, timeout_ms=60_000)
    with LiveServer([model], options) as server:
        check_answer(post(server.infer_url("fake"), body(rows(1, 5))), rows(1, 5))


def test_metrics_endpoint_reports_queue_compute_batches_and_padding() -> None:
    model, _ = fake_model(max_batch=8)
    with LiveServer([model], LONG) as server:
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
    # a batch takes 0.1 s and half the deadline is 0.225 s: a request arriving behind one
    # queued is refused. How many arrive so is up to the machine's load; what holds under any
    # load is that each is answered once, with its rows or a clean refusal (the rule itself
    # is checked without a clock in the next test)
    check_answers(answers, xs)
    for answer in answers:
        if answer.status == 503:
            assert "is overloaded: a new request would wait about" in answer.json()["error"]
            assert "over half its 450 ms deadline" in answer.json()["error"]


def test_the_overload_rule_refuses_a_request_that_would_wait_over_half_its_deadline() -> None:
    """On the batcher itself: a batch took >= 1 s and the deadline is 4 s. With the worker held
    on one request, the next finds nothing queued and is accepted; one behind it would wait
    about 3 s, over half the deadline, and is refused at once. No clock decides it: the two are
    submitted in one step of the event loop."""
    gate = threading.Event()
    gate.set()
    model, recorder = fake_model(max_batch=1, delay=1.0, gate=gate)

    async def scenario() -> list:
        batcher = Batcher(model, ServerMetrics(), timeout=4.0)
        batcher.start()
        await batcher.submit([rows(1, 0)], 1).future  # the batcher now knows a batch's time
        recorder.delay = 0.0
        gate.clear()
        held = batcher.submit([rows(1, 1)], 1)
        while len(recorder.calls) < 2:  # the worker took it and waits for the gate
            await asyncio.sleep(0.01)
        queued = batcher.submit([rows(1, 2)], 1)
        with pytest.raises(QueueFull, match="is overloaded: a new request would wait about "
                                            r"\d+ ms, over half its 4000 ms deadline"):
            batcher.submit([rows(1, 3)], 1)
        gate.set()
        done = await asyncio.gather(held.future, queued.future, return_exceptions=True)
        await batcher.close()
        return done

    for result, x in zip(asyncio.run(scenario()), [rows(1, 1), rows(1, 2)], strict=True):
        if isinstance(result, DeadlineExceeded):
            continue  # a documented answer, were the machine too busy to finish in 4 s
        np.testing.assert_array_equal(result[0], expected(x)[0])


def hold_one_and_queue_three(server: LiveServer, recorder,
                             xs: list[np.ndarray]) -> list[tuple[threading.Thread, list]]:
    """Under load, as the batcher sees it: xs[0] runs and holds the worker (its gate is
    clear), xs[1:4] queue behind it. The senders, with the lists their answers go to."""
    warm = len(recorder.calls)
    first = send(server, xs[:1])
    wait_for(lambda: len(recorder.calls) > warm, "the first request started")
    queued = send(server, xs[1:4])
    wait_for(lambda: metric(server, "bitsmith_queue_depth", model="fake") == 3,
             "three requests queued")
    return [first, queued]


def batches_run(recorder, warm: int) -> list[set[float]]:
    """The requests (their fill value) of each batch run after the warm-up, padding dropped."""
    return [set(r[:, 0].tolist()) for r in recorder.rows_seen[warm:]]


def test_under_load_a_batch_waits_for_company_until_max_delay() -> None:
    """Released, the worker finds three requests queued while it ran: their batch is not full
    (3 of 8 rows), and runs once the oldest has waited max-delay, not at the deadline."""
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    xs = [np.full((1, 3), i, np.float32) for i in range(4)]
    with LiveServer([model], ServeOptions(max_delay_ms=300, timeout_ms=30_000)) as server:
        warm = len(recorder.calls)
        gate.clear()
        senders = hold_one_and_queue_three(server, recorder, xs)
        gate.set()
        for sender, _ in senders:
            sender.join(60)
    for answer, x in zip([a for _, result in senders for a in result], xs, strict=True):
        check_answer(answer, x)
    assert batches_run(recorder, warm) == [{0.0}, {1.0, 2.0, 3.0}]


def test_under_load_a_batch_waits_for_company_until_it_is_full() -> None:
    """Max-delay is long: the batch of the three queued requests waits, and a request of five
    rows sent after the worker was released joins it (3 + 5 = 8 rows, full: it runs then)."""
    gate = threading.Event()
    model, recorder = fake_model(max_batch=8, gate=gate)
    gate.set()
    xs = [np.full((1, 3), i, np.float32) for i in range(4)] + [np.full((5, 3), 4, np.float32)]
    options = ServeOptions(max_delay_ms=120_000, timeout_ms=240_000)
    with LiveServer([model], options) as server:
        warm = len(recorder.calls)
        gate.clear()
        senders = hold_one_and_queue_three(server, recorder, xs)
        gate.set()
        late = post(server.infer_url("fake"), body(xs[4]))
        for sender, _ in senders:
            sender.join(60)
    answers = [a for _, result in senders for a in result] + [late]
    for answer, x in zip(answers, xs, strict=True):
        check_answer(answer, x)
    assert batches_run(recorder, warm) == [{0.0}, {1.0, 2.0, 3.0, 4.0}]
