"""The streaming client over a real socket, against the stand-in server."""

from __future__ import annotations

import asyncio
import json

import pytest

import perftest_models as pm


def run(coro):
    return pm.run_async(coro)  # the tool's loop: PERFTEST_LOOP, else uvloop when installed


async def one_request(srv, tokens_out=20, kwargs=None, nonce="n1", api_key=None,
                      sleep=asyncio.sleep):
    async with pm.http_client(srv.base_url, api_key, 30.0) as client:
        payload = pm.chat_payload(srv.config.model, pm.latency_messages(nonce), tokens_out, 0.7,
                                  kwargs, nonce)
        return await pm.send_chat(client, payload, tokens_out, retry_wait_s=0.05, sleep=sleep)


class VirtualSleep:
    """asyncio.sleep on virtual time: records what was asked, waits for nothing."""

    def __init__(self):
        self.asked = []

    async def __call__(self, seconds):
        self.asked.append(seconds)
        await asyncio.sleep(0)


def test_ttft_over_a_real_socket_matches_the_servers_own_first_token(standin):
    srv = standin(ttft_s=0.2, itl_s=0.005)
    s = run(one_request(srv))
    rec = srv.records[-1]
    server_ttft_ms = (rec.first_token_at - rec.arrival) * 1000
    assert s.ok, s.error
    assert s.ttft_ms >= 200.0
    # the client pays no Nagle/delayed-ACK stall (~40 ms) on top of the server's time
    assert s.ttft_ms - server_ttft_ms < 35.0


def test_output_length_is_forced_even_when_the_model_would_stop_early(standin):
    srv = standin(eos_after_tokens=5)
    s = run(one_request(srv, tokens_out=40))
    body = srv.requests[-1]
    assert s.ok and s.tokens_out == 40 and s.tokens_out_exact
    assert body["max_tokens"] == body["min_tokens"] == 40 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["stream"] is True


def test_several_tokens_per_chunk_are_counted_from_usage_not_chunks(standin):
    srv = standin(tokens_per_chunk=4, itl_s=0.002)
    s = run(one_request(srv, tokens_out=40))
    # 10 chunks of 4: each of the 9 gaps is shared by the 4 tokens of its later chunk
    assert s.tokens_out == 40 and len(s.itl_ms) == 36
    assert sum(s.itl_ms) == pytest.approx(s.total_s * 1000 - s.ttft_ms)


def test_thinking_models_report_first_reasoning_token_and_first_answer_token(standin):
    srv = standin(reasoning_tokens=10, itl_s=0.01)
    s = run(one_request(srv, tokens_out=30))
    assert s.ttfo_ms - s.ttft_ms >= 90.0  # ten reasoning tokens ~10 ms apart come first
    off = run(one_request(srv, tokens_out=30, kwargs={"enable_thinking": False}))
    assert srv.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert off.ttfo_ms == pytest.approx(off.ttft_ms)


def test_the_api_key_is_sent_as_a_bearer_token(standin):
    srv = standin(api_key="sekrit")
    assert not run(one_request(srv)).ok  # 401 without it
    s = run(one_request(srv, api_key="sekrit"))
    assert s.ok and srv.records[-1].headers.get("Authorization") == "Bearer sekrit"


@pytest.mark.parametrize("fault", ["http_429", "http_503"])
def test_a_refused_request_is_retried_and_the_retry_is_counted(standin, fault):
    srv = standin(faults=[fault])
    sleep = VirtualSleep()  # the 429's Retry-After: 1 is waited on virtual time
    s = run(one_request(srv, sleep=sleep))
    assert s.ok and s.retries == 1
    assert sleep.asked == [1.0 if fault == "http_429" else 0.05]  # Retry-After, else ours


def test_a_server_error_is_a_failed_sample_not_a_retry(standin):
    srv = standin(faults=["http_500"])
    s = run(one_request(srv))
    assert not s.ok and s.error.startswith("HTTP 500") and s.retries == 0
    assert len(srv.records) == 1


@pytest.mark.parametrize("size", [1000, 4000, 777])
def test_context_prompts_have_the_exact_token_count(standin, size):
    srv = standin()

    async def build():
        async with pm.http_client(srv.base_url, None, 30.0) as client:
            b = pm.PromptBuilder(client, srv.config.model, None)
            messages, n = await b.build(size, pm.new_nonce())
            tok = await client.post("/tokenize", json={"model": srv.config.model,
                                                       "messages": messages,
                                                       "add_generation_prompt": True})
            return n, tok.json()["count"]

    n, counted = run(build())
    assert n == counted == size


