"""Long campaigns: the plan, the time left (on virtual time), resume merges."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re

import pytest

import perftest_models as pm

CFG = pm.RunConfig(iterations=2, context_sizes=(1000,), latency_tokens_out=9,
                   context_tokens_out=9, warmup_tokens=9)
SPECS = tuple(pm.ModelSpec(n, f"svc-{n}", n, 40960) for n in ("a", "b", "c"))
# One request of 64 tokens in, 9 out: TTFT 0.5 s, then 8 tokens in 1.0 s.
TIMES = pm.ModelTimes(points=((64, 9, 0.5, 1.5),))


def ok_sample(i=0):
    return pm.Sample(ok=True, ttft_ms=500.0 + i, total_s=1.5, tokens_in=64, tokens_out=9, tps=8.0)


def result(scenario, n):
    samples = tuple(ok_sample(i) for i in range(n))
    return pm.ScenarioResult(scenario, samples, pm.summarize_samples(samples))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


# --- the time left -----------------------------------------------------------

def test_one_request_is_estimated_from_the_nearest_measured_prompt_and_the_decode_rate():
    assert pm.request_estimate_s(TIMES, None, 9) == 1.5  # the latency prompt: as measured
    # 936 more tokens at the measured 128 tok/s of prefill, then 8 tokens at 0.125 s
    assert pm.request_estimate_s(TIMES, 1000, 9) == 0.5 + 936 / 128 + 1.0
    assert pm.request_estimate_s(pm.ModelTimes(), 1000, 9) is None


def test_the_time_left_adds_the_rest_of_this_model_and_every_later_one():
    steps = pm.plan_campaign(CFG, SPECS[:2])
    pos = pm.CampaignPosition(model=0, phase="measure", scenario=1, requests_done=1, request_s=2.0)
    times = {"a": TIMES, "b": dataclasses.replace(TIMES, load_s=30.0)}
    est = pm.estimate_left(steps, pos, times, warmup_tokens=9, stop_s=4.0)
    # a: 1 context request left (8.8125 s) of which 2 s ran, and its stop (4 s);
    # b: load 30, warm-up 1.5, latency 2 x 1.5, context 2 x 8.8125, stop 4
    assert est == pm.Estimate(6.8125 + 4 + 30 + 1.5 + 3 + 17.625 + 4)
    assert est.known_s == 66.9375


def test_what_has_no_measurement_is_unknown_not_guessed():
    steps = pm.plan_campaign(CFG, SPECS[:2])
    pos = pm.CampaignPosition(model=0, phase="measure", scenario=1, requests_done=1, request_s=2.0)
    est = pm.estimate_left(steps, pos, {"a": TIMES}, warmup_tokens=9, stop_s=None)
    assert est.known_s == 6.8125
    assert est.unknown == (("a", "stop"), ("b", "load"), ("b", "warm-up"), ("b", "latency"),
                           ("b", "context-1k"), ("b", "stop"))
    assert pm.format_estimate(est) == "at least 7 s left (unknown yet: a stop, b)"
    first = pm.estimate_left(steps, pm.CampaignPosition(0), {}, stop_s=None)
    assert pm.format_estimate(first) == "time left unknown (nothing measured yet for a, b)"


def test_a_model_kept_by_a_resume_takes_no_time():
    steps = pm.plan_campaign(CFG, SPECS[:2])
    steps = (dataclasses.replace(steps[0], to_run=()), steps[1])
    times = {"b": dataclasses.replace(TIMES, load_s=30.0)}
    est = pm.estimate_left(steps, pm.CampaignPosition(1), times, warmup_tokens=9, stop_s=4.0)
    assert est == pm.Estimate(30 + 1.5 + 3 + 17.625 + 4)


def test_an_earlier_report_fills_in_what_this_run_has_not_measured_yet():
    steps = pm.plan_campaign(CFG, SPECS[:2])
    report = pm.Report(CFG, "t0", [pm.ModelResult(SPECS[0]), pm.ModelResult(SPECS[1])])
    earlier = {"b": dataclasses.replace(TIMES, load_s=30.0), "a": pm.ModelTimes(load_s=99.0)}
    progress = pm.CampaignProgress(steps, report, managed=False, history=earlier, clock=Clock())
    progress.start_model(0)
    planned = pm.plan_scenarios(CFG, SPECS[0])
    samples = (ok_sample(), ok_sample())
    report.models[0].scenarios.append(pm.ScenarioResult(planned[0], samples,
                                                        pm.summarize_samples(samples)))
    report.models[0].lifecycle = pm.Lifecycle(load_s=12.0)
    times = progress.times()
    assert times["b"] == earlier["b"]
    assert times["a"] == pm.ModelTimes(12.0, TIMES.points * 2)  # this run's own, not the report's
    # a: warm-up 1.5, latency 2 x 1.5, context 2 x 8.8125; b the same: nothing unknown
    assert progress.estimate() == pm.Estimate(2 * (1.5 + 3 + 17.625))


def test_estimate_from_takes_only_models_of_the_same_id(standin, report_dir, capsys):
    srv = standin(itl_s=0.0005)
    argv = ["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
            "--report-dir", str(report_dir)]
    assert pm.main(argv) == 0
    (path,) = report_dir.glob("*.json")
    plan = pm.make_plan(pm.build_parser().parse_args([*argv, "--estimate-from", str(path)]))
    assert set(plan.history) == {"standin"} and len(plan.history["standin"].points) == 2
    data = json.loads(path.read_text())
    data["models"][0]["model_id"] = "another-model"
    path.write_text(json.dumps(data))
    plan = pm.make_plan(pm.build_parser().parse_args([*argv, "--estimate-from", str(path)]))
    assert plan.history == {}


def test_the_progress_line_gives_position_elapsed_and_time_left():
    cfg = dataclasses.replace(CFG, context_sizes=(1000, 2000, 4000, 8000, 16000))
    steps = pm.plan_campaign(cfg, SPECS)
    pos = pm.CampaignPosition(model=1, phase="measure", scenario=3)
    line = pm.format_progress(steps, pos, 41 * 60, pm.Estimate(65 * 60))
    assert line == "model 2/3, scenario 4/6, elapsed 41 m, about 1 h 5 m left"
    assert pm.format_progress(steps, pm.CampaignPosition(0), 35, pm.Estimate(120)) == \
        "model 1/3, loading, elapsed 35 s, about 2 m left"


def test_a_log_gets_a_progress_line_per_scenario_and_every_30_s_while_waiting():
    clock, err = Clock(), io.StringIO()
    steps = pm.plan_campaign(CFG, SPECS[:1])
    report = pm.Report(CFG, "t0", [pm.ModelResult(SPECS[0])])
    progress = pm.CampaignProgress(steps, report, managed=True, clock=clock)
    events = pm.ConsoleEvents(err, tty=False, clock=clock, progress=progress)
    events.model_started(0, SPECS[0])
    events.phase("a", "load")
    for t in (100.0, 110.0, 131.0):  # waiting is polled; a log line only every 30 s
        clock.t = t
        events.waiting("a", t - 100, lambda: None)
    clock.t = 160.0
    events.phase("a", "measure")  # loaded in 60 s
    report.models[0].lifecycle = pm.Lifecycle(load_s=60.0)
    scenario = steps[0].to_run[0]
    events.scenario_started("a", scenario)
    for i in range(2):
        clock.t += 1.5
        events.sample("a", scenario, i, ok_sample())
    report.models[0].scenarios.append(result(scenario, 2))
    events.scenario_done(report.models[0], report.models[0].scenarios[0])
    lines = err.getvalue().splitlines()
    assert lines[0] == "  a: waiting for health, 0 s"
    assert lines[1] == "  model 1/1, loading, elapsed 0 s, time left unknown (nothing measured yet for a)"
    assert lines[3] == "  model 1/1, loading, elapsed 31 s, time left unknown (nothing measured yet for a)"
    assert len([ln for ln in lines if "waiting for health" in ln]) == 2
    # after the latency test: the context test (2 x 8.8125 s) is left; the stop is unknown
    assert lines[-1] == "  model 1/1, scenario 1/2, elapsed 1 m, at least 18 s left (unknown yet: a stop)"
    assert progress.walls == {"a": {"load_s": 60.0}}
    assert progress.part_models()["a"].scenarios == ("latency",)


def test_a_terminal_shows_the_request_in_flight_on_the_live_line():
    clock, err = Clock(), io.StringIO()
    steps = pm.plan_campaign(CFG, SPECS[:1])
    report = pm.Report(CFG, "t0", [pm.ModelResult(SPECS[0])])
    events = pm.ConsoleEvents(err, tty=True, clock=clock,
                              progress=pm.CampaignProgress(steps, report, managed=False, clock=clock))
    assert events.wants_live and not pm.ConsoleEvents(io.StringIO(), tty=False).wants_live
    events.model_started(0, SPECS[0])
    events.live(120, 31.25)
    assert err.getvalue() == ("\r\x1b[2K  model 1/1, warm-up, elapsed 0 s, time left unknown "
                              "(nothing measured yet for a) | request: 120 tokens, 31.2 tok/s")


def test_the_live_counter_counts_a_real_stream_outside_its_reads(standin):
    srv = standin(itl_s=0.01)
    seen = []

    class Live(pm.Events):
        wants_live = True

        def live(self, tokens, rate_tps):
            seen.append((tokens, rate_tps))

    async def go():
        async with pm.http_client(srv.base_url, None, 30.0) as client:
            payload = pm.chat_payload("standin", pm.latency_messages("n1"), 60, 0.7, None, "n1")
            return await pm.watch_live_reads(Live(), pm.send_chat(client, payload, 60),
                                             interval_s=0.05)

    sample = asyncio.run(go())
    assert sample.ok and sample.tokens_out == 60
    assert seen and all(0 <= tokens <= 60 for tokens, _ in seen)
    assert any(tokens > 0 and rate for tokens, rate in seen)
    assert [t for t, _ in seen] == sorted(t for t, _ in seen)  # counted on, never re-parsed
    assert pm._LIVE_READS.get() is None  # gone with the ticker


# --- the plan and the resume merge ------------------------------------------

def old_report(statuses, scenarios, parts=True):
    models = []
    for spec in SPECS:
        planned = pm.plan_scenarios(CFG, spec)
        done = [result(planned[i], n) for i, n in enumerate(scenarios.get(spec.name, ()))]
        models.append(pm.ModelResult(spec, status=statuses[spec.name], scenarios=done))
    report = pm.Report(dataclasses.replace(CFG, models=("a", "b", "c")), "t0", models)
    if parts:
        report.parts = [pm.RunPart("t0", models={
            mr.spec.name: pm.PartModel(tuple(sr.scenario.name for sr in mr.scenarios
                                             if len(sr.samples) == sr.scenario.requests))
            for mr in models})]
    return report


CFG3 = dataclasses.replace(CFG, models=("a", "b", "c"))


@pytest.mark.parametrize("parts", [True, False])
def test_a_resume_keeps_what_was_complete_and_reruns_a_cut_scenario_whole(parts):
    old = old_report({"a": "ok", "b": "interrupted", "c": "skipped"}, {"a": (2, 2), "b": (2, 1)},
                     parts)
    a, b, c = pm.plan_resume(old, CFG3, SPECS)
    assert a.keep_whole and a.kept == tuple(old.models[0].scenarios)
    assert all(x is y for x, y in zip(a.kept, old.models[0].scenarios))  # exactly as measured
    assert b.kept == (old.models[1].scenarios[0],) and [s.name for s in b.to_run] == ["context-1k"]
    assert [s.name for s in c.to_run] == ["latency", "context-1k"] and not c.kept
    assert pm.resumed_result(a) is not old.models[0] and pm.resumed_result(a).scenarios == \
        old.models[0].scenarios
    assert pm.resumed_result(b).scenarios == [old.models[1].scenarios[0]]


def test_a_scenario_its_part_did_not_finish_is_run_again_even_with_all_samples():
    old = old_report({"a": "ok", "b": "interrupted", "c": "skipped"}, {"a": (2, 2), "b": (2, 2)})
    old.parts = [pm.RunPart("t0", models={"a": pm.PartModel(("latency", "context-1k")),
                                          "b": pm.PartModel(("latency",))})]
    _, b, _ = pm.plan_resume(old, CFG3, SPECS)
    assert [s.name for s in b.to_run] == ["context-1k"]


def test_a_killed_run_resumes_from_its_running_model():
    old = old_report({"a": "ok", "b": "running", "c": "pending"}, {"a": (2, 2), "b": (2,)})
    a, b, c = pm.plan_resume(old, CFG3, SPECS)
    assert a.keep_whole and [s.name for s in b.to_run] == ["context-1k"] and len(c.to_run) == 2


def test_failed_models_are_kept_unless_rerun_failed_is_given():
    old = old_report({"a": "failed", "b": "ok", "c": "ok"}, {"a": (2, 1), "b": (2, 2), "c": (2, 2)})
    a, b, c = pm.plan_resume(old, CFG3, SPECS)
    assert a.keep_whole and pm.resumed_result(a).status == "failed"
    a, b, c = pm.plan_resume(old, CFG3, SPECS, rerun_failed=True)
    assert [s.name for s in a.to_run] == ["context-1k"] and b.keep_whole and c.keep_whole
    assert pm.resumed_result(a).status == "pending"


def test_a_configuration_that_decides_the_numbers_must_match_the_report():
    old = old_report({"a": "ok", "b": "ok", "c": "ok"}, {})
    assert pm.config_differences(old, CFG3, SPECS) == []
    other = dataclasses.replace(CFG3, iterations=3, port=9000, request_timeout_s=5.0)
    assert pm.config_differences(old, other, SPECS) == ["iterations: report 2, now 3"]
    bigger = (dataclasses.replace(SPECS[0], max_context_tokens=8192), *SPECS[1:])
    assert pm.config_differences(old, CFG3, bigger) == [
        "a max_context_tokens: report 40960, now 8192"]


def test_the_plan_names_models_services_scenarios_and_requests():
    old = old_report({"a": "ok", "b": "interrupted", "c": "skipped"}, {"a": (2, 2), "b": (2, 1)})
    text = pm.format_plan(pm.plan_resume(old, CFG3, SPECS), CFG3, managed=True,
                          resumed_from="r.json")
    assert text == (
        "plan: 3 model(s), 2 iteration(s), 3 scenario(s) and 6 request(s) to measure "
        "(+ a warm-up per model, 2 service start(s)); resuming r.json\n"
        "  a (service svc-a): kept as measured (ok, 2 scenario(s)): not started\n"
        "  b (service svc-b):\n"
        "    latency: kept as measured\n"
        "    context-1k: 1000 tokens in, 9 out, x2\n"
        "  c (service svc-c):\n"
        "    latency: ~50-token prompt, 9 out, x2\n"
        "    context-1k: 1000 tokens in, 9 out, x2\n")


def test_parts_round_trip_through_the_json_report():
    report = old_report({"a": "ok", "b": "ok", "c": "ok"}, {"a": (2, 2)})
    report.parts.append(pm.RunPart("t1", "t2", "SIGTERM", pm.Environment(gpu="X"), {
        "b": pm.PartModel(("latency",), "0.9", "sha256:1", 1.5, 2.0, 3.0)}))
    again = pm.report_from_dict(json.loads(json.dumps(pm.report_to_dict(report))))
    assert again.parts == report.parts


def test_results_from_a_part_whose_environment_differs_are_flagged_where_shown():
    report = old_report({"a": "ok", "b": "ok", "c": "ok"}, {"a": (2, 2), "b": (2, 2), "c": (2, 2)})
    report.parts = [
        pm.RunPart("t0", "t1", "SIGTERM", pm.Environment(gpu="GPU-1"),
                   {"a": pm.PartModel(("latency", "context-1k"), "0.9")}),
        pm.RunPart("t2", "t3", None, pm.Environment(gpu="GPU-2"),
                   {"b": pm.PartModel(("latency", "context-1k"), "0.9"),
                    "c": pm.PartModel(("latency", "context-1k"), "0.10")})]
    assert pm.part_differences(report) == {2: ["gpu GPU-1 -> GPU-2", "c vLLM 0.9 -> 0.10"]}
    text = pm.format_results(report)
    assert "| b (p)" in text and "| c (p)" in text and "| a " in text and "| a (p)" not in text
    assert "(p) b: latency, context-1k measured in part 2 of the run" in text
    assert "ENVIRONMENT DIFFERS: gpu GPU-1 -> GPU-2; c vLLM 0.9 -> 0.10" in text
    assert "| b (p) |" in pm.format_markdown(report)  # every output that shows the tables
    report.parts[1] = dataclasses.replace(report.parts[1], environment=pm.Environment(gpu="GPU-1"), models={
        "b": pm.PartModel(("latency",), "0.9")})
    assert pm.part_differences(report) == {} and "(p)" not in pm.format_results(report)


# --- through main(): dry run, resume, refusal ---------------------------------

def streamed(srv):
    """The benchmark's requests (all ignore_eos), not the answer check's."""
    return [r for r in srv.requests if r.get("ignore_eos")]


def run_main(argv, capsys):
    rc = pm.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_dry_run_prints_the_plan_and_sends_no_request(standin, report_dir, capsys):
    srv = standin()
    rc, out, err = run_main(["--endpoint", srv.base_url, "--iterations", "2", "--context-sizes",
                             "1k", "--report-dir", str(report_dir), "--dry-run"], capsys)
    assert rc == 0, err
    assert "plan: 1 model(s), 2 iteration(s), 2 scenario(s) and 4 request(s)" in err
    assert "context-1k: 1000 tokens in, 100 out, x2" in err and "nothing started" in err
    assert srv.requests == [] and list(report_dir.glob("*.json")) == [] and out == ""


def test_an_endpoint_run_resumes_where_it_was_cut_and_updates_its_report(standin, report_dir,
                                                                           capsys):
    srv = standin(itl_s=0.0005)
    argv = ["--endpoint", srv.base_url, "--iterations", "2", "--context-sizes", "1k,2k",
            "--report-dir", str(report_dir)]
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    (path,) = report_dir.glob("*.json")
    full = json.loads(path.read_text())
    # as a SIGKILL during context-2k leaves it: written after context-1k, model running
    cut = json.loads(path.read_text())
    model = cut["models"][0]
    model["status"], model["scenarios"] = "running", model["scenarios"][:2]
    cut["parts"][0]["models"]["standin"]["scenarios"] = ["latency", "context-1k"]
    cut["finished_at"] = cut["parts"][0]["finished_at"] = None
    path.write_text(json.dumps(cut))
    before = len(streamed(srv))
    rc, _, err = run_main([*argv, "--resume", str(path), "--dry-run"], capsys)
    assert rc == 0 and "latency: kept as measured" in err and "nothing started" in err
    assert len(streamed(srv)) == before and json.loads(path.read_text()) == cut
    rc, out, err = run_main([*argv, "--resume", str(path)], capsys)
    assert rc == 0, err
    assert "latency: kept as measured" in err and "context-2k: 2000 tokens in" in err
    assert len(streamed(srv)) - before == 1 + 2  # a warm-up and context-2k's two: nothing twice
    assert list(report_dir.glob("*.json")) == [path]  # updated in place
    assert path.with_suffix(".txt").read_text() == out
    done = json.loads(path.read_text())
    assert done["models"][0]["scenarios"][:2] == full["models"][0]["scenarios"][:2]
    assert [s["name"] for s in done["models"][0]["scenarios"]] == ["latency", "context-1k",
                                                                   "context-2k"]
    assert done["models"][0]["status"] == "ok" and done["started_at"] == full["started_at"]
    assert [p["models"]["standin"]["scenarios"] for p in done["parts"]] == [
        ["latency", "context-1k"], ["context-2k"]]
    assert all(p["environment"]["host"] for p in done["parts"]) and done["parts"][1]["finished_at"]
    assert "run in 2 parts:" in out
    assert re.search(r"wall time per model:\n    standin: [\d.]+ s \(measure [\d.]+ s\)", out)


def test_a_resume_with_other_iterations_is_refused_before_anything_starts(standin, report_dir,
                                                                          capsys):
    srv = standin(itl_s=0.0005)
    argv = ["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
            "--report-dir", str(report_dir)]
    assert run_main(argv, capsys)[0] == 0
    (path,) = report_dir.glob("*.json")
    text, before = path.read_text(), len(srv.requests)
    rc, _, err = run_main([*argv[:3], "2", *argv[4:], "--resume", str(path)], capsys)
    assert rc == 2
    assert "iterations: report 1, now 2" in err
    assert len(srv.requests) == before and path.read_text() == text


def test_rerun_failed_needs_resume(capsys):
    rc, _, err = run_main(["--endpoint", "http://127.0.0.1:9", "--rerun-failed"], capsys)
    assert rc == 2 and "add --resume REPORT.json" in err
