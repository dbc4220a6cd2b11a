"""The command line through main(argv): exit codes, stdout vs stderr, reports."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockertools import require_loop

import perftest_models as pm

ROOT = Path(__file__).resolve().parent.parent


def reports(report_dir):
    return sorted(report_dir.glob("*.json")), sorted(report_dir.glob("*.txt"))


def test_an_endpoint_run_prints_tables_and_writes_both_reports(standin, report_dir, capsys):
    srv = standin(ttft_s=0.02, itl_s=0.001)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "2", "--context-sizes", "1k,4k",
                  "--report-dir", str(report_dir)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "latency: ~50-token prompt, 500 out, x2" in out
    assert "context-4k: 4000 tokens in, 100 out, x2" in out
    assert "Summary:\n  standin: ok" in out
    assert "waiting" not in out and "report:" not in out  # progress goes to stderr
    assert "report:" in err and "[2/2] context-4k" in err
    (js,), (txt,) = reports(report_dir)
    assert js.stem == txt.stem and js.stem.startswith("model-comparison-")
    assert txt.read_text() == out  # the text report is the complete results output
    report = json.loads(js.read_text())
    assert report["schema_version"] == 1 and report["tool"]["name"] == "perftest-models"
    (model,) = report["models"]
    assert model["status"] == "ok" and model["service"] is None
    assert model["server"]["version"] == "0.0.0-standin"
    names = [s["name"] for s in model["scenarios"]]
    assert names == ["latency", "context-1k", "context-4k"]
    for sc in model["scenarios"]:
        assert len(sc["samples"]) == 2
        assert set(sc["summary"]["ttft_ms"]) >= {"mean", "stddev", "min", "max", "median", "n"}
        for s in sc["samples"]:
            assert s["ok"] and s["tokens_out"] == sc["target_tokens_out"]
            assert s["ttft_ms"] > 0 and s["tps"] > 0 and s["total_s"] > 0
            if sc["target_tokens_in"]:
                assert s["tokens_in"] == sc["target_tokens_in"]


def test_plain_output_has_no_escape_codes_when_not_a_terminal(standin, report_dir, capsys):
    srv = standin()
    pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
             "--report-dir", str(report_dir)])
    out, _ = capsys.readouterr()
    assert "\x1b[" not in out and "+---" in out


def test_a_failing_model_is_reported_and_exits_1(standin, report_dir, capsys):
    srv = standin(faults=["http_500"] * 50)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                  "--report-dir", str(report_dir)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "standin: failed: warm-up request failed 3 times: HTTP 500" in out
    report = json.loads(reports(report_dir)[0][0].read_text())
    assert report["models"][0]["status"] == "failed"


def test_too_many_failed_requests_fail_the_model_but_keep_its_samples(standin, report_dir):
    # The fault list is consumed one per chat request: warm-up ok, then every
    # request fails (a thread that set the faults after the warm-up raced it).
    srv = standin(faults=["none"] + ["http_500"] * 100)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "5", "--context-sizes", "1k",
                  "--max-failures", "2", "--report-dir", str(report_dir)])
    assert rc == 1
    model = json.loads(reports(report_dir)[0][0].read_text())["models"][0]
    assert model["status"] == "failed" and "too many failed requests" in model["error"]
    samples = model["scenarios"][0]["samples"]
    assert len(samples) == 3 and not any(s["ok"] for s in samples)
    assert all(s["error"].startswith("HTTP 500") for s in samples)


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "--iterations: must be >= 1, got 0"),
    (["--iterations", "-2"], "--iterations: must be >= 1, got -2"),
    (["--iterations", "three"], "expected a whole number >= 1, got 'three'"),
    (["--skip", "nope"], "unknown model 'nope'; models: qwen3-32b-fp8"),
    (["--only", "gpt-5"], "unknown model 'gpt-5'"),
    (["--port", "70000"], "must be a TCP port"),
    (["--health-timeout", "-1"], "must be a number > 0"),
    (["--context-sizes", "1k,lots"], "expected sizes like 1k,8k,16k,32k"),
    (["--context-sizes", "100k"], "context size 100000 tokens fits no selected model"),
    (["--compose-file", "/nonexistent/compose.yml"], "compose file /nonexistent/compose.yml not found"),
    (["--endpoint", "ftp://x"], "is not an http(s) URL"),
    (["--endpoint", "localhost:8000"], "is not an http(s) URL"),
    (["--skip", "qwen3-32b-fp8", "--skip", "qwen3-30b-a3b-fp8", "--skip", "llama33-70b-fp8"],
     "every model is skipped"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = pm.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("perftest-models: error: ")
    assert message in err


@pytest.mark.parametrize("content, message", [
    ("services: [", "is not valid YAML"),
    ("- a\n- b\n", "is not a mapping"),
    ("version: '3'\n", "has no 'services:' mapping"),
    ("services:\n  other: {image: x}\n", "Service vllm-qwen3-32b-fp8 not found in compose.yml"),
])
def test_bad_compose_files_are_refused_before_anything_starts(tmp_path, content, message, capsys):
    path = tmp_path / "compose.yml"
    path.write_text(content)
    assert pm.main(["--compose-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_server_that_is_not_openai_compatible_is_refused(standin, capsys, tmp_path):
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rc = pm.main(["--endpoint", f"http://127.0.0.1:{httpd.server_address[1]}",
                      "--report-dir", str(tmp_path)])
    finally:
        httpd.shutdown()
    assert rc == 2
    assert "without a model list: is this an OpenAI-compatible server?" in capsys.readouterr().err


def test_nothing_listening_is_a_clear_usage_error(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert pm.main(["--endpoint", f"http://127.0.0.1:{port}"]) == 2
    assert "is the server running?" in capsys.readouterr().err


# ---------------------------------------------------------------- model table


def write_models(tmp_path, data):
    path = tmp_path / "models.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_models_file_adds_and_replaces_models(tmp_path):
    path = write_models(tmp_path, {"models": [
        {"name": "tiny", "service": "vllm-tiny", "model_id": "tiny", "max_context_tokens": 4096},
        {"name": "qwen3-32b-fp8", "service": "vllm-q", "model_id": "Q", "max_context_tokens": 8000,
         "chat_template_kwargs": {"enable_thinking": False}},
    ]})
    table = pm.load_models_file(path, pm.MODELS)
    by_name = {m.name: m for m in table}
    assert set(by_name) == {"qwen3-32b-fp8", "qwen3-30b-a3b-fp8", "llama33-70b-fp8", "tiny"}
    assert by_name["qwen3-32b-fp8"].chat_template_kwargs == {"enable_thinking": False}
    replaced = write_models(tmp_path, {"replace": True, "models": [
        {"name": "tiny", "model_id": "tiny", "max_context_tokens": 4096}]})
    (only,) = pm.load_models_file(replaced, pm.MODELS)
    assert only.service == "vllm-tiny"


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "model_id": "x"}, "lacks 'max_context_tokens'"),
    ({"name": "x", "model_id": "x", "max_context_tokens": "big"}, "'max_context_tokens' must be int"),
    ({"name": "x", "model_id": "x", "max_context_tokens": True}, "must be int"),
    ({"name": "x; rm -rf /", "model_id": "x", "max_context_tokens": 9}, "is not a valid name"),
    ({"name": "x", "service": "$(reboot)", "model_id": "x", "max_context_tokens": 9},
     "service '$(reboot)' is not a valid name"),
    ({"name": "x", "model_id": "x", "max_context_tokens": 9, "colour": "red"}, "unknown field(s) colour"),
])
def test_a_bad_models_file_is_a_one_line_usage_error(tmp_path, entry, message, capsys):
    path = write_models(tmp_path, {"models": [entry]})
    assert pm.main(["--models", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_compose_file_matches_the_model_table():
    compose = pm.load_compose_file(ROOT / "docker-compose.yml")
    pm.check_services(compose, pm.MODELS)
    for m in pm.MODELS:
        svc = compose.services[m.service]
        argv = svc["command"].split()
        assert argv[0] == m.model_id and svc["entrypoint"] == ["vllm", "serve"]
        assert int(argv[argv.index("--max-model-len") + 1]) == m.max_context_tokens
        assert "8000:8000" in svc["ports"][0]
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "healthcheck" in svc and svc["volumes"]


def test_help_lists_the_models_and_exit_codes():
    # (how fast --help starts is measured in benchmarks/, not in a unit test)
    proc = subprocess.run([sys.executable, str(ROOT / "perftest_models.py"), "--help"],
                          capture_output=True, text=True, check=True)
    for m in pm.MODELS:
        assert m.name in proc.stdout and m.service in proc.stdout
    assert "exit codes:" in proc.stdout


# ---------------------------------------------------------------- compose commands


class FakeRunner:
    """Records argv lists; answers like docker compose would."""

    def __init__(self, stdout="", returncode=0, stderr=""):
        self.calls = []
        self.stdout, self.returncode, self.stderr = stdout, returncode, stderr

    def __call__(self, argv, **kwargs):
        assert isinstance(argv, list) and "shell" not in kwargs  # never a shell
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, self.stderr)


def test_compose_commands_are_argv_lists_with_file_and_project(tmp_path):
    path = tmp_path / "docker-compose.yml"
    path.write_text("name: My_Bench\nservices:\n  vllm-a: {image: x}\n  vllm-b: {image: x}\n")
    runner = FakeRunner(stdout="vllm-a\n")
    compose = pm.Compose(pm.load_compose_file(path), ("docker", "compose"), runner)
    compose.up("vllm-a")
    assert compose.running(["vllm-a", "vllm-b"]) == ["vllm-a"]
    compose.stop(["vllm-a"])
    base = ["docker", "compose", "-f", str(path), "-p", "my_bench"]
    assert runner.calls == [base + ["up", "-d", "vllm-a"],
                            base + ["ps", "--services", "--filter", "status=running"],
                            base + ["stop", "vllm-a"]]


class NoContainers:
    """A Docker client that finds no container (the containers are not real here)."""

    class containers:  # noqa: N801 (the SDK's attribute name)
        @staticmethod
        def list(**kwargs):
            return []


def test_the_service_lifecycle_stops_leftovers_once_and_always_stops_what_it_started(tmp_path):
    path = tmp_path / "docker-compose.yml"
    path.write_text("name: b\nservices:\n  vllm-a: {image: x}\n  vllm-b: {image: x}\n")
    runner = FakeRunner(stdout="vllm-b\n")  # vllm-b was left running by an earlier run
    said, held = [], []

    @contextlib.contextmanager
    def hold():
        held.append(len(runner.calls))
        yield

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    services = pm.ServiceLifecycle(pm.Compose(pm.load_compose_file(path), ("docker", "compose"),
                                              runner), ["vllm-a", "vllm-b"], port, said.append,
                                   hold=hold, clock=lambda: 7.0, docker=NoContainers())
    with services.running("a", "vllm-a") as svc:
        assert (svc.service, svc.started_s, svc.lifecycle) == ("vllm-a", 7.0, pm.Lifecycle(service="vllm-a"))
    with pytest.raises(KeyboardInterrupt), services.running("a", "vllm-a"):
        raise KeyboardInterrupt
    base = ["docker", "compose", "-f", str(path), "-p", "b"]
    assert runner.calls == [base + ["ps", "--services", "--filter", "status=running"],
                            base + ["stop", "vllm-b"],
                            base + ["up", "-d", "vllm-a"], base + ["stop", "vllm-a"],
                            base + ["up", "-d", "vllm-a"], base + ["stop", "vllm-a"]]
    assert held == [1, 3, 5]  # every stop under the hold against a second signal
    assert said == ["stopping running inference services first: vllm-b",
                    "a: starting vllm-a", "a: stopped vllm-a", "a: starting vllm-a", "a: stopped vllm-a"]


def test_a_daemon_that_is_down_becomes_advice(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("services:\n  a: {image: x}\n")
    runner = FakeRunner(returncode=1, stderr="Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
    compose = pm.Compose(pm.load_compose_file(path), ("docker-compose",), runner)
    with pytest.raises(pm.SetupError, match="start it"):
        compose.up("a")


def test_the_project_name_is_derived_like_compose_does(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPOSE_PROJECT_NAME", raising=False)
    d = tmp_path / "My.Inference Box"
    d.mkdir()
    assert pm.compose_project_name(d / "docker-compose.yml", {}) == "myinferencebox"
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "ci")
    assert pm.compose_project_name(d / "docker-compose.yml", {"name": "x"}) == "ci"


def test_an_endpoint_model_that_matches_two_table_entries_is_refused(standin, tmp_path, capsys):
    srv = standin(model="tiny")
    path = write_models(tmp_path, {"replace": True, "models": [
        {"name": "a", "model_id": "tiny", "max_context_tokens": 4096},
        {"name": "b", "model_id": "tiny", "max_context_tokens": 4096}]})
    assert pm.main(["--endpoint", srv.base_url, "--models", str(path)]) == 2
    assert "share the model id 'tiny'" in capsys.readouterr().err


def test_a_warm_up_that_fails_once_is_tried_again(standin, report_dir):
    srv = standin(faults=["http_500"])
    assert pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                    "--report-dir", str(report_dir)]) == 0
    assert srv.records[0].status == 500 and srv.records[1].status == 200


def test_credentials_in_the_endpoint_url_are_refused(capsys):
    assert pm.main(["--endpoint", "http://user:hunter2@127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "must not carry a user or password" in err and "hunter2" not in err


def test_a_tiny_context_still_gets_a_positive_throughput_prompt():
    spec = pm.ModelSpec("m", None, "m", 200)
    (level,) = [s for s in pm.plan_scenarios(pm.RunConfig(context_sizes=(), concurrency=(2,)), spec)
                if s.kind == "throughput"]
    assert level.target_tokens_in == 1


def test_the_inline_script_metadata_matches_pyproject():
    # PEP 723: `uv run perftest_models.py` / `pipx run` read this block from the
    # copied file; it must ask for what pyproject.toml installs.
    import re
    import tomllib

    text = (ROOT / "perftest_models.py").read_text(encoding="utf-8")
    pep723 = r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
    blocks = list(re.finditer(pep723, text))
    assert [b.group("type") for b in blocks] == ["script"]
    script = tomllib.loads("".join(line[2:] if line.startswith("# ") else line[1:]
                                   for line in blocks[0].group("content").splitlines(keepends=True)))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert script == {"requires-python": project["requires-python"],
                      "dependencies": project["dependencies"]}


# ---------------------------------------------------------------------------
# The event loop: PERFTEST_LOOP=asyncio|uvloop, else uvloop when installed
# ---------------------------------------------------------------------------

UVLOOP_INSTALLED = importlib.util.find_spec("uvloop") is not None


async def _running_loop_module():
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_perftest_loop_picks_the_loop_that_runs_and_is_recorded(
        loop, standin, report_dir, monkeypatch):
    monkeypatch.setenv("PERFTEST_LOOP", require_loop(loop))
    assert pm.run_async(_running_loop_module()) == loop
    srv = standin()
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                  "--report-dir", str(report_dir)])
    assert rc == 0
    (js,), _ = reports(report_dir)
    assert json.loads(js.read_text())["environment"]["event_loop"] == loop


def test_without_perftest_loop_uvloop_runs_when_it_is_installed(monkeypatch):
    monkeypatch.delenv("PERFTEST_LOOP", raising=False)
    expected = "uvloop" if UVLOOP_INSTALLED else "asyncio"
    assert pm.event_loop_name() == expected
    assert pm.run_async(_running_loop_module()) == expected


def test_an_unknown_perftest_loop_is_a_usage_error_before_anything_starts(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERFTEST_LOOP", "trio")
    rc = pm.main(["--endpoint", "http://127.0.0.1:9", "--report-dir", str(tmp_path / "r")])
    assert (rc, capsys.readouterr().err) == (2, "perftest-models: error: PERFTEST_LOOP='trio': "
                                                "use 'asyncio' or 'uvloop' (or unset it)\n")
    assert not (tmp_path / "r").exists()


def test_perftest_loop_uvloop_without_uvloop_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    monkeypatch.setenv("PERFTEST_LOOP", "uvloop")
    rc = pm.main(["--endpoint", "http://127.0.0.1:9", "--report-dir", str(tmp_path / "r")])
    assert (rc, capsys.readouterr().err) == (
        1, "perftest-models: error: PERFTEST_LOOP=uvloop but uvloop (0.19 or later) is not "
           "installed: pip install 'perftest-models[fast]', or unset PERFTEST_LOOP\n")
    assert not (tmp_path / "r").exists()


def sections_and_uses(source: str) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """The module's banner sections in order, and every (section, definition,
    global name, that name's section) where a top-level function or class
    uses a module-level name inside a function body. Only function bodies
    can use a name defined further down (anything else runs at import and
    would fail); symtable tells globals from locals of the same name, and
    under `from __future__ import annotations` it leaves type hints out."""
    import ast
    import symtable

    lines = source.splitlines()
    banners = [(i + 2, lines[i + 1][2:].strip()) for i in range(len(lines) - 2)
               if lines[i].startswith("# ====") and lines[i + 2].startswith("# ====")]

    def section(lineno: int) -> str:
        return next((name for start, name in reversed(banners) if start <= lineno), "(top)")

    defined: dict[str, str] = {}
    owners: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = owners[node.name] = section(node.lineno)
        for target in getattr(node, "targets", [getattr(node, "target", None)]):
            if isinstance(target, ast.Name):
                defined.setdefault(target.id, section(node.lineno))
    uses = []

    def walk(scope: symtable.SymbolTable, owner: str) -> None:
        if scope.get_type() == "function":
            uses.extend((owners[owner], owner, sym.get_name(), defined[sym.get_name()])
                        for sym in scope.get_symbols()
                        if sym.is_global() and sym.is_referenced() and sym.get_name() in defined)
        for child in scope.get_children():
            walk(child, owner)

    for child in symtable.symtable(source, "perftest_models.py", "exec").get_children():
        if child.get_name() in owners:
            walk(child, child.get_name())
    return ["(top)", *(name for _, name in banners)], uses


def test_no_name_is_used_before_the_section_that_defines_it():
    # The module reads top to bottom in pipeline order: a definition uses
    # only what its own section or an earlier one defines (type hints aside).
    order, uses = sections_and_uses((ROOT / "perftest_models.py").read_text(encoding="utf-8"))
    rank = {name: i for i, name in enumerate(order)}
    assert len(order) >= 15 and len(uses) > 500  # the check sees the module, not nothing
    later = sorted({(sec, owner, name, where) for sec, owner, name, where in uses
                    if rank[where] > rank[sec]})
    assert later == []


def test_the_section_check_sees_a_name_used_before_its_section():
    source = ("# ====\n# First\n# ====\n\ndef early():\n    return late()\n\n\n"
              "def fine(x: Later) -> Later:\n    return x\n\n\n"
              "# ====\n# Second\n# ====\n\ndef late():\n    return early()\n\n\n"
              "class Later:\n    pass\n")
    order, uses = sections_and_uses("from __future__ import annotations\n" + source)
    assert order == ["(top)", "First", "Second"]
    assert ("First", "early", "late", "Second") in uses
    assert ("Second", "late", "early", "First") in uses
    assert not [u for u in uses if u[1] == "fine"]  # type hints are not uses


def test_the_walk_of_a_latency_scenario_in_the_index_reads_top_to_bottom():
    # The header names the definitions one latency scenario passes through;
    # each must exist and sit below the one before it in the file.
    import re

    text = (ROOT / "perftest_models.py").read_text(encoding="utf-8")
    header = text[text.index("# One latency scenario, read top to bottom"):
                  text.index("from __future__ import annotations")]
    walk = re.findall(r"\w+", header.split(":", 1)[1].replace("#", " "))
    assert len(walk) >= 15 and walk[0] == "measure_stream" and walk[-1] == "main"
    lines = {m.group(2): text[:m.start()].count("\n")
             for m in re.finditer(r"(?m)^(async def|def|class) (\w+)\b", text)}
    at = [lines[name] for name in walk]  # a KeyError names a walk step that is gone
    assert at == sorted(at), list(zip(walk, at))


def test_the_section_index_lists_every_section_in_file_order():
    import re

    text = (ROOT / "perftest_models.py").read_text(encoding="utf-8")
    header = text[text.index("# Sections, in the order"):text.index("# One latency scenario")]
    index = [m.group(1) for m in re.finditer(r"(?m)^#   (\S+(?: \S+)?)\s{2,}", header)]
    order, _ = sections_and_uses(text)
    banners = order[1:]  # "(top)" is the imports and constants above the first banner
    assert len(index) == len(banners) >= 15
    assert all(b.startswith(i) for i, b in zip(index, banners)), list(zip(index, banners))
