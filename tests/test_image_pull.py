"""The image pull as its own step, against a real registry through a slow link.

A real registry (Debian's docker-registry on 127.0.0.1) holds an image of a
few hundred MB of random layers that is not on this machine; Docker pulls it
through a byte-rate-limited proxy (tests/support/registry.py), so that the
pull takes tens of seconds, as a 15 GB vLLM image takes many minutes on a
real box. The tool runs as a user runs it, with stderr piped (`| tee`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dockertools import HERE, ROOT, docker_ready, free_port, new_project, project_containers, \
    remove_project, require

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(600)]

COMPOSE = HERE / "docker" / "compose.pull.yml"
MODELS = HERE / "docker" / "models.pull.yml"
IMAGE_MB = 200
LAYER_BYTES = 3 * (IMAGE_MB // 3) * 2**20  # push_test_image's three random layers
RATE_BPS = 5.5e6  # ~38 s for the image: past the 30 s between progress lines in a log


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory):
    require(docker_ready(), "no Docker engine reachable here")
    from images import ensure_base_image
    from registry import registry_available, slow_image

    require(registry_available(), "no docker-registry here (.ci/setup-docker.sh installs it)")
    ensure_base_image()
    with slow_image(tmp_path_factory.mktemp("registry"), new_project("issue-11-pull-"),
                    IMAGE_MB, RATE_BPS) as (reg, proxy, image):
        yield reg, proxy, image


class PullRun:
    def __init__(self, tmp_path, reg, proxy, image):
        from registry import remove_local_image

        remove_local_image(image)  # a test before may have pulled it
        self.image = image
        self.project = new_project("issue-11-pl")
        self.port = free_port()
        self.report_dir = tmp_path / "reports"
        self.missing = f"127.0.0.1:{reg.port}/{self.project}-absent:1"
        self.unreachable = f"127.0.0.1:{free_port()}/{self.project}-nowhere:1"
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project,
                    "PERFTEST_PORT": str(self.port), "PERFTEST_TESTS_DIR": str(HERE),
                    "PERFTEST_PULL_IMAGE": image, "PERFTEST_MISSING_IMAGE": self.missing,
                    "PERFTEST_UNREACHABLE_IMAGE": self.unreachable, "PYTHONUNBUFFERED": "1"}

    def argv(self, *models, extra=()):
        only = [a for m in models for a in ("--only", m)]
        return [sys.executable, str(ROOT / "perftest_models.py"), "--compose-file", str(COMPOSE),
                "--models", str(MODELS), *only, "--port", str(self.port), "--iterations", "1",
                "--context-sizes", "1k", "--health-timeout", "120", "--report-dir",
                str(self.report_dir), *extra]

    def report(self):
        (path,) = self.report_dir.glob("*.json")
        return json.loads(path.read_text())

    def model(self, name):
        return next(m for m in self.report()["models"] if m["name"] == name)


@pytest.fixture
def pull_run(tmp_path, slow_registry):
    reg, proxy, image = slow_registry
    r = PullRun(tmp_path, reg, proxy, image)
    yield r
    remove_project(r.project)


def test_a_pull_shows_progress_in_a_log_and_is_recorded_apart_from_the_load(pull_run,
                                                                              slow_registry):
    r = pull_run
    proc = subprocess.run(r.argv("model-missing", "model-unreachable", "model-pulled"),
                          env=r.env, capture_output=True, text=True, timeout=500)
    err = proc.stderr
    assert proc.returncode == 1, err  # two models failed, one ran
    print(err)
    # The missing and the unreachable image fail at once, named, in the engine's words.
    missing, unreachable, pulled = (r.model(n) for n in
                                    ("model-missing", "model-unreachable", "model-pulled"))
    assert missing["status"] == "failed" and r.missing in missing["error"]
    assert "manifest unknown" in missing["error"] or "not found" in missing["error"], missing
    assert unreachable["status"] == "failed" and r.unreachable in unreachable["error"]
    assert "connection refused" in unreachable["error"], unreachable
    assert "load_s" not in missing["lifecycle"] and "load_s" not in unreachable["lifecycle"]
    # The pulled model: progress lines under a pipe (no terminal codes), one
    # at the start and one every 30 s, then the total.
    lines = [ln for ln in err.splitlines() if re.match(r"  model-pulled: pulling \S+: \d+/\d+ layers", ln)]
    assert len(lines) >= 2, err
    assert "\r" not in err and "\x1b[" not in err
    assert re.search(r"model-pulled: pulled \d+\.\d MB in \d+\.\d s", err), err
    assert pulled["status"] == "ok", pulled["error"]
    pull = pulled["lifecycle"]["pull"]
    assert pull["image"] == r.image and pull["skipped"] is False and pull["policy"] == "missing"
    # Random layers do not compress: what came through is about the image's size.
    assert LAYER_BYTES < pull["bytes"] < LAYER_BYTES * 1.02, pull
    # The pull took its time (the proxy's rate bounds it from below), and the
    # load was counted after it: the stand-in loads in 1 s.
    assert pull["pull_s"] >= LAYER_BYTES / RATE_BPS * 0.9, pull
    assert 1.0 <= pulled["lifecycle"]["load_s"] < pull["pull_s"], pulled["lifecycle"]
    assert re.search(r"model-pulled: ok, pulled 20\d\.\d MB in [\d.]+ s; loaded in [\d.]+ s",
                     proc.stdout), proc.stdout
    # A second run finds the image present: the pull is recorded as skipped.
    again = subprocess.run(r.argv("model-pulled"), env=r.env, capture_output=True, text=True,
                           timeout=200)
    assert again.returncode == 0, again.stderr
    report = sorted(r.report_dir.glob("*.json"))[-1]
    second = json.loads(report.read_text())["models"][0]["lifecycle"]["pull"]
    assert second["skipped"] is True and second["pull_s"] is None, second


def test_pull_never_fails_a_missing_image_without_asking_the_registry(pull_run, slow_registry):
    r = pull_run
    _, proxy, _ = slow_registry
    before = proxy.bytes_down
    proc = subprocess.run(r.argv("model-pulled", extra=["--pull", "never"]), env=r.env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 1, proc.stderr
    m = r.model("model-pulled")
    assert m["status"] == "failed" and "--pull never" in m["error"] and r.image in m["error"]
    assert proxy.bytes_down == before
    assert project_containers(r.project, running_only=False) == []


def test_ctrl_c_mid_pull_stops_the_pull_and_leaves_nothing_running(pull_run, slow_registry):
    r = pull_run
    _, proxy, _ = slow_registry
    before = proxy.bytes_down  # the proxy counts for the whole module
    proc = subprocess.Popen(r.argv("model-pulled"), env=r.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while proxy.bytes_down == before or proxy.active == 0:  # the pull is under way
            assert time.monotonic() < deadline and proc.poll() is None, "the pull never started"
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    # The engine dropped the download once the tool's connection closed.
    assert proxy.wait_idle(20), f"{proxy.active} connections still pulling"
    stopped_at = proxy.bytes_down
    time.sleep(2)
    assert proxy.bytes_down == stopped_at
    assert stopped_at - before < LAYER_BYTES * 0.9  # it was stopped, not finished
    # Nothing was started, nothing is left, and the image is not there.
    assert project_containers(r.project, running_only=False) == []
    assert subprocess.run(["docker", "image", "inspect", r.image],
                          capture_output=True).returncode != 0
    m = r.model("model-pulled")
    assert m["status"] == "interrupted", m
    assert "interrupted by SIGINT" in out


def test_a_pull_past_its_timeout_fails_the_model_and_the_download_stops(pull_run, slow_registry):
    r = pull_run
    _, proxy, _ = slow_registry
    before = proxy.bytes_down
    proc = subprocess.run(r.argv("model-pulled", extra=["--pull-timeout", "5"]), env=r.env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 1, proc.stderr
    m = r.model("model-pulled")
    assert m["status"] == "failed", m
    assert f"pulling image {r.image} did not finish in 5 s (raise --pull-timeout)" == m["error"]
    pull = m["lifecycle"]["pull"]  # how far it got
    assert pull["skipped"] is False and 5 <= pull["pull_s"] < 30 and 0 < pull["bytes"] < LAYER_BYTES
    assert proxy.wait_idle(20), f"{proxy.active} connections still pulling"
    assert proxy.bytes_down - before < LAYER_BYTES * 0.9
    assert project_containers(r.project, running_only=False) == []
