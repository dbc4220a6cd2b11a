"""Faults and bad input (issue 7): every fault the stand-in can produce, the
signals, the report folder, bad input, fuzzing, and the secrets.

Everything here runs against the stand-in server on 127.0.0.1, in-process or
as a subprocess; the faults that need a real Docker engine (a container
killed or OOM-killed mid-scenario, a signal while a container runs) are in
tests/test_docker_lifecycle.py. docs/faults.md maps each case to its test.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import standin as standin_module
from dockertools import require_loop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from property_budget import examples

import perftest_models as pm

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "perftest_models.py"

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s=20.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


async def _one(base_url, model="standin", tokens_out=20, timeout_s=30.0, messages=None,
               retry_wait_s=0.01, max_retries=2, sleep=asyncio.sleep):
    async with pm.http_client(base_url, None, timeout_s) as client:
        payload = pm.chat_payload(model, messages or pm.latency_messages("n"), tokens_out, 0.7,
                                  None, pm.new_nonce())
        return await pm.send_chat(client, payload, tokens_out, retry_wait_s=retry_wait_s,
                                  max_retries=max_retries, sleep=sleep)


async def no_wait(seconds):  # asyncio.sleep on virtual time (a Retry-After: 1 costs nothing)
    await asyncio.sleep(0)


def one_request(srv, **kw) -> pm.Sample:
    """One streaming chat request through the real client over a real socket,
    on the tool's event loop (PERFTEST_LOOP, else uvloop when installed)."""
    return pm.run_async(_one(srv.base_url, srv.config.model, **kw))


def json_report(report_dir) -> dict:
    (path,) = report_dir.glob("*.json")
    return json.loads(path.read_text())


# ============================================================================
# Server faults: each is a failed sample with its reason, never a crash
# ============================================================================

# fault -> the start of the reason the sample carries. None of these is retried:
# they fail after the server accepted the request (it may have generated).
NOT_RETRIED = {
    "close_mid_stream": "connection broken after ",
    "reset": "connection broken after ",
    "http_400": "HTTP 400: stand-in fault http_400: Bad Request",
    "http_500": "HTTP 500: stand-in fault http_500: Internal Server Error",
    "malformed_sse": "malformed SSE event: '{not json'",
    "error_event": "error event in stream: Internal server error",
    "no_usage": "no usage in the stream: the server ignored stream_options.include_usage",
    "done_no_tokens": "stream finished without any generated token",
    "empty_body": "stream ended before [DONE] after 0 token chunk(s)",
}


@pytest.mark.parametrize("fault, reason", sorted(NOT_RETRIED.items()))
def test_each_server_fault_is_a_failed_sample_with_its_reason(standin, fault, reason):
    srv = standin(faults=[fault])
    s = one_request(srv)
    assert not s.ok and s.error.startswith(reason), s.error
    assert s.retries == 0 and len(srv.records) == 1  # sent once: resending is not safe
    # a failed sample carries no numbers at all, so nothing averages in a zero
    assert all(getattr(s, k) is None for k in pm.SAMPLE_METRICS) and s.itl_ms == ()


def test_a_mid_stream_close_or_reset_names_what_broke(standin):
    srv = standin(faults=["close_mid_stream", "reset"], fault_after_chunks=3)
    closed, reset = one_request(srv), one_request(srv)
    assert "RemoteProtocolError" in closed.error  # FIN without the chunked terminator
    assert "ReadError" in reset.error or "RemoteProtocolError" in reset.error  # RST


@pytest.mark.parametrize("fault", ["http_429", "http_503"])
def test_a_refusal_before_generation_is_retried_and_counted(standin, fault):
    srv = standin(faults=[fault])
    s = one_request(srv, sleep=no_wait)
    assert s.ok and s.retries == 1 and len(srv.records) == 2


def test_a_429_waits_as_long_as_retry_after_says(standin):
    srv = standin(faults=["http_429"])  # the stand-in sends Retry-After: 1
    s = one_request(srv, retry_wait_s=0.0)
    rec = srv.records
    assert s.ok and s.retries == 1
    assert rec[1].arrival - rec[0].arrival >= 1.0  # the server's wish, not ours (0 s)


def test_retries_stop_at_the_limit_and_the_sample_says_so(standin):
    srv = standin(faults=["http_503"] * 5)
    s = one_request(srv, max_retries=2)
    assert not s.ok and s.retries == 2 and len(srv.records) == 3
    assert s.error == "HTTP 503: stand-in fault http_503: Service Unavailable"


def test_a_server_still_loading_answers_503_and_the_request_is_retried(standin):
    srv = standin(load_s=600.0)

    def finish_loading():  # once a request has been refused as "still loading"
        wait_for(lambda: any(r.status == 503 for r in srv.records), what="a 503")
        srv.config.load_s = 0.0

    loader = threading.Thread(target=finish_loading, daemon=True)
    loader.start()
    s = one_request(srv, retry_wait_s=0.05, max_retries=100)
    loader.join(timeout=10)
    assert s.ok and s.retries >= 1
    assert [r.status for r in srv.records] == [503] * s.retries + [200]


def test_a_refused_connection_is_retried_and_counted():
    url = f"http://127.0.0.1:{free_port()}"
    s = pm.run_async(_one(url, max_retries=2))
    assert not s.ok and s.retries == 2 and s.error.startswith("cannot connect: ")


def test_a_stalled_stream_fails_after_the_read_timeout(standin):
    srv = standin(faults=["stall"], stall_s=10.0)
    t0 = time.monotonic()
    s = one_request(srv, timeout_s=0.5)
    assert time.monotonic() - t0 < 5.0  # gave up at the read timeout, not after the stall
    assert not s.ok and s.retries == 0
    assert s.error.startswith("stalled: no bytes for 0.5 s after 1 read(s)"), s.error


def test_a_prompt_longer_than_the_context_is_a_400_with_the_servers_reason(standin):
    srv = standin(max_model_len=500)
    s = one_request(srv, messages=pm.context_messages("n", 8000))  # ~1500 words
    assert not s.ok and s.retries == 0 and len(srv.records) == 1
    assert s.error.startswith("HTTP 400: This model's maximum context length is 500 tokens"), s.error


def _send_through(transport_error):
    import httpx

    def handler(request):
        raise transport_error(request)

    async def go():
        async with httpx.AsyncClient(base_url="http://fake.invalid",
                                     transport=httpx.MockTransport(handler)) as client:
            return await pm.send_chat(client, b"{}", 5, retry_wait_s=0.0)

    return asyncio.run(go())


@pytest.mark.parametrize("name", ["CloseError", "LocalProtocolError", "ProxyError",
                                  "UnsupportedProtocol", "WriteError"])
def test_any_transport_error_is_a_failed_sample_not_an_exception(name):
    import httpx

    exc_type = getattr(httpx, name)
    s = _send_through(lambda request: exc_type("boom") if name == "LocalProtocolError"
                      else exc_type("boom", request=request))
    assert not s.ok and s.retries == 0
    assert s.error == f"connection broken after 0 read(s): {name}: boom"


def test_a_connect_timeout_is_retried_like_a_refused_connection():
    import httpx

    s = _send_through(lambda request: httpx.ConnectTimeout("", request=request))
    assert not s.ok and s.retries == 2 and s.error == "cannot connect: ConnectTimeout"


# ============================================================================
# Through the whole run: recorded in the report, the failure budget
# ============================================================================