def test_without_tokenize_the_size_is_calibrated_from_usage_within_one_percent(standin):
    srv = standin(tokenize_endpoint=False)

    async def build():
        async with pm.http_client(srv.base_url, None, 30.0) as client:
            b = pm.PromptBuilder(client, srv.config.model, None)
            messages, n = await b.build(8000, pm.new_nonce())
            payload = pm.chat_payload(srv.config.model, messages, 5, 0.7, None, "x")
            return n, await pm.send_chat(client, payload, 5)

    n, sample = run(build())
    assert n is None and b"" is not None
    assert abs(sample.tokens_in - 8000) <= 80


def _json_report(report_dir):
    (path,) = report_dir.glob("*.json")
    return json.loads(path.read_text())


def test_every_measured_request_is_cold_for_the_prefix_cache(standin, report_dir):
    srv = standin(prefill_s_per_token=1e-5)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "3", "--context-sizes", "2k",
                  "--report-dir", str(report_dir)])
    assert rc == 0
    heads = [r.body["messages"][0]["content"][:24] for r in srv.records]
    assert len(set(heads)) == len(heads)  # a unique head on every request, warm-up included
    assert len({r.body["cache_salt"] for r in srv.records}) == len(srv.records)
    assert all(r.cached_tokens == 0 for r in srv.records)
    report = _json_report(report_dir)
    for sc in report["models"][0]["scenarios"]:
        assert sc["server_metrics"]["prefix_cache_hits"] == 0


def test_concurrent_streams_give_the_scripted_aggregate(standin):
    # 8 requests, 4 at a time; each: 100 ms to the first token, then 19 gaps of 10 ms
    srv = standin(ttft_s=0.1, itl_s=0.01)
    sc = pm.Scenario("throughput-c4", "throughput", None, 20, 8, concurrency=4)

    async def go():
        async with pm.http_client(srv.base_url, None, 30.0, streams=4) as client:
            payloads = [pm.chat_payload(srv.config.model, pm.latency_messages(str(i)), 20, 0.7,
                                        None, str(i)) for i in range(8)]
            return await pm.run_concurrent(client, payloads, sc)

    samples, duration = run(go())
    agg = pm.throughput_aggregate(samples, duration)
    assert agg.requests_ok == 8 and agg.errors == 0
    # The server's sleeps set floors that no noise can lower: two waves of
    # 0.1 + 19 x 0.01 = 0.29 s; the ceilings are loose (a noisy 2-core machine).
    assert 2 * 0.29 <= duration < 3 * 2 * 0.29
    assert agg.output_tps == pytest.approx(8 * 20 / duration)
    assert agg.requests_per_s == pytest.approx(8 / duration)
    starts = sorted(s.start_s for s in samples)
    assert starts[3] < 0.29 <= starts[4]  # the second wave starts only as the first ends
    assert all(s.ttft_ms >= 100.0 and 40.0 < s.tps < 250.0 for s in samples)  # scripted: 100


def test_held_back_empty_tokens_count_like_vllm_sends_them(standin):
    # vLLM sends a token that ends inside a UTF-8 sequence as content "".
    srv = standin(held_back_every=1, itl_s=0.005, ttft_s=0.05)
    s = run(one_request(srv, tokens_out=10))
    assert s.ok and s.tokens_out == 10 and len(s.itl_ms) == 9  # one token per chunk
    # TTFT is taken at the first (empty) chunk; the first text comes 9 gaps later
    assert s.ttfo_ms - s.ttft_ms > 9 * 4.0  # (0 if the empty chunks were not counted)


def test_ttft_and_decode_rate_match_the_servers_true_timing_within_a_few_percent(standin):
    # The server records when it wrote its first and last token (same clock,
    # same process): the client's figures must agree with those, not with
    # the scripted delays.
    srv = standin(ttft_s=0.3, itl_s=0.01)
    s = run(one_request(srv, tokens_out=50))
    rec = srv.records[-1]
    true_ttft_ms = (rec.first_token_at - rec.arrival) * 1000
    true_tps = (rec.completion_tokens - 1) / (rec.last_token_at - rec.first_token_at)
    assert s.ttft_ms == pytest.approx(true_ttft_ms, rel=0.05)
    assert s.tps == pytest.approx(true_tps, rel=0.05)
