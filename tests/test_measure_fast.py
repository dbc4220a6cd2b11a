"""The optimized measurement path equals the straightforward one it replaced.

The references below are the original split_sse / measure_stream /
spread_gaps (quadratic buffer joins, stdlib json, a list per token), kept
verbatim as the definition of the semantics. Hypothesis builds vLLM-like SSE
byte streams, cuts them into network reads at random places (inside "\\n\\n",
inside "\\r\\n", inside multi-byte UTF-8) and checks that the fast versions
give exactly the same events and the same Sample.
"""

from __future__ import annotations

import asyncio

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import perftest_models as pm  # noqa: E402
from property_budget import examples  # noqa: E402


def split_sse(reads):
    """The SSE payloads as text: pm.sse_payloads decoded (these tests compare text)."""
    return [(t, data.decode("utf-8", "replace")) for t, data in pm.sse_payloads(reads)]


# ----------------------------------------------------------------------------
# References: the original implementations
# ----------------------------------------------------------------------------


def reference_split_sse(reads):
    """The SSE spec's reading, slowly: a line ends at CRLF, LF or a lone CR;
    an event is complete at the read that brought its blank line."""
    events, raw, emitted = [], b"", 0
    for t, chunk in reads:
        raw += chunk
        blocks = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")[:-1]
        for block in blocks[emitted:]:
            data = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
            if data:
                events.append((t, b"\n".join(data).decode("utf-8", "replace")))
        emitted = len(blocks)
    return events


def reference_spread_gaps(times, counts, tokens_out):
    if len(times) < 2:
        return []
    known = all(isinstance(c, int) and c > 0 for c in counts[1:]) and sum(counts[1:]) < tokens_out
    per_chunk = (tokens_out - 1) / (len(times) - 1) if tokens_out > 1 else 1.0
    itl = []
    for i in range(1, len(times)):
        k = counts[i] if known else per_chunk
        gap_ms = (times[i] - times[i - 1]) * 1000
        whole = max(1, round(k))
        itl.extend([gap_ms / whole] * whole)
    return itl


def reference_measure_stream(t_sent, reads, target_tokens_out, t_scheduled=None, retries=0):
    Sample = pm.Sample
    t0 = t_sent if t_scheduled is None else t_scheduled
    queued_ms = (t_sent - t0) * 1000
    fail = lambda why: Sample(ok=False, error=why, retries=retries, queued_ms=queued_ms)  # noqa: E731
    token_times = []
    token_counts = []
    first_answer = None
    usage = None
    done = False
    for t, data in reference_split_sse(reads):
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            return fail(f"malformed SSE event: {data[:80]!r}")
        if not isinstance(chunk, dict):
            return fail(f"malformed SSE event: {data[:80]!r}")
        if "error" in chunk:
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            return fail(f"error event in stream: {str(msg)[:200]}")
        token, answer = pm._delta_tokens(chunk)
        chunk_usage = chunk.get("usage")
        if token:
            token_times.append(t)
            prev = (usage or {}).get("completion_tokens", 0) if usage else 0
            now = chunk_usage.get("completion_tokens") if isinstance(chunk_usage, dict) else None
            token_counts.append(now - prev if isinstance(now, int) and isinstance(prev, int) else None)
            if answer and first_answer is None:
                first_answer = t
        if isinstance(chunk_usage, dict):
            usage = chunk_usage
    if not done:
        return fail(f"stream ended before [DONE] after {len(token_times)} token chunk(s)")
    if not token_times:
        return fail("stream finished without any generated token")
    if usage is None:
        return fail("no usage in the stream: the server ignored stream_options.include_usage")
    tokens_out, tokens_in = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if not pm._count(tokens_out) or not pm._count(tokens_in) or tokens_out < 1:
        return fail(f"usage without valid token counts: {json.dumps(usage)[:120]}")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    ttft_s = token_times[0] - t0
    latency_s = token_times[-1] - t0
    decode_s = token_times[-1] - token_times[0] if pm.count_arrivals(token_times) > 1 else 0.0
    itl = reference_spread_gaps(token_times, token_counts, tokens_out)
    return Sample(
        ok=True,
        ttft_ms=ttft_s * 1000,
        ttfo_ms=(first_answer - t0) * 1000 if first_answer is not None else None,
        tps=(tokens_out - 1) / decode_s if tokens_out > 1 and decode_s > 0 else None,
        tpot_ms=decode_s * 1000 / (tokens_out - 1) if tokens_out > 1 and decode_s > 0 else None,
        e2e_tps=tokens_out / latency_s if latency_s > 0 else None,
        prefill_tps=tokens_in / ttft_s if ttft_s > 0 else None,
        total_s=latency_s,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        tokens_out_exact=None if target_tokens_out is None else tokens_out == target_tokens_out,
        cached_tokens=cached if isinstance(cached, int) else None,
        retries=retries,
        queued_ms=queued_ms,
        token_reads=pm.count_arrivals(token_times),
        itl_ms=tuple(itl),
    )


