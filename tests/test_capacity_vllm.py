"""The capacity search against a real vLLM on the CPU (slow).

The server runs with `--max-num-seqs 1`: one request at a time, so a second
stream waits for the first to finish and its end-to-end time about doubles,
whatever the CPU's speed and however the starved frontend flushes its tokens
(see tests/test_e2e_vllm.py: per-token timing is not to be trusted there, the
end of a stream is). Under e2e_p50_s <= 1.5 x the time of one request alone,
the capacity is 1 stream and 2 break it: the search must end there, within
its small budget, with the e2e rule as what limited it.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

import pytest

from test_e2e_vllm import BareVllm, require_vllm, run_tool, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOKENS_OUT = 256  # the throughput prompt's output length, as the probes send


def one_request_s(base_url: str) -> float:
    """Wall time of one streamed answer like a probe's (about 512 tokens in)."""
    body = {"model": "tiny", "stream": True, "max_tokens": TOKENS_OUT, "min_tokens": TOKENS_OUT,
            "ignore_eos": True, "temperature": 0.7,
            "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(480))}]}
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
    return time.perf_counter() - t0


@pytest.mark.timeout(900)
def test_the_capacity_search_on_real_vllm_ends_with_a_capacity_and_the_rule_that_broke(tmp_path):
    require_vllm()
    server = BareVllm(tmp_path / "vllm-serve.log", ("--max-num-seqs", "1"))
    try:
        wait_healthy(server.url, 300, server.alive)
        alone = statistics.median(one_request_s(server.url) for _ in range(3))
        slo = f"e2e_p50_s<={1.5 * alone:.2f}"
        run = run_tool(["--endpoint", server.url, "--iterations", "1", "--context-sizes", "1k",
                        "--slo", slo, "--max-concurrency", "4", "--capacity-budget", "300",
                        "--throughput-requests", "6"], tmp_path)
        assert run.proc.returncode == 0, run.explain(server.log_tail())
    finally:
        server.stop()
    (m,) = run.report["models"]
    cap = m["capacity"]
    seen = [(p["concurrency"], p["values"], p["holds"]) for p in cap["probes"]]
    print(f"\none request alone {alone:.2f} s; {slo}; probes {seen}; {cap['detail']}; "
          f"search {cap['elapsed_s']:.0f} s, run {run.elapsed_s:.0f} s")
    assert cap["limited_by"] == "e2e_p50_s", seen
    assert abs(cap["streams"] - 1) <= 1 and cap["broke_at"] == cap["streams"] + 1, seen
    assert cap["elapsed_s"] <= 300 + 2 * alone * 6
    broke = next(p for p in cap["probes"] if p["concurrency"] == cap["broke_at"])
    assert broke["failed"] == ["e2e_p50_s"] and broke["values"]["e2e_p50_s"] > 1.5 * alone * 0.99
    assert f"capacity {cap['streams']} streams" in run.proc.stdout
    assert f"{cap['broke_at']} streams broke e2e_p50_s" in run.proc.stdout
