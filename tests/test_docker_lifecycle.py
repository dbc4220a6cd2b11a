"""The Compose lifecycle against a real Docker engine, through the tool's CLI.

The services run the stand-in server (tests/standin.py) in a skeleton image
that borrows the host's /usr (tests/support/images.py): no registry needed.
Each test gets its own Compose project and port; nothing is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from dockertools import (HERE, ROOT, any_compose, free_port, new_project, project_containers,
                         remove_project, require_compose, require_docker)

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(300)]

COMPOSE = HERE / "docker" / "compose.lifecycle.yml"
MODELS = HERE / "docker" / "models.yml"


@pytest.fixture(scope="module")
def base_image():
    require_docker()
    from images import ensure_base_image

    return ensure_base_image()


@pytest.fixture(params=["docker compose", "docker-compose"])
def compose_cmd(request, base_image):
    require_compose(request.param)
    return request.param


class Run:
    """One invocation of ./perftest_models.py in its own project and port."""

    def __init__(self, tmp_path, compose_cmd):
        self.project = new_project("ptlc")
        self.port = free_port()
        self.report_dir = tmp_path / "reports"
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project,
                    "PERFTEST_COMPOSE": compose_cmd, "PERFTEST_PORT": str(self.port),
                    "PERFTEST_TESTS_DIR": str(HERE), "PYTHONUNBUFFERED": "1"}

    def argv(self, *models, extra=()):
        only = [a for m in models for a in ("--only", m)]
        return [sys.executable, str(ROOT / "perftest_models.py"), "--compose-file", str(COMPOSE),
                "--models", str(MODELS), *only, "--port", str(self.port), "--iterations", "1",
                "--context-sizes", "1k", "--health-timeout", "120", "--report-dir",
                str(self.report_dir), *extra]

    def __call__(self, *models, extra=()):
        t0 = time.monotonic()
        proc = subprocess.run(self.argv(*models, extra=extra), env=self.env, capture_output=True,
                              text=True, timeout=240)
        self.elapsed_s = time.monotonic() - t0
        return proc

    def compose(self, *args):
        return subprocess.run([*self.env["PERFTEST_COMPOSE"].split(), "-f", str(COMPOSE), "-p",
                               self.project, *args], env=self.env, capture_output=True, text=True,
                              timeout=120)

    def report(self):
        (path,) = self.report_dir.glob("*.json")
        return json.loads(path.read_text())

    def model(self, name):
        return next(m for m in self.report()["models"] if m["name"] == name)


@pytest.fixture
def run(tmp_path, base_image):
    """`run()` for a test that does not depend on the Compose version: the one
    this machine has (dockertools.any_compose); `run(compose_cmd)` for one."""
    runs = []

    def make(compose_cmd=None):
        r = Run(tmp_path, compose_cmd or any_compose())
        runs.append(r)
        return r

    yield make
    for r in runs:
        remove_project(r.project)


def test_two_models_are_started_measured_and_stopped_in_turn(run, compose_cmd):
    r = run(compose_cmd)
    proc = r("model-a", "model-b")
    assert proc.returncode == 0, proc.stderr
    label = "docker compose (v2)" if compose_cmd == "docker compose" else "docker-compose (v1)"
    assert f"using {label}" in proc.stderr
    err = proc.stderr
    assert err.index("model-a: stopped svc-a") < err.index("model-b: starting svc-b")
    for name in ("model-a", "model-b"):
        m = r.model(name)
        assert m["status"] == "ok", m["error"]
        assert m["lifecycle"]["image"] == "perftest-base:local"
        assert m["lifecycle"]["image_id"].startswith("sha256:")
        assert m["lifecycle"]["load_s"] >= 1.0  # the stand-in "loads" for 1 s
        assert m["lifecycle"]["command"][:2] == ["--model", name]
        assert [s["name"] for s in m["scenarios"]] == ["latency", "context-1k"]
        assert all(s["ok"] for sc in m["scenarios"] for s in sc["samples"])
    assert project_containers(r.project) == []  # nothing left running


def test_a_service_that_exits_during_load_fails_in_seconds_and_the_next_runs(run, compose_cmd):
    r = run(compose_cmd)
    proc = r("model-crash", "model-a")
    assert proc.returncode == 1
    crash = r.model("model-crash")
    assert crash["status"] == "failed"
    assert "exited with code 3" in crash["error"]
    assert crash["failure"]["exit_code"] == 3 and crash["failure"]["oom_killed"] is False
    assert any("exiting with code 3" in line for line in crash["failure"]["log_tail"])
    assert r.model("model-a")["status"] == "ok"
    assert r.elapsed_s < 90  # far from the 120 s health timeout: the exit was noticed
    assert "exiting with code 3" in proc.stdout  # the log tail is in the report
    assert project_containers(r.project) == []


def test_an_oom_killed_service_is_reported_as_oom_killed(run):
    r = run()
    proc = r("model-oom")
    assert proc.returncode == 1
    m = r.model("model-oom")
    assert m["failure"]["oom_killed"] is True and m["failure"]["exit_code"] == 137
    assert "OOM-killed" in m["error"]


def test_a_service_that_never_becomes_healthy_fails_at_the_health_timeout(run):
    r = run()
    proc = r("model-never", extra=("--health-timeout", "4"))
    assert proc.returncode == 1
    m = r.model("model-never")
    assert "health check timeout after 4s" in m["error"]
    assert "model-never: stopped svc-never" in proc.stderr
    assert project_containers(r.project) == []


def test_a_container_that_dies_mid_scenario_is_noticed_and_the_next_model_runs(run):
    r = run()
    proc = r("model-dies", "model-a", extra=("--context-sizes", "1k,2k,4k,8k",
                                             "--iterations", "3"))
    assert proc.returncode == 1
    m = r.model("model-dies")
    assert m["status"] == "failed" and "exited with code 7" in m["error"]
    assert m["failure"]["exit_code"] == 7
    assert m["scenarios"]  # what was measured before the death is kept
    assert r.model("model-a")["status"] == "ok"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                          (signal.SIGHUP, 143)])
def test_an_interrupt_mid_test_stops_the_container_and_keeps_the_report(run, signum, code):
    r = run()
    proc = subprocess.Popen(r.argv("model-slow", "model-dies"), env=r.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, out_parts = [], []
    healthy = threading.Event()

    def read():  # the only reader of stderr, so no line is lost
        for line in proc.stderr:
            lines.append(line)
            if "model-slow: healthy" in line:
                healthy.set()

    reader = threading.Thread(target=read, daemon=True)
    writer = threading.Thread(target=lambda: out_parts.append(proc.stdout.read()), daemon=True)
    reader.start()
    writer.start()
    assert healthy.wait(120), "".join(lines)
    time.sleep(1.5)  # inside the 10 s latency test
    assert project_containers(r.project), "the service should be running now"
    proc.send_signal(signum)
    proc.wait(60)
    reader.join(10)
    writer.join(10)
    out = "".join(out_parts)
    assert proc.returncode == code, "".join(lines)
    assert project_containers(r.project) == []
    assert any("model-slow: stopped svc-slow" in line for line in lines)
    report = r.report()
    assert report["interrupted"] == signal.Signals(signum).name
    statuses = {m["name"]: m["status"] for m in report["models"]}
    assert statuses == {"model-slow": "interrupted", "model-dies": "skipped"}  # table order
    assert (r.report_dir / (next(r.report_dir.glob("*.json")).stem + ".txt")).exists()
    assert "interrupted by" in out


def test_a_port_held_by_another_container_is_named_and_left_alone(run, base_image):
    r = run()
    name = f"not-ours-{r.project}"
    try:  # a container whose start failed exists all the same: removed in `finally`
        # On a network of its own, as the services are: the engine's default
        # bridge is not needed (and may be missing, as docker0 can be).
        subprocess.run(["docker", "network", "create", name], capture_output=True, check=True)
        started = subprocess.run(
            ["docker", "run", "-d", "--name", name, "--network", name, "-p",
             f"127.0.0.1:{r.port}:8000", "-v", "/usr:/usr:ro", "-v", f"{HERE}:/app:ro",
             base_image, "/usr/bin/python3", "/app/standin.py", "--host", "0.0.0.0", "--port",
             "8000", "--quiet"], capture_output=True, text=True)
        assert started.returncode == 0, f"docker run failed: {started.stderr.strip()}"
        for _ in range(100):
            if subprocess.run(["docker", "port", name], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        proc = r("model-a")
        assert proc.returncode == 1
        m = r.model("model-a")
        assert f"port {r.port} is already in use by container {name}" in m["error"]
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert state == "true"  # never stop a container we do not manage
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "network", "rm", name], capture_output=True)


def test_a_port_held_by_a_plain_process_is_named(run):
    from standin import StandinConfig, StandinServer

    r = run()
    with StandinServer(StandinConfig(quiet=True), port=r.port):
        proc = r("model-a")
    assert proc.returncode == 1
    assert "a process that is not a container" in r.model("model-a")["error"]
    assert project_containers(r.project) == []


def test_a_running_inference_service_of_the_project_is_stopped_first(run):
    r = run()
    up = r.compose("up", "-d", "svc-b")
    assert up.returncode == 0, up.stderr
    proc = r("model-a")
    assert proc.returncode == 0, proc.stderr
    assert "stopping running inference services first: svc-b" in proc.stderr
    assert project_containers(r.project) == []


# --- long campaigns: --resume, --dry-run (issue 18) ---------------------------

def container_events(project, since, until):
    """(action, service) of each container created or started in the project between
    two Unix times, as the Docker engine recorded them."""
    proc = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
         "--filter", f"label=com.docker.compose.project={project}", "--filter", "type=container",
         "--filter", "event=create", "--filter", "event=start",
         "--format", '{{.Action}} {{index .Actor.Attributes "com.docker.compose.service"}}'],
        capture_output=True, text=True, timeout=60, check=True)
    return [tuple(line.split()) for line in proc.stdout.splitlines() if line.strip()]


def three_models_file(tmp_path):
    """model-a, then model-slow (long enough to be cut), then model-b, in that order."""
    path = tmp_path / "three.yml"
    path.write_text("replace: true\nmodels:\n"
                    "  - {name: model-a, service: svc-a, model_id: model-a, max_context_tokens: 40960}\n"
                    "  - {name: model-slow, service: svc-slow, model_id: model-slow, "
                    "max_context_tokens: 40960}\n"
                    "  - {name: model-b, service: svc-b, model_id: model-b, max_context_tokens: 40960}\n")
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_campaign_cut_in_its_second_model_resumes_without_measuring_anything_twice(
        run, tmp_path, signum):
    r = run()
    models = ("--models", str(three_models_file(tmp_path)), "--iterations", "2")
    proc = subprocess.Popen(r.argv(extra=models), env=r.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines, cut = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "[1/2] context-1k" in line and any("=== model-slow" in ln for ln in lines):
                cut.set()  # model-slow: latency done and saved, context-1k half done

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert cut.wait(150), "".join(lines)
    proc.send_signal(signum)
    proc.wait(60)
    reader.join(10)
    assert proc.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL)
    (path,) = r.report_dir.glob("*.json")
    cut_report = json.loads(path.read_text())  # written atomically: whole even after kill -9
    by_name = {m["name"]: m for m in cut_report["models"]}
    assert by_name["model-a"]["status"] == "ok"
    cut_scenarios = by_name["model-slow"]["scenarios"]
    assert [s["name"] for s in cut_scenarios][:1] == ["latency"]
    if signum == signal.SIGTERM:  # the cut scenario's one sample is in the report, marked partial
        assert [len(s["samples"]) for s in cut_scenarios] == [2, 1]
    else:
        assert by_name["model-slow"]["status"] == "running"  # as the last scenario left it
        assert project_containers(r.project) != []  # nobody stopped svc-slow

    since = time.time()
    again = r(extra=(*models, "--resume", str(path)))
    until = time.time() + 1
    assert again.returncode == 0, again.stderr
    assert "model-a (service svc-a): kept as measured (ok, 2 scenario(s)): not started" in again.stderr
    assert "    latency: kept as measured" in again.stderr
    assert re.search(r"model-b: [\d.]+ s \(load [\d.]+ s, measure [\d.]+ s, stop [\d.]+ s\)",
                     again.stdout), again.stdout  # the summary's wall time per model
    started = container_events(r.project, since, until)
    assert all(service != "svc-a" for _, service in started), started  # never started again
    assert ("start", "svc-slow") in started and ("start", "svc-b") in started
    assert list(r.report_dir.glob("*.json")) == [path]  # one report, updated in place
    done = r.report()
    final = {m["name"]: m for m in done["models"]}
    assert [m["name"] for m in done["models"]] == ["model-a", "model-slow", "model-b"]
    assert all(m["status"] == "ok" for m in done["models"]), done["models"]
    assert final["model-a"]["scenarios"] == by_name["model-a"]["scenarios"]  # samples unchanged
    assert final["model-slow"]["scenarios"][0] == by_name["model-slow"]["scenarios"][0]
    slow_context = final["model-slow"]["scenarios"][1]
    assert slow_context["name"] == "context-1k" and len(slow_context["samples"]) == 2  # run whole
    if signum == signal.SIGTERM:  # from the second start only: never mixed with the cut one
        assert cut_scenarios[1]["samples"][0] not in slow_context["samples"]
    assert [s["name"] for s in final["model-b"]["scenarios"]] == ["latency", "context-1k"]
    assert len(done["parts"]) == 2 and done["parts"][1]["finished_at"] and done["interrupted"] is None
    assert done["parts"][0]["interrupted"] == ("SIGTERM" if signum == signal.SIGTERM else None)
    assert done["parts"][1]["models"]["model-slow"]["scenarios"] == ["context-1k"]
    assert "model-a" not in done["parts"][1]["models"]
    assert project_containers(r.project) == []


def test_a_resume_with_other_iterations_is_refused_and_starts_nothing(run):
    r = run()
    assert r("model-a").returncode == 0
    (path,) = r.report_dir.glob("*.json")
    text = path.read_text()
    since = time.time()
    proc = r("model-a", extra=("--iterations", "2", "--resume", str(path)))
    until = time.time() + 1
    assert proc.returncode == 2
    assert "iterations: report 1, now 2" in proc.stderr
    assert container_events(r.project, since, until) == []
    assert path.read_text() == text


def test_a_dry_run_checks_everything_and_starts_nothing(run):
    r = run()
    since = time.time()
    proc = r("model-a", "model-b", extra=("--dry-run",))
    until = time.time() + 1
    assert proc.returncode == 0, proc.stderr
    assert "model-a (service svc-a):" in proc.stderr and "model-b (service svc-b):" in proc.stderr
    assert f"port {r.port} (free)" in proc.stderr and "nothing started" in proc.stderr
    assert container_events(r.project, since, until) == []
    assert project_containers(r.project, running_only=False) == []
    assert list(r.report_dir.glob("*.json")) == []
