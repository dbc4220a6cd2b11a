#!/usr/bin/env python3
"""How much does the benchmark client itself cost and distort? Ours vs vLLM's.

Starts benchmarks/sse_server.py (a fast vLLM-shaped streaming server that
stamps every chunk with its send time) in its own process on loopback, then
for each concurrency level drives, under the same load:

  * our client: perftest_models.run_concurrent -> send_chat, with the real
    payload from chat_payload, in this process (CPU from getrusage);
  * vLLM's client: `vllm bench serve --backend openai-chat` as a child
    process (CPU from /proc at its first request and wait4 at its exit);

and reports for each: CPU per streamed token, and the timing error (client
receive time minus the server's send stamp) for the first token and for
every token chunk; then sweeps the server's rate to find the most tokens/s
our client ingests while its p99 chunk error stays within 1 ms.

Output: one JSON line per configuration on stdout (see docs/benchmark.md for
the fields), then a human summary with the ratios ours / vLLM's. Progress goes
to stderr. Noisy machines: compare ratios within one run, and repeat runs.

examples:
  python3 benchmarks/client_overhead.py
  python3 benchmarks/client_overhead.py --levels 1,64 --json-out out.jsonl
  python3 benchmarks/client_overhead.py --no-vllm --no-sweep --levels 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA_VERSION = 1
MODEL = "bench-model"
VLLM_DEFAULT = "/opt/perftest-vllm/bin/vllm"
ERR_LIMIT_S = 0.001  # the sweep's bound on the p99 chunk error


# ============================================================================
# Records
# ============================================================================


@dataclass(frozen=True)
class Load:
    """What the server streams: `requests` requests of `tokens_out` tokens,
    `concurrency` at a time, one token per stream every `gap_s` (0: as fast
    as the client reads)."""

    concurrency: int
    requests: int
    tokens_out: int
    gap_s: float


@dataclass(frozen=True)
class Dist:
    """p50, p99 and max of a list of durations, in seconds."""

    n: int
    p50_s: float
    p99_s: float
    max_s: float

    def to_ms(self) -> dict[str, float]:
        return {"p50": round(self.p50_s * 1e3, 4), "p99": round(self.p99_s * 1e3, 4),
                "max": round(self.max_s * 1e3, 4), "n": self.n}


@dataclass(frozen=True)
class ClientRun:
    """One client under one load."""

    client: str
    load: Load
    ok: int
    failed: int
    tokens: int
    wall_s: float
    cpu_s: float | None
    first_token_err: Dist | None  # receive - send stamp, first token chunk
    chunk_err: Dist | None        # receive - send stamp, every token chunk
    ttft_err: Dist | None         # client's TTFT - server's (arrival -> first token sent)
    send_lag: Dist | None         # server's arrival stamp - client's request start
    first_error: str | None = None

    @property
    def cpu_us_per_token(self) -> float | None:
        return self.cpu_s / self.tokens * 1e6 if self.cpu_s is not None and self.tokens else None


@dataclass(frozen=True)
class SweepStep:
    target_tps: float
    tps: float
    chunk_err_p99_s: float | None
    failed: int


# ============================================================================
# Statistics (pure)
# ============================================================================


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def dist(values: Sequence[float]) -> Dist | None:
    if not values:
        return None
    v = sorted(values)
    return Dist(len(v), percentile(v, 50), percentile(v, 99), v[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ============================================================================
# Timing error from the raw stream (reference parser, independent of ours)
# ============================================================================


def stamped_events(reads: Sequence[tuple[float, bytes]]) -> list[tuple[float, dict]]:
    """(receive time, chunk JSON) per SSE event, the receive time being that
    of the read that completed the event. Deliberately simple and slow: it
    checks the client, it is not the client."""
    out: list[tuple[float, dict]] = []
    buf = bytearray()
    for t, data in reads:
        buf += data
        while (end := buf.find(b"\n\n")) >= 0:
            block = bytes(buf[:end])
            del buf[:end + 2]
            for line in block.split(b"\n"):
                if line.startswith(b"data: {"):
                    out.append((t, json.loads(line[6:])))
    return out


def is_token_chunk(chunk: dict) -> bool:
    """A chunk with generated text (the role chunk carries none)."""
    choices = chunk.get("choices")
    return bool(choices) and "role" not in choices[0]["delta"]


@dataclass
class ErrorLists:
    first: list[float] = dataclasses.field(default_factory=list)
    chunk: list[float] = dataclasses.field(default_factory=list)
    ttft: list[float] = dataclasses.field(default_factory=list)
    send: list[float] = dataclasses.field(default_factory=list)


def our_errors(t_sent: float, reads: Sequence[tuple[float, bytes]], ttft_s: float | None,
               queued_s: float, into: ErrorLists) -> None:
    """Add one of our streams' errors: the stamps travel in the chunks."""
    t_scheduled = t_sent - queued_s
    x_recv = None
    first = True
    for t, chunk in stamped_events(reads):
        if "x_recv" in chunk:
            x_recv = chunk["x_recv"]
        if not is_token_chunk(chunk):
            continue
        into.chunk.append(t - chunk["x_sent"])
        if first:
            first = False
            into.first.append(t - chunk["x_sent"])
            if x_recv is not None:
                into.send.append(x_recv - t_scheduled)
                if ttft_s is not None:
                    into.ttft.append(ttft_s - (chunk["x_sent"] - x_recv))


