"""Helpers for the tests that need a real part of the machine (a Docker engine,
Compose v1/v2, uvloop): each finds it, or skips saying which part is missing
and how .ci/run gets it (a failure instead under PERFTEST_REQUIRE_*=1)."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "support"))


def require(condition: bool, why: str, env: str = "PERFTEST_REQUIRE_DOCKER") -> None:
    """Skip when the machine lacks something; fail instead where CI says it must have it."""
    if condition:
        return
    if os.environ.get(env) == "1":
        pytest.fail(f"{why} (and {env}=1 says it must be here)")
    pytest.skip(why)


# How .ci/run gets each part (said in every skip, so a reader knows the fix).
HOW_DOCKER = "bash .ci/setup-docker.sh (step 1 of .ci/run) installs and starts it"
HOW_COMPOSE = {"docker compose": "Compose v2; bash .ci/setup-docker.sh (step 1 of .ci/run) "
                                 "installs the plugin",
               "docker-compose": "Compose v1; bash .ci/setup-docker.sh (step 1 of .ci/run) "
                                 "installs Debian's docker-compose"}


@functools.lru_cache(maxsize=None)
def docker_problem() -> str | None:
    """Why the Docker engine cannot be used here, in one line, or None."""
    if shutil.which("docker") is None:
        return "no `docker` on PATH"
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s"
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return f"`docker info` failed: {lines[-1] if lines else f'exit {proc.returncode}'}"


def docker_ready() -> bool:
    return docker_problem() is None


def require_docker() -> None:
    """Skip (fail under PERFTEST_REQUIRE_DOCKER=1) where no engine can be used."""
    problem = docker_problem()
    require(problem is None, f"no Docker engine reachable here ({problem}); {HOW_DOCKER}")


@functools.lru_cache(maxsize=None)
def compose_commands() -> list[str]:
    """The Compose versions on this machine, v2 first."""
    found = []
    for cmd in ("docker compose", "docker-compose"):
        argv = cmd.split()
        if shutil.which(argv[0]) and subprocess.run(
                [*argv, "version"], capture_output=True, timeout=30,
                stdin=subprocess.DEVNULL).returncode == 0:
            found.append(cmd)
    return found


def require_compose(cmd: str) -> None:
    """Skip (fail under PERFTEST_REQUIRE_DOCKER=1) where this Compose is missing."""
    require(cmd in compose_commands(), f"`{cmd}` does not work here "
            f"({HOW_COMPOSE.get(cmd, 'use docker compose or docker-compose')})")


def any_compose() -> str:
    """The Compose for tests that do not depend on its version: PERFTEST_COMPOSE
    when set (as the tool reads it), else v2, else v1; skips (or fails, under
    PERFTEST_REQUIRE_DOCKER=1) where there is none."""
    chosen = os.environ.get("PERFTEST_COMPOSE", "").strip()
    if chosen:
        require_compose(" ".join(chosen.split()))
        return " ".join(chosen.split())
    found = compose_commands()
    require(bool(found), "neither `docker compose` (v2) nor `docker-compose` (v1) works here; "
                         "bash .ci/setup-docker.sh (step 1 of .ci/run) installs both")
    return found[0]


def require_loop(loop: str) -> str:
    """For a test that needs this event loop (PERFTEST_LOOP): skip where it is
    not installed (fail under PERFTEST_REQUIRE_UVLOOP=1, as CI sets)."""
    if loop == "uvloop":
        require(importlib.util.find_spec("uvloop") is not None,
                "uvloop is not installed (the `fast` extra: pip install -e '.[test,fast]'; "
                ".ci/run installs it)", env="PERFTEST_REQUIRE_UVLOOP")
    return loop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_containers(project: str, running_only: bool = True) -> list[str]:
    argv = ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"]
    if not running_only:
        argv.insert(2, "-a")
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


def new_project(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def remove_project(project: str) -> None:
    """Remove a test project's containers and networks (each network holds
    one of the engine's few address pools)."""
    ids = project_containers(project, running_only=False)
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    nets = subprocess.run(["docker", "network", "ls", "-q", "--filter",
                           f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True).stdout.split()
    if nets:
        subprocess.run(["docker", "network", "rm", *nets], capture_output=True)
