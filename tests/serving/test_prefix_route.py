"""The pieces of `serve --ray`'s routed path that need no cluster: routing keys from OpenAI
bodies (hostile ones included), the affinity table's ranking, the gateway relaying a replica's
app (streamed, errors, limits, a client that leaves), the route chosen by artifact kind, and a
Ray address with nothing behind it refused at once."""
from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bitsmith.errors import ServingError
from bitsmith.serving.prefix_route import CHUNK, MAX_LINKS, AffinityTable, routing_key
from bitsmith.serving.ray_serve import Forwarded, Gateway, resolve_route, run_forwarded
from bitsmith.serving.server import ServeOptions


def _chat(system: str, user: str, model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "system", "content": system},
                                                      {"role": "user", "content": user}]})


def test_keys_share_links_exactly_as_far_as_the_prompts_share_text() -> None:
    system = "You answer in French. " * 40  # 880 characters: 6 whole links
    a = routing_key("/v1/chat/completions", _chat(system, "Why?"))
    b = routing_key("/v1/chat/completions", _chat(system, "How?"))
    assert a is not None and b is not None and a != b
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert shared >= len(system) // CHUNK  # the system prompt's whole chunks, and the model
    other = routing_key("/v1/chat/completions", _chat(system, "Why?", model="n"))
    assert other is not None and not set(other) & set(a)  # another model shares nothing
    long = routing_key("/v1/completions", orjson.dumps({"prompt": "x" * 10**6}))
    assert long is not None and len(long) == MAX_LINKS
    ids = routing_key("/v1/completions", orjson.dumps({"prompt": [1, 2, 3]}))
    assert ids == routing_key("/v1/completions", orjson.dumps({"prompt": [[1, 2, 3]]}))
    parts = routing_key("/v1/chat/completions", orjson.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}))
    assert parts == routing_key("/v1/chat/completions", orjson.dumps({"messages": [
        {"role": "user", "content": "hi"}]}))