def vllm_errors(result: dict, server_log: Sequence[dict], into: ErrorLists) -> None:
    """vLLM's saved per-request start, TTFT and ITLs give its receive times;
    the first token's text (" #<id>") names the server's log entry. vLLM
    counts the role chunk as the first token, so its chunk k is the server's
    chunk k (role chunk first)."""
    by_id = {r["id"]: r for r in server_log}
    for st, ttft, itls, text in zip(result["start_times"], result["ttfts"], result["itls"],
                                    result["generated_texts"]):
        if not ttft or not text or not text.startswith(" #"):
            continue
        entry = by_id.get(int(text[2:].split(" ", 1)[0]))
        if entry is None:
            continue
        sent = entry["sent"]
        recv = [st + ttft]
        for gap in itls:
            recv.append(recv[-1] + gap)
        into.first.append(recv[0] - sent[0])
        into.chunk.extend(r - s for r, s in zip(recv, sent))
        into.ttft.append(ttft - (sent[0] - entry["recv"]))
        into.send.append(entry["recv"] - st)


# ============================================================================
# The server (a child process)
# ============================================================================


class BenchServer:
    """benchmarks/sse_server.py in its own process, and its control calls."""

    def __init__(self, python: str = sys.executable):
        self.proc = subprocess.Popen([python, str(HERE / "sse_server.py"), "--port", "0",
                                      "--model", MODEL], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit("benchmark server did not start (see its error above)")
        self.port = json.loads(line)["port"]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.base_url + path, data=data),
                                    timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def configure(self, gap_s: float, watch_pid: int | None = None) -> None:
        self._call("/_bench/config", {"gap_s": gap_s, "watch_pid": watch_pid})

    def take_log(self) -> dict:
        return self._call("/_bench/log")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ============================================================================
# Our client (in this process)
# ============================================================================


