#!/usr/bin/env python3
"""A fast OpenAI-compatible streaming server that stamps every chunk.

For benchmarking *clients*: it answers POST /v1/chat/completions with the
exact SSE framing of vLLM 0.32 (HTTP/1.1 chunked transfer, one HTTP chunk per
SSE event):

  1. the role chunk, delta {"role": "assistant", "content": ""};
  2. one chunk per token, delta {"content": " tok"}; the last one carries
     finish_reason "length";
  3. the usage chunk, "choices": [] and "usage";
  4. data: [DONE]

and adds two fields to every chunk's JSON: "x_sent", the server's
time.perf_counter() just before the chunk was written to the socket, and, in
the role chunk, "x_recv", when the request had arrived. On Linux
perf_counter is CLOCK_MONOTONIC, so a client in another process can subtract
it from its own receive time. The first token's text is " #<request id>" so
that a client's saved output can be matched to the server's log.

Pacing is vLLM's engine step: all streams step together on one grid of
`gap_s` (multiples of it on the perf_counter clock), one token per stream per
step, the role chunk and first token one to two gaps after the request
arrives; so whatever the client's own sending pattern, its streams' chunks
come in the same bursts. Gap 0 means as fast as the client reads (a stream is
skipped while its socket is backed up, so a stamp is never older than the
kernel's buffer).

Control (for the benchmark driving it):
  POST /_bench/config {"gap_s": 0.01, "watch_pid": PID}
                                        set the pacing for new requests; with
                                        watch_pid, read that process's CPU time
                                        (/proc/PID/stat) when the next request
                                        arrives, so that a client's start-up can
                                        be left out of its CPU per token
  GET  /_bench/log                      per-request stamps since the last call,
                                        and the CPU time read for watch_pid
  GET  /health, GET /v1/models          as vLLM answers them

usage: sse_server.py [--port 0] [--model NAME]   (prints {"port": N} when ready)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import time

clock = time.perf_counter

SSE_HEADERS = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def chunked(body: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(body), body)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU of a process and its reaped children, as wait4 counts it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def plain(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status.encode(), ctype, len(body), body))


class Server:
    """Shared state: pacing, the active streams, the stamp log."""

    def __init__(self, model: str):
        self.model = model
        self.gap_s = 0.01
        self.next_id = 0
        self.active: list[Stream] = []
        self.log: list[dict] = []
        self.sleeper: asyncio.Future | None = None
        self.watch_pid: int | None = None
        self.watch_cpu_s: float | None = None

    def wake(self) -> None:
        """A new stream: end the ticker's sleep (its deadline may be earlier)."""
        if self.sleeper is not None and not self.sleeper.done():
            self.sleeper.set_result(None)

    async def sleep(self, seconds: float | None) -> None:
        """Sleep until woken, or `seconds` have passed (None: until woken)."""
        loop = asyncio.get_running_loop()
        self.sleeper = fut = loop.create_future()
        timer = None if seconds is None else loop.call_later(
            seconds, lambda: fut.done() or fut.set_result(None))
        await fut
        if timer is not None:
            timer.cancel()

    async def ticker(self) -> None:
        """Emit every token that is due, then sleep until the next one."""
        while True:
            if not self.active:
                await self.sleep(None)
                continue
            now = clock()
            nxt = float("inf")
            fast = []
            for s in self.active:
                if s.gap_s == 0:
                    fast.append(s)
                    continue
                while s.next_t <= now and not s.done:
                    s.step()
                    s.next_t += s.gap_s
                if not s.done:
                    nxt = min(nxt, s.next_t)
            for s in fast:
                if not s.done and s.conn.transport.get_write_buffer_size() == 0:
                    s.step()
            if any(s.done for s in self.active):
                self.active = [s for s in self.active if not s.done]
            if fast:
                await asyncio.sleep(0)
                continue
            # Event-loop timers have 1 ms steps: a late wake-up sends what is
            # due at once (above), so the rate holds on average. No busy
            # wait: the server must leave the CPU to the client it measures.
            if nxt != float("inf"):
                await self.sleep(max(0.0, nxt - clock()))


