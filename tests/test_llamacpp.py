"""End to end against llama.cpp's own server, `llama-server`, on the CPU.

The server is built by .ci/setup-llamacpp.sh from the llama.cpp sources in
the llama-cpp-python sdist and serves the tiny random model of
tests/support/make_tiny_model.py as GGUF (tests/support/make_tiny_gguf.py):
the same weights, tokenizer and ChatML template that vLLM serves in
tests/test_e2e_vllm.py. Started here as a bare process on 127.0.0.1 with a
4096-token slot context (-c 8192 over 2 slots), `--metrics` on (one test
starts it without), and the tool's whole main job run against it with
--endpoint, as a user would. One thread (-t 1): with -t 2 on 2 cores that
other jobs also use, llama.cpp's spinning worker threads decoded the tiny
model at 4.9 tok/s; with -t 1 at ~2,170 tok/s (measured here).

Skipped without the binary or the GGUF unless PERFTEST_REQUIRE_LLAMACPP=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
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

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

LLAMACPP = Path(os.environ.get("PERFTEST_LLAMACPP_DIR", "/opt/perftest-llamacpp"))
GGUF = Path(os.environ.get("PERFTEST_TINY_GGUF", "/opt/perftest-tiny-gguf/tiny.gguf"))
SLOT_CONTEXT = 4096


def require_llamacpp() -> None:
    require((LLAMACPP / "bin" / "llama-server").exists() and GGUF.exists(),
            f"no llama-server in {LLAMACPP}/bin or no GGUF at {GGUF} "
            "(.ci/setup-llamacpp.sh, tests/support/make_tiny_gguf.py)",
            env="PERFTEST_REQUIRE_LLAMACPP")


def http_json(url: str, body=None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LlamaServer:
    def __init__(self, log: Path, metrics: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [str(LLAMACPP / "bin" / "llama-server"), "-m", str(GGUF), "--alias", "tiny",
                "--host", "127.0.0.1", "--port", str(self.port), "-c", str(2 * SLOT_CONTEXT),
                "-np", "2", "-t", "1", "--jinja", "--no-webui"]
        if metrics:
            argv.append("--metrics")
        self.proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"llama-server not ready in {timeout_s} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    require_llamacpp()
    server = LlamaServer(tmp_path_factory.mktemp("llamacpp") / "llama-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def run_tool(args, tmp_path, timeout_s: float = 600, env=None):
    report_dir = tmp_path / "reports"
    proc = subprocess.run([sys.executable, str(ROOT / "perftest_models.py"), *args,
                           "--report-dir", str(report_dir)],
                          capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path,
                          env={**os.environ, **(env or {})}, check=False)
    reports = list(report_dir.glob("*.json"))
    report = json.loads(reports[0].read_text()) if reports else None
    return proc, report


def test_llama_servers_own_api_is_what_the_tool_reads(llama_server):
    models = http_json(f"{llama_server.url}/v1/models")["data"]
    (entry,) = [m for m in models if m["id"] == "tiny"]
    assert entry["owned_by"] == "llamacpp" and entry["meta"]["n_ctx"] == SLOT_CONTEXT
    props = http_json(f"{llama_server.url}/props")
    assert props["default_generation_settings"]["n_ctx"] == SLOT_CONTEXT and props["build_info"]
    messages = [{"role": "user", "content": "Request n1. hello there"}]
    prompt = http_json(f"{llama_server.url}/apply-template", {"messages": messages})["prompt"]
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    tokens = http_json(f"{llama_server.url}/tokenize",
                       {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    answer = http_json(f"{llama_server.url}/v1/chat/completions",
                       {"model": "tiny", "messages": messages, "max_tokens": 3})
    assert answer["usage"]["prompt_tokens"] == len(tokens)


@pytest.mark.timeout(900)
def test_the_main_job_against_llama_server_has_exact_inputs_and_outputs(llama_server, tmp_path):
    proc, report = run_tool(["--endpoint", llama_server.url, "--iterations", "2",
                             "--context-sizes", "1k,2k", "--concurrency", "2",
                             "--throughput-requests", "4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    (m,) = report["models"]
    server = m["server"]
    assert server["engine"] == "llama.cpp" and server["version"]  # its build_info
    assert server["context_tokens"] == SLOT_CONTEXT and m["spec"]["max_context_tokens"] == SLOT_CONTEXT
    assert "min_tokens" not in server["knobs_ignored"] and not server["knobs_refused"]
    by_name = {sc["name"]: sc for sc in m["scenarios"]}
    assert list(by_name) == ["latency", "context-1k", "context-2k", "throughput-c2"]
    for name, target in (("context-1k", 1000), ("context-2k", 2000)):
        sc = by_name[name]
        assert sc["tokens_in_exact"] is True
        for s in sc["samples"]:
            assert s["ok"] and abs(s["tokens_in"] - target) <= target // 100, s
    for sc in m["scenarios"]:
        assert sc["output_forced"] is True
        assert all(s["ok"] and s["tokens_out"] == sc["target_tokens_out"] for s in sc["samples"])
        metrics = sc["server_metrics"]
        assert metrics["requests"] is None and metrics["ttft_mean_ms"] is None
        assert metrics["prefix_cache_hits"] == 0  # cache_prompt false: nothing reused
        # the server's own counts agree with the usage of what was sent
        assert metrics["generation_tokens"] == sum(s["tokens_out"] for s in sc["samples"])
        assert metrics["decode_tps"] > 0
    # no prompt reused the slot cache (cache_prompt false): every token computed
    for sc in m["scenarios"]:
        assert all(s["cached_tokens"] in (0, None) for s in sc["samples"]), sc["name"]
    assert f"llama.cpp {server['version']}" in proc.stdout  # the report says which engine


@pytest.mark.timeout(600)
def test_a_table_context_larger_than_the_servers_is_clamped_to_it(llama_server, tmp_path):
    models = tmp_path / "models.yml"
    models.write_text("models:\n- {name: tiny-gguf, model_id: tiny, max_context_tokens: 40000}\n")
    proc, report = run_tool(["--endpoint", llama_server.url, "--models", str(models),
                             "--iterations", "1", "--context-sizes", "8k"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = report["models"]
    sc = m["scenarios"][1]
    assert (sc["requested_tokens_in"], sc["target_tokens_in"]) == (8000, SLOT_CONTEXT - 100)
    assert [s["tokens_in"] for s in sc["samples"]] == [SLOT_CONTEXT - 100]
    assert "8000 tokens do not fit its 4096-token context; clamped to 3996" in proc.stdout


@pytest.mark.timeout(600)
def test_without_metrics_the_server_metrics_are_null_not_zero(tmp_path):
    require_llamacpp()
    server = LlamaServer(tmp_path / "llama-server.log", metrics=False)
    try:
        server.wait_ready()
        proc, report = run_tool(["--endpoint", server.url, "--iterations", "1",
                                 "--context-sizes", "1k"], tmp_path)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sc in report["models"][0]["scenarios"]:
        assert sc["server_metrics"] is None
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| tiny") and "1,000" in ln)
    assert [c.strip() for c in row.split("|")][4] == "-"  # Server TTFT (ms)


COMPOSE = HERE / "e2e" / "docker-compose.engines.yml"
MODELS = HERE / "e2e" / "models-engines.yml"


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_under_compose_the_llamacpp_service_is_started_measured_and_stopped(tmp_path):
    require_llamacpp()
    require(docker_ready(), "no Docker engine reachable here")
    require(bool(compose_commands()), "neither docker compose nor docker-compose is installed")
    from images import ensure_base_image

    project, port = new_project("issue-17-llamacpp"), free_port()
    env = {"COMPOSE_PROJECT_NAME": project, "PERFTEST_PORT": str(port),
           "PERFTEST_TINY_MODEL": os.environ.get("PERFTEST_TINY_MODEL", "/opt/perftest-tiny-model"),
           "PERFTEST_TINY_GGUF": str(GGUF), "PERFTEST_LLAMACPP_DIR": str(LLAMACPP),
           "PERFTEST_BASE_IMAGE": ensure_base_image()}
    try:
        proc, report = run_tool(["--compose-file", str(COMPOSE), "--models", str(MODELS),
                                 "--only", "tiny-llamacpp", "--port", str(port),
                                 "--iterations", "2", "--context-sizes", "1k,4k",
                                 "--health-timeout", "120"], tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not project_containers(project)  # stopped after measuring
    finally:
        remove_project(project)
    (m,) = report["models"]
    assert m["status"] == "ok" and m["service"] == "llamacpp-tiny"
    assert m["server"]["engine"] == "llama.cpp" and not m["server"]["engine_forced"]
    assert m["lifecycle"]["load_s"] > 0
    for sc in m["scenarios"]:
        assert sc["output_forced"] is True and sc["server_metrics"]["decode_tps"] > 0
        for s in sc["samples"]:
            assert s["ok"] and s["tokens_out"] == sc["target_tokens_out"]
            if sc["target_tokens_in"]:
                assert s["tokens_in"] == sc["target_tokens_in"]