# ----------------------------------------------------------------------------
# Streams: vLLM-like events, SSE framing, random network reads
# ----------------------------------------------------------------------------

# Multi-byte UTF-8 (2, 3 and 4 bytes) next to ASCII, so that cuts land inside.
TEXT = st.text(alphabet=st.sampled_from(list("ab \"\\/é漢😀\t")), max_size=6)
BIG = st.sampled_from([2**63 - 1, 2**63, 2**64, 10**19, 10**25])
COUNT = st.one_of(st.integers(0, 3), st.integers(4, 500), BIG, st.none(), st.just("7"))


def _chunk(delta: dict[str, Any] | None, usage: Any = "absent", finish: Any = None) -> dict:
    doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                           "model": "m"}
    doc["choices"] = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    if usage != "absent":
        doc["usage"] = usage
    return doc


@st.composite
def usage_docs(draw) -> Any:
    return draw(st.one_of(
        st.fixed_dictionaries({"prompt_tokens": COUNT, "completion_tokens": COUNT},
                              optional={"total_tokens": COUNT, "prompt_tokens_details":
                                        st.one_of(st.none(), st.fixed_dictionaries(
                                            {"cached_tokens": COUNT}))}),
        st.none(), st.just("usage")))


@st.composite
def event_texts(draw) -> str:
    """One event's data payload (a JSON chunk mostly)."""
    kind = draw(st.sampled_from(["role", "content", "content", "content", "empty", "reasoning",
                                 "reasoning2", "finish", "usage", "usage_chunk", "error",
                                 "error_str", "list", "malformed", "done"]))
    if kind == "role":
        return json.dumps(_chunk({"role": "assistant", "content": ""}), ensure_ascii=False)
    if kind == "content":
        return json.dumps(_chunk({"content": draw(TEXT)}), ensure_ascii=draw(st.booleans()))
    if kind == "empty":
        return json.dumps(_chunk({"content": ""}))
    if kind in ("reasoning", "reasoning2"):
        key = "reasoning_content" if kind == "reasoning" else "reasoning"
        return json.dumps(_chunk({key: draw(TEXT)}), ensure_ascii=False)
    if kind == "finish":
        return json.dumps(_chunk({}, finish="length"))
    if kind == "usage":
        return json.dumps(_chunk({"content": draw(TEXT)}, usage=draw(usage_docs())),
                          ensure_ascii=False)
    if kind == "usage_chunk":
        return json.dumps(_chunk(None, usage=draw(usage_docs())))
    if kind == "error":
        return json.dumps({"error": {"message": draw(TEXT), "code": draw(BIG)}},
                          ensure_ascii=False)
    if kind == "error_str":
        return json.dumps({"error": draw(st.one_of(TEXT, BIG))}, ensure_ascii=False)
    if kind == "list":
        return "[1, 2]"
    if kind == "malformed":
        return draw(st.sampled_from(['{"choices": [', "NaN", "{'a': 1}", '{"a": 1}x']))
    return "[DONE]"


