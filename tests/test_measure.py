"""Measurement on virtual time: scripted reads, exact numbers."""

from __future__ import annotations

import json
import math

import pytest

import perftest_models as pm


def split_sse(reads):
    """The SSE payloads as text: pm.sse_payloads decoded (these tests compare text)."""
    return [(t, data.decode("utf-8", "replace")) for t, data in pm.sse_payloads(reads)]


def chunk(content=None, *, role=None, reasoning=None, finish=None, usage=None, choices=True):
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    body = {"id": "x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def usage(prompt=10, completion=3, **extra):
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, **extra}


DONE = b"data: [DONE]\n\n"


def vllm_stream(times, tokens_in=10):
    """Role chunk at times[0], one token per later time, then usage and [DONE]
    arriving 0.5 s after the last token (they must not extend latency)."""
    reads = [(times[0], chunk("", role="assistant"))]
    reads += [(t, chunk(f" t{i}")) for i, t in enumerate(times[1:])]
    last = times[-1]
    reads.append((last + 0.5, chunk(choices=False, usage=usage(tokens_in, len(times) - 1))))
    reads.append((last + 0.6, DONE))
    return reads


def test_ttft_skips_the_role_chunk_and_latency_ends_at_the_last_token():
    reads = vllm_stream([0.010, 0.200, 0.250, 0.300, 0.350])
    s = pm.measure_stream(0.0, reads, 4)
    assert s.ok and s.error is None
    assert s.ttft_ms == pytest.approx(200.0)
    assert s.total_s == pytest.approx(0.350)  # not the usage trailer (0.85) nor [DONE]
    assert s.tokens_out == 4 and s.tokens_in == 10 and s.tokens_out_exact is True


def test_decode_tps_and_tpot_follow_vllm_definitions():
    reads = vllm_stream([0.0, 1.0, 1.1, 1.2, 1.3, 1.4])
    s = pm.measure_stream(0.0, reads, 5)
    assert s.tpot_ms == pytest.approx(100.0)
    assert s.tps == pytest.approx(10.0)  # (5 - 1) / (1.4 - 1.0)
    assert s.e2e_tps == pytest.approx(5 / 1.4)
    assert s.prefill_tps == pytest.approx(10 / 1.0)


def test_latency_minus_ttft_equals_the_sum_of_inter_token_gaps_exactly():
    times = [0.0, 0.5, 0.53, 0.61, 0.62, 0.9, 1.75]
    s = pm.measure_stream(0.0, vllm_stream(times), 6)
    assert math.isclose(sum(s.itl_ms), (s.total_s * 1000 - s.ttft_ms), rel_tol=0, abs_tol=1e-9)
    assert len(s.itl_ms) == 5


def test_several_tokens_per_chunk_are_counted_from_usage_and_gaps_are_spread():
    reads = [(0.0, chunk("", role="assistant")), (0.1, chunk(" a b c")), (0.4, chunk(" d e f")),
             (0.7, chunk(" g h i")), (0.8, chunk(choices=False, usage=usage(5, 9))), (0.8, DONE)]
    s = pm.measure_stream(0.0, reads, 9)
    assert s.tokens_out == 9  # from usage, not the 3 chunks
    assert s.itl_ms == pytest.approx([75.0] * 8)  # 0.6 s spread over 8 token gaps
    assert s.tps == pytest.approx(8 / 0.6)


def test_continuous_usage_gives_exact_tokens_per_chunk():
    reads = [(0.0, chunk(" a", usage=usage(5, 1))), (0.1, chunk(" b c", usage=usage(5, 3))),
             (0.4, chunk(" d", usage=usage(5, 4))), (0.5, chunk(choices=False, usage=usage(5, 4))),
             (0.5, DONE)]
    s = pm.measure_stream(0.0, reads, 4)
    assert s.itl_ms == pytest.approx([50.0, 50.0, 300.0])


def test_reasoning_counts_for_ttft_and_the_first_answer_token_is_ttfo():
    reads = [(0.0, chunk("", role="assistant")), (0.2, chunk(reasoning="hmm")),
             (0.3, chunk(reasoning=" so")), (0.9, chunk("Answer")),
             (1.0, chunk(choices=False, usage=usage(5, 3))), (1.0, DONE)]
    s = pm.measure_stream(0.0, reads, 3)
    assert s.ttft_ms == pytest.approx(200.0)
    assert s.ttfo_ms == pytest.approx(900.0)


