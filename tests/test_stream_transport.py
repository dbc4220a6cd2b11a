"""StreamTransport against a scripted HTTP/1.1 server on loopback.

Each test's server is a coroutine that reads one request at a time and
writes exactly the bytes the test wants (split, delayed, cut short), so the
transport's framing, keep-alive, timeout and error paths are checked on a
real socket. No timing thresholds: delays only order events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import perftest_models as pm  # noqa: E402

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


def sse(*events: str) -> bytes:
    return b"".join(b"data: %s\n\n" % e.encode() for e in events)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
ROLE = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOKEN = json.dumps({"choices": [{"index": 0, "delta": {"content": " tok"}}]})
USAGE = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
STREAM = [ROLE, TOKEN, TOKEN, USAGE, "[DONE]"]


class Server:
    """Counts connections and requests; `handler(reader, writer, n)` answers
    request n and returns whether to keep the connection open."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.bodies.append(await reader.readexactly(length))
                self.requests += 1
                if not await self.handler(reader, writer, self.requests):
                    return
        except asyncio.CancelledError:  # the test is over
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def streaming(pieces_of: Callable[[bytes], list[bytes]] = lambda b: [b],
              keep: bool = True) -> Handler:
    async def handler(reader, writer, n):
        body = b"".join(chunk(sse(e)) for e in STREAM) + b"0\r\n\r\n"
        writer.write(SSE_HEAD)
        for piece in pieces_of(body):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.001)
        return keep
    return handler


def payload() -> bytes:
    return pm.chat_payload("m", [{"role": "user", "content": "hi"}], 2, 0.0, None, "salt")


def run(coro):
    return pm.run_async(coro)


async def one_chat(url: str, timeout_s: float = 30.0, n: int = 1) -> list[pm.Sample]:
    async with pm.http_client(url, "sk-test", timeout_s) as client:
        assert isinstance(client._transport, pm.StreamTransport)
        return [await pm.send_chat(client, payload(), 2, retry_wait_s=0.01) for _ in range(n)]


@pytest.mark.parametrize("split", ["whole", "per-event", "byte-by-byte"])
def test_a_chunked_stream_is_measured_however_the_server_splits_it(split):
    cut = {"whole": lambda b: [b],
           "per-event": lambda b: [b[i:i + 40] for i in range(0, len(b), 40)],
           "byte-by-byte": lambda b: [b[i:i + 1] for i in range(len(b))]}[split]
    srv = Server(streaming(cut))

    async def main():
        async with srv as url:
            return await one_chat(url)

    [s] = run(main())
    assert s.ok, s.error
    assert (s.tokens_in, s.tokens_out, s.tokens_out_exact) == (3, 2, True)
    assert len(s.itl_ms) == 1
    assert json.loads(srv.bodies[0]) == json.loads(payload())


def test_recorded_reads_carry_the_same_bytes_as_aiter_raw():
    srv = Server(streaming(lambda b: [b[i:i + 7] for i in range(0, len(b), 7)]))

    async def main():
        async with srv as url, pm.http_client(url, None, 30.0) as client:
            got = []
            for use_record in (True, False):
                request = client.build_request("POST", "/v1/chat/completions", content=payload())
                response = await client.send(request, stream=True)
                reads: list[tuple[float, bytes]] = []
                if use_record:
                    await response.extensions["perftest.record"](reads, lambda: 1.0)
                else:
                    reads = [(1.0, c) async for c in response.aiter_raw()]
                await response.aclose()
                got.append(b"".join(d for _, d in reads))
            return got

    recorded, iterated = run(main())
    assert recorded == iterated == b"".join(sse(e) for e in STREAM)


def test_a_kept_alive_connection_is_reused():
    srv = Server(streaming())

    async def main():
        async with srv as url:
            return await one_chat(url, n=3)

    assert all(s.ok for s in run(main()))
    assert (srv.connections, srv.requests) == (1, 3)


def test_a_connection_the_server_closed_after_its_response_is_replaced():
    srv = Server(streaming(keep=False))

    async def main():
        async with srv as url:
            return await one_chat(url, n=3)

    samples = run(main())
    assert all(s.ok for s in samples), [s.error for s in samples]
    assert srv.connections == 3 and all(s.retries == 0 for s in samples)


def test_a_stalled_stream_is_a_failed_sample_that_says_so():
    async def handler(reader, writer, n):
        writer.write(SSE_HEAD + chunk(sse(ROLE)))  # read 1, with the head
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(sse(TOKEN)))  # read 2
        await asyncio.sleep(5)
        return False

    async def main():
        async with Server(handler) as url:
            return await one_chat(url, timeout_s=0.2)

    [s] = run(main())
    assert not s.ok
    assert s.error.startswith("stalled: no bytes for 0.2 s after 2 read(s)")


def test_a_connection_cut_mid_stream_is_a_failed_sample_that_says_so():
    async def handler(reader, writer, n):
        writer.write(SSE_HEAD + chunk(sse(ROLE)) + chunk(sse(TOKEN))[:-3])
        await writer.drain()
        return False

    async def main():
        async with Server(handler) as url:
            return await one_chat(url)

    [s] = run(main())
    assert not s.ok
    assert s.error.startswith("connection broken after 1 read(s): RemoteProtocolError")


