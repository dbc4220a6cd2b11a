"""Shared fixtures: a real stand-in server on 127.0.0.1, temp report folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import property_budget  # noqa: E402
from standin import StandinConfig, StandinServer  # noqa: E402


def pytest_configure(config):
    """-m "not slow" is the quick run: property tests draw fewer examples
    there (see property_budget.py); the full run draws them all."""
    property_budget.QUICK = "not slow" in (config.getoption("markexpr") or "")


@pytest.fixture
def standin():
    """Start stand-in servers: `standin(ttft_s=0.05, ...)`; all stopped at the end."""
    servers: list[StandinServer] = []

    def start(**config) -> StandinServer:
        config.setdefault("quiet", True)
        srv = StandinServer(StandinConfig(**config))
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def run_main(capsys):
    """pm.main(argv) -> (exit code, stdout, stderr), with no traceback on stderr."""
    import perftest_models as pm

    def run(argv):
        rc = pm.main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return rc, out, err
    return run


@pytest.fixture
def report_dir(tmp_path):
    return tmp_path / "reports"
