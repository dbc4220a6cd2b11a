"""Power, prefill curve, roofline and environment lines in the report."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

import perftest_models as pm


class FakeNvmlLib:
    """Mock of the nvidia-ml-py binding: there is no GPU (and no NVML) on this
    machine, so the GPU's answers are scripted here. Same names and units as
    pynvml: milliwatts, MHz, degrees C, clock-event reason bits."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self, boards):
        self.boards = boards  # one dict per GPU: power_mw, sm_mhz, temp_c, reasons

    def nvmlDeviceGetPowerUsage(self, h):
        return self.boards[h]["power_mw"]

    def nvmlDeviceGetClockInfo(self, h, kind):
        return self.boards[h]["sm_mhz"]

    def nvmlDeviceGetTemperature(self, h, kind):
        return self.boards[h]["temp_c"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.boards[h].get("reasons", 0)

    def nvmlShutdown(self):
        pass


def fake_nvml(*boards):
    return pm.Nvml(FakeNvmlLib(list(boards)), range(len(boards)))


BOARD = {"power_mw": 150_500, "sm_mhz": 2100, "temp_c": 60}


def test_power_is_integrated_into_energy_and_tokens_per_joule():
    ticks = itertools.count(0.0, 2.0)  # virtual clock: 2 s between samples
    nvml = fake_nvml(BOARD)
    readings = [nvml.read(clock=lambda: next(ticks)) for _ in range(4)]
    summary = pm.gpu_summary(readings, tokens=3000)
    assert summary.mean_w == 150.5 and summary.samples == 4
    assert summary.energy_j == pytest.approx(150.5 * 2.0 * 3)
    assert summary.tokens_per_j == pytest.approx(3000 / (150.5 * 2.0 * 3), rel=1e-3)


def test_power_is_absent_cleanly_without_nvml(monkeypatch):
    if not Path("/dev/nvidiactl").exists():  # real: the binding finds no NVML library here
        assert pm.Nvml.open() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # and without the binding at all
    assert pm.Nvml.open() is None
    with pm.GpuSampler(None, interval_s=0.001) as sampler:
        pass
    assert sampler.readings == [] and pm.gpu_summary(sampler.readings, 100) is None


def test_a_gpu_with_several_boards_adds_their_power():
    reading = fake_nvml({**BOARD, "power_mw": 100_000}, {**BOARD, "power_mw": 50_000}).read()
    assert reading.power_w == 150.0


def result(name, ttfts, rates, tps=None, **spec):
    mr = pm.ModelResult(pm.ModelSpec(name, None, name, 40000, **spec), status="ok")
    if tps:
        sc = pm.Scenario("latency", "latency", None, 500, len(tps))
        mr.scenarios.append(pm.ScenarioResult(sc, (), {"tps": pm.summarize(tps)}))
    for size, ttft, rate in zip((1000, 8000), ttfts, rates):
        sc = pm.Scenario(f"context-{size // 1000}k", "context", size, 100, 1)
        mr.scenarios.append(pm.ScenarioResult(sc, (), {"ttft_ms": pm.summarize([ttft]),
                                                       "prefill_tps": pm.summarize([rate])}))
    return mr


def test_the_prefill_curve_has_a_column_per_context_size():
    table = pm.prefill_curve_table([result("a", [100, 900], [10000, 8900]),
                                    result("b", [50, 400], [20000, 20000])])
    assert table.headers == ("Model", "context-1k", "context-8k")
    assert table.rows == (("a", "100 ms, 10,000 tok/s", "900 ms, 8,900 tok/s"),
                          ("b", "50 ms, 20,000 tok/s", "400 ms, 20,000 tok/s"))


def test_the_summary_names_the_roofline_share_power_and_image():
    mr = result("q", [1, 2], [1, 2], tps=[6.1, 6.2, 6.3], params_active_b=32.8, bytes_per_weight=1.0)
    mr.server = pm.ServerInfo(version="0.11.0", chat_template_kwargs={"enable_thinking": False})
    mr.lifecycle = pm.Lifecycle(image="vllm/vllm-openai:v0.11.0", repo_digests=("vllm@sha256:ab",),
                                command=("Qwen/Qwen3-32B-FP8", "--max-model-len", "32000"),
                                power=pm.PowerSummary(mean_w=140.0, max_w=140.0, energy_j=2500.0,
                                                      samples=2, tokens_per_j=0.5))
    lines = pm.format_model_environment(mr, 273.0)
    assert lines[0] == ("      vLLM 0.11.0; image vllm/vllm-openai:v0.11.0 (vllm@sha256:ab); "
                        'chat_template_kwargs {"enable_thinking": false}; '
                        "decode roofline 8.3 tok/s, achieved 74%; GPU 140 W mean, 2.5 kJ, 0.50 tokens/J")
    assert lines[1] == "      command: Qwen/Qwen3-32B-FP8 --max-model-len 32000"
    d = pm.model_to_dict(mr, 273.0)
    assert d["roofline"] == {"bandwidth_gbs": 273.0, "ceiling_tps": 8.323, "achieved_pct": 74.5}


def test_decode_detail_has_tpot_itl_percentiles_and_e2e_rate_per_scenario():
    mr = pm.ModelResult(pm.ModelSpec("m", None, "m", 4096), status="ok")
    samples = (pm.Sample(ok=True, tpot_ms=2.0, e2e_tps=400.0, itl_ms=(1.0, 2.0, 3.0, 4.0)),
               pm.Sample(ok=True, tpot_ms=4.0, e2e_tps=200.0, itl_ms=(5.0,)))
    sc = pm.Scenario("latency", "latency", None, 5, 2)
    mr.scenarios.append(pm.ScenarioResult(sc, samples, pm.summarize_samples(samples)))
    table = pm.decode_detail_table([mr])
    # ITL pools every gap: [1, 2, 3, 4, 5] -> p50 3, p90 4.6, p99 4.96
    assert table.rows == (("m", "latency", "3.00 ± 1.41", "3.00", "4.60", "4.96", "300.0 ± 141.4"),)


def test_a_metric_only_one_model_has_is_said_to_be_unranked():
    a = pm.ModelResult(pm.ModelSpec("a", None, "a", 4096), status="ok")
    b = pm.ModelResult(pm.ModelSpec("b", None, "b", 4096), status="ok")
    sc = pm.Scenario("latency", "latency", None, 5, 2)
    a.scenarios.append(pm.ScenarioResult(sc, (), {"tps": pm.summarize([5.0, 6.0]),
                                                  "ttft_ms": pm.summarize([1.0, 1.1])}))
    b.scenarios.append(pm.ScenarioResult(sc, (), {"ttft_ms": pm.summarize([9.0, 9.1])}))
    notes = pm.scenario_table([a, b], pm.scenario_winners([a, b], "latency", "latency"), 273.0).notes
    assert "Decode (tok/s): not ranked: a value for a only, of a, b (see the notes above)" in notes
    assert any(n.startswith("TTFT (ms): 🏆 a") for n in notes)


def test_every_output_renders_the_one_ranking_it_is_given_and_ranks_nothing_itself():
    # a is faster; a ranking that says b won (as no rank() would) shows up in
    # every output: the renderers read the Winners stage's record, they do not rank.
    a = pm.ModelResult(pm.ModelSpec("a", None, "a", 4096), status="ok")
    b = pm.ModelResult(pm.ModelSpec("b", None, "b", 4096), status="ok")
    sc = pm.Scenario("latency", "latency", None, 5, 2)
    a.scenarios.append(pm.ScenarioResult(sc, (), {"ttft_ms": pm.summarize([1.0, 1.1])}))
    b.scenarios.append(pm.ScenarioResult(sc, (), {"ttft_ms": pm.summarize([9.0, 9.1])}))
    report = pm.Report(pm.RunConfig(), "2026-01-01T00:00:00", [a, b])
    assert pm.rank_scenarios(report.models)[0].winner("ttft_ms") == "a"
    given = (pm.ScenarioWinners("latency", "latency", (
        pm.Ranking("latency", "ttft_ms", "b", "a", tie=False, tested=True, ratio=2.0),)),)
    for text in (pm.format_results(report, winners=given),
                 pm.format_results(report, styled=True, winners=given),
                 pm.format_markdown(report, winners=given),
                 pm.format_html(report, {}, winners=given)):
        assert "b: 2.00x faster than a" in text  # the trophy is a star in HTML
        assert "faster than b" not in text
