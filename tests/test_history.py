"""history: saved reports over time, the run where a level changed, hardware side by side.

tests/fixtures/history/ holds six real reports of the tool against the
stand-in (tests/fixtures/make_history.py): from run 4 on the server decodes a
third slower and reports another version. The pure rules are pinned on
synthetic series whose answer is known by construction.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import perftest_models as pm

ROOT = Path(__file__).resolve().parents[1]
SERIES = ROOT / "tests" / "fixtures" / "history"
HARDWARE = ROOT / "tests" / "fixtures" / "history-hardware"
STEP_FILE = sorted(SERIES.glob("*.json"))[3].name  # the fourth run


def stat(mean: float, half: float | None = 1.0) -> pm.Stat:
    ci = None if half is None else (mean - half, mean + half)
    return pm.Stat(n=3, mean=mean, stddev=None if half is None else half, min=mean, max=mean,
                   median=mean, p90=mean, p99=mean, ci95=ci)


# -- the rules, on synthetic series --------------------------------------------------

def test_a_step_is_placed_at_the_first_run_of_the_new_level():
    points = [stat(v) for v in (100, 101, 99, 100, 70, 71, 69, 70)]
    (step,) = pm.find_steps("tps", points, 5.0)
    assert step.run == 4 and step.verdict == pm.REGRESSED
    assert step.change_pct == pytest.approx((70 - 100) / 100 * 100, abs=1.0)


def test_a_noisy_series_with_no_real_change_has_no_step():
    rng = random.Random(20261201)
    points = [stat(100 * (1 + rng.gauss(0, 0.03)), half=4.0) for _ in range(30)]
    assert pm.find_steps("tps", points, 5.0) == []
    assert pm.find_steps("ttft_ms", points, 10.0) == []


def test_a_direction_aware_step_for_a_lower_is_better_metric():
    points = [stat(v) for v in (50, 50, 50, 80, 80, 80)]
    (step,) = pm.find_steps("ttft_ms", points, 10.0)
    assert (step.run, step.verdict) == (3, pm.REGRESSED)
    (up,) = pm.find_steps("tps", points, 5.0)
    assert (up.run, up.verdict) == (3, pm.IMPROVED)  # more tok/s is better


def test_a_regression_stands_until_a_step_back_fixes_it():
    bad = [stat(v) for v in (100, 100, 100, 70, 70, 70, 70, 70, 70, 70)]
    steps = pm.find_steps("tps", bad, 5.0)
    standing = pm.standing_regression("tps", bad, steps, 5.0)
    assert standing is not None and standing.run == 3  # six runs later, still red
    fixed = bad + [stat(100), stat(100), stat(100)]
    steps = pm.find_steps("tps", fixed, 5.0)
    assert [s.verdict for s in steps] == [pm.REGRESSED, pm.IMPROVED]
    assert pm.standing_regression("tps", fixed, steps, 5.0) is None


def test_gaps_in_a_series_are_skipped_not_read_as_zero():
    points = [stat(100), None, stat(100), stat(100), None, stat(100)]
    assert pm.find_steps("tps", points, 5.0) == []


# -- the committed series of real reports ---------------------------------------------

def test_history_names_the_run_where_the_decode_rate_stepped_down_and_what_changed(run_main):
    rc, out, _ = run_main(["history", str(SERIES)])
    assert rc == 0  # without --fail-on-change a standing regression is shown, not gated
    assert "6 run(s), oldest first" in out
    line = next(ln for ln in out.splitlines() if "standin latency Decode (tok/s):" in ln)
    assert "(regressed) from run #4" in line and STEP_FILE in line
    assert "what changed: vLLM 0.0.0-standin -> 0.0.1-standin" in line
    assert "REGRESSION standing" in out
    table = out.split("standin / latency", 1)[1].split("\n\n", 1)[0]
    decode = next(ln for ln in table.splitlines() if ln.startswith("| Decode"))
    cells = [c.strip() for c in decode.strip("|").split("|")]
    assert [c.endswith(" *") for c in cells[1:]] == [False, False, False, True, False, False]


def test_fail_on_change_exits_3_while_the_regression_stands(run_main):
    rc, _, err = run_main(["history", str(SERIES), "--fail-on-change"])
    assert rc == 3
    assert "a regression stands: standin latency tps" in err


def test_a_regression_in_the_newest_run_already_stands(run_main, tmp_path):
    for path in sorted(SERIES.glob("*.json"))[:4]:  # the step is the newest run
        shutil.copy(path, tmp_path / path.name)
    rc, out, _ = run_main(["history", str(tmp_path), "--fail-on-change"])
    assert rc == 3 and "from run #4" in out


def test_leaving_the_runs_before_the_step_out_accepts_it(run_main, tmp_path):
    files = sorted(SERIES.glob("*.json"))[3:]
    rc, out, _ = run_main(["history", *map(str, files), "--fail-on-change"])
    assert rc == 0
    assert "no regression standing" in out


def test_reports_given_in_any_order_are_put_in_time_order(run_main):
    files = sorted(SERIES.glob("*.json"))
    rc, out, _ = run_main(["history", *map(str, reversed(files))])
    assert rc == 0
    listed = [ln.split()[1] for ln in out.splitlines() if ln.startswith("  #")]
    assert listed == [f.name for f in files]


def test_a_run_without_a_scenario_is_a_gap_in_its_series(run_main, tmp_path):
    for path in sorted(SERIES.glob("*.json")):
        doc = json.loads(path.read_text())
        if path.name == STEP_FILE:
            doc["models"][0]["scenarios"] = [s for s in doc["models"][0]["scenarios"]
                                             if s["name"] != "context-1k"]
        (tmp_path / path.name).write_text(json.dumps(doc))
    rc, out, _ = run_main(["history", str(tmp_path)])
    assert rc == 0
    table = out.split("standin / context-1k", 1)[1].split("\n\n", 1)[0]
    ttft = next(ln for ln in table.splitlines() if ln.startswith("| TTFT"))
    cells = [c.strip() for c in ttft.strip("|").split("|")]
    assert cells[4] == "-" and all(c != "-" for c in cells[1:4] + cells[5:])


def test_a_report_of_another_schema_version_is_refused_by_name(run_main, tmp_path):
    for path in sorted(SERIES.glob("*.json"))[:2]:
        shutil.copy(path, tmp_path / path.name)
    old = tmp_path / "model-comparison-2020-01-01T00-00-00.json"
    old.write_text(json.dumps({**json.loads((SERIES / STEP_FILE).read_text()), "schema_version": 0}))
    rc, _, err = run_main(["history", str(tmp_path)])
    assert rc == 2
    assert old.name in err and "schema" in err


def test_a_folder_without_reports_is_a_usage_error(run_main, tmp_path):
    rc, _, err = run_main(["history", str(tmp_path)])
    assert rc == 2 and "holds no model-comparison-*.json" in err


def test_the_markdown_summary_goes_to_stdout_and_the_text_to_stderr(run_main):
    rc, out, err = run_main(["history", str(SERIES), "--markdown", "-"])
    assert rc == 0
    assert out.startswith("# perftest-models history\n")
    assert "### Step changes" in out and "from run #4" in out
    assert "| Decode (tok/s) |" in out
    assert "6 run(s), oldest first" in err


def test_charts_draw_one_trend_per_scenario_and_metric(run_main, tmp_path):
    pytest.importorskip("matplotlib")
    rc, _, _ = run_main(["history", str(SERIES), "--charts", str(tmp_path / "charts"),
                         "--html", str(tmp_path / "history.html")])
    assert rc == 0
    names = {p.name for p in (tmp_path / "charts").iterdir()}
    assert {"history-latency-tps.png", "history-context-1k-ttft_ms.png"} <= names
    assert all((tmp_path / "charts" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    html = (tmp_path / "history.html").read_text()
    assert html.count("data:image/png;base64,") == len(names) and "Step changes" in html
    (chart,) = [c for c in pm.history_charts(pm.build_history(
        pm.load_history([SERIES]), pm.DEFAULT_THRESHOLDS_PCT)) if c.name == "history-latency-tps"]
    (line,) = chart.series
    assert line.x == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0) and all(e > 0 for e in line.yerr)


# -- hardware side by side ------------------------------------------------------------

def test_by_hardware_sets_each_box_beside_the_other_with_its_roofline_share(run_main):
    rc, out, _ = run_main(["history", str(HARDWARE), "--by", "hardware"])
    assert rc == 0
    assert "2 hardware group(s)" in out
    assert "dgx-spark (273 GB/s)" in out and "h100-sxm (3350 GB/s)" in out
    decode = next(ln for ln in out.split("standin / latency", 1)[1].splitlines()
                  if ln.startswith("| Decode"))
    assert "of 273.0)" in decode and "of 3,350.0)" in decode


def test_by_hardware_says_so_when_every_report_ran_on_one_box(run_main):
    rc, out, _ = run_main(["history", str(SERIES), "--by", "hardware"])
    assert rc == 0 and "nothing to set side by side" in out


# -- capacity under --slo --------------------------------------------------------------

def with_capacities(capacities):
    """The committed series, each run's model given a capacity: (streams,
    slo, limited_by) or None."""
    runs = pm.load_history([SERIES])
    assert len(runs) == len(capacities)
    for run, cap in zip(runs, capacities):
        if cap is not None:
            streams, slo, limited_by = cap
            run.report.models[0].capacity = pm.Capacity(slo, streams, 1.0, 100.0, limited_by,
                                                        streams + 1, 1, ())
    return runs


SLO = "tpot_p99_ms<=50"


def capacity_trend(runs):
    history = pm.build_history(runs, pm.DEFAULT_THRESHOLDS_PCT)
    (trend,) = [t for t in history.trends if t.scenario == "capacity"]
    assert trend.metric == "capacity_streams"
    return history, trend


def test_a_capacity_that_fell_is_a_step_that_stands():
    runs = with_capacities([(12, SLO, "tpot_p99_ms")] * 3 + [(8, SLO, "tpot_p99_ms")] * 3)
    history, trend = capacity_trend(runs)
    assert [p.mean for p in trend.points] == [12, 12, 12, 8, 8, 8]
    (step,) = trend.steps
    assert (step.run, step.verdict) == (3, pm.REGRESSED)
    assert trend.standing is not None and trend in history.standing


def test_capacities_under_another_slo_or_cut_by_the_budget_are_left_out_of_the_series():
    runs = with_capacities([(4, "tpot_p99_ms<=25", "tpot_p99_ms"), (12, SLO, "tpot_p99_ms"),
                            (2, SLO, "budget"), (12, SLO, "tpot_p99_ms"),
                            (12, SLO, "tpot_p99_ms"), (12, SLO, "tpot_p99_ms")])
    _, trend = capacity_trend(runs)
    assert [p and p.mean for p in trend.points] == [None, 12, None, 12, 12, 12]
    assert trend.steps == () and trend.standing is None


def test_a_newest_run_without_slo_keeps_the_capacity_series_of_the_runs_before():
    runs = with_capacities([(12, SLO, "tpot_p99_ms")] * 3 + [(8, SLO, "tpot_p99_ms")] * 2 + [None])
    _, trend = capacity_trend(runs)
    assert [p and p.mean for p in trend.points] == [12, 12, 12, 8, 8, None]
    assert [s.run for s in trend.steps] == [3]


def test_an_interrupted_capacity_search_is_a_gap_not_a_step_down():
    runs = with_capacities([(12, SLO, "tpot_p99_ms")] * 3 + [(2, SLO, "interrupted")] * 3)
    _, trend = capacity_trend(runs)
    assert [p and p.mean for p in trend.points] == [12, 12, 12, None, None, None]
    assert trend.steps == ()