class Stream:
    """One streaming response."""

    __slots__ = ("conn", "rid", "tokens", "emitted", "gap_s", "next_t", "recv_t", "sent",
                 "prompt_tokens", "done", "head", "tok", "last", "usage")

    def __init__(self, conn: Conn, rid: int, tokens: int, prompt_tokens: int, gap_s: float,
                 recv_t: float, model: str):
        self.conn, self.rid, self.tokens, self.gap_s = conn, rid, tokens, gap_s
        self.prompt_tokens, self.recv_t = prompt_tokens, recv_t
        # Steps on one grid for all streams (multiples of the gap), as vLLM's
        # engine steps serve every running sequence at once: the first token
        # one to two gaps after arrival, then one per step.
        self.next_t = math.ceil((recv_t + gap_s) / gap_s) * gap_s if gap_s else recv_t
        self.emitted = 0
        self.sent: list[float] = []
        self.done = False
        created = int(time.time())
        self.head = (b'data: {"id":"chatcmpl-%d","object":"chat.completion.chunk","created":%d,'
                     b'"model":%s,' % (rid, created, json.dumps(model).encode()))
        self.tok = (b'"choices":[{"index":0,"delta":{"content":" tok"},"logprobs":null,'
                    b'"finish_reason":null,"token_ids":null}],"x_sent":')
        self.last = (b'"choices":[{"index":0,"delta":{"content":" tok"},"logprobs":null,'
                     b'"finish_reason":"length","stop_reason":null,"token_ids":null}],"x_sent":')

    def write(self, middle: bytes, extra: bytes = b"") -> None:
        t = clock()
        self.conn.transport.write(chunked(b"%s%s%r%s}\n\n" % (self.head, middle, t, extra)))
        self.sent.append(t)

    def step(self) -> None:
        """Write the next token (after the role chunk, the first time)."""
        if self.emitted == 0:
            self.write(b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                       b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
                       b'"prompt_text":null,"x_sent":', b',"x_recv":%r' % self.recv_t)
            first = self.last if self.tokens == 1 else self.tok
            self.write(first.replace(b'" tok"', b'" #%d"' % self.rid))
        else:
            self.write(self.last if self.emitted == self.tokens - 1 else self.tok)
        self.emitted += 1
        if self.emitted == self.tokens:
            self.finish()

    def finish(self) -> None:
        usage = (b'"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
                 b'"completion_tokens":%d},"x_sent":'
                 % (self.prompt_tokens, self.prompt_tokens + self.tokens, self.tokens))
        t = clock()
        self.conn.transport.write(chunked(b"%s%s%r}\n\n" % (self.head, usage, t))
                                  + chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.done = True
        self.conn.server.log.append({"id": self.rid, "recv": self.recv_t, "sent": self.sent,
                                     "tokens": self.tokens})
        self.conn.busy = False
        self.conn.serve_buffered()


class Conn(asyncio.Protocol):
    """An HTTP/1.1 keep-alive connection (no pipelining needed by clients)."""

    def __init__(self, server: Server):
        self.server = server
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.recv_t = clock()
        self.buf += data
        self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            method, path, _ = head[0].split(" ", 2)
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        srv = self.server
        write = self.transport.write
        if method == "POST" and path == "/v1/chat/completions":
            req = json.loads(body)
            tokens = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
            words = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
            srv.next_id += 1
            if srv.watch_pid is not None and srv.watch_cpu_s is None:
                srv.watch_cpu_s = process_cpu_s(srv.watch_pid)
            self.busy = True
            write(SSE_HEADERS)
            stream = Stream(self, srv.next_id, max(1, tokens), words, srv.gap_s, self.recv_t,
                            srv.model)
            srv.active.append(stream)
            srv.wake()
        elif method == "GET" and path == "/health":
            write(plain("200 OK", b""))
        elif method == "GET" and path == "/v1/models":
            doc = {"object": "list", "data": [{"id": srv.model, "object": "model",
                                               "owned_by": "bench", "max_model_len": 65536}]}
            write(plain("200 OK", json.dumps(doc).encode()))
        elif method == "POST" and path == "/_bench/config":
            conf = json.loads(body)
            srv.gap_s = float(conf["gap_s"])
            srv.watch_pid, srv.watch_cpu_s = conf.get("watch_pid"), None
            write(plain("200 OK", b"{}"))
        elif method == "GET" and path == "/_bench/log":
            log, srv.log = srv.log, []
            doc = {"requests": log, "watch_cpu_s": srv.watch_cpu_s}
            write(plain("200 OK", json.dumps(doc).encode()))
        else:
            write(plain("404 Not Found", b'{"error": "not found"}'))


async def serve(port: int, model: str) -> None:
    srv = Server(model)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(srv), "127.0.0.1", port, backlog=1024)
    ticker = asyncio.create_task(srv.ticker())
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await server.serve_forever()
    ticker.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="bench-model")
    args = ap.parse_args(argv)
    run = asyncio.run
    try:
        import uvloop  # noqa: PLC0415 (optional: the `fast` extra)
        run = uvloop.run
    except ImportError:
        pass
    try:
        run(serve(args.port, args.model))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