@pytest.mark.parametrize("fault", sorted({*NOT_RETRIED, "stall"}))
def test_a_fault_in_a_run_is_a_failed_sample_in_the_report_and_the_run_goes_on(
        standin, report_dir, fault, capsys):
    srv = standin(faults=["none", fault], stall_s=10.0)  # warm-up ok, then the fault
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "2", "--context-sizes", "1k",
                  "--request-timeout", "0.5", "--report-dir", str(report_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err  # one failure is within the budget (--max-failures 3)
    assert "Traceback" not in err
    (model,) = json_report(report_dir)["models"]
    latency, context = model["scenarios"]
    bad, good = latency["samples"]
    reason = NOT_RETRIED.get(fault, "stalled: no bytes for 0.5 s")
    assert not bad["ok"] and bad["error"].startswith(reason)
    assert bad["ttft_ms"] is None and bad["tokens_out"] is None  # no silent zero
    assert good["ok"] and latency["summary"]["ttft_ms"]["n"] == 1  # only the ok sample counts
    assert all(s["ok"] for s in context["samples"])
    assert f"[1/2] latency: FAILED: {reason}" in err
    latency_row = next(ln for ln in out.splitlines() if ln.startswith("| standin"))
    assert [c.strip() for c in latency_row.split("|")][-2] == "1"  # the Failed column


def two_model_plan(srv, report_dir, **cfg) -> pm.Plan:
    """Two models behind one server (the stand-in serves any name we give it
    under one model id), so the run can be watched going on after a failure."""
    specs = tuple(pm.ModelSpec(name, None, srv.config.model, srv.config.max_model_len)
                  for name in ("first", "second"))
    config = pm.RunConfig(compose_file=None, endpoint=srv.base_url,
                          models=tuple(m.name for m in specs), **cfg)
    return pm.Plan(config, specs, specs, None, srv.base_url, report_dir)


def test_a_model_past_its_failure_limit_is_failed_and_the_next_model_runs(standin, report_dir):
    # warm-up ok, then every latency request of the first model fails
    srv = standin(faults=["none", "http_500", "reset"])
    plan = two_model_plan(srv, report_dir, iterations=3, context_sizes=(1000,),
                          max_failed_samples=1)
    out, err = io.StringIO(), io.StringIO()
    rc = pm.run_benchmark(plan, out, err)
    assert rc == 1
    first, second = json_report(report_dir)["models"]
    assert first["status"] == "failed"
    assert first["error"].startswith("too many failed requests (limit --max-failures); last: "
                                     "connection broken after")
    (latency,) = first["scenarios"]  # the failed scenario's samples are kept
    assert [s["ok"] for s in latency["samples"]] == [False, False]
    assert second["status"] == "ok" and [s["name"] for s in second["scenarios"]] == [
        "latency", "context-1k"]
    assert all(s["ok"] for sc in second["scenarios"] for s in sc["samples"])
    assert "first: failed: too many failed requests" in out.getvalue()
    assert "second: ok" in out.getvalue()


def test_failures_count_across_scenarios_against_one_budget(standin, report_dir):
    # one failure in the latency test, one in the context test: limit 1 -> failed
    srv = standin(faults=["none", "http_500", "none", "none", "http_500"])
    plan = two_model_plan(srv, report_dir, iterations=2, context_sizes=(1000,),
                          max_failed_samples=1)
    assert pm.run_benchmark(plan, io.StringIO(), io.StringIO()) == 1
    first, second = json_report(report_dir)["models"]
    assert first["status"] == "failed" and len(first["scenarios"]) == 2
    assert [s["ok"] for s in first["scenarios"][1]["samples"]] == [True, False]
    assert second["status"] == "ok"


def test_max_failures_zero_fails_a_model_at_its_first_failed_request(standin, report_dir):
    srv = standin(faults=["none", "http_500"])
    plan = two_model_plan(srv, report_dir, iterations=3, context_sizes=(1000,),
                          max_failed_samples=0)
    assert pm.run_benchmark(plan, io.StringIO(), io.StringIO()) == 1
    first, second = json_report(report_dir)["models"]
    assert first["status"] == "failed" and len(first["scenarios"][0]["samples"]) == 1
    assert second["status"] == "ok"


def test_a_models_file_that_overstates_the_context_is_clamped_to_what_the_server_reports(
        standin, report_dir, tmp_path, capsys):
    # The table says 40,000 tokens; the server was started with a 3,000-token
    # context and says so in /v1/models: the 8k test is clamped to fit it.
    srv = standin(max_model_len=3000)
    models = tmp_path / "models.yml"
    models.write_text("models:\n- {name: standin, model_id: standin, max_context_tokens: 40000}\n")
    rc = pm.main(["--endpoint", srv.base_url, "--models", str(models), "--iterations", "1",
                  "--context-sizes", "1k,8k", "--max-failures", "0",
                  "--report-dir", str(report_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (model,) = json_report(report_dir)["models"]
    assert model["status"] == "ok" and model["server"]["context_tokens"] == 3000
    sc = model["scenarios"][2]
    assert (sc["name"], sc["requested_tokens_in"], sc["target_tokens_in"]) == ("context-8k", 8000, 2900)
    assert [s["tokens_in"] for s in sc["samples"]] == [2900]
    assert "8000 tokens do not fit its 3000-token context; clamped to 2900" in out


def test_a_context_the_server_does_not_report_gives_400s_that_fail_the_model(
        standin, report_dir, tmp_path, capsys):
    # An OpenAI-only server states no context: the table's 40,000 is believed,
    # and the server refuses the 8k prompts with its own reason.
    srv = standin(max_model_len=3000, openai_only=True)
    models = tmp_path / "models.yml"
    models.write_text("models:\n- {name: standin, model_id: standin, max_context_tokens: 40000}\n")
    rc = pm.main(["--endpoint", srv.base_url, "--models", str(models), "--iterations", "1",
                  "--context-sizes", "1k,8k", "--max-failures", "0",
                  "--report-dir", str(report_dir)])
    assert rc == 1
    (model,) = json_report(report_dir)["models"]
    assert model["status"] == "failed"
    assert "HTTP 400: This model's maximum context length is 3000 tokens" in model["error"]
    assert [sc["name"] for sc in model["scenarios"]] == ["latency", "context-1k", "context-8k"]
    assert "Traceback" not in capsys.readouterr().err


def _die_on_tokenize_after(srv, monkeypatch, context_requests):
    """Make the stand-in die (stop listening, drop every connection) at the
    first /tokenize after `context_requests` context-sized chat requests: the
    client is sequential, so that is exactly mid-scenario."""
    original = standin_module._ROUTES[("POST", "/tokenize")]
    died = threading.Event()

    def tokenize(handler):
        if not died.is_set() and sum(r.prompt_tokens >= 900 for r in srv.records) >= context_requests:
            died.set()
            threading.Thread(target=srv.stop, daemon=True).start()
            srv._state.stopping.wait(5)
            raise standin_module._ClientGone()
        original(handler)

    monkeypatch.setitem(standin_module._ROUTES, ("POST", "/tokenize"), tokenize)
    return died


def test_a_server_that_dies_mid_scenario_fails_the_model_and_keeps_its_samples(
        standin, report_dir, monkeypatch, capsys):
    srv = standin()
    died = _die_on_tokenize_after(srv, monkeypatch, context_requests=2)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "3", "--context-sizes", "1k",
                  "--report-dir", str(report_dir)])
    out, err = capsys.readouterr()
    assert died.is_set()
    assert rc == 1 and "Traceback" not in err
    (model,) = json_report(report_dir)["models"]
    assert model["status"] == "failed" and model["error"].startswith("/tokenize failed: ")
    latency, context = model["scenarios"]
    assert len(latency["samples"]) == 3
    assert [s["ok"] for s in context["samples"]] == [True, True]  # measured before the death
    assert "standin: failed: /tokenize failed" in out


def test_a_tokenize_answer_without_a_count_fails_the_model_not_the_run(
        standin, report_dir, monkeypatch, capsys):
    srv = standin()

    def tokenize(handler):
        handler._send_json(200, {"tokens": [1, 2, 3]})

    monkeypatch.setitem(standin_module._ROUTES, ("POST", "/tokenize"), tokenize)
    rc = pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                  "--report-dir", str(report_dir)])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    (model,) = json_report(report_dir)["models"]
    assert model["error"] == ("/tokenize answered without count: '{\"tokens\":[1,2,3]}' "
                              "(is this a vLLM server?)")
    assert [sc["name"] for sc in model["scenarios"]] == ["latency", "context-1k"]


# ============================================================================
# Signals: the tool as a subprocess, interrupted at every point
# ============================================================================

# SIGHUP takes SIGTERM's handler and exit code: the full run tries it at every
# point, the quick run (-m "not slow") only SIGINT and SIGTERM.
SIGNALS = [("SIGINT", 130), ("SIGTERM", 143),
           pytest.param("SIGHUP", 143, marks=pytest.mark.slow, id="SIGHUP-143")]
LOOPS = ["asyncio", "uvloop"]  # PERFTEST_LOOP: for the tests that depend on the loop

