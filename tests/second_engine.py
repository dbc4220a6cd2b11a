"""A second real Docker engine on this machine, for the multi-host tests.

`.ci/docker2.sh` starts it (CI runs it; the `second_engine` fixture runs it
when the engine does not answer): its own socket, data-root, exec-root,
pidfile, no bridge and no iptables, so the main engine (which other people use
at the same time) is never touched.  Its containers use host networking on
their own 127.0.0.1 ports.  The tool reaches it as another Docker host:
DOCKER_HOST=unix:///run/perftest-docker2.sock.
"""

from __future__ import annotations

import os
import subprocess

from dockertools import ROOT, require

SCRIPT = ROOT / ".ci" / "docker2.sh"
NAME = os.environ.get("PERFTEST_DOCKER2_NAME", "perftest-docker2")
HOST = f"unix:///run/{NAME}.sock"


def docker2(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """`docker ARGS` against the second engine."""
    return subprocess.run(["docker", *args], env={**os.environ, "DOCKER_HOST": HOST},
                          capture_output=True, text=True, check=check, timeout=timeout)


def answers() -> bool:
    try:
        return docker2("info", check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True,
                          timeout=180, check=False)


def ensure_second_engine() -> str:
    """Start the second engine unless it answers (and build its base image);
    skip, or fail where PERFTEST_REQUIRE_DOCKER=1, when it cannot run here."""
    proc = script("start")
    require(proc.returncode == 0 and answers(),
            f"no second Docker engine at {HOST} ({(proc.stderr or proc.stdout).strip()[-300:]})")
    return HOST


def kill_second_engine() -> None:
    """The host goes away: the engine, its containerd and its containers' processes, SIGKILL."""
    proc = script("kill")
    assert proc.returncode == 0, proc.stderr


def containers(project: str, running_only: bool = True) -> list[str]:
    argv = ["ps", "-q", "--filter", f"label=com.docker.compose.project={project}"]
    if not running_only:
        argv.insert(1, "-a")
    return docker2(*argv).stdout.split()


def remove_project(project: str) -> None:
    if not answers():
        return
    ids = containers(project, running_only=False)
    if ids:
        docker2("rm", "-f", *ids, check=False)