def load_client(path: Path) -> Any:
    """The perftest_models module to measure (a file path, so that an older
    version can be compared: --client-module)."""
    spec = importlib.util.spec_from_file_location("perftest_models", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["perftest_models"] = mod
    spec.loader.exec_module(mod)
    return mod


def run_ours(pm: Any, server: BenchServer, load: Load, *, errors: bool = True,
             run_loop: Any = None) -> ClientRun:
    """Drive run_concurrent exactly as a throughput scenario does; only the
    client's own CPU (this process; the server is another) is counted."""
    server.configure(load.gap_s)
    payloads = []
    for _ in range(load.requests):
        nonce = pm.new_nonce()
        payloads.append(pm.chat_payload(MODEL, pm.latency_messages(nonce), load.tokens_out,
                                        0.0, None, nonce))
    scenario = pm.Scenario("client-overhead", "throughput", None, load.tokens_out,
                           load.requests, load.concurrency)
    streams: list[tuple[float, Any, Any]] = []

    def on_stream(t_sent: float, reads: Any, sample: Any) -> None:
        streams.append((t_sent, reads, sample))

    usage: list[Any] = []
    observe: dict[str, Any] = {"on_stream": on_stream}
    if "on_stream" not in inspect.signature(pm.run_concurrent).parameters:
        # An older perftest_models (--client-module): watch measure_stream.
        observe = {}
        real_measure = pm.measure_stream

        def spy(t_sent: float, reads: Any, *args: Any) -> Any:
            sample = real_measure(t_sent, reads, *args)
            on_stream(t_sent, reads, sample)
            return sample
        pm.measure_stream = spy

    async def drive() -> list[Any]:
        # The client object is made before the clock starts, as vLLM's
        # session is made before its first request: a one-time cost.
        async with pm.http_client(server.base_url, None, 120.0, load.concurrency) as client:
            usage.append((resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()))
            samples, _ = await pm.run_concurrent(client, payloads, scenario, **observe)
            usage.append((resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()))
            return samples

    try:
        samples = (run_loop or getattr(pm, "run_async", asyncio.run))(drive())
    finally:
        if not observe:
            pm.measure_stream = real_measure
    (r0, t0), (r1, t1) = usage
    wall_s = t1 - t0
    cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    server.take_log()
    ok = [s for s in samples if s.ok]
    lists = ErrorLists()
    if errors:
        for t_sent, reads, s in streams:
            if s.ok:
                our_errors(t_sent, reads, s.ttft_ms / 1e3, s.queued_ms / 1e3, lists)
    failed = [s for s in samples if not s.ok]
    return ClientRun("perftest-models", load, len(ok), len(failed),
                     sum(s.tokens_out for s in ok), wall_s, cpu_s, dist(lists.first),
                     dist(lists.chunk), dist(lists.ttft), dist(lists.send),
                     failed[0].error if failed else None)


# ============================================================================
# vLLM's client (a child process)
# ============================================================================


TOKENIZER_SCRIPT = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(2000)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                        model_max_length=65536).save_pretrained(sys.argv[1])
"""


def make_tokenizer(vllm: Path, out: Path) -> Path:
    """A tiny word-level tokenizer, made offline with the vLLM venv's own
    `tokenizers` (vllm bench serve needs one to build its random prompts)."""
    if not (out / "tokenizer.json").exists():
        subprocess.run([str(vllm.parent / "python"), "-c", TOKENIZER_SCRIPT, str(out)],
                       check=True, capture_output=True)
    return out


def vllm_command(vllm: Path, server: BenchServer, load: Load, tokenizer: Path,
                 result_dir: Path) -> list[str]:
    return [str(vllm), "bench", "serve", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", server.base_url,
            "--model", MODEL, "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", "50", "--random-output-len", str(load.tokens_out),
            "--num-prompts", str(load.requests), "--max-concurrency", str(load.concurrency),
            "--ignore-eos", "--disable-tqdm", "--seed", "0", "--save-result", "--save-detailed",
            "--result-dir", str(result_dir), "--result-filename", "result.json"]


def run_vllm_once(vllm: Path, server: BenchServer, load: Load, tokenizer: Path
                  ) -> tuple[float | None, dict, dict]:
    """Run vllm bench serve; returns (CPU seconds from its first request to
    its exit, its saved result, the server's log)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.Popen(vllm_command(vllm, server, load, tokenizer, Path(tmp)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp)
        server.configure(load.gap_s, watch_pid=proc.pid)
        out = proc.stdout.read()  # type: ignore[union-attr]
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log = server.take_log()
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}):\n"
                               + out.decode(errors="replace")[-3000:])
        result = json.loads((Path(tmp) / "result.json").read_text())
    at_first = log.get("watch_cpu_s")
    total = ru.ru_utime + ru.ru_stime
    return (total - at_first if at_first is not None else None), result, log


def run_vllm(vllm: Path, server: BenchServer, load: Load, tokenizer: Path,
             overhead_cpu_s: float) -> ClientRun:
    cpu_s, result, log = run_vllm_once(vllm, server, load, tokenizer)
    lists = ErrorLists()
    vllm_errors(result, log["requests"], lists)
    ok = int(result.get("completed", 0))
    return ClientRun("vllm-bench-serve", load, ok, load.requests - ok,
                     int(result.get("total_output_tokens", 0)), float(result["duration"]),
                     None if cpu_s is None else cpu_s - overhead_cpu_s,
                     dist(lists.first), dist(lists.chunk), dist(lists.ttft), dist(lists.send))


def vllm_fixed_cost(vllm: Path, server: BenchServer, tokenizer: Path, repeats: int = 2
                    ) -> float:
    """vLLM's CPU from its first request to its exit for 1 request of 1
    token: its result processing and interpreter exit, which is subtracted
    from every measured run (the least of `repeats` runs)."""
    costs = [run_vllm_once(vllm, server, Load(1, 1, 1, 0.0), tokenizer)[0]
             for _ in range(repeats)]
    return min(c for c in costs if c is not None)


# ============================================================================
# Rate sweep (ours)
# ============================================================================


