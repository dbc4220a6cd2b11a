"""Models on two real Docker engines, through the tool's CLI.

The second engine is a real dockerd on this machine (.ci/docker2.sh: its own
socket, data-root, exec-root, pidfile, no bridge); the tool reaches it as
another Docker host, DOCKER_HOST=unix:///run/perftest-docker2.sock, exactly as
it would reach ssh://admin@spark-2 (no SSH host is reachable here). The
services of tests/docker/compose.multihost.yml run the stand-in server with
host networking, each on its own free 127.0.0.1 port. Each test has its own
Compose project on both engines; nothing is left behind.
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
import second_engine
from dockertools import (
    HERE,
    ROOT,
    compose_commands,
    docker_ready,
    free_port,
    new_project,
    project_containers,
    remove_project,
    require,
)

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(400)]

COMPOSE = HERE / "docker" / "compose.multihost.yml"
HOST2 = second_engine.HOST


@pytest.fixture(scope="module")
def engines():
    require(docker_ready(), "no Docker engine reachable here")
    from images import ensure_base_image

    ensure_base_image()
    return second_engine.ensure_second_engine()


@pytest.fixture(params=["docker compose", "docker-compose"])
def compose_cmd(request, engines):
    require(request.param in compose_commands(), f"{request.param} is not installed")
    return request.param


def models_file(ports: dict[str, int]) -> str:
    url = "http://127.0.0.1:{}".format
    return json.dumps({"replace": True, "models": [
        {"name": "model-near", "service": "svc-near", "model_id": "model-near",
         "max_context_tokens": 40960, "url": url(ports["NEAR"])},
        {"name": "model-far", "service": "svc-far", "model_id": "model-far",
         "max_context_tokens": 40960, "docker_host": HOST2},  # url: 127.0.0.1 and --port
        {"name": "model-tp2", "model_id": "model-tp2", "max_context_tokens": 40960,
         "url": url(ports["HEAD"]),
         "services": [{"service": "ray-worker", "docker_host": HOST2}, {"service": "vllm-head"}]},
        {"name": "model-head-alone", "model_id": "model-tp2", "max_context_tokens": 40960,
         "url": url(ports["HEAD"]), "services": [{"service": "vllm-head"}]},
    ]}, indent=1)


class Run:
    """One invocation of ./perftest_models.py over both engines."""

    def __init__(self, tmp_path, compose_cmd="docker compose", itl_s=0.001, tokens_per_chunk=1):
        self.project = new_project("ptmh")
        self.ports = {k: free_port() for k in ("NEAR", "FAR", "WORKER", "HEAD")}
        self.report_dir = tmp_path / f"reports-{self.project}"
        self.models = tmp_path / f"models-{self.project}.yml"
        self.models.write_text(models_file(self.ports))
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project,
                    "PERFTEST_COMPOSE": compose_cmd, "PERFTEST_TESTS_DIR": str(HERE),
                    "PERFTEST_ITL_NEAR": str(itl_s), "PERFTEST_ITL_FAR": str(itl_s),
                    "PERFTEST_TOKENS_PER_CHUNK": str(tokens_per_chunk), "PYTHONUNBUFFERED": "1",
                    **{f"PERFTEST_PORT_{k}": str(v) for k, v in self.ports.items()}}

    def argv(self, *models, extra=()):
        only = [a for m in models for a in ("--only", m)]
        return [sys.executable, str(ROOT / "perftest_models.py"), "--compose-file", str(COMPOSE),
                "--models", str(self.models), *only, "--port", str(self.ports["FAR"]),
                "--iterations", "1", "--context-sizes", "1k", "--health-timeout", "60",
                "--report-dir", str(self.report_dir), *extra]

    def __call__(self, *models, extra=()):
        t0 = time.monotonic()
        proc = subprocess.run(self.argv(*models, extra=extra), env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)
        self.elapsed_s = time.monotonic() - t0
        return proc

    def model(self, name):
        (path,) = self.report_dir.glob("*.json")
        return next(m for m in json.loads(path.read_text())["models"] if m["name"] == name)

    def cleanup(self):
        remove_project(self.project)
        second_engine.remove_project(self.project)


@pytest.fixture
def run(tmp_path, engines):
    runs = []

    def make(*args, **kwargs):
        r = Run(tmp_path, *args, **kwargs)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.cleanup()


def test_a_model_on_the_second_engine_is_started_measured_and_stopped_there(run, compose_cmd):
    r = run(compose_cmd)
    proc = r("model-far")
    assert proc.returncode == 0, proc.stderr
    m = r.model("model-far")
    assert m["status"] == "ok", m["error"]
    assert all(s["ok"] for sc in m["scenarios"] for s in sc["samples"])
    assert m["lifecycle"]["docker_host"] == HOST2
    assert m["lifecycle"]["url"] == f"http://127.0.0.1:{r.ports['FAR']}"  # the default
    assert m["lifecycle"]["hosts"][0]["hardware"]["profile"]  # the engine's machine
    assert f"model-far: starting svc-far on {HOST2}" in proc.stderr
    assert f"model-far: stopped svc-far on {HOST2}" in proc.stderr
    assert second_engine.containers(r.project, running_only=False)  # it ran there...
    assert second_engine.containers(r.project) == []  # ...and is stopped
    assert project_containers(r.project, running_only=False) == []  # never on the main engine


def test_a_model_over_both_engines_starts_in_order_and_stops_in_reverse(run, compose_cmd):
    r = run(compose_cmd)
    proc = r("model-tp2")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    order = [f"model-tp2: starting ray-worker on {HOST2}",
             "model-tp2: starting vllm-head on the local engine", "model-tp2: healthy after",
             "model-tp2: stopped vllm-head on the local engine",
             f"model-tp2: stopped ray-worker on {HOST2}"]
    at = [err.index(line) for line in order]
    assert at == sorted(at), err
    m = r.model("model-tp2")
    assert m["status"] == "ok", m["error"]
    assert m["lifecycle"]["services"] == ["ray-worker", "vllm-head"]
    assert m["lifecycle"]["docker_host"] == f"{HOST2} + the local engine"
    (head,) = project_containers(r.project, running_only=False)  # the worker ran on the other
    logs = subprocess.run(["docker", "logs", head], capture_output=True, text=True,
                          check=True).stdout
    assert "joined; engine ready" in logs  # the head waited for the worker on the other engine
    assert project_containers(r.project) == [] and second_engine.containers(r.project) == []


BASE_IMAGE = os.environ.get("PERFTEST_BASE_IMAGE", "perftest-base:local")


def test_the_image_step_asks_the_models_own_host(run):
    """--pull never looks for the image on the engine the service runs on: an
    image only the second engine has is there; one neither has fails the
    model naming that host, before anything is created there."""
    r = run()
    far_only = f"{r.project}-far-only:1"
    second_engine.docker2("tag", BASE_IMAGE, far_only)
    try:
        r.env["PERFTEST_BASE_IMAGE"] = far_only
        proc = r("model-far", extra=("--pull", "never"))
        assert proc.returncode == 0, proc.stderr
        pull = r.model("model-far")["lifecycle"]["pull"]
        assert pull["image"] == far_only and pull["skipped"] is True and pull["policy"] == "never"
    finally:
        second_engine.docker2("image", "rm", "-f", far_only, check=False)
    r2 = run()
    r2.env["PERFTEST_BASE_IMAGE"] = f"{r2.project}-absent:1"
    proc = r2("model-far", extra=("--pull", "never"))
    assert proc.returncode == 1
    m = r2.model("model-far")
    assert m["status"] == "failed"
    assert f"image {r2.project}-absent:1 is not on {HOST2}" in m["error"], m["error"]
    assert second_engine.containers(r2.project, running_only=False) == []  # nothing created


def test_a_missing_image_is_pulled_on_the_models_own_host_with_progress(run, tmp_path):
    from registry import LocalRegistry, push_test_image, registry_available

    require(registry_available(), "no docker-registry here (.ci/setup-docker.sh installs it)")
    r = run()
    with LocalRegistry(tmp_path / "registry") as reg:
        name = push_test_image(reg.port, f"{r.project}-pulled", size_mb=6, layers=2)
        ref = f"127.0.0.1:{reg.port}/{name}"
        try:
            r.env["PERFTEST_BASE_IMAGE"] = ref
            proc = r("model-far")  # --pull missing, the default
            assert proc.returncode == 0, proc.stderr
            assert f"model-far: pulling {ref} on {HOST2}" in proc.stderr
            pull = r.model("model-far")["lifecycle"]["pull"]
            assert pull["image"] == ref and pull["skipped"] is False
            assert pull["bytes"] >= 6 * 2**20 and pull["pull_s"] > 0  # random layers: no gzip gain
            assert second_engine.docker2("image", "inspect", ref, check=False).returncode == 0
            assert subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                                  check=False).returncode != 0  # never on the main engine
        finally:
            second_engine.docker2("image", "rm", "-f", ref, check=False)


def test_the_head_alone_never_becomes_healthy(run):
    """The counter-proof of the test above: without its worker the head stays
    unhealthy, so the two-engine model's health really needed both engines."""
    r = run()
    proc = r("model-head-alone", extra=("--health-timeout", "5"))
    assert proc.returncode == 1
    m = r.model("model-head-alone")
    assert "health check timeout after 5s" in m["error"]
    assert project_containers(r.project) == []