def test_a_refused_request_is_retried_and_its_error_body_read():
    async def handler(reader, writer, n):
        if n == 1:
            body = b'{"error": {"message": "busy"}}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n"
                         b"retry-after: 0\r\n\r\n%s" % (len(body), body))
            return True
        return await streaming()(reader, writer, n)

    async def main():
        async with Server(handler) as url:
            return await one_chat(url)

    [s] = run(main())
    assert s.ok and s.retries == 1


def test_a_server_error_is_reported_with_its_message():
    async def handler(reader, writer, n):
        body = b'{"error": {"message": "model exploded"}}'
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n"
                     + chunk(body) + b"0\r\n\r\n")
        return True

    async def main():
        async with Server(handler) as url:
            return await one_chat(url)

    [s] = run(main())
    assert (s.ok, s.error) == (False, "HTTP 500: model exploded")


def test_an_informational_response_before_the_real_one_is_skipped():
    async def handler(reader, writer, n):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await streaming()(reader, writer, n)

    async def main():
        async with Server(handler) as url:
            return await one_chat(url)

    [s] = run(main())
    assert s.ok, s.error


def test_a_plain_json_post_reads_its_content_length_body():
    async def handler(reader, writer, n):
        body = json.dumps({"count": 7, "max_model_len": 4096}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    async def main():
        async with Server(handler) as url, pm.http_client(url, None, 30.0) as client:
            first = await client.post("/tokenize", json={"prompt": "x"})
            second = await client.post("/tokenize", json={"prompt": "y"})
            return first.json(), second.status_code

    assert run(main()) == ({"count": 7, "max_model_len": 4096}, 200)


def test_the_api_key_and_the_body_reach_the_server():
    srv = Server(streaming())

    async def main():
        async with srv as url:
            return await one_chat(url)

    [s] = run(main())
    assert s.ok
    head = srv.heads[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nauthorization: bearer sk-test\r\n" in head.lower()
    assert srv.bodies[0] == payload()


def test_a_refused_connection_is_a_connect_error_sample():
    async def main():
        async with Server(streaming()) as url:
            pass  # closed: nothing listens on the port any more
        return await one_chat(url)

    [s] = run(main())
    assert not s.ok and s.error.startswith("cannot connect:") and s.retries == 2


def test_through_a_proxy_the_default_httpx_transport_is_used(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert pm._proxied("http://10.1.2.3:8000")
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert not pm._proxied("http://10.1.2.3:8000")


def test_concurrent_streams_are_measured_in_payload_order_after_the_level():
    seen_by_observer = []

    async def handler(reader, writer, n):
        await asyncio.sleep(0.01 * (5 - n % 5))  # later requests finish first
        return await streaming()(reader, writer, n)

    async def main():
        async with Server(handler) as url, pm.http_client(url, None, 30.0, streams=5) as client:
            scenario = pm.Scenario("t", "throughput", None, 2, 10, 5)
            return await pm.run_concurrent(
                client, [payload()] * 10, scenario,
                on_stream=lambda t_sent, reads, s: seen_by_observer.append(s))

    samples, duration_s = run(main())
    assert len(samples) == 10 and all(s.ok for s in samples) and duration_s > 0
    # Measured after the level, in payload order, whatever order they ended in.
    assert seen_by_observer == [dataclasses.replace(s, start_s=0.0) for s in samples]


def test_a_cookie_the_server_sets_is_sent_back_like_httpx_does():
    # Load balancers pin a client to a replica with a cookie.
    async def handler(reader, writer, n):
        writer.write(SSE_HEAD.replace(b"\r\n\r\n", b"\r\nset-cookie: route=r7; Path=/\r\n\r\n", 1)
                     + chunk(b"".join(sse(e) for e in STREAM)) + b"0\r\n\r\n")
        return True

    srv = Server(handler)

    async def main():
        async with srv as url:
            return await one_chat(url, n=2)

    assert all(s.ok for s in run(main()))
    assert b"\r\ncookie: route=r7\r\n" not in srv.heads[0].lower()
    assert b"\r\ncookie: route=r7\r\n" in srv.heads[1].lower()


def test_a_kept_alive_connection_the_loop_refuses_to_write_to_is_replaced():
    """uvloop raises RuntimeError when the request is written to a transport
    the server closed after the pool's check (asyncio drops the write and the
    read finds the connection stale): either way the request goes out on a new
    connection, as a resend of nothing measured, not a failed sample. The
    refusing transport stands in for uvloop's, whose timing cannot be forced."""
    srv = Server(streaming())

    class ClosedUnderUs:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; "
                               "the handler is closed")

        def __getattr__(self, name):
            return getattr(self.real, name)

    async def main():
        async with srv as url, pm.http_client(url, "sk-test", 30.0) as client:
            first = await pm.send_chat(client, payload(), 2, retry_wait_s=0.01)
            (idle,) = [conns for conns in client._transport._idle.values() if conns]
            idle[-1].transport = ClosedUnderUs(idle[-1].transport)
            second = await pm.send_chat(client, payload(), 2, retry_wait_s=0.01)
            return first, second

    first, second = run(main())
    assert first.ok and second.ok, second.error
    assert second.retries == 0 and srv.connections == 2