def test_an_empty_content_token_after_the_role_chunk_counts_as_a_token():
    # vLLM holds back an incomplete UTF-8 byte sequence and sends content "".
    reads = [(0.0, chunk("", role="assistant")), (0.2, chunk("")), (0.3, chunk("é")),
             (0.4, chunk(choices=False, usage=usage(5, 2))), (0.4, DONE)]
    s = pm.measure_stream(0.0, reads, 2)
    assert s.ttft_ms == pytest.approx(200.0)
    assert s.ttfo_ms == pytest.approx(300.0)


def test_a_finish_chunk_without_content_is_not_a_token():
    reads = [(0.0, chunk(" a")), (0.1, chunk(" b")),
             (0.9, b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'),
             (1.0, chunk(choices=False, usage=usage(5, 2))), (1.0, DONE)]
    assert pm.measure_stream(0.0, reads, 2).total_s == pytest.approx(0.1)


def test_ttft_counts_from_the_scheduled_time_when_the_client_was_late():
    s = pm.measure_stream(1.0, vllm_stream([1.0, 1.3, 1.4]), 2, t_scheduled=0.8)
    assert s.ttft_ms == pytest.approx(500.0)
    assert s.queued_ms == pytest.approx(200.0)


def test_sse_events_split_across_reads_take_the_time_of_their_last_byte():
    raw = chunk(" a") + chunk(" b")
    reads = [(0.1, raw[:7]), (0.2, raw[7:30]), (0.3, raw[30:]), (0.4, DONE)]
    events = split_sse(reads)
    assert [t for t, _ in events] == [0.3, 0.3, 0.4]
    assert json.loads(events[0][1])["choices"][0]["delta"]["content"] == " a"


def test_crlf_framing_and_comments_are_understood():
    reads = [(0.1, b": keep-alive\r\n\r\ndata: {\"a\": 1}\r\n\r\n"), (0.2, b"data: [DONE]\r\n\r\n")]
    assert split_sse(reads) == [(0.1, '{"a": 1}'), (0.2, "[DONE]")]


def test_a_short_output_is_flagged_not_hidden():
    s = pm.measure_stream(0.0, vllm_stream([0.0, 0.1, 0.2]), 500)
    assert s.ok and s.tokens_out == 2 and s.tokens_out_exact is False


@pytest.mark.parametrize("reads, reason", [
    ([(0.1, chunk(" a"))], "stream ended before [DONE]"),
    ([(0.1, chunk("", role="assistant")), (0.2, DONE)], "without any generated token"),
    ([(0.1, chunk(" a")), (0.2, DONE)], "no usage in the stream"),
    ([(0.1, b"data: {not json\n\n"), (0.2, DONE)], "malformed SSE event"),
    ([(0.1, b'data: {"error": {"message": "boom", "code": 500}}\n\n'), (0.2, DONE)],
     "error event in stream: boom"),
    ([], "stream ended before [DONE] after 0"),
])
def test_broken_streams_are_failed_samples_with_a_reason(reads, reason):
    s = pm.measure_stream(0.0, reads, 1)
    assert not s.ok and reason in s.error and s.ttft_ms is None


# ---------------------------------------------------------------- statistics


def test_percentiles_interpolate_linearly_like_numpy():
    values = [15, 20, 35, 40, 50]
    # numpy.percentile(values, [0, 25, 50, 90, 99, 100]) = 15, 20, 35, 46, 49.6, 50
    got = [pm.percentile(values, q) for q in (0, 25, 50, 90, 99, 100)]
    assert got == pytest.approx([15, 20, 35, 46, 49.6, 50])
    assert pm.percentile([7.0], 99) == 7.0


def test_a_single_value_has_no_stddev_and_no_interval():
    st = pm.summarize([3.0])
    assert st.stddev is None and st.ci95 is None and st.mean == 3.0 and st.n == 1


def test_the_confidence_interval_uses_student_t():
    st = pm.summarize([10.0, 12.0, 14.0])
    # mean 12, s = 2, t(0.975, 2) = 4.303: half-width 4.303 * 2 / sqrt(3)
    half = 4.303 * 2 / math.sqrt(3)
    assert st.ci95 == pytest.approx((12 - half, 12 + half))
    assert st.stddev == pytest.approx(2.0) and st.median == 12.0


def test_failed_samples_do_not_enter_the_summary():
    ok = pm.Sample(ok=True, ttft_ms=100.0, tokens_out=5, itl_ms=(1.0, 2.0))
    bad = pm.Sample(ok=False, error="x")
    summary = pm.summarize_samples([ok, bad, ok])
    assert summary["ttft_ms"].n == 2 and summary["itl_ms"].n == 4
    assert "tps" not in summary


def test_ratio_carries_the_uncertainty_of_both_means():
    a, b = pm.summarize([6.0, 7.0, 8.0]), pm.summarize([1.0, 1.0, 1.0 + 1e-9])
    r, err = pm.ratio_with_error(a, b)
    assert r == pytest.approx(7.0) and err == pytest.approx(7.0 * (1.0 / 7.0), rel=1e-3)


# ---------------------------------------------------------------- winners


def model(name, **metrics):
    mr = pm.ModelResult(pm.ModelSpec(name, None, name, 1000))
    sc = pm.Scenario("latency", "latency", None, 500, 3)
    mr.scenarios.append(pm.ScenarioResult(sc, (), {k: pm.summarize(v) for k, v in metrics.items()}))
    return mr


def test_lower_ttft_wins_when_the_intervals_do_not_overlap():
    r = pm.rank([model("a", ttft_ms=[100, 101, 102]), model("b", ttft_ms=[200, 201, 202])],
                "latency", "ttft_ms")
    assert r.best == "a" and not r.tie and r.tested
    assert r.ratio == pytest.approx(201 / 101)
    assert pm.format_ranking(r) == "TTFT (ms): 🏆 a: 1.99 ± 0.02x faster than b"


def test_higher_tps_wins_and_the_summary_says_by_how_much():
    r = pm.rank([model("slow", tps=[6.1, 6.2, 6.3]), model("fast", tps=[40, 41, 42])],
                "latency", "tps")
    assert r.best == "fast" and r.runner_up == "slow"
    text = pm.format_ranking(r)
    assert text.startswith("Decode (tok/s): 🏆 fast: 6.61 ±") and "x the decode of slow" in text


def test_overlapping_intervals_are_a_tie():
    r = pm.rank([model("a", tps=[10, 12, 14]), model("b", tps=[11, 13, 15])], "latency", "tps")
    assert r.tie and "tie between" in pm.format_ranking(r)


def test_single_runs_pick_the_best_mean_but_say_it_is_untested():
    r = pm.rank([model("a", tps=[10]), model("b", tps=[11])], "latency", "tps")
    assert r.best == "b" and not r.tie and not r.tested
    assert "untested" in pm.format_ranking(r)


def test_token_counts_are_not_ranked():
    assert pm.rank([model("a", tokens_in=[1]), model("b", tokens_in=[2])], "latency",
                   "tokens_in") is None


def test_every_metric_declares_its_direction_once():
    assert pm.METRICS["ttft_ms"].higher_is_better is False
    assert pm.METRICS["tps"].higher_is_better is True
    assert pm.METRICS["prefill_tps"].higher_is_better is True
    assert pm.METRICS["total_s"].higher_is_better is False


# ---------------------------------------------------------------- planning


def test_sizes_use_k_as_thousand_and_plain_numbers():
    assert pm.parse_token_count("32k") == 32000
    assert pm.parse_token_count("1K") == 1000
    assert pm.parse_token_count("1500") == 1500
    for bad in ("", "k", "-1k", "1.5k", "0", "x"):
        with pytest.raises(ValueError):
            pm.parse_token_count(bad)


def test_a_context_that_does_not_fit_is_clamped_and_marked():
    spec = pm.ModelSpec("m", None, "m", max_context_tokens=32000)
    plan = pm.plan_scenarios(pm.RunConfig(context_sizes=(8000, 32000)), spec)
    assert [s.name for s in plan] == ["latency", "context-8k", "context-32k"]
    assert plan[1].target_tokens_in == 8000 and not plan[1].clamped
    assert plan[2].target_tokens_in == 31900 and plan[2].requested_tokens_in == 32000
    assert plan[2].clamped and plan[0].target_tokens_out == 500 and plan[2].target_tokens_out == 100


def test_throughput_levels_are_off_by_default_and_planned_when_asked():
    spec = pm.ModelSpec("m", None, "m", 4096)
    assert all(s.kind != "throughput" for s in pm.plan_scenarios(pm.RunConfig(), spec))
    plan = pm.plan_scenarios(pm.RunConfig(context_sizes=(), concurrency=(1, 16)), spec)
    assert [(s.name, s.concurrency, s.requests) for s in plan[1:]] == [
        ("throughput-c1", 1, 8), ("throughput-c16", 16, 64)]


def test_roofline_divides_bandwidth_by_active_weight_bytes():
    qwen32 = next(m for m in pm.MODELS if m.name == "qwen3-32b-fp8")
    assert pm.roofline_tps(qwen32, 273.0) == pytest.approx(273 / 32.8)
    moe = next(m for m in pm.MODELS if m.name == "qwen3-30b-a3b-fp8")
    assert pm.roofline_tps(moe, 273.0) == pytest.approx(273 / 3.3)
    assert pm.roofline_tps(pm.ModelSpec("x", None, "x", 10), 273.0) is None


# ---------------------------------------------------------------- server metrics


PROM_BEFORE = """# HELP vllm:generation_tokens_total x
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 100.0
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 0.5
vllm:time_to_first_token_seconds_count{model_name="m"} 1.0
vllm:prefix_cache_hits_total{model_name="m"} 32.0
vllm:kv_cache_usage_perc{model_name="m"} 0.0
"""
PROM_AFTER = PROM_BEFORE.replace("} 100.0", "} 400.0").replace("_sum{model_name=\"m\"} 0.5",
    "_sum{model_name=\"m\"} 1.1").replace("_count{model_name=\"m\"} 1.0", "_count{model_name=\"m\"} 3.0")


def test_server_metrics_deltas_give_the_servers_own_ttft():
    d = pm.server_delta(pm.parse_prometheus(PROM_BEFORE), pm.parse_prometheus(PROM_AFTER))
    assert d.generation_tokens == 300 and d.requests == 2
    assert d.ttft_mean_ms == pytest.approx(300.0)
    assert d.prefix_cache_hits == 0


def test_prometheus_sums_label_sets_and_skips_buckets():
    m = pm.parse_prometheus('a_total{x="1"} 2\na_total{x="2"} 3\nb_bucket{le="1"} 9\nc 1e3\n')
    assert m == {"a_total": 5.0, "c": 1000.0}


def test_tokens_that_arrive_in_one_burst_are_flagged_bursty():
    # vLLM on a starved CPU can flush a whole answer at once: 20 tokens, 1 read
    reads = [(0.5, b"".join([chunk("", role="assistant")] + [chunk(f" t{i}") for i in range(20)]
                           + [chunk(choices=False, usage=usage(5, 20)), DONE]))]
    s = pm.measure_stream(0.0, reads, 20)
    assert s.ok and s.token_reads == 1 and s.bursty
    assert s.tps is None and s.tpot_ms is None  # no decode time was seen: no rate
    steady = pm.measure_stream(0.0, vllm_stream([0.0] + [0.1 * i for i in range(1, 21)]), 20)
    assert steady.token_reads == 20 and not steady.bursty


def test_chunks_microseconds_apart_are_one_arrival_and_milliseconds_apart_are_not():
    # httpx hands over a buffered burst one chunk at a time, ~7 us apart
    assert pm.count_arrivals([1.0 + i * 7e-6 for i in range(256)]) == 1
    assert pm.count_arrivals([1.0 + i * 2e-3 for i in range(256)]) == 256
    assert pm.count_arrivals([]) == 0


def test_bursty_samples_stay_out_of_the_decode_summary_but_count_for_ttft():
    steady = pm.Sample(ok=True, ttft_ms=10.0, tps=50.0, tokens_out=100, token_reads=100,
                       itl_ms=(20.0, 20.0))
    burst = pm.Sample(ok=True, ttft_ms=900.0, tps=250000.0, tokens_out=100, token_reads=2,
                      itl_ms=(0.0, 0.0))
    summary = pm.summarize_samples([steady, burst])
    assert summary["tps"].n == 1 and summary["tps"].mean == 50.0
    assert summary["itl_ms"].n == 2 and summary["ttft_ms"].n == 2
