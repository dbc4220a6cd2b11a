"""The known-answer check at warm-up: a model that answers garbage is never a winner.

Against the stand-in (a real HTTP server on 127.0.0.1) that answers the
known questions right, or rambles its usual words as a broken model does.
The real vLLM tiny random model is checked in tests/test_e2e_vllm.py.
"""

from __future__ import annotations

import json

import pytest

import perftest_models as pm
from standin import STANDIN_ANSWERS, canned_answer


def report_of(report_dir):
    (path,) = report_dir.glob("*.json")
    return json.loads(path.read_text())


def models_file(tmp_path, *pairs):
    """A models file naming stand-ins: (name, served model id) per model."""
    lines = ["replace: true", "models:"]
    for name, model_id in pairs:
        lines += [f"  - name: {name}", f"    model_id: {model_id}", "    max_context_tokens: 40960"]
    path = tmp_path / "models.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the verdict, pure ---------------------------------------------------------

def test_the_answer_leaves_out_reasoning_and_an_unfinished_thought_is_no_answer():
    assert pm.answer_text({"content": " 42\n", "reasoning_content": "17 + 25 is 42"}) == "42"
    assert pm.answer_text({"content": "<think>add them</think>The answer is 42."}) == \
        "The answer is 42."
    assert pm.answer_text({"content": "<think>17 plus 25, carry the"}) is None
    assert pm.answer_text({"content": None}) is None


def test_a_right_answer_is_a_whole_word_near_the_start():
    assert pm.answer_is_right("A spider has 8 legs.", ("8", "eight"))
    assert pm.answer_is_right("PARIS", ("paris",))
    assert not pm.answer_is_right("428", ("42",))  # not a part of a word
    late = " ".join(["tok"] * pm.ANSWER_WORDS) + " 42"
    assert not pm.answer_is_right(late, ("42",))  # a rambler does not pass by chance


def test_the_verdict_counts_answers_and_keeps_one_wrong_one_escaped_and_cut_short():
    long_garbage = "\x1b[2J" + "tok " * 100
    check = pm.judge_answers([("q1", ("42",), "42"), ("q2", ("paris",), long_garbage),
                              ("q3", ("cold",), "tok1 tok2"), ("q4", ("8",), None)], refused=[])
    assert (check.status, check.asked, check.right, check.ok) == ("wrong", 3, 1, False)
    assert check.example.prompt == "q2" and check.example.expected == "paris"
    assert "\x1b" not in check.example.answer and check.example.answer.startswith("\\x1b[2J")
    assert len(check.example.answer) <= pm.ANSWER_EXAMPLE_CHARS + 10


def test_three_of_four_right_passes_and_nothing_judged_is_unchecked():
    right = pm.judge_answers([("a", ("1",), "1"), ("b", ("2",), "2"), ("c", ("3",), "3"),
                              ("d", ("4",), "no")], refused=[])
    assert right.status == "right" and right.ok is True and right.example.prompt == "d"
    none = pm.judge_answers([], refused=["400: no chat template"])
    assert (none.status, none.ok, none.reason) == ("unchecked", None, "400: no chat template")


def test_the_stand_in_knows_the_answer_to_every_known_question():
    """The stand-in's own answers (not taken from the tool) pass the tool's check."""
    for prompt, expected in pm.KNOWN_ANSWERS:
        words = canned_answer({"messages": [{"role": "user", "content": prompt}]})
        assert words is not None, prompt
        assert pm.answer_is_right(" ".join(words), expected), (prompt, words)
    assert len(STANDIN_ANSWERS) == len(pm.KNOWN_ANSWERS)


# -- whole runs against the stand-in ----------------------------------------------

def test_a_model_that_answers_right_is_checked_and_says_so(standin, report_dir, run_main):
    srv = standin()
    rc, out, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                           "--report-dir", str(report_dir)])
    assert rc == 0
    check = report_of(report_dir)["models"][0]["answer_check"]
    assert check == {"ok": True, "status": "right", "asked": 4, "right": 4, "example": None,
                     "reason": None}
    known = [r for r in srv.records if not r.body.get("ignore_eos")]
    assert len(known) == 4 and all(r.body["temperature"] == 0.0 for r in known)
    assert "answer check: 4 of 4 right" in out