def sweep(pm: Any, server: BenchServer, concurrency: int, seconds: float = 1.5
          ) -> list[SweepStep]:
    """Double the server's rate until our p99 chunk error passes 1 ms or the
    rate is not reached; the last step is 'as fast as possible' (gap 0).
    Streams are at least 50 tokens long, so that their start (connections,
    requests sent together) weighs little in the p99."""
    steps: list[SweepStep] = []
    target = max(1000.0, 25.0 * concurrency)
    while True:
        gap_s = concurrency / target if target else 0.0
        tokens = max(50, min(4000, int((target or 50000) * seconds / concurrency)))
        run = run_ours(pm, server, Load(concurrency, concurrency, tokens, gap_s))
        p99 = run.chunk_err.p99_s if run.chunk_err else None
        steps.append(SweepStep(target, run.tokens / run.wall_s, p99, run.failed))
        if not target or p99 is None or p99 > ERR_LIMIT_S or run.tokens / run.wall_s < 0.7 * target:
            return steps
        target *= 2
        if concurrency / target < 50e-6:
            target = 0.0


def max_ingest_tps(steps: Sequence[SweepStep]) -> float | None:
    good = [s.tps for s in steps if s.chunk_err_p99_s is not None
            and s.chunk_err_p99_s <= ERR_LIMIT_S and not s.failed]
    return max(good) if good else None


# ============================================================================
# Rendering (pure)
# ============================================================================


def run_to_dict(r: ClientRun, env: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "client", "client": r.client,
        "concurrency": r.load.concurrency, "requests": r.load.requests,
        "tokens_per_request": r.load.tokens_out, "gap_ms": round(r.load.gap_s * 1e3, 4),
        "ok": r.ok, "failed": r.failed, "tokens": r.tokens, "wall_s": round(r.wall_s, 4),
        "tokens_per_s": round(r.tokens / r.wall_s, 1) if r.wall_s else None,
        "cpu_s": None if r.cpu_s is None else round(r.cpu_s, 4),
        "cpu_us_per_token": None if r.cpu_us_per_token is None else round(r.cpu_us_per_token, 3),
    }
    for name, v in (("first_token_err_ms", r.first_token_err), ("chunk_err_ms", r.chunk_err),
                    ("ttft_err_ms", r.ttft_err), ("send_lag_ms", r.send_lag)):
        d[name] = v.to_ms() if v else None
    if r.first_error:
        d["first_error"] = r.first_error
    return d | env


def ratio_dict(ours: Sequence[ClientRun], theirs: Sequence[ClientRun]) -> dict[str, Any]:
    """Ours / theirs of the medians over the repeated runs of one level."""
    def median(runs: Sequence[ClientRun], get: Any) -> float | None:
        values = [v for v in map(get, runs) if v is not None]
        return statistics.median(values) if values else None

    def p99(name: str) -> Any:
        return lambda r: getattr(r, name).p99_s if getattr(r, name) else None

    vals = {"cpu_per_token": ratio(median(ours, lambda r: r.cpu_us_per_token),
                                   median(theirs, lambda r: r.cpu_us_per_token))}
    for key, name in (("first_token_err_p99", "first_token_err"), ("chunk_err_p99", "chunk_err"),
                      ("ttft_err_p99", "ttft_err")):
        vals[key] = ratio(median(ours, p99(name)), median(theirs, p99(name)))
    return {"schema": SCHEMA_VERSION, "kind": "ratio", "concurrency": ours[0].load.concurrency,
            "runs": len(ours),
            **{f"{k}_ours_over_vllm": None if v is None else round(v, 3) for k, v in vals.items()}}


def sweep_to_dict(concurrency: int, steps: Sequence[SweepStep], env: dict[str, Any]
                  ) -> dict[str, Any]:
    best = max_ingest_tps(steps)
    return {"schema": SCHEMA_VERSION, "kind": "sweep", "client": "perftest-models",
            "concurrency": concurrency, "err_limit_ms": ERR_LIMIT_S * 1e3,
            "max_ingest_tps": None if best is None else round(best),
            "steps": [{"target_tps": round(s.target_tps) if s.target_tps else "max",
                       "tps": round(s.tps),
                       "chunk_err_p99_ms": None if s.chunk_err_p99_s is None
                       else round(s.chunk_err_p99_s * 1e3, 4), "failed": s.failed}
                      for s in steps]} | env


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ms(d: dict | None, key: str = "p99") -> str:
    return "-" if not d else f"{d[key]:.3f}"


