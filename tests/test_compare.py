"""compare, --baseline and the exports (Markdown, CSV, HTML, PNG charts).

The fixtures under tests/fixtures/compare/ have hand-picked numbers whose
verdicts are known by design (tests/fixtures/make_fixtures.py writes them);
real-standin.json is a real report of a run against the stand-in server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def test_a_real_report_round_trips_through_the_records_unchanged():
    original = json.loads(REAL.read_text())
    again = json.loads(json.dumps(pm.report_to_dict(pm.load_report(REAL))))
    assert again == original


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


# --- --baseline on a run ----------------------------------------------------


def _plan(tmp_path: Path, baseline: Path | None, exports: pm.ExportTargets | None = None,
          rules: dict | None = None) -> pm.Plan:
    base = (pm.Baseline(baseline, pm.load_report(baseline), pm.effective_thresholds(rules or {}))
            if baseline else None)
    return pm.Plan(pm.RunConfig(), (), (), None, "http://127.0.0.1:8000", tmp_path,
                   baseline=base, exports=exports or pm.ExportTargets())