@pytest.mark.parametrize("path,body", [
    ("/v2/models/m/infer", _chat("s", "u")),  # not an LLM route
    ("/v1/completions", b"{not json"), ("/v1/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"messages": "hi"}'),
    ("/v1/chat/completions", b'{"messages": [1, null, {"content": {"a": 1}}]}'),
    ("/v1/completions", b'{"prompt": {"nested": [1e999]}, "model": 7}'),
])
def test_hostile_or_other_bodies_route_by_load_or_by_what_they_hold(path: str,
                                                                    body: bytes) -> None:
    key = routing_key(path, body)
    assert key is None or (isinstance(key, tuple) and all(isinstance(k, bytes) for k in key))
    if path.startswith("/v2") or body.startswith((b"{not", b"[")):
        assert key is None


def test_a_huge_or_deep_prompt_costs_no_more_than_its_keyed_text() -> None:
    ids = orjson.dumps({"prompt": [1] * 5_000_000})  # 10 MB of token ids
    assert len(routing_key("/v1/completions", ids) or ()) == MAX_LINKS
    chat = orjson.dumps({"messages": [{"role": "user", "content": "x"}] * 500_000})
    assert len(routing_key("/v1/chat/completions", chat) or ()) == MAX_LINKS
    deep = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert routing_key("/v1/completions", deep) is not None  # nested lists add nothing
    deeper = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert routing_key("/v1/completions", deeper) is None  # past orjson's nesting limit
    odd = orjson.dumps({"model": ["m"], "messages": [{"role": {"r": 1}, "content": [
        True, 3, None, {"text": 5}, {"text": "t"}]}]})
    assert routing_key("/v1/chat/completions", odd) is not None


def test_affinity_ranks_the_holder_first_unless_it_is_busier_than_the_slack() -> None:
    table = AffinityTable(slack=2)
    a = routing_key("/v1/completions", orjson.dumps({"prompt": "p" * 1000 + "a"}))
    b = routing_key("/v1/completions", orjson.dumps({"prompt": "p" * 1000 + "b"}))
    assert a and b
    loads = {"r0": 0, "r1": 0, "r2": 0}
    first = table.rank(a, loads)  # nobody holds it: its two hash-chosen replicas, then the rest
    assert [len(rank) for rank in first] == [1, 1, 1]
    assert first == table.rank(a, loads)  # the same two whoever asks
    pair = first[0] + first[1]
    assert table.rank(a, {**loads, pair[0]: 5})[0] == pair  # apart by load: the router picks
    c = routing_key("/v1/completions", orjson.dumps({"prompt": "other prefix " * 50}))
    assert c
    table.record(c, pair[0])  # pair[0] now holds more: a new prefix goes to pair[1] first
    assert table.rank(a, loads)[0] == [pair[1]] and table.held[pair[0]] == len(c) - 1
    table = AffinityTable(slack=2)
    table.record(a, "r2")
    assert table.rank(b, loads)[0] == ["r2"]  # b shares a's prefix: r2 holds it
    assert table.rank(b, {"r0": 0, "r1": 1, "r2": 2})[0] == ["r2"]  # within the slack
    busy = table.rank(b, {"r0": 0, "r1": 1, "r2": 3})  # past it: spread by load
    assert busy[0] != ["r2"] and sorted(r for rank in busy for r in rank) == ["r0", "r1", "r2"]
    assert table.rank(b, {"r0": 0, "r1": 0})[0] != ["r2"]  # r2 is gone
    table.forget("r2")
    assert not table.owner and not table.held and table.rank(b, {}) == []
    small = AffinityTable(capacity=3)
    small.record(a, "r0")
    assert len(small.owner) == 3 and list(small.owner) == list(a[-3:]) and small.held["r0"] == 3
    small.record(a[:3], "r1")  # links move between replicas, counted where they are
    assert small.held == {"r0": 1, "r1": 2}
    small.record(a[:1], "r1")  # the model's own link is nobody's prefix
    assert small.held == {"r0": 1, "r1": 2}
    with pytest.raises(ValueError, match="capacity >= 1"):
        AffinityTable(capacity=0)


async def _echo(request: Request) -> Response:
    body = await request.body()
    if b'"stream": true' in body:
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n".encode()
        return StreamingResponse(chunks(), media_type="text/event-stream")
    if request.url.path == "/boom":
        raise RuntimeError("the app failed")
    return JSONResponse({"method": request.method, "query": request.url.query,
                         "header": request.headers.get("x-tag"), "body": body.decode()},
                        status_code=201, headers={"x-replica": "r0"})


BACKEND = Starlette(routes=[Route("/{rest:path}", _echo, methods=["GET", "POST"])])


class _Stream:
    def __init__(self, generator) -> None:
        self.generator, self.cancelled = generator, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.generator.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class _Whole:
    def __init__(self, handle: _Handle) -> None:
        self.handle = handle

    async def _collect(self, request: Forwarded):
        items = [item async for item in run_forwarded(BACKEND, request)]
        return items[0][1], items[0][2], b"".join(items[1:])

    def remote(self, request: Forwarded):
        self.handle.seen.append(request)
        self.handle.whole += 1
        return self._collect(request)


class _Handle:
    """What the gateway uses of a Serve handle, over the backend app in this process."""

    def __init__(self) -> None:
        self.seen: list[Forwarded] = []
        self.whole = 0  # requests answered in one reply, not streamed
        self.forward_whole = _Whole(self)

    def options(self, stream: bool) -> _Handle:
        assert stream
        return self

    @property
    def forward(self) -> _Handle:
        return self

    def remote(self, request: Forwarded) -> _Stream:
        self.seen.append(request)
        return _Stream(run_forwarded(BACKEND, request))


def _gateway(options: ServeOptions | None = None) -> tuple[TestClient, _Handle]:
    handle = _Handle()
    gateway = Gateway(handle, options or ServeOptions())
    app = Starlette(routes=[Route("/{rest:path}", gateway.__call__, methods=["GET", "POST"])])
    return TestClient(app), handle


def test_the_gateway_relays_the_replicas_answer_with_its_key() -> None:
    client, handle = _gateway()
    r = client.post("/v1/completions?x=1", content=b'{"prompt": "hello"}',
                    headers={"x-tag": "t"})
    assert r.status_code == 201 and r.headers["x-replica"] == "r0"
    assert r.json() == {"method": "POST", "query": "x=1", "header": "t",
                        "body": '{"prompt": "hello"}'}
    assert handle.seen[-1].key == routing_key("/v1/completions", b'{"prompt": "hello"}')
    assert handle.whole == 1
    body = b'{"prompt": "hi", "stream": true}'
    r = client.post("/v1/completions", content=body)
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert handle.whole == 1 and handle.seen[-1].key == routing_key("/v1/completions", body)
    r = client.post("/v2/models/m/infer", content=body)  # streamed by the app: relayed whole
    assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n" and handle.whole == 2
    assert handle.seen[-1].key is None
    r = client.get("/boom")  # the app's own 500 (its error logged), not a hang
    assert r.status_code == 500


def test_the_gateway_cancels_a_finished_stream_and_relays_a_deep_body() -> None:
    client, handle = _gateway()
    streams: list[_Stream] = []
    remote = handle.remote
    handle.remote = lambda request: streams.append(remote(request)) or streams[-1]  # type: ignore[method-assign]
    r = client.post("/v1/completions", content=b'{"prompt": "x", "stream": true}')
    assert r.status_code == 200 and streams and streams[0].cancelled
    deep = b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}"
    r = client.post("/v1/completions", content=deep)  # the replica answers it, not the gateway
    assert r.status_code == 201 and r.json()["body"] == deep.decode()


def _call(gateway: Gateway, messages: list[dict], headers=()) -> object:
    """The gateway's answer to a request whose body arrives as `messages` (then stalls)."""
    async def main():
        from starlette.requests import Request as StarletteRequest

        pending = list(messages)

        async def receive():
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "query_string": b"", "headers": list(headers), "client": ("1.2.3.4", 5)}
        return await gateway(StarletteRequest(scope, receive))
    return asyncio.run(main())


