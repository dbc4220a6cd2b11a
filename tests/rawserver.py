"""A scripted raw HTTP server on 127.0.0.1, for misbehaviour tests.

A real listening socket served from threads (one per connection), so the
client under test meets it exactly as it would meet a server on the network,
in-process or as a subprocess. Each request is read (head up to the blank
line, then a Content-Length body) and handed to `reply(request)`, which
returns the steps to play on the socket, in order:

* bytes: written as they are (one sendall each; a step per network write);
* a float: sleep that many seconds;
* CLOSE: close the connection (FIN); RESET: abort it (RST);
* HOLD(s): stop answering but keep the socket open for s seconds, reading
  (and recording) whatever the client still sends, then close.

When the steps end without CLOSE, RESET or HOLD, the next request is read on
the same connection (keep-alive). Nothing here is HTTP-correct on purpose:
the steps are the bytes the test wants.

`vllm_like(chat)` answers the endpoints the tool reads before and around a
chat request (/v1/models, /health, /version, /tokenize, /metrics) like a
small vLLM would, and hands chat requests to `chat(request)`.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class _Step:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLOSE = _Step("CLOSE")
RESET = _Step("RESET")


@dataclass(frozen=True)
class HOLD:
    """Keep the connection open without answering for `seconds`, then close."""

    seconds: float


@dataclass
class Request:
    method: str
    path: str
    head: bytes
    body: bytes
    conn: int              # which connection (1, 2, ...) it came on
    index: int             # which request overall (1, 2, ...)
    arrived: float         # time.monotonic() when its head was complete

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Connection:
    number: int
    opened: float
    closed: float | None = None
    requests: int = 0
    bytes_after_last_reply: int = 0  # what the client wrote while we held the connection
    send_error: str | None = None


Reply = Callable[[Request], Sequence[Any]]


class RawServer:
    """`RawServer(reply)`: serving at once on `base_url`; `stop()` (or use as
    a context manager) closes it. `requests` and `connections` record what
    happened, for the test to assert."""

    def __init__(self, reply: Reply, *, ssl_context: Any = None, backlog: int = 512):
        self.reply = reply
        self.requests: list[Request] = []
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(backlog)
        self._ssl = ssl_context
        self.port = self._sock.getsockname()[1]
        self.base_url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping = True
        # close() alone does not wake a thread blocked in accept() on Linux
        # (it waited out the 5 s join below); shutdown() does.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)
        for t in list(self._threads):
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                conn = Connection(len(self.connections) + 1, time.monotonic())
                self.connections.append(conn)
                self._open.add(sock)
            t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        try:
            if self._ssl is not None:
                try:
                    sock = self._ssl.wrap_socket(sock, server_side=True)
                except OSError:  # the client refused our certificate
                    return
            self._requests(sock, conn)
        finally:
            with self._lock:
                self._open.discard(sock)
            conn.closed = time.monotonic()
            try:
                sock.close()
            except OSError:
                pass

    def _requests(self, sock: socket.socket, conn: Connection) -> None:
        buf = b""
        while not self._stopping:
            while b"\r\n\r\n" not in buf:
                data = _recv(sock)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            while len(buf) < length:
                data = _recv(sock)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            method, path = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            with self._lock:
                req = Request(method.decode(), path.decode(), head, body, conn.number,
                              len(self.requests) + 1, time.monotonic())
                self.requests.append(req)
            conn.requests += 1
            if not self._play(sock, conn, self.reply(req)):
                return

    def _play(self, sock: socket.socket, conn: Connection, steps: Sequence[Any]) -> bool:
        """Play the steps; False when the connection is done."""
        for step in steps:
            try:
                if isinstance(step, (bytes, bytearray)):
                    sock.sendall(step)
                elif isinstance(step, (int, float)):
                    time.sleep(step)
                elif step is CLOSE:
                    return False
                elif step is RESET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return False
                elif isinstance(step, HOLD):
                    self._hold(sock, conn, step.seconds)
                    return False
                else:
                    raise TypeError(f"unknown step {step!r}")
            except OSError as exc:
                conn.send_error = f"{type(exc).__name__}: {exc}"
                return False
        return True

    def _hold(self, sock: socket.socket, conn: Connection, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._stopping:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except (socket.timeout, OSError):
                break
            if not data:
                break
            conn.bytes_after_last_reply += len(data)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


# ----------------------------------------------------------------------------
# Building blocks for replies
# ----------------------------------------------------------------------------

def response(status: int = 200, body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
             *, length: bool = True, version: str = "HTTP/1.1") -> bytes:
    """A whole response: status line, headers, Content-Length (unless
    `length` is False or a header sets it), body."""
    lines = [f"{version} {status} {'OK' if status == 200 else 'Status'}"]
    names = {k.lower() for k, _ in headers}
    if length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_response(obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    return response(status, json.dumps(obj).encode(),
                    [("Content-Type", "application/json"), *headers])


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def token_event(text: str = " tok", usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": text}}]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def usage_event(completion_tokens: int, prompt_tokens: int = 7) -> bytes:
    return b"data: " + json.dumps({"choices": [], "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}}).encode() + b"\n\n"


def sse_events(tokens: int, *, completion_tokens: int | None = None) -> list[bytes]:
    """The SSE events of a good stream: a role chunk, `tokens` token chunks
    (each with its running usage), the usage trailer, [DONE]."""
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    events = [role]
    for i in range(tokens):
        events.append(token_event(f" tok{i}", {"prompt_tokens": 7, "completion_tokens": i + 1,
                                               "total_tokens": 8 + i}))
    events += [usage_event(tokens if completion_tokens is None else completion_tokens),
               b"data: [DONE]\n\n"]
    return events


def sse_reply(tokens: int, gap_s: float = 0.0, **kw: Any) -> list[Any]:
    """A chunked SSE response, one event per chunk, `gap_s` apart."""
    steps: list[Any] = [SSE_HEAD]
    for event in sse_events(tokens, **kw):
        steps += [chunk(event), gap_s] if gap_s else [chunk(event)]
    return [*steps, b"0\r\n\r\n"]


def wanted_tokens(req: Request, default: int = 4) -> int:
    try:
        return int(req.json().get("max_tokens") or default)
    except (ValueError, AttributeError, TypeError):
        return default


@dataclass
class VllmLike:
    """A reply function: a small vLLM for everything but the chat requests."""

    chat: Reply = field(default=lambda req: sse_reply(wanted_tokens(req)))
    model_id: str = "raw-model"
    max_model_len: int = 4096
    metrics: bytes = b"vllm:num_requests_running 0\n"

    def __call__(self, req: Request) -> Sequence[Any]:
        path = req.path.split("?")[0]
        if path == "/v1/chat/completions":
            return self.chat(req)
        if path == "/v1/models":
            return [json_response({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "max_model_len": self.max_model_len}]})]
        if path == "/health":
            return [response(200)]
        if path == "/version":
            return [json_response({"version": "0.0-raw"})]
        if path == "/tokenize":
            return [json_response({"count": _count_tokens(req), "max_model_len": self.max_model_len})]
        if path == "/metrics":
            return [response(200, self.metrics, [("Content-Type", "text/plain")])]
        return [json_response({"error": {"message": "not found"}}, 404)]


def vllm_like(chat: Reply | None = None, **kw: Any) -> VllmLike:
    return VllmLike(chat=chat, **kw) if chat is not None else VllmLike(**kw)


def _count_tokens(req: Request) -> int:
    """One token per word of the messages, plus 3 per message and 2 (a ChatML-ish template)."""
    try:
        messages = req.json()["messages"]
        return 2 + sum(3 + len(str(m.get("content", "")).split()) for m in messages)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0