def test_a_garbage_model_is_never_crowned_even_when_it_is_faster(
        standin, report_dir, tmp_path, run_main):
    good = standin(model="good", itl_s=0.001)
    bad = standin(model="bad", itl_s=0.00025, answers="garbage")  # four times as fast
    models = models_file(tmp_path, ("good", "good"), ("bad", "bad"))
    # one endpoint serves one model: run each, then compare them in one report
    rc1, _, _ = run_main(["--endpoint", good.base_url, "--models", str(models), "--only", "good",
                          "--iterations", "2", "--context-sizes", "1k",
                          "--report-dir", str(tmp_path / "r1")])
    rc2, _, _ = run_main(["--endpoint", bad.base_url, "--models", str(models), "--only", "bad",
                          "--iterations", "2", "--context-sizes", "1k",
                          "--report-dir", str(tmp_path / "r2")])
    assert rc1 == rc2 == 0
    good_rep, bad_rep = (pm.load_report(next((tmp_path / d).glob("*.json"))) for d in ("r1", "r2"))
    bad_model = bad_rep.models[0]
    assert bad_model.answer_check.ok is False and bad_model.answer_check.right == 0
    assert "tok" in bad_model.answer_check.example.answer
    merged = pm.Report(good_rep.config, good_rep.started_at, [good_rep.models[0], bad_model])
    assert pm.scenario_stat(bad_model, "latency", "tps").mean > \
        pm.scenario_stat(good_rep.models[0], "latency", "tps").mean  # faster, yet:
    for metric in pm.ranked_metrics("latency"):
        assert pm.rank(merged.models, "latency", metric) is None  # one ranked model: no contest
    text = pm.format_results(merged)
    assert "🏆" not in text
    assert "bad (w)" in text
    assert ("(w) bad: answers wrong: 0 of 4 right; its speed figures are shown but not ranked"
            in text)
    summary = pm.format_summary(merged)
    assert "answers wrong: 0 of 4 right" in summary and "expected 42" in summary


def test_require_correct_answers_fails_a_garbage_model_before_measuring_it(
        standin, report_dir, run_main):
    srv = standin(answers="garbage")
    rc, out, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                           "--require-correct-answers", "--report-dir", str(report_dir)])
    assert rc == 1
    model = report_of(report_dir)["models"][0]
    assert model["status"] == "failed" and "answers wrong: 0 of 4 right" in model["error"]
    assert model["scenarios"] == []
    measured = [r for r in srv.records if r.body.get("ignore_eos")]
    assert len(measured) == 1  # the warm-up only: no scenario was run


def test_no_answer_check_sends_no_question_and_records_that_it_was_skipped(
        standin, report_dir, run_main):
    srv = standin()
    rc, out, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                           "--no-answer-check", "--report-dir", str(report_dir)])
    assert rc == 0
    assert all(r.body.get("ignore_eos") for r in srv.records)
    check = report_of(report_dir)["models"][0]["answer_check"]
    assert check["status"] == "skipped" and check["ok"] is None
    assert "answer check skipped (--no-answer-check)" in out


def test_a_server_that_refuses_the_questions_leaves_the_model_unchecked_not_wrong(
        standin, report_dir, run_main):
    srv = standin(answer_refusal=400)
    rc, out, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                           "--require-correct-answers", "--report-dir", str(report_dir)])
    assert rc == 0  # unchecked is not wrong, even with --require-correct-answers
    check = report_of(report_dir)["models"][0]["answer_check"]
    assert check["status"] == "unchecked" and check["ok"] is None
    assert "no chat template" in check["reason"]
    assert "answers unchecked:" in out


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_thinking_model_is_judged_on_its_answer_not_its_reasoning(
        standin, report_dir, field, run_main):
    srv = standin(reasoning_tokens=40, reasoning_field=field)
    rc, _, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                         "--report-dir", str(report_dir)])
    assert rc == 0
    check = report_of(report_dir)["models"][0]["answer_check"]
    assert (check["status"], check["right"]) == ("right", 4)
    known = [r for r in srv.records if not r.body.get("ignore_eos")]
    assert all(r.body["max_tokens"] == pm.ANSWER_TOKENS for r in known)


def test_a_thinking_model_that_never_finishes_thinking_is_unchecked(
        standin, report_dir, run_main):
    srv = standin(reasoning_tokens=pm.ANSWER_TOKENS + 10)
    rc, _, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                         "--report-dir", str(report_dir)])
    assert rc == 0
    check = report_of(report_dir)["models"][0]["answer_check"]
    assert check["status"] == "unchecked" and "within 512 tokens" in check["reason"]


def test_the_check_survives_the_round_trip_through_a_saved_report(
        standin, report_dir, run_main):
    srv = standin(answers="garbage")
    run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
              "--report-dir", str(report_dir)])
    (path,) = report_dir.glob("*.json")
    report = pm.load_report(path)
    assert report.models[0].answer_check.ok is False and not report.models[0].ranked
    again = pm.report_to_dict(report)["models"][0]["answer_check"]
    assert again == json.loads(path.read_text())["models"][0]["answer_check"]