# Runs main() with a hook that signals (or SIGKILLs) the process from inside
# a call, deterministically: WHERE ".json"/".txt" is inside the rename of the
# Nth report file of that kind ("while writing the report"; the signal comes
# before the rename is done); WHERE "write" is inside the tool's own write of
# the Nth benchmark chat request (ignore_eos: the answer check's are not
# counted) to its connection's transport (_Connection's, so on either event
# loop); WHERE "send" is inside the Nth socket send of one, deep in asyncio's
# transport code (uvloop writes in C and never calls socket.send: asyncio's
# loop only); WHERE "read" is inside the tool's protocol callback
# (_Connection.data_received) for the Nth read that carries SSE events.
# The driver exits 99 where its hook ran fewer than N times.
DRIVER = """\
import json, os, signal, socket, sys
sys.path.insert(0, {root!r})
import perftest_models as pm
sig, where, nth = getattr(signal, sys.argv[1]), sys.argv[2], int(sys.argv[3])
seen = []
def hit():
    seen.append(1)
    if len(seen) == nth:
        os.kill(os.getpid(), sig)
def chat(data):  # one of the benchmark's requests (ignore_eos), not the answer check's
    head, _, body = bytes(data).partition(b"\\r\\n\\r\\n")
    if not head.startswith(b"POST /v1/chat/completions "):
        return False
    try:
        return json.loads(body).get("ignore_eos") is True
    except ValueError:
        return False
real_replace, real_send = os.replace, socket.socket.send
def replace(src, dst):
    if str(dst).endswith(where):
        hit()
    return real_replace(src, dst)
def send(self, data, *flags):
    if where == "send" and chat(data):
        hit()
    return real_send(self, data, *flags)
class HookedWrites:
    def __init__(self, transport):
        self.transport = transport
    def __getattr__(self, name):
        return getattr(self.transport, name)
    def write(self, data):
        if where == "write" and chat(data):
            hit()
        return self.transport.write(data)
    def writelines(self, chunks):
        return self.write(b"".join(chunks))
real_made, real_received = pm._Connection.connection_made, pm._Connection.data_received
def connection_made(self, transport):
    real_made(self, HookedWrites(transport))
def data_received(self, data):
    if where == "read" and b"data: " in data:
        hit()
    return real_received(self, data)
os.replace, socket.socket.send = replace, send
pm._Connection.connection_made = connection_made
pm._Connection.data_received = data_received
rc = pm.main(sys.argv[4:])
if len(seen) < nth:
    print(f"driver: the hook at {{where!r}} ran {{len(seen)}} time(s), not {{nth}}", file=sys.stderr)
    rc = 99
raise SystemExit(rc)
"""


def start_run(srv, report_dir, *args, cwd, driver=None, loop=None):
    """The tool as a subprocess against `srv`, with plain pipes; on `loop`
    (PERFTEST_LOOP) where given, else on the loop this test run has."""
    cmd = [sys.executable, str(SCRIPT)]
    if driver is not None:
        path = cwd / "driver.py"
        path.write_text(DRIVER.format(root=str(ROOT)))
        cmd = [sys.executable, str(path), *driver]
    argv = ["--endpoint", srv.base_url, "--report-dir", str(report_dir), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "OPENAI_API_KEY")}
    if loop is not None:
        env["PERFTEST_LOOP"] = require_loop(loop)
    # As from a terminal: Ctrl-C at its default even where the test runner
    # was started with SIGINT ignored (a background job of a non-interactive
    # shell, as CI may be), which the child would otherwise inherit.
    return subprocess.Popen([*cmd, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc, timeout_s=30):
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the run did not exit in {timeout_s} s; stderr:\n{err}") from None
    assert "Traceback" not in err, err
    return proc.returncode, out, err


def assert_clean_report_dir(report_dir):
    """Both reports whole, no temp file, and nothing else."""
    names = sorted(p.name for p in report_dir.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".txt"), names
    report = json_report(report_dir)
    txt = next(report_dir.glob("*.txt")).read_text()
    assert txt.endswith("\n") and txt.startswith("perftest-models ")
    return report, txt


def mid_stream(srv, index):
    """True once chat request `index` is streaming tokens (counting the
    benchmark's requests, all sent with ignore_eos: not the answer check's)."""
    records = [r for r in srv.records if r.body.get("ignore_eos")]
    return len(records) > index and records[index].first_token_at is not None


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_during_the_warm_up_saves_the_report_and_exits_with_its_code(
        standin, report_dir, tmp_path, name, code):
    srv = standin(itl_s=0.2)  # the 50-token warm-up takes 10 s
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k", cwd=tmp_path)
    wait_for(lambda: mid_stream(srv, 0), what="the warm-up to stream")
    proc.send_signal(getattr(signal, name))
    rc, out, err = finish(proc)
    assert rc == code
    report, txt = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name and report["finished_at"] is not None
    (model,) = report["models"]
    assert model["status"] == "interrupted" and model["error"] == f"interrupted by {name}"
    assert model["scenarios"] == []
    assert txt == out and f"interrupted by {name}: the results above are partial" in out
    assert f"standin: interrupted: interrupted by {name}" in out
    assert "report: " in err


def _slow_down_at_context_request(srv, monkeypatch, n, itl_s):
    """From the n-th context-sized chat request on (1-based), stream slowly.
    Set at the /tokenize that builds it: the client is sequential, so this
    point is deterministic and the earlier requests are not slowed."""
    original = standin_module._ROUTES[("POST", "/tokenize")]

    def tokenize(handler):
        if sum(r.prompt_tokens >= 900 for r in srv.records) >= n - 1:
            srv.config.itl_s = itl_s
        original(handler)

    monkeypatch.setitem(standin_module._ROUTES, ("POST", "/tokenize"), tokenize)


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_mid_scenario_keeps_every_sample_measured_so_far(
        standin, report_dir, tmp_path, monkeypatch, name, code):
    srv = standin()
    _slow_down_at_context_request(srv, monkeypatch, n=2, itl_s=0.5)
    proc = start_run(srv, report_dir, "--iterations", "3", "--context-sizes", "1k,2k",
                     cwd=tmp_path)
    # warm-up, 3 latency, then context-1k: its 2nd request (chat record 5) streams slowly
    wait_for(lambda: mid_stream(srv, 5), what="the second context request to stream")
    proc.send_signal(getattr(signal, name))
    rc, _, _ = finish(proc)
    assert rc == code
    report, txt = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    (model,) = report["models"]
    latency, context = model["scenarios"]  # context-2k never started
    assert [s["ok"] for s in latency["samples"]] == [True] * 3
    assert context["name"] == "context-1k" and context["requests"] == 3
    assert [s["ok"] for s in context["samples"]] == [True]  # the one done before the signal
    assert context["summary"]["ttft_ms"]["n"] == 1
    assert "context-1k: 1000 tokens in, 100 out, x3" in txt


def _block_nth_get(srv, monkeypatch, path, nth):
    """Hold the n-th GET of `path` until released; returns (entered, release)."""
    original = standin_module._ROUTES[("GET", path)]
    entered, release, calls = threading.Event(), threading.Event(), []

    def handler(h):
        calls.append(1)
        if len(calls) == nth:
            entered.set()
            release.wait(30)
        original(h)

    monkeypatch.setitem(standin_module._ROUTES, ("GET", path), handler)
    return entered, release


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_between_scenarios_keeps_the_finished_ones(
        standin, report_dir, tmp_path, monkeypatch, name, code):
    srv = standin()
    # /metrics is scraped before and after each scenario: the 3rd scrape is the
    # one before context-1k, after the latency scenario was saved.
    entered, release = _block_nth_get(srv, monkeypatch, "/metrics", 3)
    proc = start_run(srv, report_dir, "--iterations", "2", "--context-sizes", "1k",
                     cwd=tmp_path)
    try:
        assert entered.wait(20), "the run never reached the second scenario"
        saved = json_report(report_dir)  # the mid-run save, on disk already
        assert [sc["name"] for sc in saved["models"][0]["scenarios"]] == ["latency"]
        assert saved["interrupted"] is None and saved["finished_at"] is None
        proc.send_signal(getattr(signal, name))
        rc, _, _ = finish(proc)
    finally:
        release.set()
    assert rc == code
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    (model,) = report["models"]
    assert model["status"] == "interrupted"
    assert [sc["name"] for sc in model["scenarios"]] == ["latency"]
    assert len(model["scenarios"][0]["samples"]) == 2


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_while_the_final_report_is_written_finishes_it_then_exits(
        standin, report_dir, tmp_path, name, code):
    srv = standin()
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=[name, ".txt", "1"])
    rc, out, _ = finish(proc)
    assert rc == code
    report, txt = assert_clean_report_dir(report_dir)
    assert txt == out
    # The signal came after every model had finished: nothing was cut short.
    assert report["interrupted"] is None and report["models"][0]["status"] == "ok"
    assert len(report["models"][0]["scenarios"]) == 2


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_during_a_mid_run_save_leaves_no_temp_file_and_a_whole_report(
        standin, report_dir, tmp_path, name, code):
    srv = standin()
    # the first .json rename is the save after the latency scenario
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=[name, ".json", "1"])
    rc, _, _ = finish(proc)
    assert rc == code
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    assert [sc["name"] for sc in report["models"][0]["scenarios"]] == ["latency"]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_inside_the_tools_request_write_saves_the_report_and_exits_with_its_code(
        standin, report_dir, tmp_path, name, code, loop):
    srv = standin()
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=[name, "write", "2"], loop=loop)  # 1st latency request
    rc, _, err = finish(proc)
    assert rc == code, err
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    (model,) = report["models"]
    assert model["status"] == "interrupted" and model["error"] == f"interrupted by {name}"
    # The signal is raised on the loop's next turn: the one latency request
    # may finish first, but context-1k never starts.
    assert [sc["name"] for sc in model["scenarios"]] in ([], ["latency"])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_inside_the_tools_read_callback_saves_the_report_and_exits_with_its_code(
        standin, report_dir, tmp_path, name, code, loop):
    # Raised inside a protocol callback, uvloop would log it as a "Fatal
    # error on transport", close the connection and go on: the signal lost.
    srv = standin(itl_s=0.01)
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=[name, "read", "3"], loop=loop)  # mid warm-up
    rc, _, err = finish(proc)
    assert rc == code, err
    assert "Fatal error" not in err
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    (model,) = report["models"]
    assert model["status"] == "interrupted" and model["scenarios"] == []