def stamped(r: Run, *args: str) -> tuple[int, list[tuple[float, str]]]:
    """Run the tool; its stderr lines with the time each arrived."""
    proc = subprocess.Popen(r.argv("model-near", "model-far", extra=("--iterations", "2", *args)),
                            env=r.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines = [(time.monotonic(), line) for line in proc.stderr]
    return proc.wait(60), lines


def at(lines: list[tuple[float, str]], text: str) -> float:
    return next(t for t, line in lines if text in line)


def test_parallel_runs_one_model_per_engine_in_about_the_time_of_one(run):
    # 500 tokens in 10 chunks 0.8 s apart: 8 s per latency request, spent
    # waiting, not computing (the machine's 2 cores are shared): ~20 s a model
    slow = {"itl_s": 0.8, "tokens_per_chunk": 50}
    serial, parallel = run(**slow), run(**slow)
    code, one_by_one = stamped(serial)
    assert code == 0, "".join(line for _, line in one_by_one)
    took = [at(one_by_one, f"{m}: stopped") - at(one_by_one, f"=== {m}")
            for m in ("model-near", "model-far")]
    code, together = stamped(parallel, "--parallel")
    err = "".join(line for _, line in together)
    assert code == 0, err
    for name in ("model-near", "model-far"):
        assert parallel.model(name)["status"] == "ok"
    # both ran at once: the far model was healthy before the near one was done
    assert err.index("model-far | model-far: healthy") < err.index("model-near | model-near: stopped")
    run_lines = err.splitlines()
    run_lines = run_lines[next(i for i, line in enumerate(run_lines) if " | === " in line):]
    assert all(line.startswith(("model-near | ", "model-far | ", "report: ", "campaign: "))
               for line in run_lines), err  # after the plan
    # as the first model ends, the campaign says how far it is (the other may
    # end within the same half second: then both are done)
    assert re.search(r"campaign: (1 of 2 models done, 1|2 of 2 models done, 0) running; ", err), err
    assert " |   model 1/1, scenario 1/2, elapsed " in err  # each model's own progress
    print("\n".join(line for line in err.splitlines() if line.startswith("campaign: ")))
    wall = max(at(together, f"{m}: stopped") for m in ("model-near", "model-far")) - min(
        at(together, f"=== {m}") for m in ("model-near", "model-far"))
    longer, total = max(took), sum(took)
    print(f"alone: {took[0]:.1f} s and {took[1]:.1f} s (sum {total:.1f} s); "
          f"in parallel: {wall:.1f} s")
    assert abs(wall - longer) < abs(wall - total)  # closer to the longer than to the sum


def test_a_killed_engine_fails_only_its_model_and_the_other_is_measured(run):
    r = run(itl_s=0.5, tokens_per_chunk=50)  # 5 s per latency request
    proc = subprocess.Popen(r.argv("model-near", "model-far", extra=("--iterations", "3",
                                                                     "--parallel")),
                            env=r.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, far_healthy = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "model-far: healthy" in line:
                far_healthy.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out = []
    writer = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    writer.start()
    try:
        assert far_healthy.wait(120), "".join(lines)
        time.sleep(2)  # inside the far model's first latency request
        second_engine.kill_second_engine()
        proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
        second_engine.ensure_second_engine()  # back for the other tests
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 1, err
    far, near = r.model("model-far"), r.model("model-near")
    assert far["status"] == "failed"
    assert HOST2 in far["error"] and far["failure"]["docker_host"] == HOST2, far["error"]
    assert near["status"] == "ok", near["error"]
    assert [s["name"] for s in near["scenarios"]] == ["latency", "context-1k"]
    assert all(s["ok"] for sc in near["scenarios"] for s in sc["samples"])
    assert "model-far | model-far: could not stop svc-far" in err  # its host is gone
    assert project_containers(r.project) == []  # nothing left running on the first engine
    writer.join(10)
    assert "model-far: failed" in out[0] and "went away while svc-far ran on it" in out[0]


def test_an_interrupt_in_parallel_stops_every_models_services_on_both_engines(run):
    r = run(itl_s=0.5, tokens_per_chunk=50)
    proc = subprocess.Popen(r.argv("model-near", "model-far", extra=("--parallel",)), env=r.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, healthy = [], {"model-near": threading.Event(), "model-far": threading.Event()}

    def read():
        for line in proc.stderr:
            lines.append(line)
            for name, event in healthy.items():
                if f"{name}: healthy" in line:
                    event.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out = []
    writer = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    writer.start()
    assert all(e.wait(120) for e in healthy.values()), "".join(lines)
    time.sleep(1)
    assert project_containers(r.project) and second_engine.containers(r.project)
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    reader.join(10)
    writer.join(10)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert project_containers(r.project) == [] and second_engine.containers(r.project) == []
    statuses = {m: r.model(m)["status"] for m in ("model-near", "model-far")}
    assert statuses == {"model-near": "interrupted", "model-far": "interrupted"}, err
    assert "interrupted by SIGINT" in out[0]


@pytest.mark.parametrize("head_exits", [True, False], ids=["head-exits", "head-serves-on"])
def test_a_dying_worker_on_the_other_engine_fails_the_model_naming_it_and_its_host(run, head_exits):
    """Whether the head then dies too (a real tensor-parallel engine does) or
    goes on answering (only the tool's own watch of the worker can tell)."""
    r = run()
    r.env["PERFTEST_HEAD_EXIT_ON_LOSS"] = "1" if head_exits else "0"
    proc = subprocess.Popen(r.argv("model-tp2", extra=("--iterations", "60")), env=r.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, healthy = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "model-tp2: healthy" in line:
                healthy.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert healthy.wait(120), "".join(lines)
    time.sleep(1.5)
    (worker,) = second_engine.containers(r.project)
    second_engine.docker2("kill", worker)  # the worker on the second engine dies
    t_killed = time.monotonic()
    proc.wait(120)
    noticed_s = time.monotonic() - t_killed
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 1, err
    m = r.model("model-tp2")
    assert m["status"] == "failed"
    assert "container of ray-worker exited with code 137" in m["error"], m["error"]
    assert f"(service ray-worker on Docker host {HOST2})" in m["error"]
    assert (m["failure"]["service"], m["failure"]["docker_host"]) == ("ray-worker", HOST2)
    assert "context-1k" not in [s["name"] for s in m["scenarios"]]  # cut short, not finished
    assert noticed_s < 30  # at once: 60 latency requests take longer than that
    assert err.index("stopped vllm-head on the local engine") < err.index(
        f"stopped ray-worker on {HOST2}")
    assert project_containers(r.project) == [] and second_engine.containers(r.project) == []