def format_summary(lines: Sequence[dict[str, Any]]) -> str:
    """The human summary of the JSON lines."""
    out = ["", "client overhead and timing error (error = client receive - server send stamp)",
           f"{'conc':>4}  {'client':<17}{'tokens':>7}{'tok/s':>9}{'CPU us/tok':>11}"
           f"{'first p50':>10}{'first p99':>10}{'first max':>10}{'chunk p99':>10}"
           f"{'TTFT p99':>10}  (ms)"]
    for d in lines:
        if d["kind"] == "client":
            out.append(f"{d['concurrency']:>4}  {d['client']:<17}{d['tokens']:>7}"
                       f"{_f(d['tokens_per_s'], 0):>9}{_f(d['cpu_us_per_token'], 1):>11}"
                       f"{_ms(d['first_token_err_ms'], 'p50'):>10}"
                       f"{_ms(d['first_token_err_ms']):>10}"
                       f"{_ms(d['first_token_err_ms'], 'max'):>10}{_ms(d['chunk_err_ms']):>10}"
                       f"{_ms(d['ttft_err_ms']):>10}")
    ratios = [d for d in lines if d["kind"] == "ratio"]
    if ratios:
        out += ["", f"ours / vLLM's, medians of {ratios[0]['runs']} run(s) each "
                "(below 1: ours is cheaper or more accurate)",
                f"{'conc':>4}  {'CPU/token':>10}{'first p99':>10}{'chunk p99':>10}{'TTFT p99':>10}"]
        for d in ratios:
            out.append(f"{d['concurrency']:>4}  {_f(d['cpu_per_token_ours_over_vllm']):>10}"
                       f"{_f(d['first_token_err_p99_ours_over_vllm']):>10}"
                       f"{_f(d['chunk_err_p99_ours_over_vllm']):>10}"
                       f"{_f(d['ttft_err_p99_ours_over_vllm']):>10}")
    sweeps = [d for d in lines if d["kind"] == "sweep"]
    if sweeps:
        out += ["", "most tokens/s our client ingests with p99 chunk error <= 1 ms"]
        for d in sweeps:
            steps = ", ".join(f"{s['tps']}:{_f(s['chunk_err_p99_ms'], 3)}" for s in d["steps"])
            best = d["max_ingest_tps"]
            out.append(f"{d['concurrency']:>4}  {'-' if best is None else best:>8} tok/s"
                       f"   (tok/s:p99 ms per step: {steps})")
    return "\n".join(out)


# ============================================================================
# Command line
# ============================================================================


def default_load(concurrency: int, tokens: int, level_tokens: int, rate_tps: float,
                 min_gap_s: float) -> Load:
    """`level_tokens` tokens in all at about `rate_tps` (one gap per stream,
    at least `min_gap_s`): light enough that neither client is saturated."""
    requests = max(concurrency, math.ceil(level_tokens / tokens / concurrency) * concurrency)
    return Load(concurrency, requests, tokens, max(min_gap_s, concurrency / rate_tps))


def environment(pm: Any, without: str) -> dict[str, Any]:
    loop = getattr(pm, "event_loop_name", lambda: "asyncio")()
    env = {"python": sys.version.split()[0], "event_loop": loop,
           "json": getattr(pm, "JSON_DECODER", "json"), "cpus": os.cpu_count()}
    return env | ({"without": without} if without else {})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,8,64,256",
                   help="concurrency levels, comma-separated (default: 1,8,64,256)")
    p.add_argument("--tokens", type=int, default=200, help="output tokens per request")
    p.add_argument("--level-tokens", type=int, default=16000,
                   help="tokens streamed per client and level (default: 16000)")
    p.add_argument("--rate", type=float, default=8000,
                   help="aggregate tokens/s of the measured load (default: 8000)")
    p.add_argument("--min-gap-ms", type=float, default=1.0,
                   help="least gap between a stream's tokens (default: 1 ms)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each client per level, alternated; the ratios compare the "
                        "medians (default: 1; 3 on a shared machine)")
    p.add_argument("--json-out", type=Path, help="also write the JSON lines to this file")
    p.add_argument("--vllm", type=Path, default=Path(VLLM_DEFAULT),
                   help=f"vllm executable (default: {VLLM_DEFAULT})")
    p.add_argument("--no-vllm", action="store_true", help="measure our client only")
    p.add_argument("--no-sweep", action="store_true", help="skip the rate sweep")
    p.add_argument("--client-module", type=Path, default=ROOT / "perftest_models.py",
                   help="perftest_models.py to measure (e.g. an older version)")
    p.add_argument("--without", default="", metavar="PARTS",
                   help="measure our client without some of its speed-ups, comma-separated: "
                        "uvloop, orjson, transport (httpx's own), record (aiter_raw loop), "
                        "send (through httpx's send layers), defer (parse each stream as it "
                        "ends)")
    return p