def test_the_gateway_times_out_a_stalled_body_and_counts_a_client_that_left() -> None:
    gateway = Gateway(_Handle(), ServeOptions(body_timeout_s=0.3))
    stalled = _call(gateway, [{"type": "http.request", "body": b"{", "more_body": True}],
                    [(b"content-length", b"100")])
    assert stalled.status_code == 408 and b"timed out reading the body" in stalled.body
    left = _call(gateway, [{"type": "http.disconnect"}])
    assert left.status_code == 499 and gateway.bodies.pending == 0


def test_a_replica_that_failed_or_is_gone_is_500_or_503_without_its_details() -> None:
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError

    class Failing(_Handle):
        def __init__(self, exc: Exception) -> None:
            super().__init__()
            self.forward_whole = self  # type: ignore[assignment]
            self.exc = exc

        def remote(self, request: Forwarded):
            async def fail():
                raise self.exc
            return fail()

    for exc, status in ((RuntimeError("secret traceback"), 500), (ActorDiedError(), 503)):
        client = TestClient(Starlette(routes=[Route(
            "/{rest:path}", Gateway(Failing(exc), ServeOptions()).__call__, methods=["POST"])]))
        r = client.post("/v2/models/m/infer", content=b"{}")
        assert r.status_code == status and "secret" not in r.text
        assert (r.headers.get("retry-after") == "1") == (status == 503)


def test_the_gateway_refuses_a_body_over_the_limit() -> None:
    client, handle = _gateway(ServeOptions(max_body_bytes=100))
    r = client.post("/v1/completions", content=b"x" * 101)
    assert r.status_code == 413 and "over the limit of 100 bytes" in r.json()["error"]["message"]
    r = client.post("/v2/models/m/infer", content=b"x" * 101)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert not handle.seen


def test_a_forwarded_request_whose_client_leaves_tells_the_app() -> None:
    left = asyncio.Event()

    async def app(scope, receive, send) -> None:
        assert (await receive())["body"] == b"q"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        left.set()

    async def main() -> None:
        stream = run_forwarded(app, Forwarded(None, "POST", "/", b"", (), b"q"))
        assert await stream.__anext__() == ("start", 200, [])
        assert await stream.__anext__() == b"first"
        await stream.aclose()  # the client left
        await asyncio.wait_for(left.wait(), 5)

    asyncio.run(main())


def test_an_app_that_ignores_its_client_leaving_is_cancelled(monkeypatch) -> None:
    from bitsmith.serving import ray_serve

    monkeypatch.setattr(ray_serve, "ABANDON_GRACE_S", 0.05)
    cancelled = asyncio.Event()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await asyncio.sleep(3600)  # never listens for the disconnect
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        stream = run_forwarded(app, Forwarded(None, "GET", "/", b"", (), b""))
        assert (await stream.__anext__())[0] == "start"
        await stream.aclose()
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(main())


def test_an_app_that_ends_without_a_response_is_an_error() -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def main() -> None:
        return [item async for item in run_forwarded(app, Forwarded(None, "GET", "/", b"", (),
                                                                    b""))]

    with pytest.raises(ServingError, match="without a complete response"):
        asyncio.run(main())


def test_auto_route_is_prefix_only_with_an_llm(tmp_path: Path) -> None:
    import torch

    import bitsmith
    import bitsmith.llm as bllm

    model = bitsmith.compile(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),), name="lin")
    model.save(tmp_path / "lin.bsm")
    llm = bllm.compile("llama", kv="f32", max_batch=1, max_seq=32, page_size=8, prefill=(8,),
                       score_chunk=0)
    llm.save(tmp_path / "llm.bsm")
    assert resolve_route("auto", [("lin", tmp_path / "lin.bsm")]) == "direct"
    assert resolve_route("auto", [("lin", tmp_path / "lin.bsm"),
                                  ("llm", tmp_path / "llm.bsm")]) == "prefix"
    assert resolve_route("round-robin", [("lin", tmp_path / "lin.bsm")]) == "round-robin"
    with pytest.raises(ServingError, match="route: expected one of auto, direct"):
        resolve_route("random", [])
    (tmp_path / "bad.bsm").write_bytes(b"not a zip")
    with pytest.raises(bitsmith.errors.ArtifactError, match="not a readable bitsmith artifact"):
        resolve_route("auto", [("bad", tmp_path / "bad.bsm")])


def test_a_ray_address_with_nothing_there_is_refused_at_once() -> None:
    ray = pytest.importorskip("ray")
    import socket

    from bitsmith.runtime.ray_cluster import join

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if ray.is_initialized():
        pytest.skip("this process is in a Ray cluster already")
    with pytest.raises(ServingError, match=f"nothing accepts connections at 127.0.0.1:{port}"):
        join(f"127.0.0.1:{port}", ServingError, "serving on Ray")
    with pytest.raises(ServingError, match="expected a Ray address 'auto', 'HOST:PORT'"):
        join("nonsense", ServingError, "serving on Ray")
