"""Models on several Docker hosts, without an engine: the models file's
docker_host / url / services, the URL default, docker contexts, the
--parallel schedule, and the report's hardware note.

No SSH host is reachable here: the ssh:// form goes through the same code as
unix:// (a DOCKER_HOST in Compose's environment and the SDK's), so only its
parsing and URL default are tested.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import perftest_models as pm

ISSUE_EXAMPLE = """\
replace: true
models:
  - name: qwen3-30b-a3b-fp8
    service: vllm-qwen3-30b-a3b-fp8      # on the local engine, as today
    model_id: Qwen/Qwen3-30B-A3B-Instruct-2507-FP8
    max_context_tokens: 32768
  - name: llama33-70b-fp8
    service: vllm-llama33-70b-fp8
    model_id: nvidia/Llama-3.3-70B-Instruct-FP8
    max_context_tokens: 65536
    docker_host: ssh://admin@spark-2     # a DOCKER_HOST URL, or the name of a docker context
    url: http://spark-2:8000
  - name: qwen3-235b-tp2
    model_id: Qwen/Qwen3-235B-A22B-FP8
    max_context_tokens: 32768
    url: http://spark-1:8000
    services:                            # started in this order, stopped in reverse
      - {service: ray-worker, docker_host: ssh://admin@spark-2}
      - {service: vllm-qwen3-235b-head}  # no docker_host: the local engine
"""


def load(tmp_path: Path, text: str) -> tuple[pm.ModelSpec, ...]:
    path = tmp_path / "models.yml"
    path.write_text(text)
    return pm.load_models_file(path, pm.MODELS)


def one(tmp_path: Path, **fields) -> pm.ModelSpec:
    entry = {"name": "m", "model_id": "m", "max_context_tokens": 4096, **fields}
    return load(tmp_path, json.dumps({"replace": True, "models": [entry]}))[0]


def test_the_issues_models_file_is_read_as_written(tmp_path):
    local, remote, tp2 = load(tmp_path, ISSUE_EXAMPLE)
    assert (local.service, local.docker_host, local.url, local.services) == (
        "vllm-qwen3-30b-a3b-fp8", None, None, ())
    assert not pm.is_hosted(local)
    assert (remote.docker_host, remote.url) == ("ssh://admin@spark-2", "http://spark-2:8000")
    assert pm.model_services(remote) == (pm.ServiceRef("vllm-llama33-70b-fp8", "ssh://admin@spark-2"),)
    assert tp2.service is None
    assert pm.model_services(tp2) == (pm.ServiceRef("ray-worker", "ssh://admin@spark-2"),
                                      pm.ServiceRef("vllm-qwen3-235b-head", None))


@pytest.mark.parametrize("docker_host, url", [
    (None, "http://127.0.0.1:8123"),
    ("unix:///run/perftest-docker2.sock", "http://127.0.0.1:8123"),
    ("ssh://admin@spark-2", "http://spark-2:8123"),
    ("ssh://admin@spark-2:2222", "http://spark-2:8123"),
    ("tcp://10.0.0.7:2376", "http://10.0.0.7:8123"),
    ("tcp://[fd00::7]:2376", "http://[fd00::7]:8123"),
    ("npipe:////./pipe/docker_engine", "http://127.0.0.1:8123"),
])
def test_the_url_defaults_to_the_docker_hosts_machine_and_the_port(docker_host, url):
    assert pm.default_model_url(docker_host, 8123) == url


@pytest.mark.parametrize("fields, says", [
    ({"service": "a", "services": [{"service": "b"}]}, "'service' and 'services' are exclusive"),
    ({"services": []}, "'services' is empty"),
    ({"services": [{"docker_host": "ssh://x"}]}, "must be a mapping with 'service'"),
    ({"services": ["head"]}, "must be a mapping with 'service'"),
    ({"services": [{"service": "b", "host": "x"}]}, "unknown field(s) host"),
    ({"services": [{"service": "b; rm -rf /"}]}, "is not a valid name"),
    ({"services": [{"service": "b"}], "docker_host": "ssh://x"}, "give each item its own"),
    ({"docker_host": "http://spark-2:2375"}, "is not a DOCKER_HOST URL"),
    ({"docker_host": "ssh://"}, "is not a DOCKER_HOST URL"),
    ({"docker_host": "spark 2"}, "nor a docker context name"),
    ({"docker_host": 7}, "'docker_host' must be str or null"),
    ({"url": "spark-2:8000"}, "is not an http(s) URL"),
    ({"url": "http://user:pw@spark-2:8000"}, "without a user"),
])
def test_a_wrong_hosting_field_is_refused_with_what_to_fix(tmp_path, fields, says):
    with pytest.raises(pm.UsageError) as exc:
        one(tmp_path, **fields)
    assert says in str(exc.value)


def test_a_services_compose_file_is_relative_to_the_models_file(tmp_path):
    spec = one(tmp_path, services=[{"service": "w", "compose_file": "sub/worker.yml"},
                                   {"service": "h", "compose_file": "/abs/head.yml"}])
    assert [r.compose_file for r in spec.services] == [str(tmp_path / "sub/worker.yml"),
                                                       "/abs/head.yml"]


def test_a_url_ending_in_v1_is_the_servers_root(tmp_path):
    assert one(tmp_path, service="s", url="http://spark-2:8000/v1/").url == "http://spark-2:8000"


COMPOSE = """\
services:
  svc-near: {image: x}
  ray-worker: {image: x}
  vllm-head: {image: x}
"""


def plan_of(tmp_path: Path, models: str, *extra: str) -> pm.Plan:
    (tmp_path / "compose.yml").write_text(COMPOSE)
    (tmp_path / "models.yml").write_text(models)
    args = pm.build_parser().parse_args(["--compose-file", str(tmp_path / "compose.yml"),
                                         "--models", str(tmp_path / "models.yml"),
                                         "--context-sizes", "1k", "--port", "8123", *extra])
    return pm.make_plan(args, environ={})


def test_the_plan_settles_each_hosted_models_url_and_engines(tmp_path):
    plan = plan_of(tmp_path, """\
replace: true
models:
  - {name: near, service: svc-near, model_id: near, max_context_tokens: 4096}
  - {name: far, service: svc-near, model_id: far, max_context_tokens: 4096,
     docker_host: "ssh://admin@spark-2"}
  - name: tp2
    model_id: tp2
    max_context_tokens: 4096
    url: http://spark-1:9000
    services: [{service: ray-worker, docker_host: "ssh://admin@spark-2"}, {service: vllm-head}]
""", "--parallel")
    # one model names a host: every model takes the per-host path, the local one too
    assert plan.hosting.urls == {"near": "http://127.0.0.1:8123", "far": "http://spark-2:8123",
                                 "tp2": "http://spark-1:9000"}
    lanes = [plan.hosting.lanes(m) for m in plan.models]
    assert lanes == [{"local"}, {"ssh://admin@spark-2"}, {"ssh://admin@spark-2", "local"}]
    assert plan.cfg.parallel is True


def test_a_model_over_two_hosts_without_a_url_is_refused(tmp_path):
    with pytest.raises(pm.UsageError, match="services run on 2 Docker hosts: give its 'url:'"):
        plan_of(tmp_path, """\
replace: true
models:
  - name: tp2
    model_id: tp2
    max_context_tokens: 4096
    services: [{service: ray-worker, docker_host: "ssh://admin@spark-2"}, {service: vllm-head}]
""")


def test_a_service_missing_from_its_compose_file_is_named_before_anything_starts(tmp_path):
    with pytest.raises(pm.UsageError, match="Service ray-head not found in compose.yml"):
        plan_of(tmp_path, """\
replace: true
models:
  - {name: tp2, model_id: tp2, max_context_tokens: 4096, url: "http://h:1",
     services: [{service: ray-worker}, {service: ray-head}]}
""")


def test_parallel_and_endpoint_are_refused_together(tmp_path):
    args = pm.build_parser().parse_args(["--endpoint", "http://127.0.0.1:9", "--parallel"])
    with pytest.raises(pm.UsageError, match="--parallel runs models on several Docker hosts"):
        pm.make_plan(args, environ={})


def test_a_docker_context_is_resolved_to_its_endpoint(tmp_path, monkeypatch):
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI here")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # the user's contexts stay untouched
    subprocess.run(["docker", "context", "create", "issue-15-spark-2", "--docker",
                    "host=tcp://10.0.0.7:2376"], check=True, capture_output=True)
    host = pm.resolve_docker_host("issue-15-spark-2")
    assert (host.name, host.url, host.cert_path) == ("issue-15-spark-2", "tcp://10.0.0.7:2376", None)
    env = host.environ({"DOCKER_CONTEXT": "other", "DOCKER_HOST": "unix:///x", "PATH": "/bin"})
    assert env == {"DOCKER_HOST": "tcp://10.0.0.7:2376", "PATH": "/bin"}
    assert pm.default_model_url(host.url, 8000) == "http://10.0.0.7:8000"
    with pytest.raises(pm.UsageError, match="no DOCKER_HOST URL and no docker context"):
        pm.resolve_docker_host("issue-15-no-such-context")


def test_a_docker_host_url_keeps_our_tls_settings_and_the_local_engine_our_environment():
    host = pm.resolve_docker_host("tcp://spark-2:2376")
    env = host.environ({"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/c", "DOCKER_HOST": "x"})
    assert env == {"DOCKER_HOST": "tcp://spark-2:2376", "DOCKER_TLS_VERIFY": "1",
                   "DOCKER_CERT_PATH": "/c"}
    assert pm.resolve_docker_host(None).environ({"DOCKER_HOST": "x"}) is None


@pytest.mark.parametrize("lanes, busy, chosen", [
    ([{"a"}, {"b"}, {"a"}], set(), [0, 1]),          # one model per engine
    ([{"a"}, {"b"}], {"a"}, [1]),                    # a busy engine waits, the other goes
    ([{"a", "b"}, {"b"}, {"c"}], set(), [0, 2]),      # a spanning model holds both engines
    ([{"a", "b"}, {"c"}], {"b"}, [1]),
    ([{"local"}, {"local"}], set(), [0]),            # the local engine is one engine too
])
def test_parallel_starts_each_waiting_model_whose_engines_are_all_free(lanes, busy, chosen):
    assert pm.startable([frozenset(x) for x in lanes], busy) == chosen


def test_the_parallel_time_left_is_the_busiest_engines_sum():
    lanes = [frozenset(x) for x in ({"a"}, {"a"}, {"b"}, {"a", "b"}, {"b"})]
    left = [pm.Estimate(100.0), pm.Estimate(50.0), pm.Estimate(30.0), pm.Estimate(20.0),
            None]  # the last model is done
    assert pm.parallel_estimate(lanes, left) == pm.Estimate(170.0)  # a: 100 + 50 + 20
    unknown = [pm.Estimate(10.0, (("m1", "load"),)), None, pm.Estimate(500.0), None, None]
    assert pm.parallel_estimate(lanes, unknown) == pm.Estimate(500.0, (("m1", "load"),))
    assert pm.parallel_estimate(lanes, [None] * 5) == pm.Estimate(0.0)


def test_the_parallel_campaign_line_counts_models_and_estimates_from_what_was_measured():
    specs = [pm.ModelSpec(n, f"svc-{n}", n, 40960) for n in ("near", "far", "later")]
    cfg = pm.RunConfig(iterations=1, context_sizes=(1000,))
    steps = pm.plan_campaign(cfg, specs)
    report = pm.Report(cfg, "2026-12-01T00:00:00+00:00", [pm.ModelResult(s) for s in specs])
    lanes = [frozenset({"local"}), frozenset({"far"}), frozenset({"local"})]
    measured = pm.ModelTimes(load_s=30.0, points=((44, 500, 0.1, 5.1), (1000, 100, 0.5, 1.5)))
    history = {"near": measured, "far": measured, "later": measured}
    campaign = pm.ParallelProgress(steps, report, lanes, history)
    report.models[0].status = report.models[1].status = "running"
    campaign.models[0].phase("near", "load")  # as run_hosted_model says when it starts
    campaign.models[1].phase("far", "load")
    one = pm.estimate_left((steps[0],), pm.CampaignPosition(0), {"near": measured})
    assert one.unknown == (("near", "stop"),)  # no stop seen yet: said, not guessed
    line = campaign.line([0, 1])
    # the local engine has two models to go (near, then later), the far one one
    assert line == ("campaign: 0 of 3 models done, 2 running; at least "
                    f"{pm.fmt_duration(2 * one.known_s)} left (unknown yet: near stop, far stop, "
                    "later stop)")
    report.models[0].status = "ok"
    report.models[1].status = "failed"
    campaign.models[0].walls["near"] = {"stop_s": 4.0}
    line = campaign.line([1])  # its thread ended, not yet joined: done, not running
    assert line.startswith("campaign: 2 of 3 models done, 0 running; about ")
    assert line.endswith(f"about {pm.fmt_duration(one.known_s + 4.0)} left")


def test_parallel_progress_lines_carry_the_model_name_and_never_interleave():
    err, lock = io.StringIO(), threading.Lock()
    a, b = pm.LinePrefixer(err, "a | ", lock), pm.LinePrefixer(err, "b | ", lock)
    a.write("start")
    b.write("one\ntwo\n")
    a.write("ed\n")
    assert err.getvalue() == "b | one\nb | two\na | started\n"


def measured(name: str, hardware: str | None) -> pm.ModelResult:
    spec = pm.ModelSpec(name, None, name, 4096)
    sample = pm.Sample(ok=True, ttft_ms=10.0, tps=50.0, total_s=1.0, tokens_in=10, tokens_out=20)
    sr = pm.ScenarioResult(pm.Scenario("latency", "latency", None, 20, 1), (sample,),
                           pm.summarize_samples([sample]))
    return pm.ModelResult(spec, "ok", lifecycle=pm.Lifecycle(hardware=hardware), scenarios=[sr])


def test_models_on_different_hardware_are_said_so_above_the_tables():
    report = pm.Report(pm.RunConfig(iterations=1), "2026-12-01T00:00:00+00:00",
                       [measured("a", "aarch64, 20 CPUs, 119 GiB, nvidia runtime"),
                        measured("b", "x86_64, 2 CPUs, 24 GiB")])
    text = pm.format_results(report)
    note = ("note: these models ran on different hardware (a on aarch64, 20 CPUs, 119 GiB, "
            "nvidia runtime; b on x86_64, 2 CPUs, 24 GiB)")
    assert note in text and text.index(note) < text.index("latency")
    assert note in pm.format_markdown(report)
    same = pm.Report(report.config, report.started_at,
                     [measured("a", "x86_64, 2 CPUs, 24 GiB"), measured("b", "x86_64, 2 CPUs, 24 GiB")])
    assert "different hardware" not in pm.format_results(same)


def test_a_hosted_models_spec_round_trips_through_a_saved_report():
    spec = pm.ModelSpec("tp2", None, "tp2", 4096, url="http://spark-1:8000", services=(
        pm.ServiceRef("ray-worker", "ssh://admin@spark-2"), pm.ServiceRef("head")))
    hw = pm.EngineHardware("spark-2", "Ubuntu", "aarch64", 20, 119.6, "28.0", ("nvidia", "runc"),
                           "aarch64, 20 CPUs, 120 GiB, nvidia runtime")
    life = pm.Lifecycle(load_s=1.5, docker_host="ssh://admin@spark-2 + the local engine",
                        url="http://spark-1:8000", services=("ray-worker", "head"),
                        hosts=(pm.HostRecord("ray-worker", "ssh://admin@spark-2", hw),
                               pm.HostRecord("head", "the local engine", None)),
                        hardware=hw.profile)
    failure = pm.Failure("unreachable", service="ray-worker", docker_host="ssh://admin@spark-2")
    report = pm.Report(pm.RunConfig(parallel=True), "2026-12-01T00:00:00+00:00",
                       [pm.ModelResult(spec, "failed", "gone", failure, lifecycle=life)])
    data = json.loads(json.dumps(pm.report_to_dict(report)))
    assert data["config"]["parallel"] is True
    assert data["models"][0]["lifecycle"]["hosts"][0]["hardware"]["cpus"] == 20
    back = pm.report_from_dict(data)
    assert back.models[0].spec == spec and back.config.parallel is True
    assert back.models[0].lifecycle == life and back.models[0].failure == failure


def test_a_run_on_one_box_keeps_the_local_path_and_its_report_fields(tmp_path):
    plan = plan_of(tmp_path, """\
replace: true
models: [{name: near, service: svc-near, model_id: near, max_context_tokens: 4096}]
""")
    assert plan.hosting.urls == {}  # run_model's own path: free_port, --port
    report = pm.Report(plan.cfg, "2026-12-01T00:00:00+00:00", [pm.ModelResult(plan.models[0])])
    data = pm.report_to_dict(report)
    assert data["config"]["parallel"] is False and "services" not in data["models"][0]["spec"]


def test_a_comparison_of_one_model_on_two_machines_says_so():
    base = pm.Report(pm.RunConfig(iterations=1), "2026-12-01T00:00:00+00:00",
                     [measured("a", "aarch64, 20 CPUs, 119 GiB, nvidia runtime")])
    cand = pm.Report(base.config, base.started_at, [measured("a", "x86_64, 2 CPUs, 24 GiB")])
    comparison = pm.compare_reports(base, cand, pm.DEFAULT_THRESHOLDS_PCT)
    assert ("note: a: the baseline ran on aarch64, 20 CPUs, 119 GiB, nvidia runtime, the "
            "candidate on x86_64, 2 CPUs, 24 GiB") in "\n".join(comparison.notes)
    same = pm.compare_reports(base, base, pm.DEFAULT_THRESHOLDS_PCT)
    assert not any("baseline ran on" in n for n in same.notes)


def test_an_unreachable_host_fails_its_model_naming_the_service_not_with_a_type_error():
    # a real Docker SDK client against a socket that does not exist: no engine needed
    gone = "unix:///nonexistent/perftest-gone.sock"
    spec = pm.ModelSpec("far", "svc-far", "far", 40960, docker_host=gone)
    compose = pm.load_compose_file(Path(__file__).parent / "docker" / "compose.multihost.yml")
    plan = pm.Plan(pm.RunConfig(), (spec,), (spec,), compose, "http://127.0.0.1:8000",
                   Path("reports"), hosting=pm.Hosting(hosts={gone: pm.DockerHost(gone, gone)},
                                                      compose_files={"": compose}))
    with pytest.raises(pm.ModelFailed, match=r"is not reachable.*\(service svc-far\)") as caught:
        pm.place_services(plan, spec, ["docker", "compose"])
    assert caught.value.details == pm.Failure(docker_host=gone, service="svc-far")


def test_a_parallel_runs_part_records_each_models_completed_scenarios_for_a_resume():
    specs = [pm.ModelSpec(n, f"svc-{n}", n, 40960) for n in ("near", "far")]
    cfg = pm.RunConfig(iterations=1, context_sizes=(1000,))
    steps = pm.plan_campaign(cfg, specs)
    report = pm.Report(cfg, "2026-12-01T00:00:00+00:00", [pm.ModelResult(s) for s in specs],
                       parts=[pm.RunPart("2026-12-01T00:00:00+00:00")])
    campaign = pm.ParallelProgress(steps, report, [frozenset({"a"}), frozenset({"b"})])
    for i, p in enumerate(campaign.models):  # what each model's thread's events say
        name, first = specs[i].name, steps[i].to_run[0]
        p.phase(name, "load")
        p.phase(name, "measure")
        p.scenario_done(name, pm.ScenarioResult(first, (pm.Sample(ok=True),) * first.requests,
                                                {}))
    parts = pm.record_part(report, campaign).parts[-1].models
    assert {n: m.scenarios for n, m in parts.items()} == {"near": ("latency",),
                                                          "far": ("latency",)}
    assert parts["far"].load_s is not None  # each model's own walls, not one shared clock
