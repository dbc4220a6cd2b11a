"""compare, --baseline and the exports (Markdown, CSV, HTML, PNG charts).

The fixtures under tests/fixtures/compare/ have hand-picked numbers whose
verdicts are known by design (tests/fixtures/make_fixtures.py writes them);
real-standin.json is a real report of a run against the stand-in server.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perftest_models as pm  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
BASE = FIXTURES / "compare" / "baseline.json"
CAND = FIXTURES / "compare" / "candidate.json"
SINGLE_BASE = FIXTURES / "compare" / "single-baseline.json"
SINGLE_CAND = FIXTURES / "compare" / "single-candidate.json"
REAL = FIXTURES / "real-standin.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXTURE_METRICS = ("ttft_ms", "ttfo_ms", "tps", "prefill_tps", "total_s")


def verdicts(comparison: pm.Comparison) -> dict[tuple[str, str, str], str]:
    return {(c.model, c.scenario, c.metric): pm.verdict_text(c) for c in comparison.changes}


def compare_files(base: Path, cand: Path, rules: dict | None = None) -> pm.Comparison:
    return pm.compare_reports(pm.load_report(base), pm.load_report(cand),
                              pm.effective_thresholds(rules or {}))


def table_rows(text: str) -> list[tuple[str, ...]]:
    """The cells of every row of the plain (ASCII) tables in `text`."""
    return [tuple(c.strip() for c in line.strip("|").split("|"))
            for line in text.splitlines() if line.startswith("| ")]


def stat(*values: float) -> pm.Stat:
    st = pm.summarize(values)
    assert st is not None
    return st


# --- loading ----------------------------------------------------------------


def test_a_real_report_round_trips_through_the_records_unchanged(standin, report_dir):
    """A report this version writes (a real run against the stand-in) loads
    into the records and is written again exactly as it was."""
    srv = standin(itl_s=0.001)
    assert pm.main(["--endpoint", srv.base_url, "--iterations", "2", "--context-sizes", "1k",
                    "--concurrency", "2", "--report-dir", str(report_dir)]) == 0
    (path,) = report_dir.glob("*.json")
    original = json.loads(path.read_text())
    again = json.loads(json.dumps(pm.report_to_dict(pm.load_report(path))))
    assert again == original


def _kept(original: object, again: object, where: str = "") -> list[str]:
    """Where `again` lost or changed a value of `original`, or added a key
    with a value (a newer version's field read back from an older file is null)."""
    if isinstance(original, dict) and isinstance(again, dict):
        lost = [f"{where}/{k}" for k in original if k not in again]
        added = [f"{where}/{k}+" for k in again if k not in original and again[k] is not None]
        return lost + added + [p for k in original if k in again
                               for p in _kept(original[k], again[k], f"{where}/{k}")]
    if isinstance(original, list) and isinstance(again, list) and len(original) == len(again):
        return [p for i, (a, b) in enumerate(zip(original, again)) for p in _kept(a, b, f"{where}[{i}]")]
    return [] if original == again and type(original) is type(again) else [where]


@pytest.mark.parametrize("path", [REAL, BASE, CAND, SINGLE_BASE, SINGLE_CAND,
                                  ROOT / "docs" / "samples" / "baseline.json",
                                  ROOT / "docs" / "samples" / "candidate.json"],
                         ids=lambda p: p.name)
def test_every_saved_report_reads_into_records_and_writes_out_every_key_it_had(path):
    original = json.loads(path.read_text())
    again = json.loads(json.dumps(pm.report_to_dict(pm.load_report(path))))
    assert _kept(original, again) == []


def _write(tmp_path: Path, name: str, doc: object) -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _real_with(**changes: object) -> dict:
    doc = json.loads(REAL.read_text())
    doc.update(changes)
    return doc


def _damaged_stat() -> dict:
    doc = json.loads(REAL.read_text())
    doc["models"][0]["scenarios"][0]["summary"]["ttft_ms"]["mean"] = "fast"
    return doc


@pytest.mark.parametrize("doc, expected", [
    (None, "not found: check the path"),
    ("{not json", "is not JSON"),
    ({"hello": 1}, "is not a report of perftest-models (tool.name is None)"),
    ([1, 2], "is not a report of perftest-models"),
    ({"tool": {"name": "hyperfine"}, "schema_version": 1}, "tool.name is 'hyperfine'"),
    (_real_with(schema_version=2), "has schema_version 2, but perftest-models"),
    (_real_with(schema_version=True), "has schema_version True"),
    (_real_with(models=None), "is a damaged perftest-models report"),
    (_damaged_stat(), "ttft_ms: mean is 'fast', not a number"),
])
def test_a_file_that_is_not_a_report_of_this_schema_is_refused_with_one_line(
        tmp_path, capsys, doc, expected):
    path = tmp_path / "missing.json" if doc is None else _write(tmp_path, "bad.json", doc)
    code = pm.main(["compare", str(path), str(CAND)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"perftest-models: error: baseline {path} ")
    assert expected in err


def test_a_field_this_version_does_not_know_is_ignored_not_refused(tmp_path):
    doc = json.loads(REAL.read_text())
    throughput = doc["models"][0]["scenarios"][-1]
    throughput["aggregate"]["scheduler"] = "fcfs"  # e.g. a text field added by a later version
    throughput["samples"][0]["new_field_ms"] = 1.0
    doc["config"]["new_option"] = True
    report = pm.load_report(_write(tmp_path, "newer.json", doc))
    assert report.models[0].scenarios[-1].aggregate.output_tps == 1767.342


def test_a_bad_candidate_is_named_as_the_candidate(tmp_path, capsys):
    path = _write(tmp_path, "c.json", {"hello": 1})
    assert pm.main(["compare", str(BASE), str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"perftest-models: error: candidate {path} ")


# --- verdicts ---------------------------------------------------------------


def test_known_changes_get_exact_verdicts_by_metric_direction():
    missing_cand = {("beta", "latency", m): "missing in candidate" for m in FIXTURE_METRICS}
    missing_cand |= {("alpha", "context-8k", m): "missing in candidate" for m in FIXTURE_METRICS}
    missing_base = {("gamma", "latency", m): "missing in baseline" for m in FIXTURE_METRICS}
    expected = {
        ("alpha", "latency", "ttft_ms"): "regressed",  # 100 -> 130 ms, lower is better
        ("alpha", "latency", "ttfo_ms"): "not gated",  # no default threshold
        ("alpha", "latency", "tps"): "improved",  # 50 -> 56 tok/s, higher is better
        ("alpha", "latency", "prefill_tps"): "regressed",  # 440 -> 339 tok/s
        ("alpha", "latency", "total_s"): "unchanged",  # +2% within 10%
        ("alpha", "context-1k", "ttft_ms"): "noise",  # +15%, but stddev 60: intervals overlap
        ("alpha", "context-1k", "ttfo_ms"): "not gated",
        ("alpha", "context-1k", "tps"): "regressed",  # -10% past 5%, tight intervals
        ("alpha", "context-1k", "prefill_tps"): "noise",  # -14.5%, wide intervals
        ("alpha", "context-1k", "total_s"): "unchanged",
        ("alpha", "throughput-c4", "ttft_ms"): "unchanged",
        ("alpha", "throughput-c4", "ttfo_ms"): "not gated",
        ("alpha", "throughput-c4", "tps"): "unchanged",
        ("alpha", "throughput-c4", "prefill_tps"): "unchanged",
        ("alpha", "throughput-c4", "total_s"): "unchanged",
        ("alpha", "throughput-c4", "output_tps"): "regressed (untested)",  # one value per level
        ("alpha", "throughput-c4", "requests_per_s"): "not gated",
        **missing_cand, **missing_base,
    }
    assert verdicts(compare_files(BASE, CAND)) == expected


def test_compare_exits_3_and_names_each_regression_on_one_stderr_line(capsys):
    assert pm.main(["compare", str(BASE), str(CAND)]) == 3
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "perftest-models: error: 4 metric(s) regressed past their threshold: "
        "alpha latency ttft_ms +30.0% (limit 10%), alpha latency prefill_tps -23.1% (limit 10%), "
        "alpha context-1k tps -10.0% (limit 5%), alpha throughput-c4 output_tps -10.0% (limit 5%)"]
    assert ("alpha", "TTFT (ms)", "100 ± 2", "130 ± 2", "+30.0%", "10%", "regressed") \
        in table_rows(out)
    assert out.count(" missing in candidate |") == 10 and out.count(" missing in baseline |") == 5
    assert ("verdicts: 4 regressed, 1 improved, 2 noise, 6 unchanged, 4 not gated, "
            "5 missing in baseline, 10 missing in candidate") in out


def test_lenient_thresholds_clear_every_regression_and_exit_0(capsys):
    rules = "ttft_ms:50%,prefill_tps:50%,tps:15%,output_tps:15%"
    assert pm.main(["compare", str(BASE), str(CAND), "--threshold", rules]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith("no regression past a threshold\n")
    assert "tps:15%" in out


def test_a_threshold_set_to_off_stops_judging_that_metric():
    judged = verdicts(compare_files(BASE, CAND, {"ttft_ms": None}))
    assert judged[("alpha", "latency", "ttft_ms")] == "not gated"
    assert judged[("alpha", "latency", "prefill_tps")] == "regressed"


def test_a_tighter_threshold_can_add_a_metric_to_the_gate():
    judged = verdicts(compare_files(BASE, CAND, {"ttfo_ms": 10.0}))
    assert judged[("alpha", "latency", "ttfo_ms")] == "regressed"


def test_single_runs_are_judged_by_the_threshold_alone_and_marked_untested(capsys):
    assert pm.main(["compare", str(SINGLE_BASE), str(SINGLE_CAND)]) == 3
    out, _ = capsys.readouterr()
    assert verdicts(compare_files(SINGLE_BASE, SINGLE_CAND)) == {
        ("alpha", "latency", "ttft_ms"): "regressed (untested)",  # 100 -> 111 ms: +11%
        ("alpha", "latency", "ttfo_ms"): "not gated",
        ("alpha", "latency", "tps"): "unchanged",  # +4% within 5%
        ("alpha", "latency", "prefill_tps"): "unchanged",  # -9.9% within 10%
        ("alpha", "latency", "total_s"): "improved (untested)",  # -20%
    }
    assert "(untested) a single run on one side" in out


def test_identical_reports_compare_unchanged_and_exit_0(capsys):
    assert pm.main(["compare", str(REAL), str(REAL)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "verdicts: 22 unchanged, 22 not gated" in out


def test_a_candidate_whose_models_all_failed_is_reported_missing_and_does_not_gate(tmp_path):
    doc = json.loads(CAND.read_text())
    for m in doc["models"]:
        m["status"], m["error"], m["scenarios"] = "failed", "container exited with code 137", []
    comparison = compare_files(BASE, _write(tmp_path, "failed.json", doc))
    assert {c.verdict for c in comparison.changes} == {"missing in candidate"}
    assert comparison.regressions == ()


def test_different_work_and_different_gpus_are_noted():
    base, cand = pm.load_report(BASE), json.loads(CAND.read_text())
    cand["models"][0]["scenarios"][1]["target_tokens_in"] = 2000
    cand["environment"]["gpu"] = "NVIDIA H200"
    comparison = pm.compare_reports(base, pm.report_from_dict(cand), pm.DEFAULT_THRESHOLDS_PCT)
    assert any(n.startswith("note: alpha context-1k: the baseline measured context-1k: 1000 tokens "
                            "in") and n.endswith("not the same work") for n in comparison.notes)
    assert "note: the baseline ran on an unknown GPU, the candidate on NVIDIA H200" in comparison.notes


@pytest.mark.parametrize("metric, base, cand, expected", [
    ("ttft_ms", 100, 120, "regressed"),  # lower is better
    ("ttft_ms", 100, 80, "improved"),
    ("tps", 100, 120, "improved"),  # higher is better
    ("tps", 100, 80, "regressed"),
    ("ttft_ms", 100, 110, "unchanged"),  # exactly the threshold is within it
    ("ttft_ms", 0.3, 0.33, "unchanged"),  # ... despite float rounding
    ("ttft_ms", 100, 110.1, "regressed"),
])
def test_judging_follows_each_metrics_direction_and_the_threshold(metric, base, cand, expected):
    verdict, _, tested = pm.judge_change(metric, stat(base), stat(cand), 10.0)
    assert (verdict, tested) == (expected, False)


def test_a_single_run_beside_many_is_judged_untested_even_inside_the_others_interval():
    many = stat(100, 130, 70)  # interval roughly 25..175
    verdict, change, tested = pm.judge_change("ttft_ms", many, stat(120), 10.0)
    assert (verdict, round(change, 1), tested) == ("regressed", 20.0, False)


def test_overlapping_intervals_past_the_threshold_are_noise_and_disjoint_ones_are_not():
    assert pm.judge_change("tps", stat(100, 90, 110), stat(120, 110, 130), 5.0)[0] == "noise"
    assert pm.judge_change("tps", stat(100, 99, 101), stat(120, 119, 121), 5.0)[0] == "improved"


# --- thresholds -------------------------------------------------------------


def test_thresholds_parse_pytest_benchmark_style_rules():
    assert pm.parse_thresholds("ttft_ms:10%,tps:5%") == {"ttft_ms": 10.0, "tps": 5.0}
    assert pm.parse_thresholds(" ttft_ms : 7.5% , ttfo_ms:OFF ,") == {"ttft_ms": 7.5, "ttfo_ms": None}
    merged = pm.effective_thresholds({"ttft_ms": 7.5, "tps": None, "itl_ms": 20.0})
    assert merged == {"ttft_ms": 7.5, "prefill_tps": 10.0, "total_s": 10.0, "output_tps": 5.0,
                      "capacity_streams": 10.0, "itl_ms": 20.0}


@pytest.mark.parametrize("text, message", [
    ("ttft_ms:10", r"give the threshold in percent, e.g. ttft_ms:10%"),
    ("ttft:10%", r"unknown metric 'ttft'; known: ttft_ms, ttfo_ms, tps"),
    ("tokens_in:5%", r"unknown metric 'tokens_in'"),  # no direction: cannot regress
    ("ttft_ms:-1%", r"must be a percentage >= 0"),
    ("ttft_ms:nan%", r"must be a percentage >= 0"),
    ("ttft_ms:fast%", r"'fast%' is not a percentage like 10%"),
    ("ttft_ms:10%,ttft_ms:5%", r"ttft_ms is given twice"),
    ("ttft_ms", r"'ttft_ms' is not METRIC:PERCENT"),
    (" , ", r"no thresholds given"),
])
def test_a_malformed_threshold_is_refused_with_the_expected_form(text, message):
    with pytest.raises(ValueError, match=message):
        pm.parse_thresholds(text)


def test_a_bad_threshold_on_the_command_line_exits_2_with_one_line(capsys):
    assert pm.main(["compare", str(BASE), str(CAND), "--threshold", "ttft_ms:10"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("perftest-models: error: argument --threshold: 'ttft_ms:10': give the "
                   "threshold in percent, e.g. ttft_ms:10% (see --help)\n")


# --- --baseline on a run ----------------------------------------------------


def _plan(tmp_path: Path, baseline: Path | None, exports: pm.ExportTargets | None = None,
          rules: dict | None = None) -> pm.Plan:
    base = (pm.Baseline(baseline, pm.load_report(baseline), pm.effective_thresholds(rules or {}))
            if baseline else None)
    return pm.Plan(pm.RunConfig(), (), (), None, "http://127.0.0.1:8000", tmp_path,
                   baseline=base, exports=exports or pm.ExportTargets())


def test_a_run_against_a_regressing_baseline_prints_the_comparison_and_exits_3(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = pm.finish_run(_plan(tmp_path, BASE), pm.load_report(CAND), 0, out=out, stdout=out, err=err)
    assert code == 3
    assert ("alpha", "Decode (tok/s)", "50.0 ± 0.5", "45.0 ± 0.5", "-10.0%", "5%", "regressed") \
        in table_rows(out.getvalue())
    assert out.getvalue().startswith(f"\nbaseline:  {BASE} (started 2026-01-05T10:00:00+00:00")
    assert "candidate: this run (started 2026-01-06T10:00:00+00:00" in out.getvalue()
    assert err.getvalue().splitlines() == [
        "perftest-models: 4 metric(s) regressed past their threshold: alpha latency ttft_ms "
        "+30.0% (limit 10%), alpha latency prefill_tps -23.1% (limit 10%), alpha context-1k tps "
        "-10.0% (limit 5%), alpha throughput-c4 output_tps -10.0% (limit 5%)"]


@pytest.mark.parametrize("code", [1, 130, 143])
def test_a_failed_model_or_an_interrupt_keeps_its_exit_code_over_a_regression(tmp_path, code):
    out = io.StringIO()
    assert pm.finish_run(_plan(tmp_path, BASE), pm.load_report(CAND), code,
                         out=out, stdout=out, err=io.StringIO()) == code
    assert "REGRESSION" in out.getvalue()


def test_a_run_within_its_thresholds_keeps_exit_0_and_a_run_without_baseline_prints_nothing(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    plan = _plan(tmp_path, BASE, rules={"ttft_ms": 50.0, "prefill_tps": 50.0, "tps": 15.0,
                                         "output_tps": 15.0})
    assert pm.finish_run(plan, pm.load_report(CAND), 0, out=out, stdout=out, err=err) == 0
    assert out.getvalue().endswith("no regression past a threshold\n") and err.getvalue() == ""
    out = io.StringIO()
    assert pm.finish_run(_plan(tmp_path, None), pm.load_report(CAND), 0,
                         out=out, stdout=out, err=err) == 0
    assert out.getvalue() == "" and err.getvalue() == ""


def test_a_run_writes_its_exports_with_the_comparison_after_the_reports(tmp_path):
    targets = pm.ExportTargets(markdown=str(tmp_path / "r.md"), csv=str(tmp_path / "r.csv"))
    err = io.StringIO()
    pm.finish_run(_plan(tmp_path, BASE, targets), pm.load_report(CAND), 0,
                  out=io.StringIO(), stdout=io.StringIO(), err=err)
    markdown = (tmp_path / "r.md").read_text()
    assert markdown.startswith("# perftest-models results\n")
    assert "## Comparison with the baseline\n\n**REGRESSION**: 4 metric(s)" in markdown
    assert "### latency: ~50-token prompt, 500 out, x3" in markdown
    assert (tmp_path / "r.csv").read_text() == pm.format_csv(pm.load_report(CAND))
    assert err.getvalue().splitlines()[:2] == [f"markdown: {tmp_path / 'r.md'}",
                                               f"csv: {tmp_path / 'r.csv'}"]


def test_the_baseline_is_checked_before_anything_else_in_the_plan(tmp_path):
    # The --models file is missing too: it would be refused first if the
    # baseline were checked later; no server is ever asked.
    args = pm.build_parser().parse_args([
        "--baseline", str(tmp_path / "nope.json"), "--models", str(tmp_path / "missing.yaml"),
        "--endpoint", "http://127.0.0.1:9"])
    with pytest.raises(pm.UsageError, match=r"^--baseline file .*nope\.json not found"):
        pm.make_plan(args)


def test_a_baseline_that_is_not_a_report_stops_a_run_with_exit_2(tmp_path, capsys):
    bad = _write(tmp_path, "b.json", _real_with(schema_version=9))
    assert pm.main(["--baseline", str(bad), "--models", str(tmp_path / "missing.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"perftest-models: error: --baseline file {bad} has schema_version 9")


def test_a_threshold_without_a_baseline_on_a_run_is_refused(capsys):
    assert pm.main(["--threshold", "tps:5%"]) == 2
    assert capsys.readouterr().err == ("perftest-models: error: --threshold judges the comparison "
                                       "with a baseline: add --baseline FILE\n")


# --- exports: where they go -------------------------------------------------


def test_an_export_to_stdout_owns_stdout_and_the_table_goes_to_stderr(capsys):
    assert pm.main(["compare", str(BASE), str(CAND), "--markdown", "-"]) == 3
    out, err = capsys.readouterr()
    assert out.startswith("## Comparison with the baseline\n\n**REGRESSION**")
    assert "+------" not in out
    assert "+------" in err and err.endswith("(limit 5%)\n")


def test_two_exports_cannot_both_take_stdout(capsys):
    assert pm.main(["compare", str(BASE), str(CAND), "--markdown", "-", "--html", "-"]) == 2
    assert capsys.readouterr().err == ("perftest-models: error: --markdown and --html both write "
                                       "to stdout (-): send one to a file\n")


def test_an_export_into_a_missing_folder_is_refused_before_reading_the_reports(tmp_path, capsys):
    dest = tmp_path / "no" / "such" / "x.md"
    assert pm.main(["compare", "missing.json", str(CAND), "--markdown", str(dest)]) == 2
    assert capsys.readouterr().err == (f"perftest-models: error: --markdown {dest}: folder "
                                       f"{dest.parent} does not exist: create it first\n")


def test_charts_without_matplotlib_fail_with_the_install_hint(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert pm.main(["compare", str(BASE), str(CAND), "--charts", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "perftest-models: error: --charts draw charts with matplotlib, which is not installed: "
        "pip install 'perftest-models[charts]' (or pip install matplotlib)\n")


def test_compare_writes_html_and_png_files_that_open(tmp_path, capsys):
    html, charts = tmp_path / "c.html", tmp_path / "charts"
    assert pm.main(["compare", str(BASE), str(CAND), "--html", str(html), "--charts", str(charts)]) == 3
    names = sorted(p.name for p in charts.iterdir())
    assert names == ["decode-tps.png", "prefill-ttft.png", "throughput.png"]
    assert all((charts / n).read_bytes().startswith(PNG_MAGIC) for n in names)
    assert html.read_text().count('src="data:image/png;base64,') == 3


# --- exports: content -------------------------------------------------------


def test_csv_has_one_row_per_sample_with_every_field_but_itl():
    rows = list(csv.reader(io.StringIO(pm.format_csv(pm.load_report(CAND)))))
    header = rows[0]
    assert header[:3] == ["model", "scenario", "iteration"]
    assert "itl_ms" not in header
    assert header[3:] == [f.name for f in pm.dataclasses.fields(pm.Sample) if f.name != "itl_ms"]
    records = [dict(zip(header, r, strict=True)) for r in rows[1:]]
    assert [(r["model"], r["scenario"]) for r in records].count(("alpha", "context-1k")) == 4
    assert len(records) == 3 + 4 + 4 + 3
    failed = next(r for r in records if r["ok"] == "false")
    assert (failed["iteration"], failed["error"], failed["ttft_ms"]) == (
        "4", "HTTP 503: the server is overloaded", "")


def test_csv_of_a_real_report_keeps_the_sample_values():
    doc = json.loads(REAL.read_text())
    rows = list(csv.DictReader(io.StringIO(pm.format_csv(pm.report_from_dict(doc)))))
    assert len(rows) == sum(len(s["samples"]) for s in doc["models"][0]["scenarios"]) == 30
    first = doc["models"][0]["scenarios"][0]["samples"][0]
    assert (rows[0]["ttft_ms"], rows[0]["tps"], rows[0]["tokens_out_exact"]) == (
        str(first["ttft_ms"]), str(first["tps"]), "true")


def test_markdown_has_a_table_per_scenario_and_escapes_pipes():
    report = pm.load_report(REAL)
    text = pm.format_markdown(report)
    headings = re.findall(r"^### (\S+?):", text, re.M)
    assert headings == ["latency", "context-1k", "context-4k", "throughput-c1", "throughput-c4"]
    assert "| Model | TTFT (ms) | Server TTFT (ms) | Decode (tok/s) |" in text
    assert pm.markdown_table(("A", "B"), [("x|y", "1")]) == "| A | B |\n|:---|---:|\n| x\\|y | 1 |\n"


def test_chart_data_holds_the_prefill_curve_decode_bars_and_throughput_levels():
    doc = json.loads(REAL.read_text())
    summary = {s["name"]: s["summary"] for s in doc["models"][0]["scenarios"]}
    prefill, decode, throughput = pm.chart_data(pm.report_from_dict(doc))
    assert prefill.name == "prefill-ttft" and len(prefill.series) == 1
    assert prefill.series[0].x == (1000.0, 4000.0)
    assert prefill.series[0].y == (summary["context-1k"]["ttft_ms"]["mean"],
                                   summary["context-4k"]["ttft_ms"]["mean"])
    assert decode.categories == ("latency", "context-1k", "context-4k")
    assert decode.series[0].yerr == tuple(summary[n]["tps"]["stddev"] for n in decode.categories)
    assert (throughput.series[0].x, throughput.series[0].y) == ((1.0, 4.0), (449.238, 1767.342))


def test_charts_draw_the_expected_series_with_labels_and_render_as_png():
    import matplotlib.image

    report, baseline = pm.load_report(CAND), pm.load_report(BASE)
    charts = pm.chart_data(report, baseline)
    assert [c.name for c in charts] == ["prefill-ttft", "decode-tps", "throughput"]
    for chart in charts:
        fig = pm.draw_chart(chart)
        ax = fig.axes[0]
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
            chart.title, chart.xlabel, chart.ylabel)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == [s.label for s in chart.series]
        kind = "BarContainer" if chart.kind == "bars" else "ErrorbarContainer"
        containers = [c for c in ax.containers if type(c).__name__ == kind]
        assert len(containers) == len(chart.series)
        for series, container in zip(chart.series, containers, strict=True):
            if chart.kind == "bars":
                assert tuple(round(b.get_height(), 6) for b in container) == tuple(
                    round(y, 6) for y in series.y)
            else:
                line = container.lines[0]
                assert (tuple(line.get_xdata()), tuple(line.get_ydata())) == (series.x, series.y)
        png = pm.figure_png(fig)
        assert png.startswith(PNG_MAGIC)
        assert matplotlib.image.imread(io.BytesIO(png)).shape == (540, 960, 4)
    labels = [s.label for s in charts[0].series]
    assert labels == ["alpha", "alpha (baseline)"]  # context scenarios: alpha only
    assert [s.label for s in charts[1].series] == [
        "alpha", "alpha (baseline)", "beta (baseline)", "gamma"]  # the comparison's order


def test_the_html_report_is_one_self_contained_file_with_tables_and_charts():
    report, baseline = pm.load_report(CAND), pm.load_report(BASE)
    comparison = pm.compare_reports(baseline, report, pm.DEFAULT_THRESHOLDS_PCT)
    charts = pm.render_charts(report, baseline)
    html = pm.format_html(report, charts, comparison, ("base.json", "cand.json"))
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>\n")
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == len(charts) == 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert '<div class="banner bad">REGRESSION: 4 metric(s) regressed past their threshold<' in html
    assert html.count('<tr class="regressed">') == 4 * 2  # the summary table and the full one
    assert "<h3>latency: ~50-token prompt, 500 out, x3</h3>" in html
    assert "<td class=\"l\">gamma</td>" in html
    # Winners are marked with a star every font has, not an emoji that may show as a box.
    assert pm.TROPHY not in html and '<span class="win" title="winner">\u2605</span>' in html


# --- docs and speed ---------------------------------------------------------


def test_usage_doc_matches_the_help_output(monkeypatch):
    doc = (ROOT / "docs" / "usage.md").read_text()
    made_with = re.search(r"Python (\d+\.\d+)", doc)
    assert made_with, "docs/usage.md should say which Python made it"
    if made_with.group(1) != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"argparse lays out help differently across Pythons; docs/usage.md was made "
                    f"with Python {made_with.group(1)}")
    monkeypatch.setenv("COLUMNS", "100")
    helps = [pm.build_parser().format_help(), pm.build_compare_parser().format_help(),
             pm.build_history_parser().format_help()]
    blocks = re.findall(r"^```text\n(.*?)^```$", doc, re.S | re.M)
    assert blocks == helps, "docs/usage.md is out of step with --help: run docs/generate_samples.py"


def test_help_imports_neither_matplotlib_nor_the_network_and_docker_libraries():
    code = ("import sys, perftest_models as pm; pm.build_parser().format_help(); "
            "pm.build_compare_parser().format_help(); "
            "print(sorted(m for m in ('matplotlib', 'httpx', 'docker', 'rich') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert proc.stdout == "[]\n"


def test_every_exit_code_has_one_name_and_the_help_lists_each():
    assert {c.name: int(c) for c in pm.ExitCode} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "REGRESSION": 3, "INTERRUPTED": 130, "TERMINATED": 143}
    listed = pm.__doc__.split("exit codes:")[1]
    assert all(f"{int(c)} " in listed for c in pm.ExitCode)
    assert pm.UsageError.exit_code == pm.ExitCode.USAGE and pm.SetupError.exit_code == pm.ExitCode.FAILED


def test_the_regression_gate_of_both_paths_keeps_an_earlier_code_and_names_each_regression():
    comparison = pm.compare_reports(pm.load_report(BASE), pm.load_report(CAND),
                                    pm.effective_thresholds({}))
    err = io.StringIO()
    assert pm.regression_gate(comparison, pm.ExitCode.OK, err, "x: ") == pm.ExitCode.REGRESSION
    assert err.getvalue() == f"x: {pm.regression_message(comparison)}\n"
    for code in (pm.ExitCode.FAILED, pm.ExitCode.INTERRUPTED, pm.ExitCode.TERMINATED):
        assert pm.regression_gate(comparison, code, io.StringIO(), "") == code
    same = pm.compare_reports(pm.load_report(BASE), pm.load_report(BASE), pm.effective_thresholds({}))
    err = io.StringIO()
    assert pm.regression_gate(same, pm.ExitCode.OK, err, "x: ") == pm.ExitCode.OK and err.getvalue() == ""


# --- capacity under --slo -----------------------------------------------------


def with_capacity(streams: int, *, step: int = 1, slo: str = "tpot_p99_ms<=50",
                  limited_by: str = "tpot_p99_ms") -> pm.ModelResult:
    mr = pm.ModelResult(pm.ModelSpec("alpha", None, "alpha", 40960), status="ok")
    mr.capacity = pm.Capacity(slo, streams, 1.0, 100.0, limited_by, streams + step, step, ())
    return mr


def capacity_verdict(base: pm.ModelResult, cand: pm.ModelResult,
                     threshold: float | None = 10.0) -> tuple[str, list[str]]:
    change, notes = pm.capacity_change("alpha", base, cand, threshold)
    assert change.scenario == "capacity" and change.metric == "capacity_streams"
    return change.verdict, notes


@pytest.mark.parametrize("base, cand, verdict", [
    (with_capacity(12), with_capacity(10), "regressed"),           # -16.7%, two steps
    (with_capacity(12), with_capacity(11), "unchanged"),           # one step: not told apart
    (with_capacity(64, step=16), with_capacity(48, step=16), "unchanged"),  # within the step
    (with_capacity(64, step=16), with_capacity(32, step=16), "regressed"),
    (with_capacity(40), with_capacity(38), "unchanged"),           # two steps, but only -5%
    (with_capacity(10), with_capacity(14), "improved"),
])
def test_a_capacity_is_judged_beyond_one_probe_step_and_the_threshold(base, cand, verdict):
    assert capacity_verdict(base, cand) == (verdict, [])


def test_a_capacity_is_not_judged_under_other_service_levels_or_a_cut_search():
    assert capacity_verdict(with_capacity(12), with_capacity(4, slo="tpot_p99_ms<=25")) == (
        "not gated", ["note: alpha capacity: the baseline searched under tpot_p99_ms<=50, the "
                      "candidate under tpot_p99_ms<=25: not the same service levels, not judged"])
    verdict, notes = capacity_verdict(with_capacity(12), with_capacity(4, limited_by="budget"))
    assert verdict == "not gated" and "only a lower bound" in notes[0]
    assert capacity_verdict(with_capacity(12), with_capacity(4), threshold=None) == (
        "not gated", [])
    none = pm.ModelResult(pm.ModelSpec("alpha", None, "alpha", 40960), status="ok")
    assert pm.capacity_change("alpha", none, none, 10.0) is None
    assert capacity_verdict(with_capacity(12), none)[0] == "missing in candidate"


def test_compare_exits_3_when_a_capacity_fell_and_names_it(tmp_path, capsys):
    base, cand = (pm.load_report(BASE), pm.load_report(BASE))
    base.models[0].capacity = with_capacity(12).capacity
    cand.models[0].capacity = with_capacity(8).capacity
    paths = [_write(tmp_path, f"{n}.json", pm.report_to_dict(r))
             for n, r in (("base", base), ("cand", cand))]
    assert pm.main(["compare", *map(str, paths)]) == 3
    out, err = capsys.readouterr()
    assert "alpha capacity capacity_streams -33.3% (limit 10%)" in err
    assert ("alpha", "Capacity (streams)", "12", "8", "-33.3%", "10%", "regressed") \
        in table_rows(out)
    assert pm.main(["compare", *map(str, paths), "--threshold", "capacity_streams:off"]) == 0


def test_an_interrupted_capacity_search_is_not_judged_as_a_regression():
    verdict, notes = capacity_verdict(with_capacity(16), with_capacity(4, limited_by="interrupted"))
    assert verdict == "not gated" and "cut short" in notes[0]