@st.composite
def vllm_streams(draw) -> bytes:
    """A whole SSE body: mostly well-formed vLLM streams, sometimes odd ones
    (comments, `event:` fields, `data:` without a space, multi-line data,
    CRLF line ends, invalid UTF-8, no [DONE])."""
    eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    texts = [json.dumps(_chunk({"role": "assistant", "content": ""}))]
    texts += draw(st.lists(event_texts(), max_size=12))
    if draw(st.booleans()):
        texts.append(json.dumps(_chunk(None, usage={"prompt_tokens": 5, "completion_tokens":
                                                    draw(st.integers(1, 40))})))
    if draw(st.integers(0, 9)):
        texts.append("[DONE]")
    out = []
    for text in texts:
        lines = []
        if not draw(st.integers(0, 7)):
            lines.append(draw(st.sampled_from([b": ping", b"event: message", b"id: 7", b"retry:"])))
        data = text.encode()
        if not draw(st.integers(0, 15)):
            data += b"\xff\xfe"  # invalid UTF-8: decoded with replacement
        prefix = b"data:" if not draw(st.integers(0, 7)) else b"data: "
        if not draw(st.integers(0, 11)) and len(data) > 2:
            cut = draw(st.integers(1, len(data) - 1))  # a payload on two data lines
            lines += [prefix + data[:cut], b"data: " + data[cut:]]
        else:
            lines.append(prefix + data)
        out.append(eol.join(lines) + eol + eol)
    return b"".join(out)