@pytest.mark.parametrize("name, code", SIGNALS)
def test_a_signal_inside_a_socket_write_is_not_swallowed_by_asyncio(
        standin, report_dir, tmp_path, name, code):
    # asyncio's transports catch BaseException around sock.send() and log it
    # as a "Fatal write error"; only KeyboardInterrupt and SystemExit go on.
    # asyncio's own loop: uvloop writes in C, with no socket.send to hook.
    srv = standin()
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=[name, "send", "2"],  # the first latency request
                     loop="asyncio")
    rc, _, err = finish(proc)
    assert rc == code and "Fatal write error" not in err
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == name
    assert report["models"][0]["status"] == "interrupted"


def test_a_second_signal_while_an_interrupted_run_saves_keeps_the_first_code(
        standin, report_dir, tmp_path):
    srv = standin(itl_s=0.2)
    # SIGTERM again inside the rename of the text report, after Ctrl-C mid-request
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=["SIGTERM", ".txt", "1"])
    wait_for(lambda: mid_stream(srv, 0), what="the warm-up to stream")
    proc.send_signal(signal.SIGINT)
    rc, _, _ = finish(proc)
    assert rc == 130
    report, _ = assert_clean_report_dir(report_dir)
    assert report["interrupted"] == "SIGINT"


def test_ctrl_c_before_any_model_starts_is_a_quiet_exit_130(tmp_path, monkeypatch):
    # the server answers /v1/models only after a long time: Ctrl-C while planning
    srv = standin_module.StandinServer(standin_module.StandinConfig(quiet=True))
    entered, release = _block_nth_get(srv, monkeypatch, "/v1/models", 1)
    try:
        proc = start_run(srv, tmp_path / "reports", cwd=tmp_path)
        assert entered.wait(20)
        proc.send_signal(signal.SIGINT)
        rc, out, err = finish(proc)
    finally:
        release.set()
        srv.stop()
    assert (rc, out, err) == (130, "", "perftest-models: interrupted\n")
    assert not (tmp_path / "reports").exists()  # nothing measured, nothing written


# ============================================================================
# SIGKILL and the atomic write: the last complete version, nothing half-written
# ============================================================================


def test_sigkill_mid_run_leaves_the_last_complete_json(standin, report_dir, tmp_path,
                                                       monkeypatch):
    srv = standin()
    _slow_down_at_context_request(srv, monkeypatch, n=1, itl_s=0.5)
    proc = start_run(srv, report_dir, "--iterations", "2", "--context-sizes", "1k",
                     cwd=tmp_path)
    wait_for(lambda: mid_stream(srv, 3), what="the first context request to stream")
    proc.kill()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    (path,) = report_dir.iterdir()  # the JSON, and no temp file, no text report
    assert path.suffix == ".json"
    report = json.loads(path.read_text())
    assert report["finished_at"] is None and report["interrupted"] is None
    (model,) = report["models"]
    assert model["status"] == "running"
    assert [sc["name"] for sc in model["scenarios"]] == ["latency"]
    assert [s["ok"] for s in model["scenarios"][0]["samples"]] == [True, True]


def test_sigkill_inside_the_rename_leaves_the_previous_version_and_one_temp_file(
        standin, report_dir, tmp_path):
    srv = standin()
    # killed at the second JSON save (after context-1k), between write and rename
    proc = start_run(srv, report_dir, "--iterations", "1", "--context-sizes", "1k",
                     cwd=tmp_path, driver=["SIGKILL", ".json", "2"])
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (path,) = report_dir.glob("*.json")
    previous = json.loads(path.read_text())
    assert [sc["name"] for sc in previous["models"][0]["scenarios"]] == ["latency"]
    (temp,) = report_dir.glob(".*")  # whole (it was fsynced), hidden, never read as a report
    assert temp.name.startswith(f".{path.name}.") and temp.name.endswith(".tmp")
    assert len(json.loads(temp.read_text())["models"][0]["scenarios"]) == 2

    # A later run into the same folder clears what a killed run left ...
    fresh = report_dir / f".{path.name}.concurrent.tmp"  # ... but not a live run's temp
    fresh.write_text("{}")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    pm.prepare_report_dir(report_dir)
    assert not temp.exists() and fresh.exists()


