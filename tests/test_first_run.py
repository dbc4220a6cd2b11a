"""What a first run on a real box learns, without Docker: the pull's progress
and record, vLLM's load facts from its log, memory given back, GPU telemetry.
(The same paths against a real registry and a real vLLM: test_image_pull.py,
test_e2e_vllm.py.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import perftest_models as pm

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# --- the pull ---------------------------------------------------------------

# Events as the Docker engine 20.10 streamed them for a pull from the test
# registry (tests/support/registry.py): one layer present, one downloading.
PULL_EVENTS = [
    {"status": "Pulling from issue-11-pull", "id": "1"},
    {"status": "Already exists", "progressDetail": {}, "id": "aaa"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "ccc"},
    {"status": "Downloading", "progressDetail": {"current": 1000, "total": 5000}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 3000, "total": 5000}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 10, "total": 2000}, "id": "ccc"},
]


def test_the_pull_tracker_counts_downloaded_bytes_of_known_layers():
    t = pm.PullTracker("img:1")
    for e in PULL_EVENTS:
        t.feed(e)
    p = t.progress(10.0)
    assert (p.layers, p.layers_done, p.bytes_done, p.bytes_total) == (3, 1, 3010, 7000)
    for e in ({"status": "Download complete", "progressDetail": {}, "id": "bbb"},
              {"status": "Extracting", "progressDetail": {"current": 5000, "total": 5000}, "id": "bbb"},
              {"status": "Pull complete", "progressDetail": {}, "id": "bbb"},
              {"status": "Digest: sha256:0123"}, {"status": "Status: Downloaded newer image"}):
        t.feed(e)
    p = t.progress(12.0)
    assert (p.layers, p.layers_done, p.bytes_done, p.bytes_total) == (3, 2, 5010, 7000)


def test_an_error_in_the_pull_stream_is_raised_with_the_engines_words():
    t = pm.PullTracker("img:1")
    with pytest.raises(pm.PullError, match="toomanyrequests: slow down"):
        t.feed({"error": "x", "errorDetail": {"message": "toomanyrequests: slow down"}})


def test_pull_progress_reads_layers_bytes_and_rate():
    p = pm.PullProgress("vllm:1", 20.0, 4, 1, 100_000_000, 250_000_000)
    assert pm.format_pull_progress(p) == ("pulling vllm:1: 1/4 layers, 100.0 MB of 250.0 MB, "
                                          "5.0 MB/s, 20 s")


def test_pull_progress_in_a_log_is_one_line_per_30_seconds():
    now = [0.0]
    err = io.StringIO()
    ev = pm.ConsoleEvents(err, tty=False, clock=lambda: now[0])
    for t in (0.0, 1.0, 29.0, 30.5, 45.0, 61.0):
        now[0] = t
        ev.pulling("m", pm.PullProgress("img", t, 2, 0, int(t * 1e6), 100_000_000))
    lines = err.getvalue().splitlines()
    assert [ln.rsplit(", ", 1)[1] for ln in lines] == ["0 s", "30 s", "61 s"]
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()


def test_pull_progress_on_a_terminal_is_one_live_line():
    now = [0.0]
    err = io.StringIO()
    ev = pm.ConsoleEvents(err, tty=True, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0):
        now[0] = t
        ev.pulling("m", pm.PullProgress("img", t, 2, 0, 0, 0))
    ev.info("m: pulled")
    assert err.getvalue().count("\r\x1b[2K") == 3 and err.getvalue().endswith("\nm: pulled\n")


def test_the_summary_says_pull_and_load_apart():
    mr = pm.ModelResult(pm.MODELS[0], status="ok", lifecycle=pm.Lifecycle(
        pull=pm.PullRecord("img", "missing", skipped=False, pull_s=372.0, bytes=12_400_000_000,
                           layers=30), load_s=220.0))
    report = pm.Report(pm.RunConfig(), "2026-01-01T00:00:00+00:00", [mr])
    assert f"  {mr.spec.name}: ok, pulled 12.4 GB in 6 m 12 s; loaded in 3 m 40 s" \
        in pm.format_summary(report)


def test_an_image_that_was_present_adds_nothing_to_the_summary_line():
    mr = pm.ModelResult(pm.MODELS[0], status="ok", lifecycle=pm.Lifecycle(
        pull=pm.PullRecord("img", "missing", skipped=True), load_s=57.4))
    report = pm.Report(pm.RunConfig(), "2026-01-01T00:00:00+00:00", [mr])
    assert f"  {mr.spec.name}: ok, loaded in 57.4 s\n" in pm.format_summary(report)


def test_the_image_comes_from_composes_resolved_config_and_a_built_service_has_none():
    config = ("services:\n  a:\n    image: 127.0.0.1:5000/vllm:1\n"
              "  b:\n    build: {context: .}\n    image: local/b\n")
    assert pm.service_image(config, "a") == "127.0.0.1:5000/vllm:1"
    assert pm.service_image(config, "b") is None
    assert pm.service_image(config, "c") is None


# --- vLLM's load facts --------------------------------------------------------


def log_lines(name: str) -> list[str]:
    return (FIXTURES / "vllm-logs" / name).read_text(encoding="utf-8").splitlines()


def test_the_real_cpu_log_gives_kv_capacity_concurrency_weights_and_engine_init():
    facts = pm.parse_vllm_load_log(log_lines("cpu-0.32.log"))
    assert facts == pm.LoadFacts(weights_load_s=0.01, engine_init_s=3.33, kv_cache_device="CPU",
                                 kv_cache_tokens=524_288, max_concurrency=12.8,
                                 max_concurrency_tokens=40_960)


def test_gpu_lines_of_vllm_0_11_are_read_with_their_older_wording():
    facts = pm.parse_vllm_load_log(log_lines("gpu-0.11.log"))
    assert facts == pm.LoadFacts(
        weights_download_s=61.473712, weights_load_s=3.51, model_load_s=65.320611,
        model_memory_gib=4.6187, torch_compile_s=25.11, cuda_graph_s=6.0, cuda_graph_gib=0.08,
        engine_init_s=36.48, kv_cache_memory_gib=52.36, kv_cache_device="GPU",
        kv_cache_tokens=686_320, max_concurrency=6.86, max_concurrency_tokens=100_000)


def test_gpu_lines_of_vllm_0_32_are_read_with_kv_size_and_concurrency_on_one_line():
    facts = pm.parse_vllm_load_log(log_lines("gpu-0.32.log"))
    assert facts == pm.LoadFacts(
        weights_download_s=187.902113, weights_load_s=41.07, model_load_s=232.514872,
        model_memory_gib=29.97, torch_compile_s=57.33, cuda_graph_s=15.0, cuda_graph_gib=0.94,
        engine_init_s=81.92, kv_cache_memory_gib=71.84, kv_cache_device="GPU",
        kv_cache_tokens=784_512, max_concurrency=23.94, max_concurrency_tokens=32_768)


def test_the_first_worker_report_counts_and_unknown_lines_are_ignored():
    lines = ["(Worker_TP0) INFO Loading weights took 3.51 seconds",
             "(Worker_TP1) INFO Loading weights took 9.99 seconds",
             "garbage \x00\xff KV cache size: lots tokens", "x" * 100_000,
             "Engine 000: GPU KV cache usage: 0.1%", "Encoder graph capturing finished in 3 secs, took 1.00 GiB"]
    assert pm.parse_vllm_load_log(lines) == pm.LoadFacts(weights_load_s=3.51)
    assert pm.parse_vllm_load_log([]) == pm.LoadFacts()


def test_the_summary_names_kv_capacity_concurrency_and_load_steps():
    facts = pm.parse_vllm_load_log(log_lines("gpu-0.32.log"))
    mr = pm.ModelResult(pm.MODELS[0], status="ok", lifecycle=pm.Lifecycle(load_s=330.0,
                                                                           vllm_load=facts))
    text = pm.format_summary(pm.Report(pm.RunConfig(), "2026-01-01T00:00:00+00:00", [mr]))
    assert ("      vLLM load: KV cache 784,512 tokens (GPU, 71.84 GiB), 23.94x concurrency at "
            "32,768 tokens; model 29.97 GiB loaded in 3 m 53 s; weights download 3 m 8 s; "
            "weights 41.07 s; torch.compile 57.33 s; CUDA graphs 15 s; engine init 1 m 22 s\n") in text


# --- GPU clocks, heat and throttling (NVML) -----------------------------------
# NVML is mocked here because this machine has no GPU (nor NVML library): the
# readings are what nvidia-ml-py returns, in its units.

from test_report_extras import BOARD, fake_nvml  # noqa: E402


def readings(*boards_over_time):
    ticks = iter(range(len(boards_over_time)))
    return [fake_nvml(b).read(clock=lambda: float(next(ticks))) for b in boards_over_time]


def test_a_scenario_gets_mean_power_energy_per_token_clock_range_and_peak_temperature():
    rs = readings({**BOARD, "power_mw": 100_000, "sm_mhz": 2100, "temp_c": 60},
                  {**BOARD, "power_mw": 200_000, "sm_mhz": 1980, "temp_c": 71},
                  {**BOARD, "power_mw": 100_000, "sm_mhz": 2050, "temp_c": 65})
    g = pm.gpu_summary(rs, tokens=600)
    assert g.mean_w == pytest.approx(133.3, abs=0.05) and g.energy_j == 300.0
    assert g.j_per_token == 0.5 and g.sm_clock_min_mhz == 1980 and g.sm_clock_max_mhz == 2100
    assert g.peak_temp_c == 71 and g.throttled is False and g.throttle_reasons == ()


def test_idle_and_application_clock_reasons_are_not_throttling_but_power_cap_and_heat_are():
    idle = readings({**BOARD, "reasons": 0x1 | 0x2}, {**BOARD, "reasons": 0x1})
    assert pm.gpu_summary(idle, 10).throttled is False
    hot = readings(BOARD, {**BOARD, "reasons": 0x4}, {**BOARD, "reasons": 0x40})
    g = pm.gpu_summary(hot, 10)
    assert g.throttled is True and g.throttle_reasons == ("power cap", "thermal (hardware)")


def test_a_throttled_scenario_is_flagged_in_its_table():
    sc = pm.Scenario("latency", "latency", None, 500, 1)
    sample = pm.Sample(ok=True, ttft_ms=10.0, ttfo_ms=10.0, tps=50.0, total_s=10.0,
                       tokens_in=50, tokens_out=500)
    gpu = pm.gpu_summary(readings(BOARD, {**BOARD, "reasons": 0x20, "temp_c": 88}), 500)
    mr = pm.ModelResult(pm.ModelSpec("a", None, "a", 40000), status="ok")
    mr.scenarios.append(pm.ScenarioResult(sc, (sample,), pm.summarize_samples([sample]), gpu=gpu))
    table = pm.scenario_table([mr], pm.scenario_winners([mr], "latency", "latency"), 273.0)
    assert table.rows[0][0] == "a (t)"
    assert ("(t) GPU a: 150 W mean, 0.301 J/token, SM 2,100 MHz, peak 88 C; the GPU throttled "
            "(thermal (software)): this model's figures are not at the clocks of the others") in table.notes


def test_each_scenario_gets_the_readings_taken_while_it_ran():
    sampler = pm.GpuSampler(None, clock=lambda: 10.0)
    sampler.readings = readings(BOARD, BOARD, BOARD, BOARD)  # t = 0, 1, 2, 3
    sc = pm.Scenario("latency", "latency", None, 500, 1)
    sr = pm.with_gpu_summary(pm.ScenarioResult(sc, (), {}), sampler, t0=2.0)
    assert sr.gpu.samples == 2 and sr.gpu.duration_s == 1.0
    assert pm.with_gpu_summary(pm.ScenarioResult(sc, (), {}), None, 0.0).gpu is None


def test_gpu_figures_survive_the_json_report():
    sc = pm.Scenario("latency", "latency", None, 500, 1)
    gpu = pm.gpu_summary(readings(BOARD, BOARD), 100)
    sr = pm.ScenarioResult(sc, (), {}, gpu=gpu)
    assert pm.scenario_from_dict(pm.scenario_to_dict(sr), "x").gpu == gpu


# --- memory given back --------------------------------------------------------

GiB = 1 << 30


def mem(avail_gib, total_gib=128):
    return pm.MemoryReading("host", total_gib * GiB, int(avail_gib * GiB))


def test_meminfo_gives_total_and_available():
    text = "MemTotal:       24683652 kB\nMemFree:  100 kB\nMemAvailable:   21971476 kB\n"
    assert pm.parse_meminfo(text) == pm.MemoryReading("host", 24683652 * 1024, 21971476 * 1024)
    assert pm.parse_meminfo("MemTotal: x kB\n") is None


def test_memory_not_back_beyond_3_percent_is_not_given_back():
    r = pm.memory_record(mem(120), mem(20), mem(119))
    assert r.peak_used_bytes == 100 * GiB and r.not_given_back_bytes == GiB
    assert r.given_back is True
    assert pm.memory_record(mem(120), mem(20), mem(110)).given_back is False


def test_the_memory_watch_waits_for_memory_to_come_back_before_it_judges():
    values = iter([mem(120), mem(30), mem(100), mem(119.5)])
    watch = pm.MemoryWatch(lambda: next(values), interval_s=3600)
    watch.start()
    watch._sample()  # what the thread does every second
    slept = []
    record = watch.finish(sleep=slept.append)
    assert slept == [1.0] and record.given_back is True
    assert record.available_peak_bytes == 30 * GiB


def test_a_model_that_did_not_give_memory_back_is_named_in_a_warning():
    values = iter([mem(120), mem(60)] + [mem(100)] * 10)
    watch = pm.MemoryWatch(lambda: next(values), interval_s=3600)
    watch.start()
    events = Recorded()
    mr = pm.ModelResult(pm.ModelSpec("leaky", "svc", "leaky", 40000))
    watch.finish = lambda: pm.MemoryWatch.finish(watch, sleep=lambda s: None)
    pm.record_memory(mr, watch, events)
    assert mr.lifecycle.memory.given_back is False
    (warning,) = events.lines
    assert warning.startswith("warning: leaky: 21.5 GB of host memory not given back after its stop")


class Recorded(pm.Events):
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)
