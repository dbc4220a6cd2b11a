#!/usr/bin/env python3
"""Load soak: thousands of streams through perftest-models' client, on loopback.

Starts the stand-in server (tests/standin.py) as its own process and drives it
with the tool's own client (http_client + run_concurrent, one client for the
whole soak, as a throughput level uses it), in rounds, until --requests are
done or --max-seconds have passed, whichever comes first. It answers three
questions, in figures:

  memory     RSS of this process after every round, and its peak (sampled
             every 0.1 s): flat once warm, or growing with each request?
  sockets    open file descriptors (/proc/self/fd) before the client, after
             every round and after it closes: does any request leak one?
  samples    requests sent vs samples returned (must be equal: none lost),
             and the server's count of requests vs ours plus retries.

Each round's samples are counted and then dropped, so that the RSS shows what
the client holds on to, not the results a run keeps by design (a run keeps
every sample: about 2 KiB each with 256 ITL values). --faults mixes resets,
closed streams, HTTP 500 and 503 (retried) into the load, because error paths
are where connections leak.

--cli runs the real command line instead (--endpoint, --concurrency, one
throughput level of --requests) and reads its RSS and descriptors from
/proc/PID while it runs; its RSS grows with the samples it keeps.

  python3 benchmarks/soak.py                       # 3200 requests, 64 streams
  python3 benchmarks/soak.py --faults --requests 6400
  python3 benchmarks/soak.py --cli --requests 3200

Prints the figures as JSON on stdout (progress on stderr); exit 1 if a sample
was lost or a descriptor leaked. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import perftest_models as pm  # noqa: E402

FAULT_MIX = ["reset", "close_mid_stream", "http_500", "http_503"]


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/status")


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakSampler:
    """The largest RSS seen while running, sampled every `interval_s`."""

    def __init__(self, pid: int | str = "self", interval_s: float = 0.1):
        self.pid, self.interval_s, self.peak_kib = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            except (OSError, RuntimeError):
                return  # the process is gone
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_standin(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    """The stand-in server as its own process; returns it and its URL."""
    cmd = [sys.executable, str(ROOT / "tests" / "standin.py"), "--port", "0", "--quiet",
           "--ttft-s", str(args.ttft_s), "--itl-s", str(args.itl_s),
           "--tokens-per-chunk", str(args.tokens_per_chunk)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if " listening on " in line:
            url = line.split(" listening on ")[1].split()[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, url
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the stand-in server did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def standin_stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/_standin/stats", timeout=10).json()


def set_faults(url: str, faults: list[str]) -> None:
    import httpx

    httpx.post(f"{url}/_standin/config", json={"faults": faults}, timeout=10).raise_for_status()


def payloads(model: str, n: int, tokens_out: int) -> list[bytes]:
    out = []
    for _ in range(n):
        nonce = pm.new_nonce()
        out.append(pm.chat_payload(model, pm.latency_messages(nonce), tokens_out, 0.7, None, nonce))
    return out


async def soak_client(args: argparse.Namespace, url: str) -> dict:
    per_round = args.concurrency * args.per_stream
    scenario = pm.Scenario("soak", "throughput", None, args.tokens_out, per_round,
                           concurrency=args.concurrency)
    result: dict = {"mode": "client", "concurrency": args.concurrency,
                    "tokens_out": args.tokens_out, "requests_per_round": per_round,
                    "rss_kib_before": rss_kib(), "fds_before": open_fds(), "rounds": []}
    sent = got = failed = retries = 0
    errors: dict[str, int] = {}
    t0 = time.monotonic()
    with PeakSampler() as peak:
        async with pm.http_client(url, None, 30.0, streams=args.concurrency) as client:
            while sent < args.requests and time.monotonic() - t0 < args.max_seconds:
                n = min(per_round, args.requests - sent)
                if args.faults:  # one request in 10 meets a fault, each kind in turn
                    set_faults(url, [FAULT_MIX[(i // 10) % len(FAULT_MIX)] if i % 10 == 9
                                     else "none" for i in range(n)])
                level = pm.Scenario(**{**scenario.__dict__, "requests": n})
                samples, _ = await pm.run_concurrent(client, payloads("standin", n, args.tokens_out),
                                                     level)
                sent += n
                got += len(samples)
                failed += sum(not s.ok for s in samples)
                retries += sum(s.retries for s in samples)
                for s in samples:
                    if not s.ok:
                        key = (s.error or "").split(":")[0][:40]
                        errors[key] = errors.get(key, 0) + 1
                del samples
                result["rounds"].append({"requests": sent, "t_s": round(time.monotonic() - t0, 1),
                                         "rss_kib": rss_kib(), "fds": open_fds()})
                print(f"  {sent} requests, {time.monotonic() - t0:.0f} s, RSS {rss_kib()} KiB, "
                      f"{open_fds()} fds", file=sys.stderr)
            result["fds_open_client"] = open_fds()
        result["fds_after"] = open_fds()
    rounds = result["rounds"]
    warm = rounds[0]["rss_kib"] if rounds else None  # after the first round: imports, pools
    result.update(
        requests=sent, samples=got, samples_lost=sent - got, failed=failed, retries=retries,
        errors=errors, duration_s=round(time.monotonic() - t0, 1),
        rss_kib_after_first_round=warm, rss_kib_end=rss_kib(), rss_kib_max=peak.peak_kib,
        rss_growth_after_first_round_kib=(rounds[-1]["rss_kib"] - warm) if rounds else None,
        server_chat_requests=standin_stats(url)["chat_requests"],
    )
    result["fd_leak"] = result["fds_after"] - result["fds_before"]
    return result


def soak_cli(args: argparse.Namespace, url: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "perftest_models.py"), "--endpoint", url,
               "--iterations", "1", "--context-sizes", "1k", "--concurrency", str(args.concurrency),
               "--throughput-requests", str(args.requests), "--report-dir", tmp]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        trace = []
        with PeakSampler(proc.pid) as peak:
            while proc.poll() is None and time.monotonic() - t0 < args.max_seconds:
                try:
                    trace.append({"t_s": round(time.monotonic() - t0, 1),
                                  "rss_kib": rss_kib(proc.pid), "fds": open_fds(proc.pid)})
                except (OSError, RuntimeError):
                    break
                time.sleep(1.0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # over time: stop it, keep what it measured
        _, err = proc.communicate(timeout=60)
        (report_path,) = Path(tmp).glob("*.json")
        report = json.loads(report_path.read_text())
    (model,) = report["models"]
    level = next(sc for sc in model["scenarios"] if sc["kind"] == "throughput")
    samples = level["samples"]
    return {"mode": "cli", "concurrency": args.concurrency, "exit_code": proc.returncode,
            "requests": level["requests"], "samples": len(samples),
            "samples_lost": level["requests"] - len(samples),
            "failed": sum(not s["ok"] for s in samples), "duration_s": round(time.monotonic() - t0, 1),
            "level_duration_s": level["aggregate"]["duration_s"],
            "rss_kib_first": trace[0]["rss_kib"] if trace else None,
            "rss_kib_end": trace[-1]["rss_kib"] if trace else None, "rss_kib_max": peak.peak_kib,
            "fds_max": max((t["fds"] for t in trace), default=None), "trace": trace,
            "server_chat_requests": standin_stats(url)["chat_requests"],
            "stderr_tail": err.splitlines()[-3:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3200, help="stop after this many (default 3200)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="or after this long, whichever comes first (default 300)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--per-stream", type=int, default=5,
                   help="requests per stream per round (client mode; default 5)")
    p.add_argument("--tokens-out", type=int, default=64)
    p.add_argument("--ttft-s", type=float, default=0.02)
    p.add_argument("--itl-s", type=float, default=0.002)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--faults", action="store_true", help="one request in 10 meets a fault")
    p.add_argument("--cli", action="store_true", help="soak the command line, not the client")
    args = p.parse_args(argv)
    server, url = start_standin(args)
    try:
        print(f"soak: stand-in pid {server.pid} at {url}", file=sys.stderr)
        result = soak_cli(args, url) if args.cli else asyncio.run(soak_client(args, url))
        result["standin_rss_kib_end"] = rss_kib(server.pid)
    finally:
        stop(server)
    print(json.dumps(result, indent=1))
    bad = result["samples_lost"] != 0 or result.get("fd_leak", 0) > 0
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