def test_reports_get_the_mode_a_plain_open_would_give_them(standin, report_dir):
    srv = standin()
    old = os.umask(0o022)
    try:
        assert pm.main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                        "--report-dir", str(report_dir)]) == 0
        os.umask(0o077)
        pm.atomic_write(report_dir / "private.json", "{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in report_dir.iterdir()}
    assert modes.pop("private.json") == 0o600  # the umask decides, as with open()
    assert sorted(modes.values()) == [0o644, 0o644]  # the .json and .txt reports


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    pm.atomic_write(target, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        pm.atomic_write(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ============================================================================
# The report folder: missing, unwritable, full
# ============================================================================


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders (`tmpfs(size="64k", ro=False)`); skips the
    test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size="64k", ro=False) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def run_main(argv, capsys):
    rc = pm.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_a_missing_report_folder_is_created(standin, tmp_path, capsys):
    srv = standin()
    folder = tmp_path / "a" / "b" / "reports"
    rc, _, _ = run_main(["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
                         "--report-dir", str(folder)], capsys)
    assert rc == 0 and len(list(folder.glob("*.json"))) == 1


def _unwritable_is_refused_before_any_model_starts(srv, folder, capsys, because):
    rc, out, err = run_main(["--endpoint", srv.base_url, "--iterations", "1",
                             "--context-sizes", "1k", "--report-dir", str(folder)], capsys)
    assert rc == 2 and out == ""
    assert err == (f"perftest-models: error: report folder {folder} is not writable ({because}): "
                   "fix its permissions or free space, or choose --report-dir\n")
    assert srv.records == []  # no model started: not even a warm-up request


def test_a_report_folder_under_a_regular_file_is_refused_before_any_model_starts(
        standin, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _unwritable_is_refused_before_any_model_starts(standin(), tmp_path / "file" / "reports",
                                                   capsys, "Not a directory")


def test_a_report_folder_that_is_a_file_is_refused(standin, tmp_path, capsys):
    (tmp_path / "reports").write_text("x")
    _unwritable_is_refused_before_any_model_starts(standin(), tmp_path / "reports", capsys,
                                                   "File exists")


def test_a_read_only_report_folder_is_refused_before_any_model_starts(standin, tmpfs, capsys):
    _unwritable_is_refused_before_any_model_starts(standin(), tmpfs(ro=True), capsys,
                                                   "Read-only file system")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_report_folder_without_write_permission_is_refused(standin, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir(mode=0o555)
    _unwritable_is_refused_before_any_model_starts(standin(), folder, capsys, "Permission denied")


def test_a_full_disk_is_refused_before_any_model_starts(standin, tmpfs, capsys):
    folder = tmpfs(size="64k")
    with open(folder / "ballast", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:  # fill it to the last block
            f.write(b"\0" * 4096)
    _unwritable_is_refused_before_any_model_starts(standin(), folder, capsys,
                                                   "No space left on device")
    assert [p.name for p in folder.iterdir()] == ["ballast"]  # the probe cleaned up


def test_a_full_disk_says_one_line_and_nothing_after_it(tmpfs, tmp_path):
    # As a process: garbage collection at exit must not add "Exception ignored".
    folder = tmpfs(size="64k")
    subprocess.run(["dd", "if=/dev/zero", f"of={folder}/ballast", "bs=4k"], capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import perftest_models as pm; "
            "from pathlib import Path\n"
            "try: pm.prepare_report_dir(Path(sys.argv[2]))\n"
            "except pm.UsageError as e: print(e, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder)],
                          capture_output=True, text=True, timeout=30)
    assert proc.stderr.count("\n") == 1 and "No space left on device" in proc.stderr


def split_stdout(out):
    """stdout when the reports could not be saved: the text, then the JSON."""
    text, brace, rest = out.partition("\n{\n")
    return text, json.loads(brace.strip() + rest)


def test_a_disk_that_fills_up_mid_run_sends_the_whole_report_to_stdout(
        standin, report_dir, monkeypatch, capsys):
    srv = standin()
    real, calls = pm.atomic_write, []

    def atomic_write(path, text):  # the first save works, then the disk is full
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(pm, "atomic_write", atomic_write)
    rc, out, err = run_main(["--endpoint", srv.base_url, "--iterations", "2",
                             "--context-sizes", "1k,2k", "--report-dir", str(report_dir)], capsys)
    assert rc == 0
    assert err.count("warning: ") == 1  # said once, not after every scenario
    assert (f"warning: cannot write {report_dir}" in err
            and "(No space left on device); the results go to stdout instead" in err)
    assert err.endswith("report: stdout only\n")
    text, report = split_stdout(out)
    assert "context-2k: 2000 tokens in, 100 out, x2" in text and "Summary:" in text
    (model,) = report["models"]
    assert [sc["name"] for sc in model["scenarios"]] == ["latency", "context-1k", "context-2k"]
    assert all(len(sc["samples"]) == 2 for sc in model["scenarios"])
    assert report["finished_at"] is not None


def test_a_disk_that_recovers_before_the_end_gets_the_whole_report(
        standin, report_dir, monkeypatch, capsys):
    srv = standin()
    real, calls = pm.atomic_write, []

    def atomic_write(path, text):  # full for the mid-run saves only
        calls.append(path)
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(pm, "atomic_write", atomic_write)
    rc, out, err = run_main(["--endpoint", srv.base_url, "--iterations", "1",
                             "--context-sizes", "1k", "--report-dir", str(report_dir)], capsys)
    assert rc == 0 and err.count("warning: ") == 1
    assert "\n{\n" not in out  # the text only: the files hold everything
    report = json_report(report_dir)
    assert len(report["models"][0]["scenarios"]) == 2


def test_a_real_full_tmpfs_mid_run_loses_nothing(standin, tmpfs, capsys):
    folder = tmpfs(size="64k")  # room for the probe and a first save, not for the whole run
    srv = standin()
    rc, out, err = run_main(["--endpoint", srv.base_url, "--iterations", "6",
                             "--context-sizes", "1k,2k", "--report-dir", str(folder)], capsys)
    assert rc == 0
    assert err.count("warning: ") == 1 and "No space left on device" in err
    _, report = split_stdout(out)
    assert [len(sc["samples"]) for sc in report["models"][0]["scenarios"]] == [6, 6, 6]
    assert list(folder.glob(".*")) == []  # the failed writes left no temp file behind
    for path in folder.glob("*.json"):  # whatever made it to disk is whole
        json.loads(path.read_text())


# ============================================================================
# Bad input: one line that says what to do, exit 2 (test_cli.py has the rest)
# ============================================================================


def usage_error(argv, capsys, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and out == "", err
    assert err.startswith("perftest-models: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("option, value, message", [
    ("--iterations", "1.5", "expected a whole number >= 1, got '1.5'"),
    ("--iterations", "", "expected a whole number >= 1, got ''"),
    ("--throughput-requests", "-3", "argument --throughput-requests: must be >= 1, got -3"),
    ("--throughput-requests", "0", "argument --throughput-requests: must be >= 1, got 0"),
    ("--throughput-requests", "many", "argument --throughput-requests: expected a whole number"),
    ("--concurrency", "-4", "argument --concurrency: expected levels like 1,4,16,64, got '-4'"),
    ("--concurrency", "1,0", "argument --concurrency: expected levels like 1,4,16,64"),
    ("--concurrency", "1,x", "argument --concurrency: expected levels like 1,4,16,64"),
    ("--concurrency", ",", "argument --concurrency: expected at least one level"),
    ("--context-sizes", "-1k", "argument --context-sizes: expected sizes like 1k,8k"),
    ("--context-sizes", "0", "argument --context-sizes: expected sizes like 1k,8k"),
    ("--context-sizes", "1.5k", "argument --context-sizes: expected sizes like 1k,8k"),
    ("--port", "-1", "argument --port: must be >= 1, got -1"),
    ("--port", "0", "argument --port: must be >= 1, got 0"),
    ("--port", "http", "argument --port: expected a whole number >= 1, got 'http'"),
    ("--health-timeout", "0", "argument --health-timeout: must be a number > 0, got 0"),
    ("--health-timeout", "nan", "argument --health-timeout: must be a number > 0, got nan"),
    ("--health-timeout", "inf", "argument --health-timeout: must be a number > 0, got inf"),
    ("--health-timeout", "soon", "argument --health-timeout: expected a number > 0, got 'soon'"),
    ("--request-timeout", "-0.5", "argument --request-timeout: must be a number > 0, got -0.5"),
    ("--request-timeout", "1e999", "argument --request-timeout: must be a number > 0"),
    ("--request-timeout", "x", "argument --request-timeout: expected a number > 0, got 'x'"),
    ("--max-failures", "-1", "--max-failures must be >= 0, got -1"),
    ("--max-failures", "few", "argument --max-failures: invalid int value: 'few'"),
    ("--bandwidth-gbs", "-273", "argument --bandwidth-gbs: must be a number > 0, got -273"),
    ("--bandwidth-gbs", "0", "argument --bandwidth-gbs: must be a number > 0, got 0"),
    ("--bandwidth-gbs", "fast", "argument --bandwidth-gbs: expected a number > 0, got 'fast'"),
    ("--hardware", "tpu", "argument --hardware: invalid choice: 'tpu'"),
    ("--pull-timeout", "0", "argument --pull-timeout: must be a number > 0, got 0"),
    ("--pull-timeout", "inf", "argument --pull-timeout: must be a number > 0, got inf"),
    ("--pull", "sometimes", "argument --pull: invalid choice: 'sometimes'"),
])
def test_every_numeric_option_refuses_negative_and_non_numeric_values(
        option, value, message, capsys, monkeypatch):
    err = usage_error([f"{option}={value}"], capsys, cwd=ROOT, monkeypatch=monkeypatch)
    assert message in err and err.rstrip().endswith("(see --help)")


def test_a_context_size_that_no_served_model_fits_is_refused(standin, capsys):
    srv = standin(max_model_len=4096)
    err = usage_error(["--endpoint", srv.base_url, "--context-sizes", "1k,8k"], capsys)
    assert "context size 8000 tokens fits no selected model (largest context: 4096 tokens): " \
           "drop it from --context-sizes" in err
    assert srv.records == []


@pytest.mark.parametrize("content, message", [
    (b"", "is not a mapping of Compose keys"),
    (b"services: {}\n", "has no 'services:' mapping"),
    (b"services: [vllm-a, vllm-b]\n", "has no 'services:' mapping"),
    (b"services:\n  vllm-a: {image: x}\ncreated: 2024-13-45\n", "is not valid YAML (month must be"),
    pytest.param(b"[" * 5000, "is not valid YAML", id="nested-5000-deep"),
    (b"\xff\xfe binary \x00", "cannot be read"),
    (b"services: !!python/object/apply:os.system ['touch pwned']\n",
     "is not valid YAML (could not determine a constructor for the tag"),
])
def test_a_compose_file_that_is_not_one_is_refused_in_one_line(tmp_path, content, message,
                                                               capsys, monkeypatch):
    (tmp_path / "docker-compose.yml").write_bytes(content)
    err = usage_error([], capsys, cwd=tmp_path, monkeypatch=monkeypatch)
    assert message in err
    assert not (tmp_path / "pwned").exists()


def test_a_compose_file_that_is_a_folder_is_refused(tmp_path, capsys):
    err = usage_error(["--compose-file", str(tmp_path)], capsys)
    assert f"compose file {tmp_path} cannot be read" in err


MODEL = {"name": "m", "model_id": "org/m", "max_context_tokens": 4096}


@pytest.mark.parametrize("text, message", [
    ("", "expected a mapping with a 'models:' list"),
    ("- name: m\n", "expected a mapping with a 'models:' list"),
    ("models: {name: m}\n", "expected a mapping with a 'models:' list"),
    ("models: [just-a-name]\n", "each model must be a mapping"),
    ("models: [{model_id: x, max_context_tokens: 9}]\n", "model '?' lacks 'name': add it"),
    ("models: [{name: m, max_context_tokens: 9}]\n", "model 'm' lacks 'model_id': add it"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9}]\nreplace: yes please\n",
     "'replace' must be true or false"),
    ("models:\n- {name: m, model_id: x, max_context_tokens: 9, 1: one, colour: red}\n",
     "unknown field(s) 1, colour"),
    ("models: [{name: m, model_id: x, max_context_tokens: 1}]\n", "max_context_tokens must be >= 2"),
    ("models: [{name: m, model_id: '  ', max_context_tokens: 9}]\n", "model_id is empty"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9.5}]\n",
     "'max_context_tokens' must be int, not float"),
    ("models: [{name: m, service: 8000, model_id: x, max_context_tokens: 9}]\n",
     "'service' must be str or null, not int"),
    ("models: [{name: m, model_id: [x], max_context_tokens: 9}]\n", "'model_id' must be str, not list"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, architecture: 7}]\n",
     "'architecture' must be str, not int"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, params_total_b: big}]\n",
     "'params_total_b' must be int or float or null, not str"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, params_active_b: .nan}]\n",
     "'params_active_b' must be a number > 0, not nan"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, bytes_per_weight: -1}]\n",
     "'bytes_per_weight' must be a number > 0, not -1"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, chat_template_kwargs: [x]}]\n",
     "'chat_template_kwargs' must be dict or null, not list"),
    (("models: [{name: m, model_id: x, max_context_tokens: 9,"
      " chat_template_kwargs: {since: 2024-01-01}}]\n"),
     "'chat_template_kwargs' must hold only strings, numbers, booleans, lists and mappings"),
    ("models: [{name: m, model_id: x, max_context_tokens: 9, created: 2024-02-30}]\n",
     "is not valid YAML (day is out of range for month)"),
    ("models: !!python/object/new:os.system [touch pwned]\n",
     "is not valid YAML (could not determine a constructor for the tag"),
])
def test_a_models_file_with_missing_or_wrong_fields_is_refused_in_one_line(
        tmp_path, text, message, capsys, monkeypatch):
    (tmp_path / "models.yml").write_text(text)
    err = usage_error(["--models", "models.yml"], capsys, cwd=tmp_path, monkeypatch=monkeypatch)
    assert message in err
    assert not (tmp_path / "pwned").exists()


