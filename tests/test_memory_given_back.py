"""Memory given back, against a real Docker engine: a model whose service
leaves 4 GB in the host's /dev/shm (ipc: host) is named in a warning after
its stop, before the next model starts.

The figures are the machine's own (MemAvailable), so other processes on a
shared machine move them too: the leak is 4 GiB against a 1 GiB slack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockertools import HERE, ROOT, docker_ready, free_port, new_project, remove_project, require

pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(300)]

COMPOSE = HERE / "docker" / "compose.memory.yml"
MODELS = HERE / "docker" / "models.memory.yml"
LEAK_MB = 4096


def test_a_model_that_leaves_shared_memory_behind_is_named_before_the_next_starts(tmp_path):
    require(docker_ready(), "no Docker engine reachable here")
    from images import ensure_base_image

    ensure_base_image()
    project, port = new_project("issue-11-mem"), free_port()
    leak = Path("/dev/shm") / f"{project}-leak"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project, "PERFTEST_PORT": str(port),
           "PERFTEST_TESTS_DIR": str(HERE), "PERFTEST_LEAK_FILE": str(leak),
           "PERFTEST_LEAK_MB": str(LEAK_MB), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, str(ROOT / "perftest_models.py"), "--compose-file", str(COMPOSE),
            "--models", str(MODELS), "--port", str(port), "--iterations", "1",
            "--context-sizes", "1k", "--health-timeout", "120", "--report-dir",
            str(tmp_path / "reports")]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
        assert leak.exists() and leak.stat().st_size == LEAK_MB << 20  # the leak was real
    finally:
        leak.unlink(missing_ok=True)
        remove_project(project)
    err = proc.stderr
    print(err)
    assert proc.returncode == 0, err
    warning = err.index("warning: model-leak: ")
    assert "of host memory not given back after its stop" in err[warning:].splitlines()[0]
    assert err.index("model-leak: stopped svc-leak") < warning < err.index("model-after: starting")
    (report,) = (tmp_path / "reports").glob("*.json")
    models = {m["name"]: m for m in json.loads(report.read_text())["models"]}
    leaked = models["model-leak"]["lifecycle"]["memory"]
    assert leaked["given_back"] is False and leaked["kind"] == "host"
    # (other processes on a shared machine move MemAvailable too: 2.2 GB of
    # the 4.3 GB were seen missing in one run, so only the slack is asserted)
    assert leaked["not_given_back_bytes"] > 1 << 30
    assert "warning: model-after" not in err  # its memory came back
    assert models["model-after"]["lifecycle"]["memory"]["given_back"] is True