@st.composite
def chunkings(draw, body: bytes) -> list[tuple[float, bytes]]:
    """`body` cut into network reads at random points, with rising times."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=40)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if body[a:b]]
    gaps = draw(st.lists(st.floats(0.0, 0.05, allow_nan=False), min_size=len(pieces),
                         max_size=len(pieces)))
    t, reads = 10.0, []
    for piece, gap in zip(pieces, gaps):
        t += gap
        reads.append((t, piece))
    return reads


@st.composite
def streams_and_reads(draw):
    body = draw(vllm_streams())
    return body, draw(chunkings(body))


SETTINGS = settings(max_examples=examples(400), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------


@SETTINGS
@given(streams_and_reads())
def test_split_sse_equals_the_reference_on_any_chunking(case):
    _, reads = case
    assert split_sse(reads) == reference_split_sse(reads)


@SETTINGS
@given(streams_and_reads())
def test_split_sse_does_not_depend_on_where_the_reads_were_cut(case):
    body, reads = case
    whole = split_sse([(1.0, body)])
    assert [d for _, d in split_sse(reads)] == [d for _, d in whole]


@SETTINGS
@given(streams_and_reads(), st.sampled_from([None, 1, 20]), st.integers(0, 2))
def test_measure_stream_equals_the_reference_on_any_chunking(case, target, retries):
    _, reads = case
    t_sent = 9.5
    for t_scheduled in (None, 9.25):
        assert pm.measure_stream(t_sent, reads, target, t_scheduled, retries) == \
            reference_measure_stream(t_sent, reads, target, t_scheduled, retries)


@SETTINGS
@given(st.lists(st.floats(0, 1e4, allow_nan=False), max_size=30).map(sorted),
       st.data())
def test_spread_gaps_equals_the_reference(times, data):
    counts = data.draw(st.lists(st.one_of(st.none(), st.integers(-1, 5)), min_size=len(times),
                                max_size=len(times)))
    tokens_out = data.draw(st.integers(0, 200))
    assert pm.spread_gaps(times, counts, tokens_out) == \
        reference_spread_gaps(times, counts, tokens_out)


# ----------------------------------------------------------------------------
# The edges the properties are about, pinned by example
# ----------------------------------------------------------------------------

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"\xc3\xa9\xf0\x9f\x98\x80"}}]}\n\n'


@pytest.mark.parametrize("cut", range(1, len(EVENT)))
def test_a_read_boundary_anywhere_in_an_event_gives_the_time_of_the_read_that_ends_it(cut):
    reads = [(1.0, EVENT[:cut]), (2.0, EVENT[cut:] + EVENT)]
    assert split_sse(reads) == [(2.0, EVENT[6:-2].decode()), (2.0, EVENT[6:-2].decode())]


@pytest.mark.parametrize("cut", range(1, 12))
def test_crlf_framing_split_anywhere_in_the_blank_line_still_ends_the_event(cut):
    body = b"data: [DONE]\r\n\r\n"
    reads = [(1.0, body[:len(body) - 12 + cut]), (2.0, body[len(body) - 12 + cut:])]
    want = reference_split_sse(reads)
    assert split_sse(reads) == want
    assert [d for _, d in want] == ["[DONE]"]


def test_an_event_without_its_blank_line_is_not_an_event():
    assert split_sse([(1.0, b"data: a\n\ndata: b\n")]) == [(1.0, "a")]


def test_a_huge_event_in_many_reads_is_split_in_linear_time():
    # 20 000 reads of 50 bytes: the old buffer joins copied ~10 GB here.
    payload = b"x" * 1_000_000
    body = b"data: " + payload + b"\n\n"
    reads = [(float(i), body[i:i + 50]) for i in range(0, len(body), 50)]
    assert split_sse(reads) == [(reads[-1][0], payload.decode())]


@pytest.mark.parametrize("doc", [
    b'{"usage": {"prompt_tokens": 1, "completion_tokens": 18446744073709551616}}',
    b'{"error": 100000000000000000000}',
    b'{"choices": [], "usage": {"completion_tokens": -9223372036854775809}}',
    b'{"a": NaN}', b'[1e400]', b'\xef\xbb\xbf{}', b'{"a": "\\ud800"}', b'{"a": "\xff"}',
])
def test_json_is_read_as_the_standard_library_reads_it(doc):
    try:
        want = json.loads(doc.decode("utf-8", "replace"))
    except ValueError:
        with pytest.raises(ValueError):
            pm._json_loads(doc)
        return
    got = pm._json_loads(doc)
    assert repr(got) == repr(want)  # repr: NaN != NaN, and int vs float shows


def _framed(head: bytes, pieces) -> pm._Connection:
    """A response fed to one connection's parser in `pieces` (as network
    reads), with no socket: what the connection made of it."""
    conn = pm._Connection(asyncio.new_event_loop())
    conn.start_response()
    for piece in pieces:
        conn.data_received(piece)
    return conn


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_chunked_decoding_gives_the_body_back_however_the_reads_are_cut(parts, data):
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    if data.draw(st.booleans()):
        body = body.replace(b"\r\n", b";ext=1\r\n", 1) if parts else body
    body += b"0\r\n" + data.draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])) + b"\r\n"
    extra = data.draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]))
    stream = CHUNKED_HEAD + body + extra
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    conn = _framed(CHUNKED_HEAD, [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])])
    assert conn.take_body() == b"".join(parts)
    assert conn.done and conn.broken is None
    assert conn.reusable == (extra == b"")  # bytes after the response spoil the connection


@pytest.mark.parametrize("bad", [b"zz\r\nab\r\n", b"2\r\nabXY", b"-1\r\n", b"2\r\nab\r\n" + b"1" * 5000])
def test_a_malformed_chunked_body_is_an_error(bad):
    conn = _framed(CHUNKED_HEAD, [CHUNKED_HEAD + bad])
    assert conn.broken is not None and not conn.done and not conn.reusable


def test_length_decoder_stops_at_the_length_and_keeps_the_rest():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    conn = _framed(head, [head + b"abc"])
    assert conn.take_body() == b"abc" and not conn.done
    conn.data_received(b"deXY")
    assert conn.take_body() == b"de" and conn.done and conn.extra and not conn.reusable