def test_a_missing_models_file_is_refused(tmp_path, capsys):
    err = usage_error(["--models", str(tmp_path / "nope.yml")], capsys)
    assert f"--models file {tmp_path / 'nope.yml'} not found: check the path" in err


@pytest.mark.parametrize("url", ["", "http://", "https://:8000", "file:///etc/passwd",
                                 "mailto:ops@example.com", "127.0.0.1:8000", "http://[::1",
                                 "http://127.0.0.1:99999", "//127.0.0.1:8000"])
def test_an_endpoint_that_is_not_an_http_url_is_refused_without_a_connection(
        url, tmp_path, capsys, monkeypatch):
    # run where a compose file exists: an empty --endpoint must not fall back to it
    (tmp_path / "docker-compose.yml").write_text("services:\n  vllm-qwen3-32b-fp8: {image: x}\n")
    err = usage_error(["--endpoint", url], capsys, cwd=tmp_path, monkeypatch=monkeypatch)
    assert f"--endpoint {url!r} is not an http(s) URL: use e.g. http://127.0.0.1:8000" in err


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/\x00", "http://127.0.0.1:9/\ud800"])
def test_an_endpoint_with_characters_no_url_may_hold_is_refused(url, capsys):
    err = usage_error(["--endpoint", url], capsys)
    assert "is not a valid URL: use e.g. http://127.0.0.1:8000" in err


class _Canned:
    """A tiny server that answers GET /v1/models with a fixed reply."""

    def __init__(self, status, body, content_type="application/json"):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (stdlib naming)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status, body, message", [
    (404, {"detail": "Not Found"}, "answered HTTP 404 without a model list"),
    (200, b"<html>hello</html>", "answered HTTP 200 without a model list"),
    (200, {"models": ["a"]}, "answered HTTP 200 without a model list"),
    (200, {"data": [{"name": "no id"}, "x", 3]}, "answered HTTP 200 without a model list"),
    (500, b"", "answered HTTP 500 without a model list"),
    (401, {"error": "Unauthorized"}, "wants an API key: pass --api-key or set VLLM_API_KEY"),
])
def test_a_server_that_is_not_openai_compatible_is_refused_in_one_line(status, body, message,
                                                                       capsys):
    server = _Canned(status, body)
    try:
        err = usage_error(["--endpoint", server.url], capsys)
    finally:
        server.stop()
    assert message in err


def test_a_server_with_a_nonsense_context_length_gets_the_default(capsys):
    server = _Canned(200, {"data": [{"id": "m", "max_model_len": "lots"},
                                    {"id": "n", "max_model_len": [1]}]})
    try:
        base = pm.check_endpoint_url(server.url)
        specs = pm.discover_endpoint_models(base, pm.MODELS, None)
    finally:
        server.stop()
    assert [(m.name, m.max_context_tokens) for m in specs] == [("m", 32768), ("n", 32768)]


# ============================================================================
# Fuzzing: the SSE parser, the YAML files, the command line
# ============================================================================

# Fixed seed and a bounded count (fewer in the quick run: property_budget.py),
# so CI is fast and repeatable; for a deeper random search:
# PERFTEST_FUZZ_EXAMPLES=20000 python3 -m pytest --timeout 0 -k "fuzz or sse"
_FUZZ_EXAMPLES = os.environ.get("PERFTEST_FUZZ_EXAMPLES")


def fuzz(full: int):
    return settings(max_examples=examples(full), deadline=None,
                    derandomize=_FUZZ_EXAMPLES is None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

# chunks shaped like vLLM's, with every field free to take any JSON value
chunk_like = st.fixed_dictionaries({}, optional={
    "choices": json_values | st.lists(st.fixed_dictionaries({}, optional={
        "delta": json_values | st.fixed_dictionaries({}, optional={
            "content": json_values, "reasoning_content": json_values, "reasoning": json_values,
            "role": json_values}),
        "finish_reason": json_values}), max_size=2),
    "usage": json_values | st.fixed_dictionaries({}, optional={
        "prompt_tokens": json_values, "completion_tokens": json_values,
        "prompt_tokens_details": json_values}),
    "error": json_values,
})


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def check_sample(s):
    assert isinstance(s, pm.Sample)
    if s.ok:
        assert s.error is None and isinstance(s.tokens_out, int) and s.tokens_out >= 1
        assert s.ttft_ms is not None and s.total_s is not None
        assert len(s.itl_ms) <= s.tokens_out
    else:
        assert isinstance(s.error, str) and s.error


@fuzz(200)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_the_sse_parser_survives_any_bytes_in_any_split(data, cuts):
    reads = [(0.001 * i, b) for i, b in enumerate(split_at(data, cuts))]
    check_sample(pm.measure_stream(0.0, reads, 20))


@fuzz(200)
@given(events=st.lists(st.one_of(chunk_like.map(json.dumps), json_values.map(json.dumps),
                                 st.sampled_from(["[DONE]", "{not json", "", "[" * 3000])),
                       max_size=8),
       done=st.booleans(), crlf=st.booleans(), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_the_sse_parser_survives_any_events_and_any_chunk_boundaries(events, done, crlf, cuts):
    sep = b"\r\n" if crlf else b"\n"
    body = b"".join(b"data: " + e.encode("utf-8", "surrogatepass") + sep + sep for e in events)
    body += (b"data: [DONE]" + sep + sep) if done else b""
    whole = pm.measure_stream(0.0, [(1.0, body)], 20)
    check_sample(whole)
    # with every read at the same moment, where the reads split cannot matter
    split = pm.measure_stream(0.0, [(1.0, part) for part in split_at(body, cuts)], 20)
    assert split == whole


def sse(*events, done=True):
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return [(0.5, body + (b"data: [DONE]\n\n" if done else b""))]


TOKEN = {"choices": [{"delta": {"content": " tok"}}]}


@pytest.mark.parametrize("event, reason", [
    ({"choices": {"0": {"delta": {"content": "x"}}}}, "stream finished without any generated token"),
    ({"choices": 5}, "stream finished without any generated token"),
    ({"choices": ["x"]}, "stream finished without any generated token"),
    ({"error": {"message": ["not", "a", "string"]}}, "error event in stream: ['not', 'a', 'string']"),
])
def test_chunks_of_the_wrong_shape_fail_the_sample_not_the_parser(event, reason):
    s = pm.measure_stream(0.0, sse(event), 5)
    assert not s.ok and s.error == reason


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 5, "completion_tokens": True},
    {"prompt_tokens": 5, "completion_tokens": 10**12},  # would have built a 10^12-entry list
    {"prompt_tokens": "5", "completion_tokens": 3},
    {"prompt_tokens": 5, "completion_tokens": -3},
])
def test_usage_with_implausible_counts_fails_the_sample(usage):
    s = pm.measure_stream(0.0, sse(TOKEN, TOKEN, {"choices": [], "usage": usage}), 5)
    assert not s.ok and s.error.startswith("usage without valid token counts: ")


def test_odd_prompt_token_details_are_ignored_not_fatal():
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": ["x"]}
    s = pm.measure_stream(0.0, sse(TOKEN, TOKEN, {"choices": [], "usage": usage}), 2)
    assert s.ok and s.cached_tokens is None


