"""Engines other than vLLM: detection, knobs, calibration, per-engine metrics.

Fast tests: a scripted server that speaks only OpenAI's own API (the
stand-in with ``openai_only``: unknown fields refused with 400, no
/tokenize, no /metrics, no ignore_eos) over a real socket, and the pure
functions on samples. SGLang needs a GPU, so its detection and metric names
are tested on committed samples written from SGLang's source
(tests/support/sglang-*.json/txt), not on a running server. The real
llama.cpp server is in tests/test_llamacpp.py (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import perftest_models as pm

SUPPORT = Path(__file__).resolve().parent / "support"


def json_report(report_dir):
    (path,) = report_dir.glob("*.json")
    return json.loads(path.read_text())


def run_endpoint(srv, report_dir, *extra):
    return pm.main(["--endpoint", srv.base_url, "--iterations", "2", "--report-dir",
                    str(report_dir), *extra])


# ---------------------------------------------------------------- OpenAI-only


def test_an_openai_only_server_is_measured_with_calibrated_inputs_and_honest_flags(
        standin, report_dir, capsys):
    # It refuses vLLM's fields, has no tokenizer, and stops after 5 tokens.
    srv = standin(openai_only=True, eos_after_tokens=5)
    rc = run_endpoint(srv, report_dir, "--context-sizes", "1k,4k")
    out, err = capsys.readouterr()
    assert rc == 0, err
    (model,) = json_report(report_dir)["models"]
    assert model["server"]["engine"] == "openai" and model["server"]["version"] is None
    assert set(model["server"]["knobs_refused"]) == {"min_tokens", "ignore_eos", "cache_salt",
                                     "stream_options.continuous_usage_stats"}
    _, ctx1k, ctx4k = model["scenarios"]
    for sc, target in ((ctx1k, 1000), (ctx4k, 4000)):
        assert sc["tokens_in_exact"] is False
        assert all(abs(s["tokens_in"] - target) <= target // 100 for s in sc["samples"])
    for sc in model["scenarios"]:
        assert sc["output_forced"] is False and sc["server_metrics"] is None
        assert all(s["ok"] and s["tokens_out"] == 5 and s["tps"] is None for s in sc["samples"])
    assert "latency: ~50-token prompt, 500 asked, 5 received, x2" in out
    assert "context-1k: 1000 tokens in, 100 asked, 5 received, x2" in out
    assert "(~) standin: the server has no chat tokenizer endpoint" in out
    assert "(!) standin: 500 asked, 5 received: the output length could not be forced " \
           "(it refused min_tokens, ignore_eos)" in out
    assert "the server refused (dropped from the requests): " in out
    # no field the server refused was sent after the warm-up learnt it
    after = [r.body for r in srv.records if r.status == 200]
    assert after and not any({"min_tokens", "ignore_eos", "cache_salt"} & set(b) for b in after)


def test_without_server_metrics_the_table_shows_a_dash_never_zero(standin, report_dir, capsys):
    srv = standin(openai_only=True)
    assert run_endpoint(srv, report_dir, "--context-sizes", "1k") == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("| standin") and "1,000" in ln)
    assert [c.strip() for c in row.split("|")][4] == "-"  # Server TTFT (ms)
    for sc in json_report(report_dir)["models"][0]["scenarios"]:
        assert sc["server_metrics"] is None


def test_a_field_the_server_refuses_is_dropped_and_the_warm_up_sent_again(standin, report_dir):
    srv = standin(openai_only=True)
    assert run_endpoint(srv, report_dir, "--context-sizes", "1k") == 0
    warm = [r for r in srv.records if r.body.get("max_tokens") == pm.WARMUP_TOKENS]
    assert [r.status for r in warm] == [400, 400, 400, 400, 200]
    assert "cache_salt" not in warm[-1].body and "min_tokens" not in warm[-1].body


def test_refused_argument_reads_openais_400_only():
    assert pm.refused_argument("HTTP 400: Unrecognized request argument supplied: ignore_eos") \
        == "ignore_eos"
    assert pm.refused_argument("HTTP 400: Unrecognized request argument supplied: "
                               "stream_options.continuous_usage_stats") \
        == "stream_options.continuous_usage_stats"
    assert pm.refused_argument("HTTP 500: Unrecognized request argument supplied: x") is None
    assert pm.refused_argument(None) is None


def test_a_refused_nested_field_is_dropped_from_stream_options_only():
    knobs = pm.RequestKnobs(refused=("stream_options.continuous_usage_stats", "min_tokens"))
    body = json.loads(pm.chat_payload("m", [], 10, 0.7, None, "salt", knobs))
    assert body["stream_options"] == {"include_usage": True}
    assert "min_tokens" not in body and body["ignore_eos"] is True


def test_llamacpp_requests_turn_its_slot_cache_off():
    knobs = pm.RequestKnobs(extra=pm.ENGINE_EXTRA_FIELDS["llama.cpp"])
    assert json.loads(pm.chat_payload("m", [], 10, 0.7, None, "s", knobs))["cache_prompt"] is False


# ---------------------------------------------------------------- usage-less streams


def test_a_server_that_never_sends_usage_is_counted_with_its_tokenizer(
        standin, report_dir, capsys):
    srv = standin(stream_usage=False)
    rc = run_endpoint(srv, report_dir, "--context-sizes", "1k")
    out, err = capsys.readouterr()
    assert rc == 0, err
    (model,) = json_report(report_dir)["models"]
    assert "stream_options.include_usage" in model["server"]["knobs_ignored"]
    latency, ctx = model["scenarios"]
    for s in latency["samples"] + ctx["samples"]:
        assert s["ok"] and s["tokens_counted"] is True
    # the stand-in's tokenizer is one token per word: the counts are exact here
    assert [s["tokens_out"] for s in ctx["samples"]] == [100, 100]
    assert [s["tokens_in"] for s in ctx["samples"]] == [1000, 1000]
    assert "(n) standin: the server sent no usage" in out


# ---------------------------------------------------------------- a scenario without success


def test_a_scenario_with_no_successful_request_fails_the_model(standin, report_dir):
    # warm-up and latency fine, then both context requests refused: within
    # --max-failures, but nothing was measured, so the model failed
    srv = standin(faults=["none", "none", "none", "http_400", "http_400"])
    rc = run_endpoint(srv, report_dir, "--context-sizes", "1k", "--max-failures", "5")
    assert rc == 1
    (model,) = json_report(report_dir)["models"]
    assert model["status"] == "failed"
    assert model["error"].startswith("context-1k: no request succeeded; last error: HTTP 400")


# ---------------------------------------------------------------- detection on samples


def test_sglang_is_detected_from_its_model_card_and_server_info():
    # SGLang needs a GPU: a committed sample of its answers, not a live server
    probes = json.loads((SUPPORT / "sglang-engine-sample.json").read_text())
    entry = probes["/v1/models"]["data"][0]
    info = pm.identify_engine(entry, probes)
    assert info == pm.EngineInfo("sglang", "0.5.6", 8192, False)
    # without the owned_by hint, /get_server_info alone tells it
    assert pm.identify_engine({"id": "tiny"}, probes).name == "sglang"


def test_sglang_metrics_are_read_by_their_own_names():
    # SGLang needs a GPU: a committed sample with the names of its collector
    after = pm.parse_prometheus((SUPPORT / "sglang-metrics-sample.txt").read_text())
    d = pm.metrics_delta({"sglang:num_requests_total": 0.0}, after)
    assert d.requests == 4 and d.prompt_tokens == 4000 and d.generation_tokens == 400
    assert d.cached_tokens == d.prefix_cache_hits == 48  # device + host
    assert d.ttft_mean_ms == pytest.approx(50.0) and d.itl_mean_ms == pytest.approx(10.0)
    assert d.queue_mean_ms == pytest.approx(2.0) and d.kv_cache_usage_perc == 0.25
    assert d.prefix_cache_queries is None


def test_llamacpp_metrics_have_no_request_count_so_it_is_null_not_zero():
    names = {"llamacpp:prompt_tokens_total": 2000.0, "llamacpp:prompt_seconds_total": 0.5,
             "llamacpp:tokens_predicted_total": 200.0,
             "llamacpp:tokens_predicted_seconds_total": 2.0, "llamacpp:n_decode_total": 220.0}
    d = pm.metrics_delta(dict.fromkeys(names, 0.0), names)
    assert d.requests is None and d.ttft_mean_ms is None
    assert d.prefix_cache_hits is None  # a build without prompt_tokens_cached_total
    assert d.prompt_tokens == 2000 and d.generation_tokens == 200
    assert d.prefill_tps == 4000.0 and d.decode_tps == 100.0 and d.decode_calls == 220


def test_metrics_of_no_known_engine_are_none():
    assert pm.metrics_delta({"process_cpu_seconds_total": 1.0},
                            {"process_cpu_seconds_total": 2.0}) is None
    assert pm.metrics_delta(None, {"vllm:prompt_tokens_total": 1.0}) is None


@pytest.mark.parametrize("entry, probes, expected", [
    ({"id": "m", "owned_by": "vllm", "max_model_len": 4096}, {"/version": {"version": "0.32.0"}},
     pm.EngineInfo("vllm", "0.32.0", 4096)),
    ({"id": "m", "owned_by": "llamacpp", "meta": {"n_ctx": 2048, "n_ctx_train": 65536}},
     {"/props": {"build_info": "b1-abc", "default_generation_settings": {"n_ctx": 2048}}},
     pm.EngineInfo("llama.cpp", "b1-abc", 2048)),
    ({"id": "m"}, {"/props": {"default_generation_settings": {"n_ctx": 1024}}},
     pm.EngineInfo("llama.cpp", None, 1024)),
    ({"id": "m", "owned_by": "m"}, {"/info": {"model_id": "m", "max_total_tokens": 4096,
                                              "version": "3.3.6", "router": "text-generation-router"}},
     pm.EngineInfo("tgi", "3.3.6", 4096)),
    ({"id": "m", "owned_by": "system"}, {}, pm.EngineInfo("openai", None, None)),
])
def test_the_engine_and_its_context_come_from_what_the_server_answers(entry, probes, expected):
    assert pm.identify_engine(entry, probes) == expected


def test_a_forced_engine_is_believed_and_marked_forced():
    info = pm.identify_engine({"id": "m", "owned_by": "vllm", "max_model_len": 4096}, {},
                              forced="openai")
    assert (info.name, info.forced, info.context_tokens) == ("openai", True, 4096)


def test_the_models_file_engine_key_is_checked(tmp_path, capsys):
    path = tmp_path / "models.yml"
    path.write_text("models:\n- {name: x, model_id: x, max_context_tokens: 4096, engine: ollama}\n")
    assert pm.main(["--models", str(path)]) == 2
    assert "'engine' must be one of vllm, llama.cpp, sglang, tgi, openai" in capsys.readouterr().err
    path.write_text("models:\n- {name: x, model_id: x, max_context_tokens: 4096, engine: llama.cpp}\n")
    (spec,) = [m for m in pm.load_models_file(path, ()) if m.name == "x"]
    assert spec.engine == "llama.cpp"


def test_llamacpps_slot_context_is_the_endpoint_models_context():
    assert pm.served_context({"id": "m", "meta": {"n_ctx": 8192, "n_ctx_train": 65536}}) == 8192
    assert pm.served_context({"id": "m", "max_model_len": 4096}) == 4096
    assert pm.served_context({"id": "m", "meta": {"n_ctx": True}}) is None


# ---------------------------------------------------------------- short answers


def _stream(tokens: int, usage_out: int) -> list[tuple[float, bytes]]:
    reads = []
    for i in range(tokens):
        chunk = {"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
        reads.append((1.0 + 0.01 * i, f"data: {json.dumps(chunk)}\n\n".encode()))
    usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": usage_out}}
    reads.append((2.0, f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()))
    return reads


def test_an_answer_of_too_few_tokens_has_no_decode_rate():
    short = pm.measure_stream(0.0, _stream(3, 3), 500)
    assert short.ok and short.tokens_out == 3 and short.tps is None and short.tpot_ms is None
    assert short.itl_ms == () and short.ttft_ms == 1000.0  # the rest is still measured
    longer = pm.measure_stream(0.0, _stream(20, 20), 500)
    assert longer.tps == pytest.approx(19 / 0.19)
    asked_few = pm.measure_stream(0.0, _stream(4, 4), 4)  # 4 asked, 4 received: a rate
    assert asked_few.tps is not None


def test_stream_text_is_what_was_generated():
    assert pm.stream_text(_stream(3, 3)) == " w0 w1 w2"


def test_the_compose_file_documents_a_llamacpp_service_beside_the_vllm_ones():
    compose = pm.load_compose_file(Path(__file__).resolve().parent.parent / "docker-compose.yml")
    svc = compose.services["llamacpp-gpt-oss-120b"]
    argv = svc["command"].split()
    assert svc["entrypoint"] == ["/app/llama-server"] and "--metrics" in argv
    assert argv[argv.index("--port") + 1] == "8000" and "8000:8000" in svc["ports"][0]
    assert argv[argv.index("--alias") + 1] == "gpt-oss-120b"  # its model_id in docs/models-file.md
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "curl" in svc["healthcheck"]["test"]  # the vLLM services' python3 check is overridden
