"""Helpers for the tests that need a real Docker engine (and Compose)."""

from __future__ import annotations

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


def docker_ready() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def compose_commands() -> list[str]:
    """The Compose versions on this machine, v2 first."""
    found = []
    for cmd in ("docker compose", "docker-compose"):
        argv = cmd.split()
        if shutil.which(argv[0]) and subprocess.run(
                [*argv, "version"], capture_output=True, timeout=30).returncode == 0:
            found.append(cmd)
    return found


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