def test_continuous_usage_that_overcounts_falls_back_to_an_even_spread():
    t = [(0.1, b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1}}\n\n'),
         (0.2, (b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"completion_tokens":10000000}}'
                b'\n\n')),
         (0.3, (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3}}\n\n'
                b"data: [DONE]\n\n"))]
    s = pm.measure_stream(0.0, t, 3)
    assert s.ok and s.itl_ms == pytest.approx((50.0, 50.0))  # 2 tokens over the one 100 ms gap


def test_a_deeply_nested_event_is_malformed_not_a_recursion_error():
    s = pm.measure_stream(0.0, [(0.1, b"data: " + b"[" * 100_000 + b"\n\ndata: [DONE]\n\n")], 5)
    assert not s.ok and s.error.startswith("malformed SSE event: '[[[[")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.dates()
    | st.text(max_size=10) | st.sampled_from(["qwen", "vllm-qwen", "org/m", "a b", "-rm", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8) | st.integers(0, 3), inner, max_size=4),
    max_leaves=10)

model_entries = st.fixed_dictionaries({}, optional={
    key: yaml_values | st.sampled_from(good) for key, good in {
        "name": ["m", "qwen3-32b-fp8"], "service": ["vllm-m", None], "model_id": ["org/m"],
        "max_context_tokens": [4096, 1, 2], "architecture": ["Dense"],
        "params_total_b": [32.8, 0], "params_active_b": [3.3], "bytes_per_weight": [1.0, 2],
        "chat_template_kwargs": [{"enable_thinking": False}, None]}.items()
}) | yaml_values


def assert_loads_or_usage_error(load, path):
    try:
        result = load(path)
    except pm.UsageError:
        return None
    return result


@fuzz(150)
@given(text=st.text(max_size=300) | st.sampled_from([
    "models:\n- {name: m, model_id: x, max_context_tokens: 9, since: 2024-13-45}\n",
    "services: !!python/name:os.system\n", "a: &x [*x]\n", "? [a]\n: b\n", "%YAML 9.9\n---\n"]))
def test_fuzz_the_yaml_files_give_a_model_table_or_a_usage_error(text, tmp_path):
    path = tmp_path / "f.yml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for spec in assert_loads_or_usage_error(lambda p: pm.load_models_file(p, pm.MODELS), path) or ():
        assert isinstance(spec, pm.ModelSpec)
    assert_loads_or_usage_error(pm.load_compose_file, path)


@fuzz(200)
@given(doc=st.fixed_dictionaries({"models": st.lists(model_entries, max_size=3)},
                                 optional={"replace": yaml_values}) | yaml_values,
       compose=st.fixed_dictionaries({}, optional={"services": yaml_values, "name": yaml_values}))
def test_fuzz_a_loaded_model_is_valid_and_fits_in_a_request_and_a_report(doc, compose, tmp_path):
    import yaml

    path = tmp_path / "models.yml"
    path.write_text(yaml.safe_dump(doc))
    for spec in assert_loads_or_usage_error(lambda p: pm.load_models_file(p, ()), path) or ():
        assert pm.NAME_RE.match(spec.name) and spec.max_context_tokens >= 2
        assert spec.service is None or pm.NAME_RE.match(spec.service)
        json.dumps(pm.model_to_dict(pm.ModelResult(spec), 273.0), allow_nan=False)
        pm.chat_payload(spec.model_id, pm.latency_messages("n"), 5, 0.7,
                        spec.chat_template_kwargs, "n")
    path.write_text(yaml.safe_dump(compose))
    loaded = assert_loads_or_usage_error(pm.load_compose_file, path)
    if loaded is not None:  # a project name Compose accepts, never an option
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", loaded.project), loaded.project


# --- the command line --------------------------------------------------------

OPTIONS = ["--skip", "--only", "--models", "--endpoint", "--api-key", "--iterations",
           "--context-sizes", "--concurrency", "--throughput-requests", "--hardware",
           "--bandwidth-gbs", "--compose-file", "--port", "--health-timeout",
           "--request-timeout", "--max-failures", "--report-dir", "--version", "--help",
           "--end", "--iter", "compare", "-h", "--", "-"]
PATHS = ["missing.yml", "folder", "bad.yml", "list.yml", "models.yml", "nested/x.yml", ""]
URLS = ["http://127.0.0.1:8000", "http://127.0.0.1:8000/v1", "https://127.0.0.1",
        "http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1", "127.0.0.1:8000",
        "http://127.0.0.1:1/\x00", ""]
numbers = (st.integers(-10, 10**6).map(str) | st.floats().map(str)
           | st.sampled_from(["1k,8k", "1,4", "-1k", "k", ",", "0x10", "1e3", "1_000", "٣"]))
argv_values = (numbers | st.text(max_size=12)
               | st.sampled_from(["dgx-spark", "qwen3-32b-fp8", "standin", "nope", *PATHS, *URLS]))
# values that fit their option reach the checks behind the parser
fitting = {"--endpoint": st.sampled_from(URLS),
           "--models": st.sampled_from(PATHS), "--compose-file": st.sampled_from(PATHS),
           "--report-dir": st.sampled_from(PATHS), "--skip": st.sampled_from(["standin", "nope"]),
           "--only": st.sampled_from(["standin", "qwen3-32b-fp8"])}
pairs = st.sampled_from([*OPTIONS, *fitting, *fitting]).flatmap(
    lambda opt: st.tuples(st.just(opt), fitting.get(opt, numbers)).map(list))
flat = lambda parts: [tok for part in parts for tok in part]  # noqa: E731
argv_lists = (st.lists(pairs, max_size=4).map(flat)  # well-formed: past argparse, into the checks
              | st.lists(pairs | st.one_of(st.sampled_from(OPTIONS), argv_values).map(
                  lambda x: [x]), max_size=6).map(flat))


@pytest.fixture
def fuzz_sandbox(tmp_path_factory, monkeypatch):
    """A folder with bad files and no compose file; no network, no Docker:
    the one 'server' answers for 127.0.0.1:8000 from memory, every other URL
    is refused, and a plan that passes every check is recorded, not run."""
    import httpx

    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "folder").mkdir()
    (folder / "bad.yml").write_text("services: [")
    (folder / "list.yml").write_text("- a\n- b\n")
    (folder / "models.yml").write_text(
        "models: [{name: standin, model_id: standin, max_context_tokens: 40960}]\n")
    monkeypatch.chdir(folder)
    planned = []

    def fake_get(url, **kwargs):
        request = httpx.Request("GET", url)  # httpx's own URL checks, then no socket
        if request.url.host == "127.0.0.1" and request.url.port == 8000:
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": "standin", "max_model_len": 40960}]}, request=request)
        raise httpx.ConnectError("refused (fuzz: no network)", request=request)

    def no_docker(*args, **kwargs):
        raise AssertionError("a fuzzed command line reached Docker")

    monkeypatch.setattr(httpx, "get", fake_get)
    monkeypatch.setattr(pm, "run_benchmark", lambda plan, *a, **k: planned.append(plan) or 0)
    for name in ("find_compose_command", "docker_client", "_run"):
        monkeypatch.setattr(pm, name, no_docker)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return planned


@fuzz(300)
@given(argv=argv_lists)
@example(argv=["--endpoint", "http://[::1"])  # each of these once ended in a traceback
@example(argv=["--endpoint", "http://127.0.0.1:1/\x00"])
@example(argv=["--models", "list.yml"])
@example(argv=["--skip", "a\nb"])
def test_fuzz_the_command_line_never_shows_a_traceback(argv, fuzz_sandbox, capsys):
    try:
        rc = pm.main(argv)
    except SystemExit as exc:  # --help and --version exit from argparse, with 0
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc in (0, 1, 2, 3, 130, 143)
    assert "Traceback" not in err and "Traceback" not in out
    if rc == 2:
        assert out == "" and err.startswith("perftest-models: error: ") and err.count("\n") == 1
    if rc == 0 and fuzz_sandbox:  # a plan that passed every check: a sane one
        plan = fuzz_sandbox.pop()
        assert plan.base_url == "http://127.0.0.1:8000" and plan.compose is None
        assert plan.cfg.iterations >= 1 and all(s >= 1 for s in plan.cfg.context_sizes)


@pytest.mark.parametrize("argv, shown", [
    (["--skip", "a\nb"], "unknown model 'a\\nb'"),
    (["--frob\nnicate"], "unrecognized arguments: --frob\\nnicate"),
    (["--compose-file", "x\x1b[31mred.yml"], "compose file x\\x1b[31mred.yml not found"),
])
def test_input_with_control_characters_is_shown_escaped_on_one_line(argv, shown, capsys,
                                                                    monkeypatch):
    err = usage_error(argv, capsys, cwd=ROOT, monkeypatch=monkeypatch)
    assert shown in err and "\x1b" not in err