def ablate(pm: Any, parts: str) -> None:
    """Switch speed-ups of our client off, to see what each one buys."""
    for part in filter(None, parts.split(",")):
        if part == "uvloop":
            pm.run_async = asyncio.run
            pm.event_loop_name = lambda: "asyncio"
        elif part == "orjson":
            pm._orjson_loads = None
            pm.JSON_DECODER = "json"
        elif part == "transport":
            pm._proxied = lambda url: True
        elif part == "record":
            real_send = pm.StreamTransport.handle_async_request

            async def no_record(self: Any, request: Any) -> Any:
                response = await real_send(self, request)
                response.extensions.pop("perftest.record", None)
                return response
            pm.StreamTransport.handle_async_request = no_record
        elif part == "send":
            async def httpx_send(client: Any, request: Any) -> Any:
                return await client.send(request, stream=True)
            pm._send_streaming = httpx_send
        elif part == "defer":
            real_stream_chat = pm.stream_chat

            async def measure_at_once(*args: Any, **kwargs: Any) -> Any:
                got = await real_stream_chat(*args, **kwargs)
                return got if isinstance(got, pm.Sample) else _Measured(got, got.measure())
            pm.stream_chat = measure_at_once
        else:
            raise SystemExit(f"--without: unknown part {part!r}")


@dataclass(frozen=True)
class _Measured:
    """A stream measured as soon as it ended (--without defer)."""

    raw: Any
    sample: Any

    def measure(self, on_stream: Any = None) -> Any:
        if on_stream is not None:
            on_stream(self.raw.t_sent, self.raw.reads, self.sample)
        return self.sample


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    pm = load_client(args.client_module)
    ablate(pm, args.without)
    import httpx  # noqa: F401, PLC0415  (start-up: imported before any CPU is counted)

    env = environment(pm, args.without)
    use_vllm = not args.no_vllm
    if use_vllm and not args.vllm.exists():
        print(f"warning: {args.vllm} not found (.ci/setup-vllm.sh installs it); "
              "measuring our client only", file=sys.stderr)
        use_vllm = False
    lines: list[dict[str, Any]] = []
    sink = args.json_out.open("w") if args.json_out else None

    def emit(d: dict[str, Any]) -> None:
        lines.append(d)
        text = json.dumps(d)
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()  # exported after every configuration: a later failure loses nothing

    server = BenchServer()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tk:
            run_ours(pm, server, Load(1, 2, 4, 0.0))  # warm-up: lazy imports, first paths
            overhead = 0.0
            if use_vllm:
                tokenizer = make_tokenizer(args.vllm, Path(tk))
                print("vllm bench serve: measuring its fixed cost (1 request, 1 token)",
                      file=sys.stderr)
                overhead = vllm_fixed_cost(args.vllm, server, tokenizer)
            for c in levels:
                load = default_load(c, args.tokens, args.level_tokens, args.rate,
                                    args.min_gap_ms / 1e3)
                print(f"concurrency {c}: {load.requests} x {load.tokens_out} tokens, "
                      f"gap {load.gap_s * 1e3:.2f} ms", file=sys.stderr)
                ours, theirs = [], []
                for i in range(args.repeat):  # alternated, so that both see the same noise
                    ours.append(run_ours(pm, server, load))
                    emit(run_to_dict(ours[-1], env | {"run": i}))
                    if use_vllm:
                        theirs.append(run_vllm(args.vllm, server, load, tokenizer, overhead))
                        emit(run_to_dict(theirs[-1], {"vllm_fixed_cpu_s": round(overhead, 4),
                                                      "run": i}))
                if use_vllm:
                    emit(ratio_dict(ours, theirs))
                if not args.no_sweep:
                    print(f"concurrency {c}: rate sweep", file=sys.stderr)
                    emit(sweep_to_dict(c, sweep(pm, server, c), env))
    finally:
        server.close()
        if sink:
            sink.close()
    print(format_summary(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