# ============================================================================
# Security: no shell, safe YAML, names checked, the API key never written
# ============================================================================


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_the_source_never_uses_a_shell_or_an_unsafe_yaml_loader():
    import ast

    tree = ast.parse(SCRIPT.read_text())
    found = []
    for node, owner, name in _calls(tree):
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and not kw.value.value):
                found.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
        if (owner, name) in {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                             ("subprocess", "getstatusoutput"), ("os", "execl"), ("os", "spawnl")}:
            found.append(f"line {node.lineno}: {owner}.{name}")
        if owner == "yaml" and name not in ("safe_load", "SafeLoader", "YAMLError"):
            found.append(f"line {node.lineno}: yaml.{name}")
        if owner == "subprocess" or name == "runner":  # the argv is a list, never a string
            first = node.args[0] if node.args else None
            if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:60]}")
        if name in ("eval", "exec", "compile", "__import__") and not owner:
            found.append(f"line {node.lineno}: {name}()")
    assert found == []
    assert "yaml.safe_load(" in SCRIPT.read_text()


class Recorder:
    """A subprocess.run stand-in that keeps every call's argv and options."""

    def __init__(self, stdout="", returncode=0):
        self.calls, self.stdout, self.returncode = [], stdout, returncode

    def __call__(self, argv, **kwargs):
        self.calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, "")


def test_every_external_command_is_an_argv_list_without_a_shell(tmp_path, monkeypatch):
    # a compose path with shell characters stays one argument
    path = tmp_path / "my compose; rm -rf ~.yml"
    path.write_text("services:\n  vllm-a: {image: x}\n")
    rec = Recorder(stdout="150\n")
    compose = pm.Compose(pm.load_compose_file(path), ("docker", "compose"), rec)
    compose.up("vllm-a")
    compose.stop(["vllm-a"])
    compose.running(["vllm-a"])
    pm._run(["docker", "version"], rec)
    monkeypatch.setattr(pm.shutil, "which", lambda name: f"/usr/bin/{name}")
    pm.find_compose_command(rec)
    pm.collect_environment(rec)
    assert len(rec.calls) == 6  # up, stop, ps, _run, compose version, nvidia-smi
    for argv, kwargs in rec.calls:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), argv
        assert kwargs.get("shell", False) is False
    assert rec.calls[0][0][:4] == ["docker", "compose", "-f", str(path)]


@pytest.mark.parametrize("bad", ["-d", "--rm", "a b", "a\nb", "x" * 129, "", "../etc", "a/b",
                                 "é", "name;", "$(id)", "`id`", "a|b", "a&b", ">x", "a*"])
@pytest.mark.parametrize("field", ["name", "service"])
def test_names_from_yaml_are_checked_before_any_command_line(bad, field, tmp_path):
    import yaml

    entry = {"name": "m", "model_id": "org/m", "max_context_tokens": 9, field: bad}
    path = tmp_path / "models.yml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    with pytest.raises(pm.UsageError, match="is not a valid name"):
        pm.load_models_file(path, pm.MODELS)


def test_the_built_in_names_and_any_project_name_are_safe_arguments(tmp_path, monkeypatch):
    for m in pm.MODELS:
        assert pm.NAME_RE.match(m.name) and pm.NAME_RE.match(m.service)
    monkeypatch.delenv("COMPOSE_PROJECT_NAME", raising=False)
    for raw in ("--rm -f", "-_-x", "; rm -rf /", "$(id)", "---"):
        project = pm.compose_project_name(tmp_path / "c.yml", {"name": raw})
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project), project


def test_a_yaml_file_with_a_python_tag_is_read_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    for name in ("compose.yml", "models.yml"):
        path = tmp_path / name
        path.write_text(f"services: !!python/object/apply:os.system ['touch {sentinel}']\n"
                        f"models: !!python/object/apply:os.system ['touch {sentinel}']\n")
        with pytest.raises(pm.UsageError, match="could not determine a constructor"):
            pm.load_compose_file(path)
        with pytest.raises(pm.UsageError, match="could not determine a constructor"):
            pm.load_models_file(path, pm.MODELS)
    assert not sentinel.exists()


KEY = "sk-CANARY-7f3a9b-do-not-log"


def assert_key_nowhere(key, *texts, folder=None):
    for text in texts:
        assert key not in text
        assert key[3:] not in text  # not even without its prefix
    for path in (folder.rglob("*") if folder else ()):
        if path.is_file():
            assert key[3:].encode() not in path.read_bytes(), path


def run_with_key(srv, report_dir, tmp_path, how, key=KEY, extra=()):
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "OPENAI_API_KEY")}
    argv = ["--endpoint", srv.base_url, "--iterations", "1", "--context-sizes", "1k",
            "--report-dir", str(report_dir), *extra]
    if how == "--api-key":
        argv += ["--api-key", key]
    else:
        env[how] = key
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("how", ["--api-key", "OPENAI_API_KEY", "VLLM_API_KEY"])
def test_the_api_key_is_sent_as_a_bearer_token_and_never_written(standin, report_dir, tmp_path,
                                                                  how):
    srv = standin(api_key=KEY)
    proc = run_with_key(srv, report_dir, tmp_path, how)
    assert proc.returncode == 0, proc.stderr
    assert {r.headers.get("Authorization") for r in srv.records} == {f"Bearer {KEY}"}
    assert len(list(report_dir.iterdir())) == 2
    assert_key_nowhere(KEY, proc.stdout, proc.stderr, folder=report_dir)


def test_a_rejected_api_key_is_never_echoed(standin, report_dir, tmp_path):
    srv = standin(api_key="the-right-one")
    proc = run_with_key(srv, report_dir, tmp_path, "VLLM_API_KEY")
    assert proc.returncode == 2
    assert proc.stderr.endswith("wants an API key: pass --api-key or set VLLM_API_KEY\n")
    assert_key_nowhere(KEY, proc.stdout, proc.stderr)


def test_a_key_revoked_mid_run_fails_requests_with_401_and_is_never_written(
        standin, report_dir, tmp_path, monkeypatch):
    srv = standin(api_key=KEY)
    original = standin_module._ROUTES[("POST", "/v1/chat/completions")]

    def chat(handler):  # the warm-up passed the key check; every request after it fails
        srv.config.api_key = "rotated"
        original(handler)

    monkeypatch.setitem(standin_module._ROUTES, ("POST", "/v1/chat/completions"), chat)
    proc = run_with_key(srv, report_dir, tmp_path, "--api-key", extra=["--max-failures", "0"])
    assert proc.returncode == 1
    assert "[1/1] latency: FAILED: HTTP 401: Unauthorized" in proc.stderr
    report = json_report(report_dir)
    assert report["models"][0]["error"].endswith("last: HTTP 401: Unauthorized")
    assert_key_nowhere(KEY, proc.stdout, proc.stderr, folder=report_dir)


def test_the_plan_and_the_config_hold_no_key(standin, monkeypatch):
    srv = standin(api_key=KEY)
    args = pm.build_parser().parse_args(["--endpoint", srv.base_url])
    plan = pm.make_plan(args, environ={"VLLM_API_KEY": KEY})
    assert plan.api_key == KEY
    assert KEY not in repr(plan) and KEY not in json.dumps(pm.dataclasses.asdict(plan.cfg))


@fuzz(100)
@given(when=st.datetimes(timezones=st.timezones()))
def test_report_file_names_stay_inside_the_report_folder(when, tmp_path):
    stem = pm.report_stem(when)  # the stem is a timestamp, never user input
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".")
    if when.year >= 1000:  # %Y pads no earlier year; the stems come from _now() anyway
        assert re.fullmatch(r"model-comparison-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", stem), stem
    files = pm.ReportFiles(tmp_path, stem, io.StringIO())
    for path in (files.json_path, files.txt_path):
        assert path.parent == tmp_path and path.resolve().parent == tmp_path.resolve()


# ============================================================================
# Load: the soak script, in miniature (the figures are in docs/faults.md)
# ============================================================================


@pytest.mark.slow  # a soak: seconds of real traffic
def test_the_soak_script_loses_no_sample_and_leaks_no_descriptor():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--requests", "192",
                           "--concurrency", "32", "--per-stream", "2", "--tokens-out", "8",
                           "--ttft-s", "0", "--itl-s", "0", "--faults"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["requests"] == figures["samples"] == 192 and figures["samples_lost"] == 0
    assert figures["fds_after"] == figures["fds_before"] and figures["fd_leak"] == 0
    # each round of 64 meets, at 9, 19, ... 59: reset, close, 500, 503, reset, close
    assert figures["failed"] == 3 * 5 and figures["retries"] == 3 * 1
    assert figures["server_chat_requests"] == 192 + figures["retries"]
