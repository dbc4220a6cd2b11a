#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "httpx>=0.27",
#     "httptools>=0.6",
#     "docker>=7.0",
#     "pyyaml>=6.0",
#     "rich>=13.0",
#     "orjson>=3.9",
# ]
# ///
"""Compare vLLM models on one GPU box: which is fastest, and did it get slower?

For every model in the table, perftest-models starts the model's Docker Compose
service, waits until it is healthy, warms it up, measures a single-request
latency test (short prompt, 500 output tokens) and long-context tests (1K, 8K,
16K, 32K input tokens, 100 output tokens), repeats each --iterations times,
stops the service, prints one table per scenario with a winner per metric, and
saves the text and a JSON report under docs/reports/.

Every request is cold (a unique prefix defeats vLLM's prefix cache), input
sizes are exact (built with the server's /tokenize), output lengths are fixed
(max_tokens + min_tokens + ignore_eos), and token counts come from the
server's usage, never from counting chunks.

examples:
  perftest_models.py                          # all models, 3 iterations
  perftest_models.py --iterations 5 --skip qwen3-32b-fp8 | tee out.txt
  perftest_models.py --only qwen3-30b-a3b-fp8 --context-sizes 1k,8k
  perftest_models.py --endpoint http://127.0.0.1:8000 --concurrency 1,8
  perftest_models.py --iterations 5 --baseline docs/reports/baseline.json
  perftest_models.py --iterations 5 --dry-run                  # the plan; nothing started
  perftest_models.py --iterations 5 --resume docs/reports/model-comparison-....json
  perftest_models.py compare BASELINE.json CANDIDATE.json --threshold ttft_ms:10%,tps:5%
  perftest_models.py history docs/reports --fail-on-change   # trends, step changes

exit codes: 0 all models ok, 1 a model failed, 2 usage error,
            3 regression past a threshold (compare, --baseline,
              history --fail-on-change while one stands),
            130 interrupted (Ctrl-C), 143 terminated (SIGTERM/SIGHUP);
            what was measured before a failure or interrupt is saved.
"""

# Sections, in the order the data flows (each banner reads "# <name>"; "# --- " marks a part):
#   Model table          ModelSpec, ServiceRef, the default models, hardware, fixed workload
#   Errors               ExitCode, PerftestError and its subclasses (only main() catches)
#   Records              Metric, Scenario, Sample (and what a burst is), Stat, Aggregate,
#                        ServerDelta, ScenarioResult, Failure, ServerInfo, Lifecycle (pull,
#                        load facts, memory), AnswerCheck, Capacity, ModelResult, RunConfig,
#                        Environment, Report; SloRule/parse_slo: records, one way
#   Model files          --models YAML: load and validate into ModelSpec (docker_host, url)
#   Services             Compose, DockerWatch, DockerHost (several engines);
#                        ServiceLifecycle.running(): start, watch, always stop; pull_image
#   Measurement          pure: reads of one stream -> Sample (TTFT, ITL, tokens)
#   Transport            lean HTTP/1.1 transport (httptools); stamps reads in the socket callback
#   Client               thin: send a streaming chat request, retries, JSON calls, engine detection
#   Prompts              prompts of exact token counts (the server's /tokenize), known answers
#   Server metrics       /metrics deltas (vLLM, llama.cpp, SGLang), NVML power and clocks, memory
#   Statistics           pure: percentiles, Student-t intervals, SLOs and goodput, the roofline
#   Benchmark            what a model runs and the campaign (plan, resume, ETA); readiness;
#                        warm-up and the known-answer check; scenarios (in turn, at once, open
#                        loop); the capacity search; benchmark_model, one model from ready to end
#   Winners              pure: rank_scenarios -> a ScenarioWinners per scenario; rank_capacity
#   Saved reports        the JSON edge, the only dicts: Report <-> dict, load_report
#   Comparison           pure: baseline vs candidate, verdicts, thresholds, capacity
#   History              pure: many reports over time, step changes, hardware groups
#   Rendering            pure: tables and summaries as text
#   Exports              pure: Markdown, CSV, charts, HTML
#   Output               files, progress and ETA on stderr, signals
#   Command line         options; the plan; one model's run (image, start, measure, stop);
#                        models on named hosts and --parallel; run_benchmark; main, compare, history
#
# One latency scenario, read top to bottom (each name defined below the one before):
#   measure_stream -> StreamTransport -> stream_chat -> PromptBuilder -> summarize_samples
#   -> plan_scenarios -> send_measured -> run_scenario -> benchmark_model -> rank_scenarios
#   -> report_to_dict -> scenario_table -> format_results -> measure_model -> run_model
#   -> run_models_in_turn -> run_benchmark -> main

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import enum
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# httpx, httptools, docker and rich are imported where they are used, so that --help and
# the usage errors answer in well under 0.3 s.

__version__ = "1.0.0"
TOOL_NAME = "perftest-models"
SCHEMA_VERSION = 1


# ============================================================================
# Model table
# ============================================================================


@dataclass(frozen=True)
class ServiceRef:
    """One Compose service of a model, on its Docker host: `docker_host` is a
    DOCKER_HOST URL or a docker context name (None: the local engine);
    `compose_file` None means --compose-file."""

    service: str
    docker_host: str | None = None
    compose_file: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One model to benchmark, and where to find it.

    `name` is what --skip/--only take; `service` is its Compose service;
    `model_id` is the name the server lists in /v1/models and expects in
    requests. Parameter counts are in billions; `bytes_per_weight` is 1 for
    FP8, 2 for BF16. They feed the decode roofline. `engine` (one of
    ENGINES) names the server's engine when its API would not tell; None:
    detected at warm-up.
    """

    name: str
    service: str | None
    model_id: str
    max_context_tokens: int
    architecture: str = ""
    params_total_b: float | None = None
    params_active_b: float | None = None
    bytes_per_weight: float | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    docker_host: str | None = None  # the engine of `service` (None: the local one)
    url: str | None = None  # where the server answers (None: from the host and --port)
    services: tuple[ServiceRef, ...] = ()  # instead of `service`: started in order
    engine: str | None = None


def model_services(spec: ModelSpec) -> tuple[ServiceRef, ...]:
    """The services a model runs, in start order, each on its Docker host."""
    if spec.services:
        return spec.services
    return (ServiceRef(spec.service, spec.docker_host),) if spec.service else ()


def is_hosted(spec: ModelSpec) -> bool:
    """True when the model names a Docker host, a url or a services list: then
    the run's models take the per-host lifecycle (run_hosted_model)."""
    return spec.docker_host is not None or bool(spec.services) or spec.url is not None


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="qwen3-32b-fp8",
        service="vllm-qwen3-32b-fp8",
        model_id="Qwen/Qwen3-32B-FP8",
        max_context_tokens=32_000,
        architecture="Dense 32B (baseline)",
        params_total_b=32.8,
        params_active_b=32.8,
        bytes_per_weight=1.0,
    ),
    ModelSpec(
        name="qwen3-30b-a3b-fp8",
        service="vllm-qwen3-30b-a3b-fp8",
        model_id="Qwen/Qwen3-30B-A3B-Instruct-2507-FP8",
        max_context_tokens=32_768,
        architecture="MoE 30B total, 3B active (efficiency)",
        params_total_b=30.5,
        params_active_b=3.3,
        bytes_per_weight=1.0,
    ),
    ModelSpec(
        name="llama33-70b-fp8",
        service="vllm-llama33-70b-fp8",
        model_id="nvidia/Llama-3.3-70B-Instruct-FP8",
        max_context_tokens=65_536,
        architecture="Dense 70B (quality)",
        params_total_b=70.6,
        params_active_b=70.6,
        bytes_per_weight=1.0,
    ),
)

# Memory bandwidth in GB/s: decoding one token reads every active weight once,
# so bandwidth / bytes of active weights bounds decode tokens/s from above.
HARDWARE_BANDWIDTH_GBS: dict[str, float] = {
    "dgx-spark": 273.0,
    "h100-sxm": 3350.0,
    "h100-pcie": 2000.0,
    "h200": 4800.0,
    "a100-80gb": 2039.0,
    "b200": 8000.0,
    "l40s": 864.0,
    "rtx-4090": 1008.0,
    "rtx-5090": 1792.0,
}

LATENCY_PROMPT = (
    "Write a detailed technical explanation of how neural network "
    "backpropagation works, including the chain rule, gradient computation "
    "for each layer, the role of activation functions, weight updates with "
    "gradient descent, and common problems such as vanishing gradients."
)
WARMUP_TOKENS = 50
WARMUP_TRIES = 3
LATENCY_TOKENS_OUT = 500
CONTEXT_TOKENS_OUT = 100
TEMPERATURE = 0.7
# A first pull of a vLLM image is 10-20 GB: 3 hours is 20 GB at 2 MB/s. The
# pull has its own budget: the load (--health-timeout) starts after it.
PULL_TIMEOUT_S = 10800.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The engines whose APIs the tool knows (models-file `engine:`; detected at
# warm-up otherwise). "openai": nothing beyond OpenAI's own chat API.
ENGINES = ("vllm", "llama.cpp", "sglang", "tgi", "openai")


# ============================================================================
# Errors
# ============================================================================


# Control characters in an error message come from the user's input (an
# argument, a field name in someone's YAML): shown escaped, so the message
# stays one line and cannot drive the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    return text.translate(_CONTROL)


class ExitCode(enum.IntEnum):
    """Every exit status of the tool, in one place (the --help epilog lists them)."""

    OK = 0
    FAILED = 1  # a model failed, or the environment cannot run a benchmark
    USAGE = 2  # bad options or input files: nothing was started
    REGRESSION = 3  # a metric regressed past its threshold (compare, --baseline)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM or SIGHUP


class PerftestError(Exception):
    """Base of every error the tool reports; carries the exit code.

    Only main() catches these. The message says what went wrong and what to do.
    """

    exit_code = ExitCode.FAILED


class UsageError(PerftestError):
    """Bad options or input files: nothing was started."""

    exit_code = ExitCode.USAGE


class SetupError(PerftestError):
    """The environment cannot run a benchmark (Docker, Compose, port)."""

    exit_code = ExitCode.FAILED


class ModelFailed(PerftestError):
    """One model failed (timeout, crash, errors); the run goes on."""

    def __init__(self, message: str, details: Failure | None = None):
        super().__init__(message)
        self.details = details


class Interrupted(KeyboardInterrupt):
    """Raised from a signal handler (SIGTERM, SIGHUP). A KeyboardInterrupt, not
    just a BaseException: asyncio catches BaseException around socket writes
    and in tasks, and lets only KeyboardInterrupt and SystemExit through, so a
    SIGTERM that landed in a write was logged and lost. Tell it from Ctrl-C
    with isinstance(exc, Interrupted)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted_exit_code(exc: BaseException) -> ExitCode:
    """130 for Ctrl-C (a plain KeyboardInterrupt), 143 for SIGTERM or SIGHUP."""
    return ExitCode.TERMINATED if isinstance(exc, Interrupted) else ExitCode.INTERRUPTED


# ============================================================================
# Records
# ============================================================================


@dataclass(frozen=True)
class Metric:
    """A measured quantity, with its unit and direction declared once."""

    key: str
    label: str
    unit: str
    higher_is_better: bool | None  # None: not ranked (token counts)
    digits: int = 0


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("ttft_ms", "TTFT", "ms", False),
        Metric("ttfo_ms", "TTFO", "ms", False),
        Metric("tps", "Decode", "tok/s", True, 1),
        Metric("tpot_ms", "TPOT", "ms", False, 1),
        Metric("itl_ms", "ITL", "ms", False, 1),
        Metric("e2e_tps", "E2E", "tok/s", True, 1),
        Metric("prefill_tps", "Prefill", "tok/s", True),
        Metric("total_s", "Total", "s", False, 2),
        Metric("tokens_in", "Tokens in", "", None),
        Metric("tokens_out", "Tokens out", "", None),
    )
}

# Whole-level figures of a throughput scenario: one value per level, so no
# spread. Their direction is declared here once, as METRICS does for samples.
AGGREGATE_METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("output_tps", "Throughput", "tok/s", True, 1),
        Metric("requests_per_s", "Requests", "req/s", True, 2),
    )
}
DECODE_METRICS = ("tps", "tpot_ms")
SAMPLE_METRICS = ("ttft_ms", "ttfo_ms", "tps", "tpot_ms", "e2e_tps", "prefill_tps",
                  "total_s", "tokens_in", "tokens_out")


@dataclass(frozen=True)
class Scenario:
    """What to send: `requests` requests, `concurrency` at a time.

    `target_tokens_in` is None for the latency test's fixed prompt. A context
    size that did not fit the model was clamped; `requested_tokens_in` keeps
    what was asked.
    """

    name: str
    kind: str  # "latency" | "context" | "throughput"
    target_tokens_in: int | None
    target_tokens_out: int
    requests: int
    concurrency: int = 1
    requested_tokens_in: int | None = None
    request_rate: float | None = None  # open loop: arrivals per second (concurrency unbounded)

    @property
    def clamped(self) -> bool:
        return self.requested_tokens_in is not None


def describe_scenario(s: Scenario) -> str:
    tin = "~50-token prompt" if s.target_tokens_in is None else f"{s.target_tokens_in} tokens in"
    clamp = f" (clamped from {s.requested_tokens_in} to fit the context)" if s.clamped else ""
    if s.kind == "throughput" and s.request_rate is not None:
        return (f"{s.name}: {s.requests} requests arriving at {s.request_rate:g}/s (open loop), "
                f"{tin}, {s.target_tokens_out} out")
    if s.kind == "throughput":
        return (f"{s.name}: {s.requests} requests, {s.concurrency} at a time, {tin}, "
                f"{s.target_tokens_out} out")
    return f"{s.name}: {tin}{clamp}, {s.target_tokens_out} out, x{s.requests}"


# A burst, defined once: token chunks stamped less than SAME_READ_S apart
# came in one network read, one arrival (httpx hands over one chunk at a
# time, microseconds apart; decode steps are milliseconds apart). A stream
# whose tokens came more than BURST_TOKENS_PER_ARRIVAL to an arrival on
# average is bursty: its decode rate shows how the server flushed its output,
# not how fast it decoded, so it stays out of the decode figures. The limit,
# all tokens in one arrival, leaves no decode time at all: no rate
# (has_decode_time).
SAME_READ_S = 1e-4
BURST_TOKENS_PER_ARRIVAL = 4
BURST_MIN_TOKENS = 8  # at most this many tokens are too few to call bursty


def is_bursty(tokens_out: int | None, arrivals: int | None) -> bool:
    """The tokens came in bursts (see above)."""
    return bool(tokens_out and arrivals and tokens_out > BURST_MIN_TOKENS
                and tokens_out / arrivals > BURST_TOKENS_PER_ARRIVAL)


def has_decode_time(arrivals: int) -> bool:
    """Tokens that came in one arrival leave no decode time to measure."""
    return arrivals > 1


@dataclass(frozen=True)
class Sample:
    """One request. A failed request is a sample with `ok` False and an error.

    Times are measured from the moment the request was meant to be sent:
    `ttft_ms` to the first generated token (reasoning counts), `ttfo_ms` to
    the first answer token, `total_s` to the last token chunk (never the
    usage trailer or [DONE]). `tps` is decode tokens/s:
    (tokens_out - 1) / (total - ttft). `itl_ms` holds the gaps between token
    chunks, spread evenly over the tokens a chunk carries.
    """

    ok: bool
    error: str | None = None
    ttft_ms: float | None = None
    ttfo_ms: float | None = None
    tps: float | None = None
    tpot_ms: float | None = None
    e2e_tps: float | None = None
    prefill_tps: float | None = None
    total_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_out_exact: bool | None = None
    cached_tokens: int | None = None
    retries: int = 0
    queued_ms: float = 0.0
    start_s: float = 0.0
    token_reads: int | None = None  # separate arrivals of token chunks (count_arrivals)
    tokens_counted: bool | None = None  # True: no usage from the server, counted with its tokenizer
    itl_ms: tuple[float, ...] = ()

    @property
    def bursty(self) -> bool:
        """Tokens arrived in bursts (is_bursty): the decode rate then shows
        the server's output batching, not its speed."""
        return self.ok and is_bursty(self.tokens_out, self.token_reads)


@dataclass(frozen=True)
class Stat:
    """Summary of one metric over the ok samples of a scenario."""

    n: int
    mean: float
    stddev: float | None  # None (not 0) for a single value
    min: float
    max: float
    median: float
    p90: float
    p99: float
    ci95: tuple[float, float] | None  # 95% confidence interval of the mean


@dataclass(frozen=True)
class Aggregate:
    """Whole-level figures of a throughput level: tokens/s and requests/s over
    its wall time; the peaks are absent where /metrics was not scraped."""

    duration_s: float | None = None
    requests_ok: int | None = None
    errors: int | None = None
    output_tps: float | None = None
    requests_per_s: float | None = None
    peak_kv_cache_usage_perc: float | None = None
    peak_requests_waiting: float | None = None
    # With --slo: requests that met every rule, and per second (goodput).
    good_requests: int | None = None
    goodput_rps: float | None = None
    # Open loop (--request-rate): the rate asked for, how well the client kept it.
    request_rate: float | None = None
    late_sends: int | None = None
    send_lag_max_ms: float | None = None
    achieved_rate_rps: float | None = None
    client_late: bool | None = None


@dataclass(frozen=True)
class ServerDelta:
    """The server's own view of a scenario, from two /metrics scrapes:
    counts, mean times in ms, tokens the engine computed per step."""

    requests: int | None = None
    ttft_mean_ms: float | None = None
    queue_mean_ms: float | None = None
    itl_mean_ms: float | None = None
    generation_tokens: int | None = None
    prompt_tokens: int | None = None
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    tokens_per_step: float | None = None
    kv_cache_usage_perc: float | None = None  # absent where the gauge is not served
    # llama.cpp's own rates (its counters of tokens and seconds) and SGLang's
    # cached prompt tokens: absent for engines that do not count them
    prefill_tps: float | None = None
    decode_tps: float | None = None
    decode_calls: int | None = None
    cached_tokens: int | None = None
    # Keys a saved report (of an older version) did not have: written back
    # absent, so that a report reads back and writes out unchanged.
    unsaved: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    samples: tuple[Sample, ...]
    summary: Mapping[str, Stat]
    aggregate: Aggregate | None = None  # throughput: whole-level figures
    server: ServerDelta | None = None  # the engine's /metrics deltas (None: it has none)
    # False: the inputs were sized from usage (no chat tokenizer), so they are
    # near the target, not on it; None: a fixed prompt (latency)
    tokens_in_exact: bool | None = None
    # False: an answer came out shorter than asked (the server did not honour
    # min_tokens/ignore_eos); None: no successful answer (or an older report)
    output_forced: bool | None = None
    gpu: PowerSummary | None = None  # NVML over the scenario (gpu_summary)

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.samples)


def output_forced(samples: Iterable[Sample], target_tokens_out: int) -> bool | None:
    """Whether every answer came out as long as asked (see ScenarioResult)."""
    ok = [s.tokens_out for s in samples if s.ok and s.tokens_out is not None]
    return None if not ok else min(ok) >= target_tokens_out


@dataclass(frozen=True)
class Failure:
    """Why a model's container stopped: its state, exit code, log tail."""

    container_status: str | None = None
    exit_code: int | None = None
    oom_killed: bool | None = None
    log_tail: tuple[str, ...] = ()
    service: str | None = None  # a model on named hosts: which service failed,
    docker_host: str | None = None  # and on which host


@dataclass(frozen=True)
class ServerInfo:
    """What the server says about itself (/version, /v1/models), and the
    chat_template_kwargs sent with every request. `engine` is one of ENGINES
    (`engine_forced`: named by the models file), `version` its own (vLLM's
    /version, llama.cpp's build, SGLang's, TGI's), `context_tokens` the
    context window it reports; `knobs_refused` the request fields it
    answered 400 for (dropped), `knobs_ignored` those it took and ignored."""

    version: str | None = None
    max_model_len: int | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    engine: str | None = None  # (these five: None in a report of an older version)
    engine_forced: bool | None = None
    context_tokens: int | None = None
    knobs_refused: tuple[str, ...] | None = None
    knobs_ignored: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PowerSummary:
    """GPU power over a model's run or one scenario (NVML): watts, joules,
    output tokens per joule, and the SM clock range, peak temperature and
    throttle reasons that say whether the GPU ran at full speed."""

    mean_w: float
    max_w: float
    energy_j: float
    samples: int
    tokens_per_j: float | None
    duration_s: float | None = None
    j_per_token: float | None = None
    sm_clock_min_mhz: float | None = None
    sm_clock_max_mhz: float | None = None
    peak_temp_c: float | None = None
    throttled: bool | None = None  # power cap, hardware slowdown, thermal, power brake
    throttle_reasons: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LoadFacts:
    """What vLLM reported in its log while it loaded; None where it did not
    say (an older or newer vLLM, the CPU build, --enforce-eager). Seconds and
    GiB as vLLM printed them; `kv_cache_tokens` is the KV cache's capacity
    and `max_concurrency` how many requests of `max_concurrency_tokens`
    tokens fit in it at once."""

    weights_download_s: float | None = None
    weights_load_s: float | None = None
    model_load_s: float | None = None
    model_memory_gib: float | None = None
    torch_compile_s: float | None = None
    cuda_graph_s: float | None = None
    cuda_graph_gib: float | None = None
    engine_init_s: float | None = None
    kv_cache_memory_gib: float | None = None
    kv_cache_device: str | None = None  # "GPU", "CPU", ...: where vLLM keeps the cache
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens: int | None = None


@dataclass(frozen=True)
class MemoryRecord:
    """Memory a model could use, before its start, at its peak, after its
    stop (bytes): "host" (unified memory) or "gpu" (NVML). `given_back` is
    False when what is missing after the stop is past the slack."""

    kind: str
    total_bytes: int
    available_before_bytes: int
    available_peak_bytes: int
    available_after_bytes: int
    peak_used_bytes: int
    not_given_back_bytes: int
    given_back: bool


@dataclass(frozen=True)
class PullRecord:
    """A model's image step: pulled (seconds, downloaded bytes) or skipped."""

    image: str
    policy: str
    skipped: bool
    pull_s: float | None = None
    bytes: int | None = None
    layers: int | None = None


@dataclass(frozen=True)
class Lifecycle:
    """A model's service as it ran: image, command, load time, GPU power.
    A field is None where it is not known (nothing started, no GPU)."""

    image: str | None = None
    image_id: str | None = None
    repo_digests: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    service: str | None = None
    load_s: float | None = None
    power: PowerSummary | None = None
    pull: PullRecord | None = None  # the image step before `up`, apart from the load
    vllm_load: LoadFacts | None = None  # what vLLM's log said while it loaded
    memory: MemoryRecord | None = None  # memory before the start, at the peak, after the stop
    docker_host: str | None = None  # a model on named hosts: where it ran ("a + b"),
    url: str | None = None  # where its server answered,
    services: tuple[str, ...] | None = None  # its services in start order,
    hosts: tuple[HostRecord, ...] | None = None  # each one's host and machine,
    hardware: str | None = None  # and one profile of the machine(s) for the report


@dataclass(frozen=True)
class EngineHardware:
    """What a Docker engine says of its machine (`docker info`), and a short
    profile that tells two machines apart."""

    name: str | None = None
    os: str | None = None
    arch: str | None = None
    cpus: int | None = None
    memory_gib: float | None = None
    server_version: str | None = None
    runtimes: tuple[str, ...] = ()
    profile: str = ""


@dataclass(frozen=True)
class HostRecord:
    """One service of a model and the Docker host it ran on."""

    service: str
    docker_host: str
    hardware: EngineHardware | None = None


@dataclass(frozen=True)
class AnswerExample:
    """One known-answer prompt the model got wrong (the answer escaped and cut short)."""

    prompt: str
    expected: str
    answer: str


@dataclass(frozen=True)
class AnswerCheck:
    """The known-answer check of one model, made at warm-up before any
    measured request: did the model answer a few easy prompts right?"""

    status: str  # "right" | "wrong" | "unchecked" (could not be judged) | "skipped"
    asked: int = 0  # prompts the model answered (refused ones are not counted)
    right: int = 0
    example: AnswerExample | None = None  # one wrong answer
    reason: str | None = None  # why unchecked or skipped

    @property
    def ok(self) -> bool | None:
        """True right, False wrong, None not judged (unchecked or skipped)."""
        return {"right": True, "wrong": False}.get(self.status)


@dataclass(frozen=True)
class Probe:
    """One level of a capacity search: `concurrency` streams, closed loop.

    `values` holds each SLO rule's figure at the level (in the rule's unit;
    inf when too many requests failed to have one); `failed` the rules it
    broke; `too_few` the rules whose percentile needs more requests than the
    probe had. `decode_tps` is the mean per-request decode rate (per user)."""

    concurrency: int
    requests: int
    errors: int
    duration_s: float
    good: int
    goodput_rps: float | None
    output_tps: float | None
    decode_tps: float | None
    values: Mapping[str, float]
    failed: tuple[str, ...] = ()
    too_few: tuple[str, ...] = ()

    @property
    def holds(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Capacity:
    """The answer of a capacity search: the most concurrent streams at which
    every SLO held. `limited_by` names what stopped it: the rule that broke at
    `broke_at` streams, "max-concurrency" (it held at the bound), or "budget"
    (time ran out first; `broke_at` is then the lowest level seen to break, if
    any). `step` is the gap between the level that held and the one that broke
    (1 once bisected down): capacities closer than a step are not told apart."""

    slo: str
    streams: int
    goodput_rps: float | None
    output_tps: float | None
    limited_by: str
    broke_at: int | None
    step: int
    probes: tuple[Probe, ...]
    detail: str = ""  # what broke, e.g. "tpot_p99_ms 61.2 > 50"
    budget_s: float | None = None
    elapsed_s: float = 0.0

    @property
    def cut_short(self) -> bool:
        """The search did not finish (its time budget, or an interrupt): its
        capacity is a lower bound, not an answer to compare."""
        return self.limited_by in ("budget", "interrupted")

    @property
    def lower_bound(self) -> bool:
        """The capacity is "at least": cut short, or it held at --max-concurrency."""
        return self.cut_short or self.limited_by == "max-concurrency"


@dataclass
class ModelResult:
    """Everything known about one model's run; filled in as the run goes."""

    spec: ModelSpec
    status: str = "pending"  # "ok" | "failed" | "skipped" | "interrupted"
    error: str | None = None
    failure: Failure | None = None
    server: ServerInfo | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    answer_check: AnswerCheck | None = None
    capacity: Capacity | None = None  # with --slo: the capacity search's answer

    @property
    def ranked(self) -> bool:
        """Its figures may win: a model whose answers were wrong is never crowned."""
        return self.answer_check is None or self.answer_check.ok is not False


@dataclass(frozen=True)
class RunConfig:
    """The options of one run (never holds secrets: it goes into the report)."""

    iterations: int = 3
    context_sizes: tuple[int, ...] = (1000, 8000, 16000, 32000)
    concurrency: tuple[int, ...] = ()
    throughput_requests: int | None = None
    throughput_tokens_in: int = 512
    throughput_tokens_out: int = 256
    latency_tokens_out: int = LATENCY_TOKENS_OUT
    context_tokens_out: int = CONTEXT_TOKENS_OUT
    warmup_tokens: int = WARMUP_TOKENS
    temperature: float = TEMPERATURE
    port: int = 8000
    health_timeout_s: float = 1800.0
    pull: str | None = "missing"  # --pull (PULL_POLICIES); None: an older report
    pull_timeout_s: float | None = PULL_TIMEOUT_S  # --pull-timeout; None: an older report
    request_timeout_s: float = 300.0
    max_failed_samples: int = 3
    answer_check: bool | None = True  # --no-answer-check turns it off (None: an older report)
    require_correct_answers: bool | None = False  # a wrong-answering model fails (exit 1)
    hardware: str = "dgx-spark"
    bandwidth_gbs: float = HARDWARE_BANDWIDTH_GBS["dgx-spark"]
    compose_file: str | None = "docker-compose.yml"
    endpoint: str | None = None
    models: tuple[str, ...] = ()
    # --slo, --request-rate (None in a report from before they existed: CONFIG_ADDED)
    slo: str | None = None  # --slo rules as given; None: no goodput, no capacity search
    max_concurrency: int | None = 256
    capacity_budget_s: float | None = 900.0  # per model
    request_rates: tuple[float, ...] | None = ()  # open-loop levels, requests/s
    burstiness: float | None = 1.0  # gamma shape of the arrival gaps (1: Poisson)
    arrival_seed: int | None = 0  # the arrivals' RNG seed: the same schedule on every run
    parallel: bool | None = False  # --parallel (None in a report from before it)


@dataclass(frozen=True)
class Environment:
    """Where the run ran; a field is None where it is not known."""

    host: str | None = None
    python: str | None = None
    platform: str | None = None
    event_loop: str | None = None  # "uvloop" | "asyncio" (PERFTEST_LOOP)
    gpu: str | None = None
    compose: str | None = None


@dataclass
class Report:
    config: RunConfig
    started_at: str
    models: list[ModelResult]
    environment: Environment = field(default_factory=Environment)
    finished_at: str | None = None
    interrupted: str | None = None
    parts: list[RunPart] = field(default_factory=list)  # one per start (--resume adds one)


@dataclass(frozen=True)
class PartModel:
    """What one part of a run did with one model: the scenarios it completed,
    what served them, and the wall time of each phase (None: not in this part)."""

    scenarios: tuple[str, ...] = ()
    vllm: str | None = None
    image: str | None = None  # repo digest, else image id
    load_s: float | None = None
    measure_s: float | None = None
    stop_s: float | None = None


@dataclass(frozen=True)
class RunPart:
    """One start of a run: a first run is one part, each --resume adds one.
    `environment` is collect_environment()'s (host, GPU, Compose)."""

    started_at: str
    finished_at: str | None = None
    interrupted: str | None = None
    environment: Environment = field(default_factory=Environment)
    models: Mapping[str, PartModel] = field(default_factory=dict)


YAML_MAX_NODES = 100_000  # values after expanding aliases; a compose or models file has hundreds


def _expanded_size(root: Any) -> int:
    """How many values a YAML node graph holds once every alias is expanded
    (what a reader walking the loaded data meets), counted in time linear in
    the distinct nodes: an alias is the same node object, met again. A
    recursive alias (`&a [*a]`) counts as endless."""
    sizes: dict[int, int] = {}
    expanded: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = ([] if isinstance(node, yaml.ScalarNode) else
                [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                else list(node.value))
        if children_done:
            sizes[key] = min(1 + sum(sizes[id(k)] for k in kids), 1 << 62)
        elif key in sizes:
            continue
        elif key in expanded:  # met again below itself: a cycle
            return 1 << 62
        else:
            expanded.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)
    return sizes[id(root)]


def parse_token_count(text: str) -> int:
    """'8k' -> 8000, '32K' -> 32000, '1500' -> 1500 (k is 1000, as in the seed)."""
    t = text.strip().lower()
    mult = 1000 if t.endswith("k") else 1
    digits = t[:-1] if mult == 1000 else t
    if not digits.isdigit() or int(digits) * mult < 1:
        raise ValueError(text)
    return int(digits) * mult


def format_token_count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


# Service levels (--slo): which figure, in which unit, better low or high.
# A rule's name is METRIC[_pNN][_UNIT]: ttft_p99_ms, tpot_p99_ms, itl_p99_ms,
# e2e_p99_s, decode_tps (tokens/s, no unit suffix).
SLO_METRICS: dict[str, tuple[str, ...]] = {  # metric -> the units it may be given in
    "ttft": ("ms", "s"), "tpot": ("ms", "s"), "itl": ("ms", "s"), "e2e": ("s", "ms"),
    "decode_tps": ("",),
}
_SLO_RE = re.compile(r"^(ttft|tpot|itl|e2e|decode_tps)(?:_p(\d+(?:\.\d+)?))?(?:_(ms|s))?"
                     r"\s*(<=|>=)\s*([0-9.eE+-]+)$")
SLO_EXAMPLE = "ttft_p99_ms<=2000,tpot_p99_ms<=50"


@dataclass(frozen=True)
class SloRule:
    """One service level, e.g. tpot_p99_ms<=50: `percentile` of the requests
    (None: every request) must have `metric` at most (`<=`) or at least
    (`>=`) `limit`, in `unit`. For a `>=` rule the percentile counts from the
    slow end: decode_tps_p99>=20 means 99% of requests decode at 20 tok/s or more."""

    key: str  # the rule's name as written, e.g. "tpot_p99_ms"
    metric: str  # ttft | tpot | itl | e2e | decode_tps
    percentile: float | None
    unit: str  # "ms" | "s" | "" (tok/s)
    op: str  # "<=" | ">="
    limit: float

    @property
    def text(self) -> str:
        return f"{self.key}{self.op}{self.limit:g}"

    def passes(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    @property
    def min_requests(self) -> int:
        """Requests a level needs for its percentile to be more than its worst
        request: p99 needs 100, p90 10, p50 2; every request (no percentile) 1."""
        if self.percentile is None:
            return 1
        return max(1, math.ceil(100 / (100 - self.percentile) - 1e-9))


def parse_slo(text: str) -> tuple[SloRule, ...]:
    """'ttft_p99_ms<=2000,tpot_p99_ms<=50' -> rules (pure); ValueError with a
    message that says what is wrong and what a rule looks like."""
    rules: list[SloRule] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _SLO_RE.match(part)
        if m is None:
            raise ValueError(f"{part!r} is not a rule like {SLO_EXAMPLE} (metrics: "
                             f"{', '.join(SLO_METRICS)}; optional _pNN percentile; unit _ms or _s)")
        metric, pct, unit, op, number = m.groups()
        unit = unit or ""
        if unit not in SLO_METRICS[metric]:
            want = " or ".join(f"_{u}" for u in SLO_METRICS[metric] if u) or "no unit (tok/s)"
            raise ValueError(f"{part!r}: {metric} takes {want}")
        if (op == ">=") != (metric == "decode_tps"):
            raise ValueError(f"{part!r}: {metric} is " + (
                "a rate: write >=" if metric == "decode_tps" else "a time: write <="))
        try:
            limit = float(number)
        except ValueError:
            raise ValueError(f"{part!r}: {number!r} is not a number") from None
        percentile = float(pct) if pct is not None else None
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"{part!r}: the limit must be a number > 0")
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"{part!r}: the percentile must be between 0 and 100, like p99")
        key = part[:m.start(4)].strip()
        if any(r.key == key for r in rules):
            raise ValueError(f"{key} is given twice")
        rules.append(SloRule(key, metric, percentile, unit, op, limit))
    if not rules:
        raise ValueError(f"expected rules like {SLO_EXAMPLE}")
    return tuple(rules)


# ============================================================================
# Model files
# ============================================================================


def _check_name(value: Any, what: str, source: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise UsageError(
            f"{source}: {what} {value!r} is not a valid name (letters, digits, '.', '_', '-'; "
            "no spaces or shell characters): fix it in the file")
    return value


_MODEL_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "service": (str, type(None)), "model_id": (str,),
    "max_context_tokens": (int,), "architecture": (str,),
    "params_total_b": (int, float, type(None)), "params_active_b": (int, float, type(None)),
    "bytes_per_weight": (int, float, type(None)), "chat_template_kwargs": (dict, type(None)),
    "docker_host": (str, type(None)), "url": (str, type(None)), "services": (list, type(None)),
    "engine": (str, type(None)),
}
_SERVICE_FIELDS = ("service", "docker_host", "compose_file")
DOCKER_HOST_SCHEMES = ("unix", "tcp", "ssh", "npipe", "fd")
_CONTEXT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")  # docker's context names


def check_docker_host(value: str, where: str) -> str:
    """A DOCKER_HOST URL (unix://, tcp://, ssh://, npipe://, fd://) or a docker context name."""
    scheme, sep, rest = value.partition("://")
    bad = any(c.isspace() or not c.isprintable() for c in value)
    if sep and (scheme not in DOCKER_HOST_SCHEMES or bad or not rest):
        raise UsageError(f"{where}: docker_host {value!r} is not a DOCKER_HOST URL: use "
                         "unix:///path, tcp://host:2376, ssh://user@host, or a docker context name")
    if not sep and not _CONTEXT_RE.match(value):
        raise UsageError(f"{where}: docker_host {value!r} is neither a DOCKER_HOST URL "
                         "(unix://, tcp://, ssh://) nor a docker context name")
    return value


def docker_host_name(docker_host: str | None) -> str:
    """The machine a DOCKER_HOST URL points at: its host name for tcp:// and
    ssh://, 127.0.0.1 for the local engine and unix://, npipe://, fd://."""
    from urllib.parse import urlsplit  # noqa: PLC0415

    if docker_host and docker_host.partition("://")[0] in ("tcp", "ssh"):
        with contextlib.suppress(ValueError):
            if host := urlsplit(docker_host).hostname:
                return host
    return "127.0.0.1"


def default_model_url(docker_host: str | None, port: int) -> str:
    """Where a model's server answers unless its `url:` says: the docker
    host's machine (a DOCKER_HOST URL, contexts resolved first) and --port."""
    host = docker_host_name(docker_host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _service_ref(item: Any, where: str, base: Path | None) -> ServiceRef:
    if not isinstance(item, dict) or not isinstance(item.get("service"), str):
        raise UsageError(f"{where}: each item of 'services' must be a mapping with 'service' "
                         "(and optionally docker_host, compose_file)")
    unknown = sorted(map(str, set(item) - set(_SERVICE_FIELDS)))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} in 'services'; "
                         f"known fields: {', '.join(_SERVICE_FIELDS)}")
    for key in ("docker_host", "compose_file"):
        if not isinstance(item.get(key, ""), str):
            raise UsageError(f"{where}: '{key}' of service {item['service']!r} must be a string")
    host = item.get("docker_host")
    compose_file = item.get("compose_file")
    if compose_file is not None and base is not None and not Path(compose_file).is_absolute():
        compose_file = str(base / compose_file)  # relative to the models file
    return ServiceRef(_check_name(item["service"], "service", where),
                      check_docker_host(host, where) if host is not None else None, compose_file)


def hosting_fields(data: Mapping[str, Any], name: str, source: str, base: Path | None
                   ) -> dict[str, Any]:
    """The models file's docker_host, url and services of one model, checked."""
    where = f"{source}: model {name!r}"
    if "services" in data and "service" in data:
        raise UsageError(f"{where}: 'service' and 'services' are exclusive: keep one")
    if data.get("services") is not None and data.get("docker_host") is not None:
        raise UsageError(f"{where}: with 'services', give each item its own docker_host "
                         "(an item without one runs on the local engine)")
    if "services" in data and not data["services"]:
        raise UsageError(f"{where}: 'services' is empty: list the model's services")
    services = tuple(_service_ref(item, where, base) for item in data.get("services") or ())
    url = data.get("url")
    if url is not None:
        from urllib.parse import urlsplit  # noqa: PLC0415

        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.username
            parts.port  # noqa: B018 (raises ValueError when out of range)
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"{where}: url {url!r} is not an http(s) URL without a user: "
                             "use e.g. http://spark-2:8000")
        url = url.rstrip("/").removesuffix("/v1")
    host = data.get("docker_host")
    return {"services": services, "url": url,
            "docker_host": check_docker_host(host, where) if host is not None else None}


def model_from_mapping(data: Any, source: str, base: Path | None = None) -> ModelSpec:
    """Build a ModelSpec from one YAML entry, checking every field's type."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: each model must be a mapping with name, service, model_id, "
                         "max_context_tokens")
    unknown = sorted(map(str, set(data) - set(_MODEL_FIELDS)))  # keys may be any YAML scalar
    if unknown:
        raise UsageError(f"{source}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"known fields: {', '.join(_MODEL_FIELDS)}")
    for key in ("name", "model_id", "max_context_tokens"):
        if key not in data:
            raise UsageError(f"{source}: model {data.get('name', '?')!r} lacks '{key}': add it")
    for key, value in data.items():
        types = _MODEL_FIELDS[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UsageError(f"{source}: model {data.get('name', '?')!r}: '{key}' must be {names}, "
                             f"not {type(value).__name__}")
    name = _check_name(data["name"], "model name", source)
    service = None if "services" in data else data.get("service", f"vllm-{name}")
    if service is not None:
        _check_name(service, "service", source)
    if data["max_context_tokens"] < 2:
        raise UsageError(f"{source}: model {name!r}: max_context_tokens must be >= 2")
    for key in ("params_total_b", "params_active_b", "bytes_per_weight"):
        value = data.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{source}: model {name!r}: '{key}' must be a number > 0, not {value}")
    try:  # it goes into every request body and the report, as JSON
        json.dumps(data.get("chat_template_kwargs"), allow_nan=False)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: model {name!r}: 'chat_template_kwargs' must hold only "
                         "strings, numbers, booleans, lists and mappings") from None
    if data.get("engine") is not None and data["engine"] not in ENGINES:
        raise UsageError(f"{source}: model {name!r}: 'engine' must be one of {', '.join(ENGINES)}, "
                         f"not {data['engine']!r}")
    if not data["model_id"].strip():
        raise UsageError(f"{source}: model {name!r}: model_id is empty")
    return ModelSpec(**{**data, "service": service, **hosting_fields(data, name, source, base)})


def load_models_file(path: Path, base: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]:
    """Models from a YAML file: `models:` entries replace built-ins of the same
    name and add the others; `replace: true` drops the built-in table."""
    data = _load_yaml(path, "--models file")
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise UsageError(f"--models file {path}: expected a mapping with a 'models:' list")
    extra = [model_from_mapping(m, f"--models file {path}", path.parent) for m in data["models"]]
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise UsageError(f"--models file {path}: 'replace' must be true or false")
    table = {} if replace else {m.name: m for m in base}
    for m in extra:
        table[m.name] = m
    return tuple(table.values())


def _load_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc}") from None
    try:
        loader = yaml.SafeLoader(text)  # the node graph first: aliases not yet expanded
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
        if node is not None and _expanded_size(node) > YAML_MAX_NODES:
            raise UsageError(f"{what} {path} expands its aliases (*name) to over "
                             f"{YAML_MAX_NODES} values, more than any such file holds "
                             "(an alias bomb?): write the entries out, or use fewer aliases")
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # safe_load's constructors raise ValueError (a date like 2024-13-45,
        # `!!int 0x`), and deep nesting exhausts the stack: all bad YAML.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{what} {path} is not valid YAML ({first}): fix the file") from None


# ============================================================================
# Services: Compose and Docker (I/O)
# ============================================================================


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class ComposeFile:
    """A compose file, read (never executed) with yaml.safe_load."""

    path: Path
    project: str
    services: Mapping[str, Any]


def compose_project_name(path: Path, data: Mapping[str, Any]) -> str:
    """The project name Compose v1 and v2 both derive: COMPOSE_PROJECT_NAME,
    the file's `name:`, else the folder's name, lower-cased and stripped."""
    raw = os.environ.get("COMPOSE_PROJECT_NAME") or data.get("name") or path.resolve().parent.name
    name = re.sub(r"[^a-z0-9_-]", "", str(raw).lower()).lstrip("_-")
    return name or "default"


def load_compose_file(path: Path) -> ComposeFile:
    data = _load_yaml(path, "compose file")
    if not isinstance(data, dict):
        raise UsageError(f"compose file {path} is not a mapping of Compose keys: is it a compose file?")
    services = data.get("services")
    if not isinstance(services, dict) or not services:
        raise UsageError(f"compose file {path} has no 'services:' mapping: add the model services")
    return ComposeFile(path=path, project=compose_project_name(path, data), services=services)


def check_services(compose: ComposeFile, models: Sequence[ModelSpec]) -> None:
    """Every selected model's service must exist in the compose file."""
    for m in models:
        if m.service not in compose.services:
            have = ", ".join(sorted(compose.services))
            raise UsageError(f"Service {m.service} not found in {compose.path.name} "
                             f"(model {m.name}; it has: {have}): add it or fix the model table")


def _run(argv: Sequence[str], runner: Runner = subprocess.run, timeout_s: float = 600,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an argv list (never a shell) and capture its output."""
    extra = {} if env is None else {"env": dict(env)}  # None: inherit ours
    try:
        return runner(list(argv), capture_output=True, text=True, timeout=timeout_s,
                      stdin=subprocess.DEVNULL, **extra)
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} is not installed: install Docker with Compose "
                         "(docker compose v2, or docker-compose v1)") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"{' '.join(argv[:4])} did not finish in {timeout_s:.0f} s") from None


def _docker_daemon_hint(stderr: str) -> str | None:
    if "Cannot connect to the Docker daemon" in stderr or "docker.sock" in stderr:
        return ("the Docker daemon is not reachable: start it (e.g. `sudo systemctl start docker`), "
                "or check DOCKER_HOST and that you may use the socket (the docker group)")
    return None


def find_compose_command(runner: Runner = subprocess.run,
                         environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """`docker compose` (v2) when present, else `docker-compose` (v1);
    PERFTEST_COMPOSE="docker-compose" (or "docker compose") picks one."""
    choices: tuple[tuple[str, ...], ...] = (("docker", "compose"), ("docker-compose",))
    if environ.get("PERFTEST_COMPOSE"):
        choices = (tuple(environ["PERFTEST_COMPOSE"].split()),)
        if choices[0] not in (("docker", "compose"), ("docker-compose",)):
            raise UsageError(f"PERFTEST_COMPOSE={environ['PERFTEST_COMPOSE']!r}: use "
                             "'docker compose' or 'docker-compose'")
    for argv in choices:
        if argv[0] == "docker" and shutil.which("docker") is None:
            continue
        if argv[0] == "docker-compose" and shutil.which("docker-compose") is None:
            continue
        try:
            proc = runner([*argv, "version"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            return argv
    raise SetupError("neither `docker compose` (v2) nor `docker-compose` (v1) works here: "
                     "install the Docker Compose plugin, or use --endpoint URL for a server "
                     "that is already running")


class Compose:
    """`docker compose` / `docker-compose` for one compose file and project."""

    env: Mapping[str, str] | None = None  # None: ours (the local engine, or our DOCKER_HOST)

    def __init__(self, file: ComposeFile, command: Sequence[str], runner: Runner = subprocess.run):
        self.file = file
        self.command = tuple(command)
        self.runner = runner

    @property
    def version_label(self) -> str:
        return "docker compose (v2)" if self.command == ("docker", "compose") else "docker-compose (v1)"

    def _compose(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        argv = [*self.command, "-f", str(self.file.path), "-p", self.file.project, *args]
        proc = _run(argv, self.runner, timeout_s, env=self.env)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            raise SetupError(self._failure(argv, args, proc.returncode,
                                           err.splitlines()[-1] if err else "no output", err))
        return proc

    def _failure(self, argv: Sequence[str], args: Sequence[str], code: int, last: str,
                 err: str) -> str:
        """What a failed Compose command says: the local daemon's hint, or its last line."""
        return _docker_daemon_hint(err) or f"`{' '.join(argv)}` failed (exit {code}): {last}"

    def up(self, service: str) -> None:
        self._compose("up", "-d", service)

    def stop(self, services: Sequence[str]) -> None:
        if services:
            self._compose("stop", *services)

    def config(self) -> str:
        """The compose file as Compose reads it, variables filled in (YAML)."""
        return self._compose("config", timeout_s=60).stdout

    def running(self, services: Sequence[str]) -> list[str]:
        """Which of `services` have a running container in this project."""
        proc = self._compose("ps", "--services", "--filter", "status=running")
        up = set(proc.stdout.split())
        return [s for s in services if s in up]


@dataclass(frozen=True)
class ContainerState:
    status: str  # created | running | restarting | exited | dead | absent
    exit_code: int | None = None
    oom_killed: bool = False
    health: str | None = None  # starting | healthy | unhealthy | None


class DockerWatch:
    """Reads one Compose service's container through the Docker SDK.

    The container is found by its Compose labels, since container names differ
    between Compose v1 (project_service_1) and v2 (project-service-1).
    """

    def __init__(self, project: str, service: str, client: Any = None):
        self.project = project
        self.service = service
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def container(self) -> Any | None:
        found = self.client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={self.service}"]})
        return found[0] if found else None

    def state(self) -> ContainerState:
        c = self.container()
        if c is None:
            return ContainerState("absent")
        s = c.attrs.get("State", {})
        # Status first: a stopped container can still report Health "unhealthy".
        return ContainerState(status=s.get("Status", "unknown"), exit_code=s.get("ExitCode"),
                              oom_killed=bool(s.get("OOMKilled")),
                              health=(s.get("Health") or {}).get("Status"))

    def log_tail(self, lines: int = 20) -> list[str]:
        c = self.container()
        if c is None:
            return []
        raw = c.logs(tail=lines).decode("utf-8", "replace")
        return [ln for ln in raw.splitlines() if ln.strip()][-lines:]

    def log_lines(self, lines: int) -> list[str]:
        """The container's last `lines` log lines (stdout and stderr)."""
        c = self.container()
        if c is None:
            return []
        return c.logs(tail=lines).decode("utf-8", "replace").splitlines()

    def image(self) -> Lifecycle:
        """The container's image and command (an empty record without one)."""
        c = self.container()
        if c is None:
            return Lifecycle()
        digests = None
        with contextlib.suppress(Exception):
            digests = tuple(c.image.attrs.get("RepoDigests") or ())
        cmd = c.attrs.get("Config", {}).get("Cmd")
        return Lifecycle(image=c.attrs.get("Config", {}).get("Image"),
                         image_id=c.attrs.get("Image"), repo_digests=digests,
                         command=tuple(cmd) if cmd else None)

    def check_alive(self) -> None:
        """Raise ModelFailed with exit code, OOM flag and log tail if the
        container is no longer running."""
        st = self.state()
        if st.status in ("running", "created", "restarting"):
            return
        tail = self.log_tail()
        details = Failure(st.status, st.exit_code, st.oom_killed, tuple(tail))
        if st.status == "absent":
            raise ModelFailed(f"container of {self.service} disappeared", details)
        why = "OOM-killed" if st.oom_killed else f"exited with code {st.exit_code}"
        last = f"; last log line: {tail[-1]}" if tail else ""
        raise ModelFailed(f"container of {self.service} {why}{last}", details)


def docker_client() -> Any:
    import docker  # noqa: PLC0415 (lazy: see imports)

    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # the SDK raises several types for the same cause
        raise SetupError(_docker_daemon_hint(str(exc)) or
                         f"the Docker daemon is not reachable ({exc}): is Docker running?") from None
    return client


@dataclass(frozen=True)
class DockerHost:
    """One Docker engine, as Docker itself reaches it: `name` as the models
    file gives it (a DOCKER_HOST URL or a docker context; None: the local
    engine, i.e. our own DOCKER_HOST or the default socket), `url` the
    DOCKER_HOST it stands for (a context resolved), `cert_path` its TLS files."""

    name: str | None
    url: str | None = None
    cert_path: str | None = None
    tls_verify: bool = False

    @property
    def label(self) -> str:
        return self.name or "the local engine"

    def environ(self, base: Mapping[str, str] = os.environ) -> dict[str, str] | None:
        """The environment for a `docker compose` of this host (None: ours, unchanged)."""
        if self.url is None:
            return None
        env = {k: v for k, v in base.items()
               if k not in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")}
        env["DOCKER_HOST"] = self.url
        if self.cert_path:
            env["DOCKER_CERT_PATH"] = self.cert_path
            if self.tls_verify:
                env["DOCKER_TLS_VERIFY"] = "1"
        elif self.name and "://" in self.name:  # a URL keeps our TLS settings for it
            env.update({k: base[k] for k in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH") if k in base})
        return env


def resolve_docker_host(name: str | None, runner: Runner = subprocess.run) -> DockerHost:
    """A models file's docker_host as a DockerHost: a URL as it is; a docker
    context through `docker context inspect` (its endpoint and TLS files), so
    that both Compose versions and the SDK reach it through DOCKER_HOST."""
    if name is None or "://" in name:
        return DockerHost(name, name)
    proc = _run(["docker", "context", "inspect", name], runner, 30)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise UsageError(f"docker_host {name!r} is no DOCKER_HOST URL and no docker context "
                         f"({why[-1] if why else 'docker context inspect failed'}): see "
                         "`docker context ls`")
    try:
        info = json.loads(proc.stdout)[0]
        endpoint = info["Endpoints"]["docker"]
        url = endpoint["Host"]
    except (ValueError, LookupError, TypeError):
        raise UsageError(f"docker context {name!r}: `docker context inspect` gave no docker "
                         "endpoint") from None
    tls = Path(str((info.get("Storage") or {}).get("TLSPath") or "")) / "docker"
    has_tls = bool(info.get("Storage")) and (tls / "ca.pem").exists()
    return DockerHost(name, url, str(tls) if has_tls else None,
                      tls_verify=has_tls and not endpoint.get("SkipTLSVerify", False))


def host_client(host: DockerHost) -> Any:
    """A Docker SDK client of `host`; ModelFailed naming the host and Docker's
    own words when it cannot be reached."""
    if host.url is None:
        return docker_client()
    import docker  # noqa: PLC0415

    try:
        client = docker.from_env(timeout=30, environment=host.environ(),
                                 use_ssh_client=host.url.startswith("ssh://"))
        client.ping()
    except Exception as exc:  # the SDK raises several types for the same cause
        raise ModelFailed(f"Docker host {host.label} is not reachable: {exc}",
                          Failure(docker_host=host.label)) from None
    return client


def engine_hardware(client: Any) -> EngineHardware:
    """The machine of a Docker engine, from `docker info`."""
    info = client.info()
    gib = (info.get("MemTotal") or 0) / 2**30
    runtimes = tuple(sorted(info.get("Runtimes") or {}))
    profile = (f"{info.get('Architecture')}, {info.get('NCPU')} CPUs, {gib:.0f} GiB"
               + (", nvidia runtime" if "nvidia" in runtimes else ""))
    return EngineHardware(info.get("Name"), info.get("OperatingSystem"), info.get("Architecture"),
                          info.get("NCPU"), round(gib, 1), info.get("ServerVersion"), runtimes,
                          profile)


class HostCompose(Compose):
    """Compose against one Docker host (DOCKER_HOST in its environment); its
    errors name the host and keep Compose's own last line."""

    def __init__(self, file: ComposeFile, command: Sequence[str], host: DockerHost,
                 runner: Runner = subprocess.run):
        super().__init__(file, command, runner)
        self.host = host
        self.env = host.environ()

    def _failure(self, argv: Sequence[str], args: Sequence[str], code: int, last: str,
                 err: str) -> str:
        # not the local daemon's hint (systemctl, the docker group): the host is named
        return (f"`{' '.join(self.command)} {' '.join(args)}` on Docker host {self.host.label} "
                f"failed (exit {code}): {last}")


@dataclass(frozen=True)
class Placement:
    """One service of a model, started (or being started) on its Docker host."""

    ref: ServiceRef
    host: DockerHost
    compose: HostCompose
    watch: DockerWatch


class GroupWatch:
    """Watches every service of a model, each on its own engine: the first one
    that is not running, or whose host cannot be reached, fails the model,
    named with its host. Duck-types DockerWatch for measure_model."""

    def __init__(self, placements: Sequence[Placement]):
        self.placements = list(placements)

    @staticmethod
    def check_one(p: Placement) -> None:
        try:
            p.watch.check_alive()
        except ModelFailed as exc:
            raise ModelFailed(f"{exc} (service {p.ref.service} on Docker host {p.host.label})",
                              dataclasses.replace(exc.details or Failure(), service=p.ref.service,
                                                  docker_host=p.host.label)) from None
        except Exception as exc:  # the SDK's connection errors: the host went away
            raise ModelFailed(f"Docker host {p.host.label} went away while {p.ref.service} ran "
                              f"on it: {exc}", Failure("unreachable", service=p.ref.service,
                                                       docker_host=p.host.label)) from None

    def check_alive(self) -> None:
        for p in self.placements:
            self.check_one(p)

    def log_tail(self, lines: int = 20) -> list[str]:
        return self.placements[-1].watch.log_tail(lines) if self.placements else []


def wait_running(p: Placement, timeout_s: float = 60.0, poll_s: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep) -> None:
    """After `up -d`: wait until the service's container runs (the next one
    starts only then); ModelFailed at once if it exited or its host went away."""
    deadline = time.monotonic() + timeout_s
    while True:
        GroupWatch.check_one(p)  # raises unless created/running/restarting
        if p.watch.state().status == "running":
            return
        if time.monotonic() > deadline:
            raise ModelFailed(f"{p.ref.service} on Docker host {p.host.label} was not running "
                              f"{timeout_s:.0f} s after `up`",
                              Failure(service=p.ref.service, docker_host=p.host.label))
        sleep(poll_s)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class PortHolder:
    kind: str  # "inference" (ours, may be stopped) | "container" | "process"
    description: str
    service: str | None = None


def who_holds_port(port: int, client: Any, project: str,
                   inference_services: Iterable[str]) -> PortHolder:
    """Name what answers on `port`: one of our inference services, another
    container, or a process that is not a container."""
    ours = set(inference_services)
    for c in client.containers.list():
        bindings = (c.attrs.get("HostConfig", {}).get("PortBindings") or {})
        ports = {b.get("HostPort") for bs in bindings.values() for b in (bs or [])}
        if str(port) not in ports:
            continue
        labels = c.labels or {}
        svc = labels.get("com.docker.compose.service")
        if labels.get("com.docker.compose.project") == project and svc in ours:
            return PortHolder("inference", f"service {svc} of this compose project", svc)
        return PortHolder("container", f"container {c.name} (image "
                          f"{c.attrs.get('Config', {}).get('Image')})")
    return PortHolder("process", "a process that is not a container (find it with "
                      f"`ss -ltnp 'sport = :{port}'`)")


@dataclass(frozen=True)
class RunningService:
    """A model's service while it runs: its container's watch, the clock's
    time when `up` began (the load time runs from there), image and command."""

    service: str
    watch: DockerWatch
    started_s: float
    lifecycle: Lifecycle


class ServiceLifecycle:
    """Every start, watch and stop of one compose file's model services.

    `ours` are the file's inference services: the only containers ever
    stopped. `running(service)` is the one way to run one: it first stops
    any of ours left running (by an earlier run), frees the port when one of
    ours holds it, starts the service, and always stops it on the way out,
    under `hold` (a second signal waits until the stop is done)."""

    def __init__(self, compose: Compose, ours: Sequence[str], port: int,
                 info: Callable[[str], None], *,
                 hold: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 clock: Clock = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 docker: Any = None):
        self.compose, self.ours, self.port, self.info = compose, list(ours), port, info
        self.hold, self.clock, self.sleep, self.docker = hold, clock, sleep, docker
        self._leftovers_checked = False

    @contextlib.contextmanager
    def running(self, name: str, service: str) -> Iterator[RunningService]:
        self._stop_leftovers()
        watch = DockerWatch(self.compose.file.project, service, self.docker)
        self._free_port(watch)
        self.info(f"{name}: starting {service}")
        started_s = self.clock()
        try:
            self.compose.up(service)  # inside try: an interrupt during `up` still stops it
            facts = Lifecycle()
            with contextlib.suppress(Exception):
                facts = watch.image()
            yield RunningService(service, watch, started_s,
                                 dataclasses.replace(facts, service=service))
        finally:
            with self.hold():
                try:
                    self.compose.stop([service])
                    self.info(f"{name}: stopped {service}")
                except PerftestError as exc:
                    self.info(f"{name}: could not stop {service}: {exc} "
                              f"(stop it by hand: docker compose stop {service})")

    def _stop_leftovers(self) -> None:
        if self._leftovers_checked:
            return
        self._leftovers_checked = True
        running = self.compose.running(self.ours)
        if running:
            self.info(f"stopping running inference services first: {', '.join(running)}")
            with self.hold():
                self.compose.stop(running)

    def _free_port(self, watch: DockerWatch) -> None:
        """If the port answers, name its holder and stop it only when it is
        one of ours."""
        port = self.port
        if not port_in_use(port):
            return
        holder = who_holds_port(port, watch.client, self.compose.file.project, self.ours)
        if holder.kind != "inference":
            raise ModelFailed(f"port {port} is already in use by {holder.description}: stop it, "
                              "or publish the services on another port and pass --port")
        self.info(f"port {port} is held by {holder.description}: stopping it")
        self.compose.stop([holder.service])  # type: ignore[list-item]
        for _ in range(60):
            if not port_in_use(port):
                return
            self.sleep(0.5)
        raise ModelFailed(f"port {port} still in use after stopping {holder.service}")


# The image step, before `up`: Compose would pull a missing image inside `up`,
# silently and under up's time limit; pulled here, it is visible and recorded.
PULL_POLICIES = ("missing", "always", "never")


@dataclass(frozen=True)
class PullProgress:
    """Where a pull stands: downloaded bytes of the layers whose size the
    engine has said (`bytes_total` grows as layers start)."""

    image: str
    elapsed_s: float
    layers: int
    layers_done: int
    bytes_done: int
    bytes_total: int


class PullError(Exception):
    """The engine reported an error in the pull's event stream."""


class PullFailed(ModelFailed):
    """A pull that failed or ran out of time, with how far it got."""

    def __init__(self, message: str, progress: PullProgress):
        super().__init__(message)
        self.progress = progress


class PullTracker:
    """Folds the engine's pull events (the JSON lines of POST /images/create)
    into PullProgress: per layer, its size and the bytes downloaded so far."""

    def __init__(self, image: str):
        self.image = image
        self.layers: set[str] = set()
        self.finished: set[str] = set()
        self.present: set[str] = set()  # "Already exists": nothing to download
        self.size: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def feed(self, event: Mapping[str, Any]) -> None:
        if event.get("error") or event.get("errorDetail"):
            detail = event.get("errorDetail") or {}
            raise PullError(str(detail.get("message") or event.get("error")))
        layer, status = event.get("id"), str(event.get("status") or "")
        if not isinstance(layer, str) or status.startswith(("Pulling from", "Digest:", "Status:")):
            return
        self.layers.add(layer)
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and isinstance(detail.get("total"), int) and detail["total"] > 0:
            self.size[layer] = detail["total"]
            self.done[layer] = min(int(detail.get("current") or 0), detail["total"])
        elif status in ("Verifying Checksum", "Download complete") and layer in self.size:
            self.done[layer] = self.size[layer]
        elif status == "Already exists":
            self.present.add(layer)
            self.finished.add(layer)
        elif status == "Pull complete":
            self.finished.add(layer)

    def progress(self, elapsed_s: float) -> PullProgress:
        return PullProgress(self.image, elapsed_s, len(self.layers), len(self.finished),
                            sum(self.done.values()), sum(self.size.values()))


def pull_image(image: str, timeout_s: float, on_progress: Callable[[PullProgress], None], *,
               connect: Callable[[float], Any] | None = None,
               clock: Clock = time.monotonic) -> PullProgress:
    """Pull `image` through the Docker engine, reporting progress as the
    engine streams it; the final progress. ModelFailed, with the image's name
    and the engine's (the registry's) words, when the pull fails or runs past
    `timeout_s`. Its own client, closed at the end: an interrupt or a timeout
    drops the connection, and the engine then stops the pull."""
    import docker  # noqa: PLC0415

    client = (connect or _pull_client)(min(timeout_s, 300.0))  # read timeout: a stalled pull
    tracker = PullTracker(image)
    t0 = clock()
    try:
        for event in client.api.pull(image, stream=True, decode=True):
            tracker.feed(event)
            elapsed = clock() - t0
            on_progress(tracker.progress(elapsed))
            if elapsed > timeout_s:
                raise PullFailed(f"pulling image {image} did not finish in {timeout_s:.0f} s "
                                 "(raise --pull-timeout)", tracker.progress(elapsed))
    except PullError as exc:
        raise PullFailed(f"cannot pull image {image}: {exc}",
                         tracker.progress(clock() - t0)) from None
    except docker.errors.APIError as exc:
        raise PullFailed(f"cannot pull image {image}: {exc.explanation or exc}",
                         tracker.progress(clock() - t0)) from None
    except (OSError, ValueError) as exc:  # requests' connection and read errors are OSErrors
        raise PullFailed(f"pulling image {image} failed: {exc}",
                         tracker.progress(clock() - t0)) from None
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return tracker.progress(clock() - t0)


def _pull_client(read_timeout_s: float, host: DockerHost | None = None) -> Any:
    """A Docker SDK client for one pull, on `host` (None: the local engine)."""
    import docker  # noqa: PLC0415

    timeout = max(30, int(read_timeout_s))
    if host is None or host.url is None:
        return docker.from_env(timeout=timeout)
    return docker.from_env(timeout=timeout, environment=host.environ(),
                           use_ssh_client=host.url.startswith("ssh://"))


def image_present(client: Any, image: str) -> bool:
    import docker  # noqa: PLC0415

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def service_image(config_yaml: str, service: str) -> str | None:
    """The image a service runs, from `compose config` output (the compose
    file with its variables filled in); None for a service Compose builds."""
    data = yaml.safe_load(config_yaml) or {}
    svc = (data.get("services") or {}).get(service) or {}
    if not isinstance(svc, dict) or svc.get("build") or not svc.get("image"):
        return None
    return str(svc["image"])


# ============================================================================
# Measurement (pure)
# ============================================================================


Read = tuple[float, bytes]  # (clock time when the bytes arrived, the bytes)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]  # asyncio.sleep; tests pass one on virtual time

try:  # a dependency, yet optional in the code: parses a chunk several times faster
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - depends on the environment
    _orjson_loads = None
JSON_DECODER = "orjson" if _orjson_loads else "json"
_LONG_DIGITS = re.compile(rb"\d{19}")


def _json_loads(data: bytes) -> Any:
    """An SSE event's JSON as json.loads(data.decode("utf-8", "replace"))
    parses it, as far as measure_stream reads it; through orjson when it is
    installed and accepts the text (what orjson rejects, json decides).

    orjson turns integers beyond 64 bits into floats where json keeps them
    exact; of what measure_stream reads, only "usage" and "error" could show
    that, so for those events a long digit run sends the text to json."""
    if _orjson_loads is not None:
        try:
            obj = _orjson_loads(data)
        except ValueError:
            pass
        else:
            if not (isinstance(obj, dict) and ("usage" in obj or "error" in obj)
                    and _LONG_DIGITS.search(data)):
                return obj
    return json.loads(data.decode("utf-8", "replace"))


def sse_payloads(reads: Sequence[Read]) -> list[tuple[float, bytes]]:
    """SSE `data:` payloads (bytes) with the time their event was complete.

    An event is complete at its blank line, so its time is that of the network
    read that delivered the blank line. Comments and other fields are dropped;
    CRLF and a lone CR count as LF (as the SSE spec says), also when split
    across reads. Linear in the bytes: each
    byte is copied and scanned a bounded number of times.
    """
    events: list[tuple[float, bytes]] = []
    buf = bytearray()  # the incomplete event so far, CRLF already made LF
    cr = False  # the previous read ended in CR: an LF that starts this one is its pair
    for t, chunk in reads:
        if cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        cr = False
        if b"\r" in chunk:  # CRLF, and a lone CR, end a line as LF does
            cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not buf:  # the common case: the read starts an event; no copy into buf
            pos = 0
            while (end := chunk.find(b"\n\n", pos)) >= 0:
                if chunk.startswith(b"data: ", pos) and chunk.find(b"\n", pos, end) < 0:
                    events.append((t, chunk[pos + 6:end]))  # one `data:` line
                else:
                    _add_event(events, t, chunk[pos:end])
                pos = end + 2
            if pos < len(chunk):
                buf += chunk[pos:] if pos else chunk
            continue
        start = max(0, len(buf) - 1)  # a blank line may straddle the reads
        buf += chunk
        pos = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            _add_event(events, t, bytes(buf[pos:end]))
            pos = start = end + 2
        if pos:
            del buf[:pos]
    return events


def _add_event(events: list[tuple[float, bytes]], t: float, block: bytes) -> None:
    data = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
    if data:
        events.append((t, data[0] if len(data) == 1 else b"\n".join(data)))


def _chunk_delta(chunk: Any) -> dict[str, Any] | None:
    """The first choice's delta of a chat chunk, or None when it has none."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    return delta if isinstance(delta, dict) else None


def _delta_tokens(chunk: Mapping[str, Any]) -> tuple[bool, bool]:
    """(carries a generated token, carries answer text) for a chat chunk.

    A token is reasoning or answer text; vLLM also sends a token whose bytes
    are an incomplete UTF-8 sequence as `content: ""` (its text follows with
    the next token), so an empty content delta counts as a token unless it is
    the role chunk. A delta without content (a final finish chunk) is no token.
    """
    delta = _chunk_delta(chunk)
    if delta is None:
        return False, False
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    content = delta.get("content")
    answer = isinstance(content, str) and content != ""
    token = answer or (isinstance(reasoning, str) and reasoning != "") or (
        isinstance(content, str) and "role" not in delta)
    return token, answer


@dataclass(frozen=True)
class StreamTokens:
    """What a complete stream's events say: when each token chunk arrived,
    the tokens it carried where the server says so per chunk (continuous
    usage; None: not said), when the first answer token came, the usage."""

    times: list[float]
    counts: list[int | None]
    first_answer: float | None
    usage: Mapping[str, Any] | None


def stream_tokens(reads: Sequence[Read]) -> StreamTokens | str:
    """The token chunks of a stream, or why it is not a complete one (an
    error event, a malformed event, no [DONE], no token at all)."""
    times: list[float] = []
    counts: list[int | None] = []
    first_answer: float | None = None
    usage: Mapping[str, Any] | None = None
    for t, raw in sse_payloads(reads):
        if raw == b"[DONE]":
            break
        try:
            chunk = _json_loads(raw)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            chunk = None
        if not isinstance(chunk, dict):
            return f"malformed SSE event: {raw.decode('utf-8', 'replace')[:80]!r}"
        if "error" in chunk:
            err = chunk["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            return f"error event in stream: {str(msg)[:200]}"
        token, answer = _delta_tokens(chunk)
        chunk_usage = chunk.get("usage")
        if token:
            times.append(t)
            if chunk_usage is None:  # the common case: no continuous usage
                counts.append(None)
            else:
                prev = (usage or {}).get("completion_tokens", 0) if usage else 0
                now = chunk_usage.get("completion_tokens") if isinstance(chunk_usage, dict) else None
                counts.append(now - prev if isinstance(now, int) and isinstance(prev, int)
                              else None)
            if answer and first_answer is None:
                first_answer = t
        if isinstance(chunk_usage, dict):
            usage = chunk_usage
    else:
        return (f"stream ended before [DONE] after {len(times)} token chunk(s)"
                + _what_came(reads, times))
    if not times:
        return "stream finished without any generated token"
    return StreamTokens(times, counts, first_answer, usage)


def _usage_counts(usage: Mapping[str, Any] | None, token_chunks: int
                  ) -> tuple[int, int, int | None] | str:
    """(tokens out, tokens in, cached tokens or None) from a stream's usage,
    or why they cannot be trusted."""
    if usage is None:
        return f"{NO_USAGE_ERROR}: the server ignored stream_options.include_usage"
    tokens_out, tokens_in = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if not _count(tokens_out) or not _count(tokens_in) or tokens_out < 1:
        return f"usage without valid token counts: {json.dumps(usage)[:120]}"
    if (why := _beyond_the_chunks(tokens_out, token_chunks)) is not None:
        return why
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return tokens_out, tokens_in, cached if isinstance(cached, int) else None


def measure_stream(t_sent: float, reads: Sequence[Read], target_tokens_out: int | None,
                   t_scheduled: float | None = None, retries: int = 0,
                   usage_fallback: Mapping[str, Any] | None = None) -> Sample:
    """Turn a finished stream's timed reads into a Sample (pure).

    TTFT runs from `t_scheduled` (when the request was meant to go; defaults
    to `t_sent`) to the first chunk that carries a generated token, reasoning
    included (see _delta_tokens); the role chunk does not count. Latency ends
    at the last token chunk. Token counts come from the usage trailer only,
    or from `usage_fallback` (counted by the caller) when the stream had none.
    An answer shorter than asked and than MIN_DECODE_TOKENS has no decode rate.
    """
    t0 = t_sent if t_scheduled is None else t_scheduled
    queued_ms = (t_sent - t0) * 1000
    tokens = stream_tokens(reads)
    if isinstance(tokens, str):
        return Sample(ok=False, error=tokens, retries=retries, queued_ms=queued_ms)
    counts = _usage_counts(tokens.usage if tokens.usage is not None else usage_fallback,
                           len(tokens.times))
    if isinstance(counts, str):
        return Sample(ok=False, error=counts, retries=retries, queued_ms=queued_ms)
    tokens_out, tokens_in, cached = counts
    times = tokens.times
    ttft_s = times[0] - t0
    latency_s = times[-1] - t0
    arrivals = count_arrivals(times)
    # no rate is better than one of millions of tokens/s (see SAME_READ_S)
    decode_s = times[-1] - times[0] if has_decode_time(arrivals) else 0.0
    # too few tokens for a rate (a server that ignored ignore_eos): none at all
    short = target_tokens_out is not None and tokens_out < min(target_tokens_out, MIN_DECODE_TOKENS)
    decode_s = 0.0 if short else decode_s
    itl = [] if short else spread_gaps(times, tokens.counts, tokens_out)
    return Sample(
        ok=True,
        ttft_ms=ttft_s * 1000,
        ttfo_ms=(tokens.first_answer - t0) * 1000 if tokens.first_answer is not None else None,
        tps=(tokens_out - 1) / decode_s if tokens_out > 1 and decode_s > 0 else None,
        tpot_ms=decode_s * 1000 / (tokens_out - 1) if tokens_out > 1 and decode_s > 0 else None,
        e2e_tps=tokens_out / latency_s if latency_s > 0 else None,
        prefill_tps=tokens_in / ttft_s if ttft_s > 0 else None,
        total_s=latency_s,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        tokens_out_exact=None if target_tokens_out is None else tokens_out == target_tokens_out,
        cached_tokens=cached,
        retries=retries,
        queued_ms=queued_ms,
        token_reads=arrivals,
        itl_ms=tuple(itl),
    )


# A sample shorter than asked and than this has no decode rate: from a 3-token
# answer "654 tok/s" would measure two gaps, not decoding.
MIN_DECODE_TOKENS = 16
NO_USAGE_ERROR = "no usage in the stream"


def stream_text(reads: Sequence[Read]) -> str:
    """The text a chat stream generated: its answer and reasoning deltas in
    order (what a server that sends no usage is counted over)."""
    parts: list[str] = []
    for _, raw in sse_payloads(reads):
        try:
            chunk = _json_loads(raw) if raw != b"[DONE]" else None
        except (ValueError, RecursionError):
            continue
        delta = _chunk_delta(chunk)
        if delta is not None:  # vLLM ~0.11-0.15 sent both reasoning fields: one counts
            for text in (delta.get("reasoning_content") or delta.get("reasoning"), delta.get("content")):
                if isinstance(text, str):
                    parts.append(text)
    return "".join(parts)


def chunk_usage_seen(reads: Sequence[Read]) -> bool:
    """Whether usage came on token chunks (continuous_usage_stats honoured),
    not only in the trailer."""
    for _, raw in sse_payloads(reads):
        try:
            chunk = _json_loads(raw) if raw != b"[DONE]" else None
        except (ValueError, RecursionError):
            continue
        if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict) \
                and _delta_tokens(chunk)[0]:
            return True
    return False


def count_arrivals(times: Sequence[float]) -> int:
    """How many separate arrivals the token chunks made: chunks less than
    SAME_READ_S apart came in the same network read (see SAME_READ_S)."""
    return (1 + sum(b - a > SAME_READ_S for a, b in zip(times, times[1:]))) if times else 0


MAX_TOKENS = 100_000_000  # more than any context: a larger count is a broken server
MAX_TOKENS_PER_CHUNK = 64  # vLLM sends a chunk per engine step: 1 token, a few when speculating


def _beyond_the_chunks(tokens_out: int, chunks: int) -> str | None:
    """A claimed count far beyond the chunks that came: the ITLs spread a
    chunk's time over its tokens, so trusting it would build a list the size
    of the claim (99 million floats from three chunks)."""
    if tokens_out <= MAX_TOKENS_PER_CHUNK * chunks:
        return None
    return (f"usage claims {tokens_out} tokens for {chunks} token chunk(s) "
            f"(more than {MAX_TOKENS_PER_CHUNK} a chunk): not a count to trust")


def _what_came(reads: Sequence[Read], token_times: Sequence[float]) -> str:
    """For a stream that ended early: what was received, when it was no SSE."""
    size = sum(len(b) for _, b in reads)
    if token_times or not size or sse_payloads(reads):  # (the failure path only: parsed again)
        return ""
    start = b"".join(b for _, b in reads[:4])[:60]
    return f" ({size} bytes, no SSE event; they start {start!r})"


def _count(value: Any) -> bool:
    """A plausible token count from a server (JSON true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS


def spread_gaps(times: Sequence[float], counts: Sequence[int | None], tokens_out: int
                ) -> list[float]:
    """Inter-token latencies in ms: each gap between token chunks is shared
    evenly by the tokens of the later chunk, so the ITLs sum to the decode
    time exactly. Per-chunk counts come from continuous usage when the server
    sends it; otherwise the tokens after the first chunk are spread evenly."""
    if len(times) < 2:
        return []
    # per-chunk counts that add up to more than the total are not to be trusted
    known = (all(isinstance(c, int) and c > 0 for c in counts[1:])
             and sum(counts[1:]) < tokens_out)  # type: ignore[arg-type]
    per_chunk = (tokens_out - 1) / (len(times) - 1) if tokens_out > 1 else 1.0
    fixed = None if known else max(1, round(per_chunk))
    itl: list[float] = []
    for i in range(1, len(times)):
        gap_ms = (times[i] - times[i - 1]) * 1000
        whole = fixed or max(1, round(counts[i]))  # type: ignore[arg-type]
        if whole == 1:  # the common case, without a list per token
            itl.append(gap_ms)
        else:
            itl.extend([gap_ms / whole] * whole)
    return itl


# ============================================================================
# Transport (I/O)
# ============================================================================


def _proxied(url: str) -> bool:
    """Whether httpx would send requests to `url` through a proxy (from the
    environment); StreamTransport speaks to the server directly only."""
    import urllib.parse  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    proxies = urllib.request.getproxies()
    parts = urllib.parse.urlsplit(url)
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


class StreamTransport:
    """An httpx transport for GET and POST requests with a known body over
    HTTP/1.1, built for the hot path of a streaming response; httptools
    frames the responses. Keep-alive connections are reused when the
    response allows it (not after `Connection: close` or an HTTP/1.0
    answer); there is no connection limit (the callers bound their
    concurrency). Every body is bounded (BODY_MAX_BYTES, or what `record`
    is given). Everything else (other methods, streamed request bodies)
    goes to `fallback`, the default httpx transport.

    A response body can be read as usual (`aiter_raw`, `aread`: one item per
    network read, chunked transfer coding removed) or recorded: the
    response's extension "perftest.record" is an async function
    `record(reads, clock)` that appends `(clock(), payload)` for each network
    read of the body from inside the protocol's data_received, that is,
    stamped when the read returns, with no task switch per read, and returns
    at the end of the body."""

    def __init__(self, fallback: Any):
        self._fallback = fallback
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._ssl: Any = None

    async def __aenter__(self) -> StreamTransport:
        await self._fallback.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await self._fallback.aclose()
        # A transport closes its socket on the next turn of the loop: take
        # that turn, so that no descriptor outlives the client.
        await asyncio.sleep(0)

    async def handle_async_request(self, request: Any) -> Any:
        import httpx  # noqa: PLC0415

        url = request.url
        if request.method not in ("POST", "GET") or url.scheme not in ("http", "https"):
            return await self._fallback.handle_async_request(request)
        try:
            body = request.content
        except httpx.RequestNotRead:
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        clock = request.extensions.get("perftest.clock")  # stamps the write that really sent it
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        head = b"".join([request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n",
                         *(b"%s: %s\r\n" % kv for kv in request.headers.raw), b"\r\n"])
        data = head + body  # built once, before the stamp: a long prompt's copy is not TTFT
        while True:
            conn = None
            idle = self._idle.get(key)
            while idle and conn is None:
                conn = idle.pop()
                if conn.eof or conn.extra:  # the server closed it (or spoke) while idle
                    self._release(conn, key, False)
                    conn = None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, timeouts.get("connect"), request)
            conn.start_response()
            t_sent = clock() if clock is not None else None
            try:
                conn.transport.write(data)
            except RuntimeError:  # uvloop: the server closed it under us (asyncio ignores it)
                self._release(conn, key, False)
                if reused:
                    continue
                raise httpx.RemoteProtocolError(
                    "server closed the connection before the request was sent",
                    request=request) from None
            try:
                status, reason, headers = await conn.read_head(timeouts.get("read"), request)
            except _StaleConnection:
                self._release(conn, key, False)
                if reused:  # the server dropped a kept-alive connection: try a new one
                    continue
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=request) from None
            except BaseException:
                self._release(conn, key, False)
                raise
            break
        stream = _body_stream_class()(self, conn, key, timeouts.get("read"), request)
        return httpx.Response(status, headers=headers, stream=stream, extensions={
            "http_version": b"HTTP/1.1", "reason_phrase": reason,
            "perftest.record": stream.record, "perftest.t_sent": t_sent})

    async def _connect(self, key: tuple[str, str, int], timeout_s: float | None, request: Any
                       ) -> _Connection:
        import httpx  # noqa: PLC0415

        scheme, host, port = key
        ssl_ctx = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            ssl_ctx = self._ssl
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop), host, port, ssl=ssl_ctx,
                server_hostname=host if ssl_ctx else None), timeout_s)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                       request=request) from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection, key: tuple[str, str, int], reusable: bool) -> None:
        if reusable and not conn.eof:
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
            self._open.discard(conn)


RESPONSE_HEAD_MAX_BYTES = 1 << 16  # a response head is a few hundred bytes; more is no server's
BODY_MAX_BYTES = 32 << 20  # a body read whole (a /tokenize answer): more is no sane answer


def _httptools() -> Any:
    """httptools (llhttp, the HTTP/1.1 parser of Node.js and uvicorn),
    imported on first use like httpx."""
    import httptools  # noqa: PLC0415 (lazy: see imports)

    return httptools


class _StaleConnection(Exception):
    """The connection ended before the first byte of a response."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection. httptools frames each response inside
    data_received (status line, headers, Content-Length, chunked coding,
    keep-alive); this class only routes what it hands over. Until a body is
    recorded, its bytes wait in `body` for the one reader (reading pauses
    while 1 MiB waits unread); while it records (`record`), data_received
    stamps each read first and appends that read's payload itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: Any = None
        self.parser: Any = None  # the response now read; None between requests
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._begin(None)
        # While recording: where reads go, the clock, when the last bytes
        # came (loop time, for the read timeout), the bytes still allowed.
        self.reads: list[Read] | None = None
        self.clock: Clock = time.perf_counter
        self.last_read = 0.0
        self.body_left = self.body_max = 0
        self.recorded: asyncio.Future[None] | None = None

    def _begin(self, parser: Any) -> None:
        self.parser = parser
        self.status, self.reason, self.headers = 0, b"", []
        self.head_bytes = 0      # status line and headers so far
        self.head_done = False   # the final (non-1xx) head is complete
        self.informational = False
        self.until_close = False  # the body ends with the connection
        self.keep_alive = False
        self.done = False        # the whole response is in
        self.extra = False       # bytes came that belong to no response: never reuse
        self.broken: ValueError | None = None  # the response is malformed
        self.body: list[bytes] = []
        self.buffered = 0
        self.paused = False

    def start_response(self) -> None:
        """Before a request is written: a parser for its response."""
        self._begin(_httptools().HttpResponseParser(self))

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # a second response nobody asked for
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self._count_head(len(reason) + 13)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > RESPONSE_HEAD_MAX_BYTES and self.broken is None:
            self.broken = ValueError(f"response head too long (over {RESPONSE_HEAD_MAX_BYTES} bytes)")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: a head follows
            self.informational = True
            self.reason, self.headers = b"", []
            return
        fields = {k.lower() for k, _ in self.headers}
        self.status, self.head_done = status, True
        self.keep_alive = parser.should_keep_alive()  # Connection: close, HTTP/1.0
        self.until_close = (b"content-length" not in fields and b"transfer-encoding" not in fields
                            and status not in (204, 304))
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif not self.done:
            self.done = True

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reads = self.reads
        if reads is not None:  # the hot path: stamp first, then frame
            t = self.clock()
            self.last_read = self.loop.time()
            self._feed(data)
            body = self.body
            if body:
                payload = body[0] if len(body) == 1 else b"".join(body)
                body.clear()
                self.buffered = 0
                self.body_left -= len(payload)
                if self.body_left < 0:
                    self._end_recording(_too_long(self.body_max))
                    return
                reads.append((t, payload))
            if self.broken is not None or self.done:
                self._end_recording(self.broken)
            return
        self._feed(data)
        if self.buffered > 1 << 20 and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _feed(self, data: bytes) -> None:
        if self.parser is None or self.done or self.broken is not None:
            self.extra = True  # after the response, or while idle: the connection is spoilt
            return
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools is looked up only when it raised, not per read
            httptools = _httptools()
            if isinstance(exc, httptools.HttpParserUpgrade):  # 101: no HTTP body follows
                self.done = self.extra = True
            elif isinstance(exc, httptools.HttpParserError):
                self.extra = True
                if not self.done and self.broken is None:
                    self.broken = ValueError(f"malformed response: {exc}")
            else:
                raise

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._ended(exc)

    def _ended(self, exc: BaseException | None) -> None:
        self.eof = True
        self.error = self.error or exc
        if self.head_done and self.until_close and exc is None:
            self.done = True  # a body delimited by the end of the connection
        self._wake()
        self._end_recording(None if self.done else (exc or EOFError()))

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        self.eof = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self.done and self.keep_alive and not self.extra and not self.eof

    async def wait(self, timeout_s: float | None) -> None:
        """Until data_received or the end of the connection wakes us;
        TimeoutError after `timeout_s`."""
        self.waiter = waiter = self.loop.create_future()
        timer = None if timeout_s is None else self.loop.call_later(timeout_s, _time_out, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def take_body(self) -> bytes:
        """The body bytes that wait unread (b"" if none)."""
        body = self.body
        data = (body[0] if len(body) == 1 else b"".join(body)) if body else b""
        body.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        return data

    def protocol_error(self, request: Any, where: str) -> Exception:
        """The httpx error for a response that cannot be read on (call at EOF or when broken)."""
        import httpx  # noqa: PLC0415

        if self.broken is not None:
            return httpx.RemoteProtocolError(str(self.broken), request=request)
        if self.error is not None:
            return httpx.ReadError(str(self.error) or type(self.error).__name__, request=request)
        return httpx.RemoteProtocolError(f"peer closed connection {where}", request=request)

    async def read_head(self, timeout_s: float | None, request: Any
                        ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The final (non-1xx) response head: status, reason, headers."""
        import httpx  # noqa: PLC0415

        while not self.head_done:
            if self.broken is not None:
                raise httpx.RemoteProtocolError(f"{self.broken} (in the head)", request=request)
            if self.eof:
                # Nothing of a response came: the server had closed the
                # connection (a reset is how a closed socket answers a write).
                if self.head_bytes == 0 and (self.error is None
                                             or isinstance(self.error, ConnectionResetError)):
                    raise _StaleConnection()
                raise self.protocol_error(request, "inside the response head")
            try:
                await self.wait(timeout_s)
            except TimeoutError:
                raise httpx.ReadTimeout(f"no bytes for {timeout_s} s", request=request) from None
        return self.status, self.reason, self.headers

    async def record(self, reads: list[Read], clock: Clock, timeout_s: float | None,
                     max_bytes: int) -> None:
        """Append the rest of the body to `reads` as (clock(), payload) per
        network read, stamped in data_received; return at its end. Raises
        TimeoutError after `timeout_s` without bytes, EOFError if the
        connection ends early, ValueError on a malformed body or one over
        `max_bytes`, or what the connection failed with."""
        loop = self.loop
        self.body_left = self.body_max = max_bytes
        if self.body:  # arrived with the head: stamped now, as a reader would
            data = self.take_body()
            self.body_left -= len(data)
            if self.body_left < 0:
                raise _too_long(max_bytes)
            reads.append((clock(), data))
        if self.broken is not None:
            raise self.broken
        if self.done:
            return
        if self.eof:
            raise self.error or EOFError()
        self.recorded = done = loop.create_future()
        self.clock, self.reads = clock, reads
        self.last_read = loop.time()
        timer = None
        if timeout_s is not None:
            def check() -> None:  # one timer per body, not per read
                nonlocal timer
                due = self.last_read + timeout_s
                if loop.time() >= due:
                    self._end_recording(TimeoutError())
                else:
                    timer = loop.call_at(due, check)
            timer = loop.call_at(self.last_read + timeout_s, check)
        try:
            await done
        finally:
            if timer is not None:
                timer.cancel()
            self.reads = None
            self.recorded = None

    def _end_recording(self, exc: BaseException | None) -> None:
        done = self.recorded
        if done is None or self.reads is None:
            return
        self.reads = None  # later bytes are buffered, not recorded
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)


def _too_long(max_bytes: int) -> ValueError:
    return ValueError(f"response body over {max_bytes} bytes, more than any answer to this "
                      "request could take")


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _BodyStream:
    """A response body from StreamTransport; the connection goes back to the
    pool when the body ended cleanly and the response allows it. Its httpx
    type (an httpx.AsyncByteStream, which httpx requires) is made by
    _body_stream_class, since httpx is imported lazily."""

    def __init__(self, owner: StreamTransport, conn: _Connection, key: tuple[str, str, int],
                 timeout_s: float | None, request: Any):
        self.owner, self.conn, self.key = owner, conn, key
        self.timeout_s, self.request = timeout_s, request
        self.finished = False

    def _done(self) -> None:
        self.finished = True
        self.owner._release(self.conn, self.key, self.conn.reusable)

    async def __aiter__(self) -> Any:
        import httpx  # noqa: PLC0415 (imported already: this class is made from it)

        conn, request = self.conn, self.request
        total = 0
        while True:
            if conn.body:
                data = conn.take_body()
                total += len(data)
                if total > BODY_MAX_BYTES:
                    raise httpx.RemoteProtocolError(
                        f"response body over {BODY_MAX_BYTES} bytes", request=request)
                yield data
                continue
            if conn.broken is not None or (conn.eof and not conn.done):
                raise conn.protocol_error(request, "without sending complete message body")
            if conn.done:
                break
            try:
                await conn.wait(self.timeout_s)
            except TimeoutError:
                raise httpx.ReadTimeout(f"no bytes for {self.timeout_s} s",
                                        request=request) from None
        self._done()

    async def record(self, reads: list[Read], clock: Clock,
                     max_bytes: int = BODY_MAX_BYTES) -> None:
        """Append (clock(), payload) per network read until the body ends
        (see StreamTransport); RemoteProtocolError past `max_bytes`."""
        import httpx  # noqa: PLC0415

        request = self.request
        try:
            await self.conn.record(reads, clock, self.timeout_s, max_bytes)
        except TimeoutError:
            raise httpx.ReadTimeout(f"no bytes for {self.timeout_s} s", request=request) from None
        except EOFError:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=request) from None
        except ValueError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        self._done()

    async def aclose(self) -> None:
        if not self.finished:  # closed early: the rest of the body is unread
            self.finished = True
            self.owner._release(self.conn, self.key, False)


@functools.cache
def _body_stream_class() -> type:
    """_BodyStream as the httpx.AsyncByteStream that httpx's Response requires."""
    import httpx  # noqa: PLC0415

    return type("BodyStream", (_BodyStream, httpx.AsyncByteStream), {})


# ============================================================================
# Client (thin I/O)
# ============================================================================


StreamObserver = Callable[[float, Sequence[Read], Sample], None]
# Set by watch_live_reads: each stream's reads list is added here, once per
# request, so that a ticker outside the streams can count them.
_LIVE_READS: contextvars.ContextVar[list[list[Read]] | None] = contextvars.ContextVar(
    "perftest_live_reads", default=None)
RETRYABLE_STATUS = (429, 503)  # refused before any generation: safe to resend


def http_client(base_url: str, api_key: str | None, timeout_s: float, streams: int = 1) -> Any:
    """An httpx.AsyncClient whose pool never makes a stream wait for a
    connection (so the client adds no queueing of its own).

    GET and POST requests (the measured streams) go over `StreamTransport`, a lean
    HTTP/1.1 transport, unless a proxy applies to `base_url`: httpx's own
    stack (httpcore, anyio, h11) costs several times more CPU per network
    read than the whole rest of the client (docs/benchmark.md)."""
    import httpx  # noqa: PLC0415 (lazy: see imports)

    headers = {"Accept-Encoding": "identity", "User-Agent": f"{TOOL_NAME}/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    transport = None if _proxied(base_url) else StreamTransport(
        httpx.AsyncHTTPTransport(limits=limits))
    return httpx.AsyncClient(
        base_url=base_url, headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits, transport=transport)


def _uvloop(environ: Mapping[str, str] = os.environ) -> Any:
    """The uvloop module run_async runs on, or None for asyncio's own loop.
    PERFTEST_LOOP=asyncio|uvloop picks one; unset, uvloop when installed."""
    choice = environ.get("PERFTEST_LOOP", "")
    if choice not in ("", "asyncio", "uvloop"):
        raise UsageError(f"PERFTEST_LOOP={choice!r}: use 'asyncio' or 'uvloop' (or unset it)")
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 (optional: the `fast` extra; see README)
    except ImportError:
        uvloop = None
    if uvloop is not None and hasattr(uvloop, "run"):
        return uvloop
    if choice:
        raise SetupError("PERFTEST_LOOP=uvloop but uvloop (0.19 or later) is not installed: "
                         "pip install 'perftest-models[fast]', or unset PERFTEST_LOOP")
    return None


def event_loop_name(environ: Mapping[str, str] = os.environ) -> str:
    """The event loop run_async uses: "uvloop" or "asyncio" (PERFTEST_LOOP)."""
    return "uvloop" if _uvloop(environ) else "asyncio"


def run_async(main: Any) -> Any:
    """asyncio.run, on uvloop when it is installed (the `fast` extra): its
    loop costs less per network read, which is the client's hot path."""
    uvloop = _uvloop()
    return uvloop.run(main) if uvloop else asyncio.run(main)


def _error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        obj = json.loads(text)
        err = obj.get("error", obj)
        text = err.get("message", text) if isinstance(err, dict) else str(err)
    return f"HTTP {status}: {text[:200] or 'empty body'}"


@dataclass(frozen=True)
class RawStream:
    """A finished stream before measurement: its timed network reads."""

    t_sent: float
    reads: list[Read]
    target_tokens_out: int | None
    t_scheduled: float | None
    retries: int

    def measure(self, on_stream: StreamObserver | None = None) -> Sample:
        """measure_stream; `on_stream(t_sent, reads, sample)` sees the raw
        reads (benchmarks/client_overhead.py checks our timestamps with it)."""
        sample = measure_stream(self.t_sent, self.reads, self.target_tokens_out,
                                self.t_scheduled, self.retries)
        if on_stream is not None:
            on_stream(self.t_sent, self.reads, sample)
        return sample


async def _record_answer(response: Any, reads: list[Read], clock: Clock,
                         target_tokens_out: int | None, last_try: bool, retry_wait_s: float
                         ) -> Sample | float | None:
    """Record a streamed answer's timed reads into `reads` (None), or say
    why there is none: the failed Sample, or the seconds to wait before
    sending a refused request again."""
    if response.status_code != 200:
        body = await _read_at_most(response, ERROR_BODY_MAX_BYTES)
        if response.status_code not in RETRYABLE_STATUS or last_try:
            return Sample(ok=False, error=_error_message(response.status_code, body))
        return _retry_after_s(response, retry_wait_s)
    if (why := _encoded(response)) is not None:
        return Sample(ok=False, error=why)
    if (record := response.extensions.get("perftest.record")) is not None:
        # StreamTransport stamps each read as it returns
        await record(reads, clock, stream_bytes_limit(target_tokens_out))
    else:
        async for chunk in response.aiter_raw():
            reads.append((clock(), chunk))
    return None


def _transport_failure(exc: Exception, read_timeout_s: float | None, reads: int, last_try: bool,
                       retry_wait_s: float) -> Sample | float:
    """A request that failed in the transport: the failed Sample, or the
    seconds to wait before sending it again when nothing was sent."""
    import httpx  # noqa: PLC0415

    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):  # nothing was sent: safe
        if (client_side := _client_limit(exc)) is not None:  # ours, not the server's refusal
            return Sample(ok=False, error=client_side)
        if last_try:
            return Sample(ok=False, error=f"cannot connect: {str(exc) or type(exc).__name__}")
        return retry_wait_s
    if isinstance(exc, httpx.TimeoutException):
        return Sample(ok=False, error=(
            f"stalled: no bytes for {read_timeout_s:g} s after {reads} read(s) "
            "(raise --request-timeout if the server is just slow)"))
    # reset, closed mid-stream, protocol errors, ...: a failed request is
    # data, and must become a sample, or it would end the run with a traceback
    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Sample(ok=False, error=f"connection broken after {reads} read(s): {why}")


async def stream_chat(client: Any, payload: bytes, target_tokens_out: int | None, *,
                      clock: Clock = time.perf_counter, t_scheduled: float | None = None,
                      max_retries: int = 2, retry_wait_s: float = 1.0,
                      sleep: Sleep = asyncio.sleep) -> RawStream | Sample:
    """POST one streaming chat completion and record its timed reads; a
    failed request is a Sample already.

    The hot loop only stamps and stores each network read; parsing happens
    after the stream ends, so it cannot delay the next timestamp. A request is
    retried only when the server refused it before generating (429, 503) or
    the connection could not be made; the retries are counted in the sample.
    """
    import httpx  # noqa: PLC0415

    retries = 0
    while True:
        request = client.build_request("POST", "/v1/chat/completions", content=payload,
                                       headers={"Content-Type": "application/json"},
                                       extensions={"perftest.clock": clock})
        reads: list[Read] = []
        if (live := _LIVE_READS.get()) is not None:
            live.append(reads)
        t_sent = clock()
        outcome: Sample | float | None  # failed, resend after this many seconds, or recorded
        try:
            response = await _send_streaming(client, request)
            if (t_written := response.extensions.get("perftest.t_sent")) is not None:
                t_sent = t_written  # after any reconnect: the write that really sent it
            try:
                outcome = await _record_answer(response, reads, clock, target_tokens_out,
                                               retries >= max_retries, retry_wait_s)
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            outcome = _transport_failure(exc, client.timeout.read, len(reads),
                                         retries >= max_retries, retry_wait_s)
        if outcome is None:
            return RawStream(t_sent, reads, target_tokens_out, t_scheduled, retries)
        if isinstance(outcome, Sample):
            return dataclasses.replace(outcome, retries=retries)
        retries += 1  # the one retry path: a refusal (429, 503) or no connection
        await sleep(outcome)


async def send_chat(client: Any, payload: bytes, target_tokens_out: int | None, *,
                    clock: Clock = time.perf_counter, t_scheduled: float | None = None,
                    max_retries: int = 2, retry_wait_s: float = 1.0,
                    on_stream: StreamObserver | None = None, sleep: Sleep = asyncio.sleep) -> Sample:
    """POST one streaming chat completion and measure it (see stream_chat)."""
    got = await stream_chat(client, payload, target_tokens_out, clock=clock,
                            t_scheduled=t_scheduled, max_retries=max_retries,
                            retry_wait_s=retry_wait_s, sleep=sleep)
    return got if isinstance(got, Sample) else got.measure(on_stream)


def _encoded(response: Any) -> str | None:
    """Why a 200 answer cannot be read as SSE: it came compressed."""
    coding = response.headers.get("content-encoding", "identity")
    if coding == "identity":
        return None
    return (f"the server sent its stream with Content-Encoding: {coding[:40]!r}, though the "
            "request asked for identity (is a proxy compressing it?)")


def _client_limit(exc: BaseException) -> str | None:
    """The reason when a connect failed on this side (out of descriptors or
    memory), not the server's: such a failure is never retried as a refusal."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE,
                                                          errno.ENOBUFS, errno.ENOMEM):
            return (f"the client is out of file descriptors or buffers "
                    f"({errno.errorcode.get(cause.errno, cause.errno)}: {cause.strerror}): "
                    "raise ulimit -n or lower --concurrency (not a server refusal)")
        cause = cause.__cause__ or cause.__context__
    return None


async def _send_streaming(client: Any, request: Any) -> Any:
    """client.send(request, stream=True), handed straight to StreamTransport
    when the client has one and nothing of httpx's send layers (auth,
    redirects, event hooks) is in use: those layers cost more CPU per request
    than the transport itself, and when a level's streams start together that
    delays the timestamps of the streams already running."""
    transport = getattr(client, "_transport", None)
    if (not isinstance(transport, StreamTransport) or client.auth is not None
            or client.follow_redirects or any(client.event_hooks.values())):
        return await client.send(request, stream=True)
    response = await transport.handle_async_request(request)
    response.request = request
    if "set-cookie" in response.headers:  # as client.send keeps them
        client.cookies.extract_cookies(response)
    return response


def _retry_after_s(response: Any, default_s: float, now: Callable[[], float] = time.time
                   ) -> float:
    """Retry-After in seconds (RFC 9110 10.2.3: seconds, or an HTTP date),
    at most 30; `default_s` when absent or unreadable."""
    value = response.headers.get("retry-after")
    with contextlib.suppress(TypeError, ValueError):
        return min(30.0, max(0.0, float(value)))
    if isinstance(value, str):
        import email.utils  # noqa: PLC0415

        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is not None:
                return min(30.0, max(0.0, when.timestamp() - now()))
    return default_s


@dataclass(frozen=True)
class RequestKnobs:
    """What a model's request bodies carry beyond OpenAI's own fields, as
    learnt at warm-up: `refused` the fields its server answered 400
    "Unrecognized request argument supplied: X" for (dropped from then on;
    "stream_options.X" for a field inside stream_options), `extra` the
    engine's own fields (llama.cpp: cache_prompt false, so that its slot
    cache does not reuse the chat template's common head)."""

    refused: tuple[str, ...] = ()
    extra: Mapping[str, Any] | None = None


ENGINE_EXTRA_FIELDS: dict[str, dict[str, Any]] = {"llama.cpp": {"cache_prompt": False}}
_REFUSED_RE = re.compile(r"Unrecognized request argument supplied: ([A-Za-z0-9_.]+)")


def refused_argument(error: str | None) -> str | None:
    """The field an OpenAI-style 400 names as unknown, else None."""
    m = _REFUSED_RE.search(error or "") if (error or "").startswith("HTTP 400") else None
    return m.group(1) if m else None


def _drop_refused(body: dict[str, Any], refused: Sequence[str]) -> None:
    for name in refused:
        head, _, tail = name.partition(".")
        if tail and isinstance(body.get(head), dict):
            body[head].pop(tail, None)
        else:
            body.pop(name, None)
            if isinstance(body.get("stream_options"), dict):  # a bare name may be nested
                body["stream_options"].pop(name, None)


ERROR_BODY_MAX_BYTES = 64 << 10  # an error answer's message is a few hundred bytes


def stream_bytes_limit(target_tokens_out: int | None) -> int:
    """The most bytes a streamed answer of `target_tokens_out` tokens may
    take: vLLM's chunks with continuous usage are ~300 bytes a token, so
    16 KiB a token (plus 1 MiB) is far past any server's, and bounds what
    a server that never ends can make the client hold."""
    return (1 << 20) + (16 << 10) * (target_tokens_out if target_tokens_out else 4096)


async def _read_at_most(response: Any, max_bytes: int) -> bytes:
    """The start of a response body, at most `max_bytes` (the rest unread:
    the connection is closed, not reused)."""
    got: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        got.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    return b"".join(got)[:max_bytes]


def chat_payload(model_id: str, messages: list[dict[str, str]], tokens_out: int,
                 temperature: float, chat_template_kwargs: Mapping[str, Any] | None,
                 cache_salt: str, knobs: RequestKnobs | None = None) -> bytes:
    """The request body, encoded before the clock starts.

    `min_tokens` + `ignore_eos` (vLLM extensions) make the output length
    exact; `cache_salt` keeps each request out of the prefix cache, on top of
    the unique text at the head of every prompt; `continuous_usage_stats`
    makes vLLM put the running token count on every chunk, so ITL is exact
    even when it merges several tokens into one chunk. `knobs` drops what
    the server refused and adds its engine's own fields.
    """
    body: dict[str, Any] = {
        "model": model_id, "messages": messages, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": tokens_out, "min_tokens": tokens_out, "ignore_eos": True,
        "temperature": temperature, "cache_salt": cache_salt,
    }
    if chat_template_kwargs:
        body["chat_template_kwargs"] = dict(chat_template_kwargs)
    if knobs is not None:
        body.update(knobs.extra or {})
        _drop_refused(body, knobs.refused)
    return json.dumps(body).encode()


def json_body(response: Any) -> Any | None:
    """The JSON document of a 200 answer; None for another status or a body
    that is not JSON."""
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


async def get_json(client: Any, path: str) -> Any | None:
    """GET a JSON document; None when the server does not have it."""
    import httpx  # noqa: PLC0415

    try:
        r = await client.get(path)
    except httpx.HTTPError:
        return None
    return json_body(r)


def served_models(doc: Any) -> list[dict[str, Any]]:
    """The entries of a /v1/models document (empty when it is not one)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
        if isinstance(data, list) else []


def _context_size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= MAX_TOKENS \
        else None


def served_context(entry: Mapping[str, Any] | None) -> int | None:
    """The context window a /v1/models entry states: vLLM's and SGLang's
    `max_model_len`, llama.cpp's `meta.n_ctx` (the slot context, what one
    request may fill); None when it states none."""
    if not entry:
        return None
    meta = entry.get("meta")
    return _context_size(entry.get("max_model_len")) or (
        _context_size(meta.get("n_ctx")) if isinstance(meta, dict) else None)


@dataclass(frozen=True)
class EngineInfo:
    """The engine behind a model, as its API tells: `name` is one of ENGINES,
    `version` what it reports of itself, `context_tokens` its context
    window (None: not reported), `forced` when the models file named it."""

    name: str
    version: str | None = None
    context_tokens: int | None = None
    forced: bool = False


ENGINE_PROBES = ("/version", "/props", "/get_server_info", "/info")
_OWNED_BY = {"vllm": "vllm", "llamacpp": "llama.cpp", "sglang": "sglang"}


def _doc(probes: Mapping[str, Any], path: str) -> dict[str, Any]:
    doc = probes.get(path)
    return doc if isinstance(doc, dict) else {}


def _guess_engine(entry: Mapping[str, Any], probes: Mapping[str, Any]) -> str:
    owner = _OWNED_BY.get(str(entry.get("owned_by")))
    if owner:
        return owner
    if {"default_generation_settings", "build_info"} & set(_doc(probes, "/props")):
        return "llama.cpp"
    if "version" in (info := _doc(probes, "/get_server_info")) and (
            "model_path" in info or "server_args" in info):
        return "sglang"
    if "max_total_tokens" in (tgi := _doc(probes, "/info")) or "router" in tgi:
        return "tgi"
    if isinstance(entry.get("max_model_len"), int) and "version" in _doc(probes, "/version"):
        return "vllm"
    return "openai"


def identify_engine(entry: Mapping[str, Any] | None, probes: Mapping[str, Any],
                    forced: str | None = None) -> EngineInfo:
    """Which engine serves a model, from its /v1/models entry and the JSON of
    ENGINE_PROBES (pure; None for a probe that failed): vLLM and SGLang say
    so in `owned_by`, llama.cpp says "llamacpp" and has /props, SGLang has
    /get_server_info, TGI /info; anything else is plain OpenAI."""
    entry = entry or {}
    name = forced or _guess_engine(entry, probes)
    props, sgl, tgi = _doc(probes, "/props"), _doc(probes, "/get_server_info"), _doc(probes, "/info")
    version = {"vllm": _doc(probes, "/version").get("version"), "llama.cpp": props.get("build_info"),
               "sglang": sgl.get("version"), "tgi": tgi.get("version")}.get(name)
    settings = props.get("default_generation_settings")
    context = served_context(entry) or {
        "llama.cpp": _context_size(settings.get("n_ctx")) if isinstance(settings, dict) else None,
        "sglang": _context_size(sgl.get("context_length")),
        "tgi": _context_size(tgi.get("max_total_tokens")),
    }.get(name)
    return EngineInfo(name, version if isinstance(version, str) else None, context, forced is not None)


async def detect_engine(client: Any, model_id: str, forced: str | None = None) -> EngineInfo:
    """identify_engine over what this server answers (one GET per probe)."""
    entry = next((m for m in served_models(await get_json(client, "/v1/models"))
                  if m["id"] == model_id), None)
    probes = {path: await get_json(client, path) for path in ENGINE_PROBES}
    return identify_engine(entry, probes, forced)


# ============================================================================
# Prompts with exact token counts
# ============================================================================

# Filler for context prompts: plain words that tokenize predictably.
_FILLER_WORDS = (
    "the system processes each request in order and records the time it "
    "takes to answer while the model reads every token of the context before "
    "it writes the first word of its reply"
).split()


def filler(n_chars: int) -> str:
    """The first `n_chars` characters of an endless plain-English filler."""
    unit = " ".join(_FILLER_WORDS) + " "
    return (unit * (n_chars // len(unit) + 1))[:n_chars]


def context_messages(nonce: str, n_chars: int) -> list[dict[str, str]]:
    """A long user message: unique head (defeats prefix caching), filler, task."""
    return [{"role": "user", "content": (
        f"Request {nonce}. Read this log:\n{filler(n_chars)}\n"
        "Summarize the log above in one paragraph.")}]


def latency_messages(nonce: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {nonce}. {LATENCY_PROMPT}"}]


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


# Known-answer prompts: easy enough for any instruction-tuned model of the
# table, with one short right answer each (any of the listed words, as a
# whole word among the first ANSWER_WORDS words of the reply).
KNOWN_ANSWERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is 17 + 25? Reply with the number only.", ("42",)),
    ("What is the capital of France? Reply with one word.", ("paris",)),
    ("What is the opposite of hot? Reply with one word.", ("cold",)),
    ("How many legs does a spider have? Reply with the number only.", ("8", "eight")),
)
ANSWER_WORDS = 16
ANSWER_TOKENS = 512  # budget per answer: thinking models think first
ANSWER_RIGHT_SHARE = 0.75  # at least 3 of 4 right: a good model may slip once
ANSWER_EXAMPLE_CHARS = 120


def _answer_int(response: Any, keys: Sequence[str], what: str) -> int:
    """An integer from a JSON answer (`keys` is its path); ModelFailed if absent."""
    try:
        value = response.json()
        for key in keys:
            value = value[key]
    except (ValueError, KeyError, IndexError, TypeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelFailed(f"{what} answered without {'.'.join(keys)}: "
                          f"{response.text[:120]!r} (is this a vLLM server?)")
    return value


class PromptBuilder:
    """Builds context prompts of an exact token count with the server's own
    chat tokenizer: vLLM's /tokenize over the messages, llama.cpp's
    /apply-template then /tokenize {content}. The filler is cut to the
    character, found by a bracketing search, and the length that hit a
    target is remembered so that the next prompt (another nonce) usually
    needs one or two calls. Where there is no chat tokenizer (SGLang's
    /tokenize takes no messages; TGI, plain OpenAI servers) the same search
    runs on `usage.prompt_tokens` of one-token requests, once per target:
    such prompts land within a few tokens of it (the nonce differs) and are
    approximate (build returns no count)."""

    def __init__(self, client: Any, model_id: str, chat_template_kwargs: Mapping[str, Any] | None,
                 engine: str = "vllm", knobs: RequestKnobs | None = None):
        self.client = client
        self.model_id = model_id
        self.kwargs = dict(chat_template_kwargs or {})
        self.engine = engine
        self.knobs = knobs
        self.usage_less = False  # the server sends no usage: streams are counted (warm_up)
        self.has_tokenize: bool | None = None if engine in ("vllm", "llama.cpp") else False
        self.overhead: int | None = None  # tokens of the prompt with no filler
        self.chars_per_token: float | None = None
        self.hints: dict[int, int] = {}  # target tokens -> filler chars that hit it

    async def count(self, messages: list[dict[str, str]]) -> int | None:
        """Tokens of the chat prompt of `messages`, by the server's own
        tokenizer; None when it has none."""
        if self.has_tokenize is False:
            return None
        if self.engine == "llama.cpp":
            return await self._count_llamacpp(messages)
        body: dict[str, Any] = {"model": self.model_id, "messages": messages,
                                "add_generation_prompt": True}
        if self.kwargs:
            body["chat_template_kwargs"] = self.kwargs
        r = await self._post("/tokenize", body)
        if r.status_code in (404, 405, 501):
            self.has_tokenize = False
            return None
        if r.status_code != 200:
            raise ModelFailed(f"/tokenize failed: {_error_message(r.status_code, r.content)}")
        self.has_tokenize = True
        return _answer_int(r, ("count",), "/tokenize")

    async def _count_llamacpp(self, messages: list[dict[str, str]]) -> int:
        """llama-server: its chat template as /apply-template renders it, then
        /tokenize of that text with special tokens parsed and added, as its
        chat completions tokenize a prompt."""
        body: dict[str, Any] = {"messages": messages}
        if self.kwargs:
            body["chat_template_kwargs"] = self.kwargs
        r = await self._post("/apply-template", body)
        if r.status_code != 200:
            raise ModelFailed(f"/apply-template failed: {_error_message(r.status_code, r.content)}")
        prompt = json_body(r)
        if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str):
            raise ModelFailed(f"/apply-template answered without a prompt: {r.text[:120]!r}")
        tokens = await self._llamacpp_tokens(prompt["prompt"], add_special=True)
        self.has_tokenize = True
        return tokens

    async def _llamacpp_tokens(self, text: str, add_special: bool) -> int:
        r = await self._post("/tokenize", {"content": text, "add_special": add_special,
                                           "parse_special": True})
        doc = json_body(r) if r.status_code == 200 else None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(tokens, list):
            raise ModelFailed(f"/tokenize failed: {_error_message(r.status_code, r.content)}")
        return len(tokens)

    async def count_text(self, text: str) -> int | None:
        """Tokens of plain text (no template, no special tokens added): how a
        stream without usage is counted. None without a tokenizer."""
        if self.engine == "llama.cpp":
            return await self._llamacpp_tokens(text, add_special=False)
        if self.has_tokenize is not True:
            return None
        r = await self._post("/tokenize", {"model": self.model_id, "prompt": text,
                                           "add_special_tokens": False})
        return _answer_int(r, ("count",), "/tokenize") if r.status_code == 200 else None

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST; a broken connection ends the model (ModelFailed), not the run."""
        import httpx  # noqa: PLC0415

        try:
            return await self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ModelFailed(f"{path} failed: {type(exc).__name__}: {exc} "
                              "(is the server still running?)") from None

    async def usage_count(self, messages: list[dict[str, str]]) -> int:
        """`usage.prompt_tokens` of a one-token, non-streamed request."""
        body = json.loads(chat_payload(self.model_id, messages, 1, 0.0, self.kwargs, new_nonce(),
                                       self.knobs))
        body.update(stream=False)
        body.pop("min_tokens", None)
        body.pop("stream_options", None)
        r = await self._post("/v1/chat/completions", body)
        if r.status_code != 200:
            raise ModelFailed(f"calibration request failed: {_error_message(r.status_code, r.content)}")
        return _answer_int(r, ("usage", "prompt_tokens"), "calibration request")

    async def _count_or_usage(self, messages: list[dict[str, str]]) -> int:
        n = await self.count(messages)
        return n if n is not None else await self.usage_count(messages)

    async def calibrate(self, probe_chars: int = 4000) -> None:
        base = await self._count_or_usage(context_messages(new_nonce(), 0))
        full = await self._count_or_usage(context_messages(new_nonce(), probe_chars))
        self.overhead, self.chars_per_token = base, probe_chars / max(1, full - base)

    async def build(self, target: int, nonce: str) -> tuple[list[dict[str, str]], int | None]:
        """Messages whose chat prompt is `target` tokens and that count (the
        closest count below when no length hits it exactly; None when the
        server has no chat tokenizer: then the length was found once per
        target from usage, and reused)."""
        if self.chars_per_token is None:
            await self.calibrate()
        assert self.overhead is not None and self.chars_per_token is not None
        chars = self.hints.get(target, max(0, round((target - self.overhead) * self.chars_per_token)))
        if self.has_tokenize is False:
            if target not in self.hints:
                chars, _ = await self._search(target, new_nonce(), chars, self.usage_count)
                self.hints[target] = chars
            return context_messages(nonce, self.hints[target]), None
        chars, n = await self._search(target, nonce, chars, self.count)
        if n is None:  # the tokenizer went away mid-search
            return context_messages(nonce, chars), None
        return context_messages(nonce, chars), n

    async def _search(self, target: int, nonce: str, chars: int,
                      counter: Callable[[list[dict[str, str]]], Any]) -> tuple[int, int | None]:
        """(filler chars, tokens) hitting `target`, or the closest below (above
        when even no filler is too long), by bracketing on `counter`."""
        cpt = self.chars_per_token or 4.0
        under: tuple[int, int] | None = None  # (chars, tokens) below the target
        over: tuple[int, int] | None = None  # (chars, tokens) above it
        for _ in range(40):
            n = await counter(context_messages(nonce, chars))
            if n is None:
                return chars, None
            if n == target:
                self.hints[target] = chars
                return chars, n
            if n < target:
                under = (chars, n) if under is None or chars > under[0] else under
            else:
                over = (chars, n) if over is None or chars < over[0] else over
            if under and over:
                if over[0] - under[0] <= 1:
                    break  # no cut of the filler gives exactly `target`
                frac = (target - under[1]) / (over[1] - under[1])
                chars = under[0] + min(over[0] - under[0] - 1, max(1, round(frac * (over[0] - under[0]))))
            elif under:
                chars = under[0] + max(1, round((target - under[1]) * cpt))
            else:
                assert over is not None
                if over[0] == 0:
                    break  # even an empty filler is longer than the target
                chars = max(0, over[0] - max(1, round((over[1] - target) * cpt)))
        return under or over  # type: ignore[return-value]


# ============================================================================
# Server metrics and GPU telemetry
# ============================================================================


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each metric over its label sets: {'vllm:generation_tokens_total': 123.0}.
    Histogram buckets are dropped; _sum and _count are kept."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end <= 0:
            continue
        name = line[:name_end]
        if name.endswith("_bucket") or name.endswith("_created"):
            continue
        rest = line[_labels_end(line, name_end):] if line[name_end] == "{" else line[name_end:]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def _labels_end(line: str, start: int) -> int:
    """The index after the label set that opens at `start` ("{"): a brace
    inside a quoted label value (`model="a}b"`, escapes too) is no end."""
    quoted = escaped = False
    for i in range(start + 1, len(line)):
        c = line[i]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = quoted
        elif c == '"':
            quoted = not quoted
        elif c == "}" and not quoted:
            return i + 1
    return len(line)


def server_delta(before: Mapping[str, float] | None, after: Mapping[str, float] | None
                 ) -> ServerDelta | None:
    """The server's own view of a scenario, from two /metrics scrapes."""
    if not before or not after:
        return None
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731

    def mean_ms(base: str) -> float | None:
        n = d(f"{base}_count")
        return d(f"{base}_sum") / n * 1000 if n > 0 else None

    gauge = next((after[g] for g in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
                  if g in after), None)
    return ServerDelta(
        requests=int(d("vllm:time_to_first_token_seconds_count")),
        ttft_mean_ms=mean_ms("vllm:time_to_first_token_seconds"),
        queue_mean_ms=mean_ms("vllm:request_queue_time_seconds"),
        itl_mean_ms=mean_ms("vllm:inter_token_latency_seconds")
        if "vllm:inter_token_latency_seconds_count" in after
        else mean_ms("vllm:time_per_output_token_seconds"),
        generation_tokens=int(d("vllm:generation_tokens_total")),
        prompt_tokens=int(d("vllm:prompt_tokens_total")),
        prefix_cache_queries=int(d("vllm:prefix_cache_queries_total")),
        prefix_cache_hits=int(d("vllm:prefix_cache_hits_total")),
        # tokens the engine computed per step: above 1 in decode means batching
        tokens_per_step=(d("vllm:iteration_tokens_total_sum") / n
                         if (n := d("vllm:iteration_tokens_total_count")) > 0 else None),
        kv_cache_usage_perc=gauge)


def _counter(before: Mapping[str, float], after: Mapping[str, float], name: str) -> float | None:
    """A counter's growth between two scrapes; None when the server has no such counter."""
    return after[name] - before.get(name, 0.0) if name in after else None


def _mean_ms(before: Mapping[str, float], after: Mapping[str, float], base: str) -> float | None:
    n, total = _counter(before, after, f"{base}_count"), _counter(before, after, f"{base}_sum")
    return total / n * 1000 if n and total is not None else None


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(x)


def llamacpp_delta(before: Mapping[str, float], after: Mapping[str, float]) -> ServerDelta:
    """llama-server's /metrics (--metrics) over a scenario. It counts prompt
    tokens it computed, those its slot cache reused (`prompt_tokens_cached`,
    where the build has it) and generated ones with the time spent on each,
    so its own prefill and decode rates follow; it has no request count,
    TTFT or queue time: those are None, never 0."""
    c = lambda name: _counter(before, after, f"llamacpp:{name}")  # noqa: E731
    prompt, prompt_s = c("prompt_tokens_total"), c("prompt_seconds_total")
    gen, gen_s = c("tokens_predicted_total"), c("tokens_predicted_seconds_total")
    cached = _int_or_none(c("prompt_tokens_cached_total"))
    return ServerDelta(
        generation_tokens=_int_or_none(gen), prompt_tokens=_int_or_none(prompt),
        prefix_cache_hits=cached, cached_tokens=cached,
        prefill_tps=prompt / prompt_s if prompt is not None and prompt_s else None,
        decode_tps=gen / gen_s if gen is not None and gen_s else None,
        decode_calls=_int_or_none(c("n_decode_total")))


def sglang_delta(before: Mapping[str, float], after: Mapping[str, float]) -> ServerDelta:
    """SGLang's /metrics (--enable-metrics) over a scenario: requests, prompt,
    generated and cached prompt tokens (summed over its cache sources), and
    the means of its TTFT, inter-token and queue-time histograms."""
    c = lambda name: _int_or_none(_counter(before, after, f"sglang:{name}"))  # noqa: E731
    cached = c("cached_tokens_total")
    return ServerDelta(
        requests=c("num_requests_total"),
        ttft_mean_ms=_mean_ms(before, after, "sglang:time_to_first_token_seconds"),
        queue_mean_ms=_mean_ms(before, after, "sglang:queue_time_seconds"),
        itl_mean_ms=_mean_ms(before, after, "sglang:inter_token_latency_seconds"),
        generation_tokens=c("generation_tokens_total"), prompt_tokens=c("prompt_tokens_total"),
        prefix_cache_hits=cached, cached_tokens=cached,
        kv_cache_usage_perc=after.get("sglang:token_usage"))


def metrics_delta(before: Mapping[str, float] | None, after: Mapping[str, float] | None
                  ) -> ServerDelta | None:
    """The server's own view of a scenario, read by the names its engine
    uses (`vllm:`, `llamacpp:`, `sglang:`); None when it exposes none of
    them (no /metrics, or a server without these names)."""
    if not before or not after:
        return None
    for prefix, delta in (("vllm:", server_delta), ("llamacpp:", llamacpp_delta),
                          ("sglang:", sglang_delta)):
        if any(name.startswith(prefix) for name in after):
            return delta(before, after)
    return None


async def scrape_metrics(client: Any) -> dict[str, float] | None:
    import httpx  # noqa: PLC0415

    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return parse_prometheus(r.text) if r.status_code == 200 else None


_NUM = r"(\d+(?:\.\d+)?)"
_COUNT = r"(\d{1,3}(?:,\d{3})*|\d+)"
# vLLM's own format strings (vllm/model_executor/model_loader/*, v1/worker/,
# compilation/monitor.py, v1/engine/core.py, v1/core/kv_cache_utils.py), the
# variants of 0.8-0.32 included: "takes"/"took", "GiB and"/"GiB memory and",
# "took 36.48 seconds"/"took 3.33 s", KV size and concurrency on one line or two.
_LOAD_PATTERNS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(rf"Time spent downloading weights for \S+: {_NUM} seconds"), ("weights_download_s",)),
    (re.compile(rf"Loading weights took {_NUM} seconds"), ("weights_load_s",)),
    (re.compile(rf"Model loading took {_NUM} GiB (?:memory )?and {_NUM} seconds"),
     ("model_memory_gib", "model_load_s")),
    (re.compile(rf"torch\.compile (?:takes|took) {_NUM} s in total"), ("torch_compile_s",)),
    (re.compile(rf"Graph capturing finished in {_NUM} secs?, took {_NUM} GiB"),
     ("cuda_graph_s", "cuda_graph_gib")),
    (re.compile(rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s"),
     ("engine_init_s",)),
    (re.compile(rf"Available KV cache memory: {_NUM} GiB"), ("kv_cache_memory_gib",)),
    (re.compile(rf"\b([A-Z]{{2,5}}(?: \+ host)?) KV cache size: {_COUNT} tokens"),
     ("kv_cache_device", "kv_cache_tokens")),
    (re.compile(rf"Maximum concurrency for {_COUNT} tokens per request: {_NUM}x"),
     ("max_concurrency_tokens", "max_concurrency")),
)
_LOAD_INTS = {"kv_cache_tokens", "max_concurrency_tokens"}
LOAD_LOG_LINES = 5000  # a start-up log is ~100-300 lines; the tail read is bounded


def parse_vllm_load_log(lines: Iterable[str]) -> LoadFacts:
    """The load facts of a vLLM log (pure). The first report of each fact
    counts (with tensor parallelism every worker repeats it); lines that say
    nothing known are ignored, never an error."""
    found: dict[str, Any] = {}
    for line in lines:
        line = line[:2000]  # a hostile or garbled line cannot cost more
        for pattern, keys in _LOAD_PATTERNS:
            if keys[0] in found or (m := pattern.search(line)) is None:
                continue
            for key, text in zip(keys, m.groups()):
                if key == "kv_cache_device":
                    found[key] = text
                else:
                    found[key] = int(text.replace(",", "")) if key in _LOAD_INTS else float(text)
    return LoadFacts(**found)


@dataclass(frozen=True)
class GpuReading:
    """One NVML sample of the machine's GPUs: power summed over boards, the
    lowest SM clock, the hottest die, throttle reasons OR-ed (NVML bits).
    A value NVML does not report on this GPU is None."""

    t: float  # clock seconds
    power_w: float | None
    sm_clock_mhz: float | None
    temp_c: float | None
    throttle: int


# NVML's clock-event ("throttle") reason bits that make a run unfair: the GPU
# slowed for power or heat. (Idle, application clocks, sync boost and the
# display clock are not a slowdown of the workload.)
THROTTLE_REASONS = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "thermal (software)",
                    0x40: "thermal (hardware)", 0x80: "power brake"}


def throttle_names(bits: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if bits & bit]


class Nvml:
    """The GPUs through NVML (the nvidia-ml-py binding, `import pynvml`).
    Optional: `Nvml.open()` is None without the binding, without the NVML
    library, or without a GPU; a query a GPU does not support reads None."""

    def __init__(self, lib: Any, handles: Sequence[Any]):
        self.lib, self.handles = lib, tuple(handles)

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml  # noqa: PLC0415 (optional: pip install nvidia-ml-py)

            pynvml.nvmlInit()
        except Exception:  # ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return None
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                       for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            handles = []
        if not handles:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lib.nvmlShutdown()

    def _each(self, query: Callable[[Any], Any]) -> list[Any]:
        values = []
        for h in self.handles:
            with contextlib.suppress(Exception):  # NVMLError_NotSupported on some boards
                values.append(query(h))
        return values

    def read(self, clock: Clock = time.monotonic) -> GpuReading:
        lib = self.lib
        power = self._each(lambda h: lib.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW
        sm = self._each(lambda h: lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_SM))
        temp = self._each(lambda h: lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU))
        reasons = getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            lib.nvmlDeviceGetCurrentClocksThrottleReasons
        bits = 0
        for b in self._each(reasons):
            bits |= int(b)
        return GpuReading(clock(), sum(power) if power else None, min(sm) if sm else None,
                          max(temp) if temp else None, bits)

    def memory(self) -> MemoryReading | None:
        """GPU memory where the GPUs have their own (None on unified memory,
        where NVML says Not Supported: a DGX Spark's GB10)."""
        info = self._each(self.lib.nvmlDeviceGetMemoryInfo)
        if len(info) != len(self.handles):
            return None
        return MemoryReading("gpu", sum(int(m.total) for m in info), sum(int(m.free) for m in info))


class GpuSampler:
    """Samples NVML in a thread while a model runs (no process per sample).
    Absent cleanly: without NVML, `readings` stays empty and every summary
    is None."""

    def __init__(self, nvml: Nvml | None, interval_s: float = 0.5, clock: Clock = time.monotonic):
        self.nvml, self.interval_s, self.clock = nvml, interval_s, clock
        self.readings: list[GpuReading] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        assert self.nvml is not None
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.readings.append(self.nvml.read(self.clock))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def window(self, t0: float, t1: float) -> list[GpuReading]:
        return [r for r in list(self.readings) if t0 <= r.t <= t1]


def gpu_summary(readings: Sequence[GpuReading], tokens: int) -> PowerSummary | None:
    """Power, energy, clocks, heat and throttling over some readings (pure):
    energy is the trapezoid integral of power; None with under two power
    readings (no NVML, or a GPU that does not report its power)."""
    powered = [r for r in readings if r.power_w is not None]
    if len(powered) < 2:
        return None
    watts = [r.power_w for r in powered]
    energy = sum((b.t - a.t) * (a.power_w + b.power_w) / 2  # type: ignore[operator]
                 for a, b in zip(powered, powered[1:]))
    clocks = [r.sm_clock_mhz for r in readings if r.sm_clock_mhz is not None]
    temps = [r.temp_c for r in readings if r.temp_c is not None]
    bits = 0
    for r in readings:
        bits |= r.throttle
    return PowerSummary(
        mean_w=round(statistics.fmean(watts), 1), max_w=max(watts),  # type: ignore[arg-type]
        energy_j=round(energy, 1), samples=len(readings),
        tokens_per_j=round(tokens / energy, 4) if energy > 0 else None,
        duration_s=round(readings[-1].t - readings[0].t, 2),
        j_per_token=round(energy / tokens, 4) if tokens else None,
        sm_clock_min_mhz=min(clocks) if clocks else None,
        sm_clock_max_mhz=max(clocks) if clocks else None,
        peak_temp_c=max(temps) if temps else None,
        throttled=bool(throttle_names(bits)), throttle_reasons=tuple(throttle_names(bits)))


def with_gpu_summary(sr: ScenarioResult, gpu: GpuSampler | None, t0: float) -> ScenarioResult:
    """The scenario with what NVML saw from `t0` to now (unchanged without NVML)."""
    if gpu is None:
        return sr
    tokens = sum(s.tokens_out or 0 for s in sr.samples if s.ok)
    summary = gpu_summary(gpu.window(t0, gpu.clock()), tokens)
    return dataclasses.replace(sr, gpu=summary) if summary else sr


# --- memory given back --------------------------------------------------------


@dataclass(frozen=True)
class MemoryReading:
    """Memory a model can use: "host" (MemAvailable: all of it on unified
    memory, like a DGX Spark) or "gpu" (NVML's free memory, summed)."""

    kind: str
    total_bytes: int
    available_bytes: int


def parse_meminfo(text: str) -> MemoryReading | None:
    """/proc/meminfo -> MemTotal and MemAvailable (pure; kB in the file)."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and rest.split():
            with contextlib.suppress(ValueError):
                values[key] = int(rest.split()[0]) * 1024
    if len(values) < 2:
        return None
    return MemoryReading("host", values["MemTotal"], values["MemAvailable"])


def read_memory(nvml: Nvml | None) -> MemoryReading | None:
    """GPU memory where NVML reports it, else the host's (unified memory)."""
    if nvml is not None and (gpu := nvml.memory()) is not None:
        return gpu
    try:
        return parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        return None


# Memory not back after a stop, beyond this, is a leak the next model may die
# of (a process outside the container, a shm segment, a stuck GPU context).
MEMORY_SLACK_FRACTION, MEMORY_SLACK_MIN_BYTES = 0.03, 1 << 30


def memory_record(before: MemoryReading, lowest: MemoryReading, after: MemoryReading
                  ) -> MemoryRecord:
    """Available memory before the start, at the peak of use, after the stop
    (pure); `given_back` is False when what is missing after the stop exceeds
    3% of the total (at least 1 GiB)."""
    missing = before.available_bytes - after.available_bytes
    slack = max(MEMORY_SLACK_MIN_BYTES, MEMORY_SLACK_FRACTION * before.total_bytes)
    return MemoryRecord(
        before.kind, before.total_bytes, before.available_bytes, lowest.available_bytes,
        after.available_bytes, peak_used_bytes=max(0, before.available_bytes - lowest.available_bytes),
        not_given_back_bytes=max(0, missing), given_back=missing <= slack)


class MemoryWatch:
    """Available memory before a model starts, its lowest while it runs
    (sampled in a thread), and after it stopped."""

    def __init__(self, read: Callable[[], MemoryReading | None], interval_s: float = 1.0):
        self.read, self.interval_s = read, interval_s
        self.before: MemoryReading | None = None
        self.lowest: MemoryReading | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        r = self.read()
        if r is not None and (self.lowest is None or r.available_bytes < self.lowest.available_bytes):
            self.lowest = r

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self._sample()

    def start(self) -> None:
        self.before = self.lowest = self.read()
        if self.before is not None:
            self._thread = threading.Thread(target=self._loop, name="memory", daemon=True)
            self._thread.start()

    def finish(self, settle_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
               ) -> MemoryRecord | None:
        """After the stop: the record, re-read for up to `settle_s` while the
        memory is not back yet (a driver frees a GPU context lazily)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.before is None or self.lowest is None:
            return None
        for _ in range(max(1, int(settle_s))):
            after = self.read()
            if after is None:
                return None
            record = memory_record(self.before, self.lowest, after)
            if record.given_back:
                break
            sleep(1.0)
        return record


# ============================================================================
# Statistics (pure)
# ============================================================================

# Two-sided 95% Student t quantiles by degrees of freedom; beyond 30 the
# normal approximation is within 2%.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be >= 1")
    return _T95[df - 1] if df <= len(_T95) else 1.960 + 2.4 / df


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy does."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> Stat | None:
    """Mean, sample stddev, min, max, median, p90, p99 and 95% CI of the mean."""
    if not values:
        return None
    n = len(values)
    mean = statistics.fmean(values)
    stddev = statistics.stdev(values) if n > 1 else None
    ci = None
    if stddev is not None:
        half = t95(n - 1) * stddev / math.sqrt(n)
        ci = (mean - half, mean + half)
    return Stat(n=n, mean=mean, stddev=stddev, min=min(values), max=max(values),
                median=statistics.median(values), p90=percentile(values, 90),
                p99=percentile(values, 99), ci95=ci)


def summarize_samples(samples: Iterable[Sample]) -> dict[str, Stat]:
    """One Stat per metric over the ok samples; ITL pools every token gap.
    Bursty samples (see Sample.bursty) stay out of the decode figures (tps,
    TPOT, ITL): their gaps show how the server flushed, not how it decoded."""
    ok = [s for s in samples if s.ok]
    steady = [s for s in ok if not s.bursty]
    out: dict[str, Stat] = {}
    for key in SAMPLE_METRICS:
        pool = steady if key in DECODE_METRICS else ok
        stat = summarize([getattr(s, key) for s in pool if getattr(s, key) is not None])
        if stat is not None:
            out[key] = stat
    itl = summarize([gap for s in steady for gap in s.itl_ms])
    if itl is not None:
        out["itl_ms"] = itl
    return out


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two confidence intervals overlap: their difference is not significant
    (the test of both a ranking's tie and a comparison's noise)."""
    return a[0] <= b[1] and b[0] <= a[1]


def ratio_with_error(a: Stat, b: Stat) -> tuple[float, float | None]:
    """a.mean / b.mean and its standard deviation by error propagation."""
    r = a.mean / b.mean
    if a.stddev is None or b.stddev is None or a.mean == 0:
        return r, None
    return r, r * math.hypot(a.stddev / a.mean, b.stddev / b.mean)


# ---- Service levels: goodness of a request, the figures of a level (pure) ----


def slo_value(sample: Sample, rule: SloRule) -> float | None:
    """A request's own figure for `rule`, in the rule's unit (None: it has
    none). ITL is the request's own percentile of its token gaps."""
    if rule.metric == "decode_tps":
        return sample.tps
    if rule.metric == "ttft":
        ms = sample.ttft_ms
    elif rule.metric == "tpot":
        ms = sample.tpot_ms
    elif rule.metric == "itl":
        ms = (percentile(sample.itl_ms, rule.percentile or 100.0) if sample.itl_ms else None)
    else:
        ms = sample.total_s * 1000 if sample.total_s is not None else None
    if ms is None:
        return None
    return ms / 1000 if rule.unit == "s" else ms


def request_meets(sample: Sample, rule: SloRule) -> bool:
    """A failed request meets no rule; a one-token answer has no decode to
    judge, so the decode rules (tpot, itl, decode_tps) do not apply to it.
    Any other request without the figure cannot show it met the rule."""
    if not sample.ok:
        return False
    value = slo_value(sample, rule)
    if value is None:
        return rule.metric in ("tpot", "itl", "decode_tps") and (sample.tokens_out or 0) <= 1
    return rule.passes(value)


def is_good(sample: Sample, rules: Sequence[SloRule]) -> bool:
    """Good: the request met every rule (vLLM's goodput definition)."""
    return all(request_meets(sample, r) for r in rules)


def slo_aggregate(samples: Sequence[Sample], duration_s: float,
                  rules: Sequence[SloRule]) -> dict[str, Any]:
    """Goodput of a level: good requests, and good requests per second of wall time."""
    good = sum(is_good(s, rules) for s in samples)
    return {"good_requests": good, "goodput_rps": good / duration_s if duration_s > 0 else None}


def _tail(values: Sequence[float], q: float) -> float:
    """percentile(values, q) where a value may be inf (a failed request)."""
    ordered = sorted(values)
    if not math.isinf(ordered[-1]):
        return percentile(ordered, q)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    if math.isinf(ordered[lo]) or (math.isinf(ordered[hi]) and pos > lo):
        return math.inf
    return ordered[lo]


def level_value(samples: Sequence[Sample], rule: SloRule) -> float | None:
    """The level's figure for `rule`: the named percentile over its requests
    (every request: the worst), a failed request counting as the worst
    possible value; ITL pools the token gaps of every request. None: no request
    had the figure."""
    lower = rule.op == "<="
    worst = math.inf if lower else 0.0
    failed = [worst] * sum(not s.ok for s in samples)
    ok = [s for s in samples if s.ok]
    if rule.metric == "itl":
        gaps = [g / 1000 if rule.unit == "s" else g for s in ok for g in s.itl_ms]
        values = gaps + failed * max(1, len(gaps) // max(1, len(ok)))  # a failure weighs a request
    else:
        values = [v for s in ok if (v := slo_value(s, rule)) is not None] + failed
    if not values:
        return None
    if rule.percentile is None:
        return max(values) if lower else min(values)
    return _tail(values, rule.percentile if lower else 100.0 - rule.percentile)


def level_check(samples: Sequence[Sample], rules: Sequence[SloRule]
                ) -> tuple[dict[str, float], tuple[str, ...], tuple[str, ...]]:
    """(each rule's figure, the rules the level broke, the rules whose
    percentile needs more requests than the level had). A rule without any
    figure is broken: nothing shows that it held."""
    values: dict[str, float] = {}
    failed, too_few = [], []
    for rule in rules:
        value = level_value(samples, rule)
        if value is None or not rule.passes(value):
            failed.append(rule.key)
        if value is not None:
            values[rule.key] = value
        if len(samples) < rule.min_requests:
            too_few.append(rule.key)
    return values, tuple(failed), tuple(too_few)


LATE_SEND_MS = 10.0  # an open-loop request sent later than this after its arrival: client-bound


def scheduled_arrivals(n: int, rate_per_s: float, burstiness: float, rng: Any) -> tuple[float, ...]:
    """Open-loop arrival times in seconds from the start, as vLLM's `bench
    serve` draws them: the first at 0, then gaps from a gamma distribution of
    shape `burstiness` and mean 1 / rate (shape 1: a Poisson process; below 1
    burstier, above 1 more regular). `rng` is a seeded random.Random."""
    times, t = [], 0.0
    scale = 1.0 / (rate_per_s * burstiness)
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return tuple(times)


def open_loop_aggregate(samples: Sequence[Sample], rate_per_s: float) -> dict[str, Any]:
    """How well the client kept an open-loop rate: requests sent more than
    LATE_SEND_MS after their scheduled arrival, the worst lag, the rate it
    actually sent at. `client_late` marks a level whose TTFT holds the
    client's own delay (over 1% of its requests late)."""
    lags = [s.queued_ms for s in samples]
    late = sum(lag > LATE_SEND_MS for lag in lags)
    sent = sorted(s.start_s + s.queued_ms / 1000 for s in samples)
    span = sent[-1] - sent[0] if len(sent) > 1 else 0.0
    return {"request_rate": rate_per_s, "late_sends": late,
            "send_lag_max_ms": max(lags, default=0.0),
            "achieved_rate_rps": (len(sent) - 1) / span if span > 0 else None,
            "client_late": late > len(samples) // 100}


def roofline_tps(spec: ModelSpec, bandwidth_gbs: float) -> float | None:
    """Decode tokens/s ceiling: bandwidth / bytes of active weights (the KV
    cache read is left out, so the true ceiling is a little lower)."""
    if not spec.params_active_b or not spec.bytes_per_weight:
        return None
    return bandwidth_gbs * 1e9 / (spec.params_active_b * 1e9 * spec.bytes_per_weight)


# ============================================================================
# Benchmark: planning, readiness, warm-up, scenarios
# ============================================================================


# --- What a model runs, and the campaign: plan, resume, time left (pure) ------


def plan_scenarios(cfg: RunConfig, spec: ModelSpec) -> list[Scenario]:
    """The scenarios one model runs, with context sizes clamped to fit
    (max context - output tokens) and marked as clamped."""
    plan = [Scenario("latency", "latency", None, cfg.latency_tokens_out, cfg.iterations)]
    fits = spec.max_context_tokens - cfg.context_tokens_out
    for size in cfg.context_sizes:
        target = min(size, fits)
        plan.append(Scenario(f"context-{format_token_count(size)}", "context", target,
                             cfg.context_tokens_out, cfg.iterations,
                             requested_tokens_in=size if target != size else None))
    tin = max(1, min(cfg.throughput_tokens_in,
                     spec.max_context_tokens - cfg.throughput_tokens_out))
    for c in cfg.concurrency:
        n = level_requests(cfg, c)
        plan.append(Scenario(f"throughput-c{c}", "throughput", tin, cfg.throughput_tokens_out,
                             n, concurrency=c))
    return plan + rate_scenarios(cfg, tin)


# The options that decide the numbers: a resumed run must have the report's.
# Options named slo* (service-level objectives) count too, when present.
DECIDING_CONFIG = ("models", "iterations", "context_sizes", "concurrency", "throughput_requests",
                   "throughput_tokens_in", "throughput_tokens_out", "latency_tokens_out",
                   "context_tokens_out", "warmup_tokens", "temperature", "hardware",
                   "bandwidth_gbs")


@dataclass(frozen=True)
class CampaignStep:
    """One model of a campaign: the scenarios still to measure, and those a
    previous part measured completely (kept exactly, never run again).
    `keep_whole`: nothing left to run, so its service is not even started."""

    spec: ModelSpec
    to_run: tuple[Scenario, ...]
    kept: tuple[ScenarioResult, ...] = ()
    previous: ModelResult | None = None

    @property
    def keep_whole(self) -> bool:
        return not self.to_run


def plan_campaign(cfg: RunConfig, models: Sequence[ModelSpec]) -> tuple[CampaignStep, ...]:
    return tuple(CampaignStep(m, tuple(plan_scenarios(cfg, m))) for m in models)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples as lists, as in the JSON


def config_differences(old: Report, cfg: RunConfig, models: Sequence[ModelSpec]) -> list[str]:
    """What differs between a report's configuration and this run's, among
    what decides the numbers (DECIDING_CONFIG, SLOs, each model's id and
    context); empty when a resume may continue it."""
    was, now = _plain(dataclasses.asdict(old.config)), _plain(dataclasses.asdict(cfg))
    keys = [*DECIDING_CONFIG, *sorted(k for k in {*was, *now} if k.startswith("slo"))]
    if was.get("slo") or now.get("slo"):  # what bounds the capacity search
        keys += ["max_concurrency", "capacity_budget_s"]
    if was.get("request_rates") or now.get("request_rates"):  # the open-loop schedule
        keys += ["request_rates", "burstiness", "arrival_seed"]
    diffs = [f"{key}: report {was.get(key)!r}, now {now.get(key)!r}"
             for key in keys if was.get(key) != now.get(key)]
    before = {mr.spec.name: mr.spec for mr in old.models}
    for m in models:
        b = before.get(m.name)
        for key in ("model_id", "max_context_tokens"):
            if b is not None and getattr(b, key) != getattr(m, key):
                diffs.append(f"{m.name} {key}: report {getattr(b, key)!r}, now {getattr(m, key)!r}")
    return diffs


def completed_in_parts(report: Report) -> dict[str, set[str]]:
    """model -> the scenarios some part of the run recorded as complete."""
    done: dict[str, set[str]] = {}
    for part in report.parts:
        for name, pm in part.models.items():
            done.setdefault(name, set()).update(pm.scenarios)
    return done


def scenario_complete(sr: ScenarioResult, planned: Scenario, mr: ModelResult,
                      completed: set[str] | None) -> bool:
    """A scenario is kept only when it is the planned one, holds all its
    requests, and its part recorded it as complete (a report without parts:
    an interrupted model's last scenario may have been cut short)."""
    if sr.scenario != planned or len(sr.samples) != planned.requests:
        return False
    if completed is not None:
        return planned.name in completed
    return not (mr.status in ("interrupted", "running") and sr is mr.scenarios[-1])


def plan_resume(old: Report, cfg: RunConfig, models: Sequence[ModelSpec],
                rerun_failed: bool = False) -> tuple[CampaignStep, ...]:
    """Old report + this plan -> what to keep and what to run, per model.

    A model that finished (ok, or failed without --rerun-failed) is kept
    whole; otherwise its complete scenarios are kept and the rest (a scenario
    cut short included, whole) run again."""
    by_name = {mr.spec.name: mr for mr in old.models}
    completed = completed_in_parts(old) if old.parts else None
    steps = []
    for spec in models:
        planned = plan_scenarios(cfg, spec)
        mr = by_name.get(spec.name)
        if mr is None:
            steps.append(CampaignStep(spec, tuple(planned)))
            continue
        if mr.status == "failed" and not rerun_failed:
            steps.append(CampaignStep(spec, (), tuple(mr.scenarios), mr))
            continue
        have = {sr.scenario.name: sr for sr in mr.scenarios}
        done = None if completed is None else completed.get(spec.name, set())
        kept = tuple(have[s.name] for s in planned
                     if s.name in have and scenario_complete(have[s.name], s, mr, done))
        kept_names = {sr.scenario.name for sr in kept}
        to_run = tuple(s for s in planned if s.name not in kept_names)
        steps.append(CampaignStep(spec, to_run, kept, mr))
    return tuple(steps)


def resumed_result(step: CampaignStep) -> ModelResult:
    """The ModelResult a resumed run starts a model from: a model kept whole
    exactly as it was (an interrupted one with nothing left is ok now); else
    its kept scenarios, and what the previous part learnt of the server
    (replaced as soon as the service starts again)."""
    prev = step.previous
    if prev is None:
        return ModelResult(step.spec)
    if step.keep_whole:
        if prev.status == "failed":
            return prev
        return dataclasses.replace(prev, status="ok", error=None, failure=None)
    return ModelResult(step.spec, server=prev.server, lifecycle=prev.lifecycle,
                       scenarios=list(step.kept))


@dataclass(frozen=True)
class ModelTimes:
    """What was measured of one model, for estimates (seconds).
    `points`: (tokens in, tokens out, TTFT, total) of each ok request;
    `levels`: (concurrency, output tokens/s) of each throughput level."""

    load_s: float | None = None
    points: tuple[tuple[int, int, float, float], ...] = ()
    levels: tuple[tuple[int, float], ...] = ()


def model_times(mr: ModelResult) -> ModelTimes:
    points, levels = [], []
    for sr in mr.scenarios:
        if sr.scenario.kind == "throughput":
            tps = sr.aggregate.output_tps if sr.aggregate else None
            if isinstance(tps, (int, float)) and tps > 0:
                levels.append((sr.scenario.concurrency, float(tps)))
            continue
        points.extend((s.tokens_in, s.tokens_out, s.ttft_ms / 1000, s.total_s)
                      for s in sr.samples if s.ok and s.tokens_in and s.tokens_out
                      and s.ttft_ms is not None and s.total_s is not None)
    load = mr.lifecycle.load_s
    return ModelTimes(float(load) if isinstance(load, (int, float)) else None,
                      tuple(points), tuple(levels))


LATENCY_PROMPT_TOKENS = 60  # about what the latency prompt is, with its chat template


def request_estimate_s(t: ModelTimes, tokens_in: int | None, tokens_out: int) -> float | None:
    """One request's time from this model's measured requests: the TTFT of
    the nearest measured input size plus the extra input at the best measured
    prefill rate, then the median time per output token; None before any."""
    decode = [(total - ttft) / (tout - 1) for _, tout, ttft, total in t.points if tout > 1]
    if not decode:
        return None
    tin = tokens_in or LATENCY_PROMPT_TOKENS
    near = min(t.points, key=lambda p: abs(p[0] - tin))
    rate = max(p[0] / p[2] for p in t.points if p[2] > 0) if any(p[2] > 0 for p in t.points) else None
    extra = (tin - near[0]) / rate if rate and tin > near[0] else 0.0
    return near[2] + extra + max(0, tokens_out - 1) * statistics.median(decode)


def scenario_estimate_s(t: ModelTimes, s: Scenario) -> float | None:
    """A scenario's time; a throughput level only from a measured level of at
    most as many streams (its rate: more streams go no slower in sum)."""
    if s.kind != "throughput" or s.concurrency == 1:
        one = request_estimate_s(t, s.target_tokens_in, s.target_tokens_out)
        return None if one is None else one * s.requests
    rates = [tps for c, tps in t.levels if c <= s.concurrency]
    if not rates:
        return None
    return s.requests * s.target_tokens_out / max(rates)


@dataclass(frozen=True)
class CampaignPosition:
    """Where a campaign is: the model (index into the steps), its phase
    ("load" | "measure" | "stop"), the scenario (index into the step's
    to_run; -1 in the warm-up), requests done in it, and how long the phase,
    the scenario and the current request have run (seconds)."""

    model: int
    phase: str = "load"
    scenario: int = -1
    requests_done: int = 0
    phase_s: float = 0.0
    scenario_s: float = 0.0
    request_s: float = 0.0


@dataclass(frozen=True)
class Estimate:
    known_s: float
    unknown: tuple[tuple[str, str], ...] = ()  # (model, what) not estimated yet


def estimate_left(steps: Sequence[CampaignStep], pos: CampaignPosition,
                  times: Mapping[str, ModelTimes], *, warmup_tokens: int = WARMUP_TOKENS,
                  stop_s: float | None = None, managed: bool = True) -> Estimate:
    """The time left from `pos` to the end (pure): what is measured of each
    model (`times`, from this run and --estimate-from) and the mean stop time
    measured so far (`stop_s`); what has no measurement is named in
    `unknown`, never guessed. `managed`: the tool starts and stops services."""
    known, unknown = 0.0, []

    def add(value: float | None, what: str, ran_s: float = 0.0) -> None:
        nonlocal known
        if value is None:
            unknown.append((name, what))
        else:
            known += max(0.0, value - ran_s)

    for i in range(pos.model, len(steps)):
        step, now = steps[i], i == pos.model
        if step.keep_whole:
            continue
        t = times.get(step.spec.name, ModelTimes())
        name, phase = step.spec.name, pos.phase if now else "load"
        if managed and phase == "load":
            add(t.load_s, "load", pos.phase_s if now else 0.0)
        if phase in ("load", "measure"):
            if not now or pos.scenario < 0:
                add(request_estimate_s(t, None, warmup_tokens), "warm-up")
            first = pos.scenario if now and phase == "measure" and pos.scenario >= 0 else 0
            for j in range(first, len(step.to_run)):
                s = step.to_run[j]
                if now and j == pos.scenario and phase == "measure":
                    add(_scenario_left_s(t, s, pos), s.name)
                else:
                    add(scenario_estimate_s(t, s), s.name)
        if managed:
            add(stop_s, "stop", pos.phase_s if now and phase == "stop" else 0.0)
    return Estimate(known, tuple(unknown))


def _scenario_left_s(t: ModelTimes, s: Scenario, pos: CampaignPosition) -> float | None:
    if s.kind == "throughput" and s.concurrency > 1:
        whole = scenario_estimate_s(t, s)
        return None if whole is None else max(0.0, whole - pos.scenario_s)
    one = request_estimate_s(t, s.target_tokens_in, s.target_tokens_out)
    if one is None:
        return None
    left = s.requests - pos.requests_done
    return max(0.0, left * one - pos.request_s) if left > 0 else 0.0


def parallel_estimate(lanes: Sequence[frozenset[str]], left: Sequence[Estimate | None]
                      ) -> Estimate:
    """--parallel: the time left when each engine runs its models one at a
    time (pure): the busiest engine's sum of what its models have left (a
    model on two engines counts on both); `left[i]` is None for a model done."""
    per_engine: dict[str, float] = {}
    unknown: list[tuple[str, str]] = []
    for need, est in zip(lanes, left):
        if est is None:
            continue
        unknown.extend(est.unknown)
        for engine in need:
            per_engine[engine] = per_engine.get(engine, 0.0) + est.known_s
    return Estimate(max(per_engine.values(), default=0.0), tuple(unknown))


# --- Readiness: the server up, listing the model ------------------------------


class Events:
    """What the benchmark tells the command layer as it goes. The command
    layer decides what to print; this base class prints nothing (tests)."""

    def info(self, text: str) -> None: ...
    def pulling(self, model: str, progress: PullProgress) -> None: ...
    def waiting(self, model: str, elapsed_s: float, last_log: Callable[[], str | None]) -> None: ...
    def sample(self, model: str, scenario: Scenario, index: int, sample: Sample) -> None: ...
    def scenario_done(self, model: ModelResult, result: ScenarioResult) -> None: ...
    # The campaign's position (progress and time left):
    wants_live = False  # whether live() is wanted (watch_live_reads)
    def model_started(self, index: int, spec: ModelSpec) -> None: ...
    def phase(self, model: str, phase: str) -> None: ...  # load | measure | stop | done
    def scenario_started(self, model: str, scenario: Scenario) -> None: ...
    def live(self, tokens: int, rate_tps: float | None) -> None: ...


async def wait_until_ready(client: Any, spec: ModelSpec, timeout_s: float, events: Events, *,
                           check_alive: Callable[[], None] | None = None,
                           last_log: Callable[[], str | None] = lambda: None,
                           clock: Clock = time.perf_counter, poll_s: float = 0.25,
                           sleep: Sleep = asyncio.sleep) -> float:
    """Poll /health and /v1/models until the model is listed; seconds waited.

    Polls every `poll_s` so readiness is noticed within a fraction of a
    second; checks the container each round so a crash fails at once.
    """
    import httpx  # noqa: PLC0415

    t0 = clock()
    while True:
        if check_alive is not None:
            await asyncio.to_thread(check_alive)
        try:
            health = await client.get("/health", timeout=5.0)
            ready = health.status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            ids = [m["id"] for m in served_models(await get_json(client, "/v1/models"))]
            if spec.model_id in ids:
                return clock() - t0
            if ids:
                raise ModelFailed(f"the server on this port serves {', '.join(ids)}, not "
                                  f"{spec.model_id}: check the service's --served-model-name")
        elapsed = clock() - t0
        if elapsed > timeout_s:
            raise ModelFailed(f"{spec.name} health check timeout after {timeout_s:.0f}s "
                              f"(raise --health-timeout for a first download)")
        events.waiting(spec.name, elapsed, last_log)
        await sleep(poll_s)


async def server_info(client: Any, spec: ModelSpec) -> ServerInfo:
    doc = await get_json(client, "/version")
    version = doc.get("version") if isinstance(doc, dict) else None
    max_len = None
    for m in served_models(await get_json(client, "/v1/models")):
        if m["id"] == spec.model_id:
            max_len = m.get("max_model_len")
    return ServerInfo(version, max_len, dict(spec.chat_template_kwargs or {}) or None)


# --- Warm-up and the known-answer check ---------------------------------------


def engine_facts(server: ServerInfo, engine: EngineInfo, knobs: RequestKnobs,
                 ignored: Sequence[str]) -> ServerInfo:
    """What the report records of a model's engine (its version where
    /version had none: llama.cpp's build, SGLang's and TGI's own)."""
    return dataclasses.replace(server, engine=engine.name, engine_forced=engine.forced,
                               version=server.version or engine.version,
                               context_tokens=engine.context_tokens,
                               knobs_refused=tuple(knobs.refused), knobs_ignored=tuple(ignored))


def fit_context(spec: ModelSpec, context_tokens: int | None) -> ModelSpec:
    """The spec with the server's context window where it is smaller than
    the table's: scenarios are then clamped to what the server takes."""
    if context_tokens is None or context_tokens >= spec.max_context_tokens:
        return spec
    return dataclasses.replace(spec, max_context_tokens=context_tokens)


MAX_REFUSED_FIELDS = 8  # more than the tool sends beyond OpenAI's fields


# What a chat request cannot do without: a server that refuses one of these
# fails the warm-up instead of being sent something else.
CORE_FIELDS = frozenset({"model", "messages", "stream", "max_tokens", "stream_options",
                         "stream_options.include_usage"})


async def warm_up(client: Any, spec: ModelSpec, cfg: RunConfig, builder: PromptBuilder, *,
                  clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep
                  ) -> tuple[RequestKnobs, tuple[str, ...]]:
    """The warm-up request, which also learns what the server does with the
    fields beyond OpenAI's own: each it refuses as unknown (400
    "Unrecognized request argument supplied: X") is dropped and the request
    sent again; one it accepts but ignores shows in the answer (see
    ignored_knobs). Tried WARMUP_TRIES times: a server just out of loading
    may fail one request. Returns the knobs (also set on `builder`) and the
    names of those ignored."""
    knobs = builder.knobs = RequestKnobs(extra=ENGINE_EXTRA_FIELDS.get(builder.engine))
    tries = 0
    while True:
        nonce = new_nonce()
        payload = chat_payload(spec.model_id, latency_messages(nonce), cfg.warmup_tokens,
                               cfg.temperature, spec.chat_template_kwargs, nonce, knobs)
        got = await stream_chat(client, payload, cfg.warmup_tokens, clock=clock, sleep=sleep)
        warm = got if isinstance(got, Sample) else await measure_counted(got, payload, builder)
        refused = refused_argument(warm.error)
        if refused and refused not in knobs.refused and refused not in CORE_FIELDS \
                and len(knobs.refused) < MAX_REFUSED_FIELDS:
            knobs = builder.knobs = dataclasses.replace(knobs, refused=(*knobs.refused, refused))
            continue
        if warm.ok:
            break
        tries += 1
        if tries >= WARMUP_TRIES:
            raise ModelFailed(f"warm-up request failed {WARMUP_TRIES} times: {warm.error}")
    chunk_usage = isinstance(got, RawStream) and chunk_usage_seen(got.reads)
    builder.usage_less = bool(warm.tokens_counted)
    return knobs, ignored_knobs(knobs, warm, cfg.warmup_tokens, chunk_usage)


def ignored_knobs(knobs: RequestKnobs, warm: Sample, asked: int, chunk_usage: bool
                  ) -> tuple[str, ...]:
    """The fields sent and accepted that had no effect on the warm-up answer
    (pure): an answer shorter than asked ignored min_tokens and ignore_eos
    (whichever was sent); a stream without usage ignored include_usage; usage
    only in the trailer ignored continuous_usage_stats. (cache_salt leaves
    no trace in an answer: it is not judged.)"""
    sent = lambda name: name not in knobs.refused and name.rpartition(".")[2] not in knobs.refused  # noqa: E731
    out: list[str] = []
    if warm.tokens_counted:
        out.append("stream_options.include_usage")
    elif warm.ok and (warm.tokens_out or 0) > 1 and not chunk_usage \
            and sent("stream_options.continuous_usage_stats"):
        out.append("stream_options.continuous_usage_stats")
    if warm.ok and warm.tokens_out is not None and warm.tokens_out < asked:
        out.extend(k for k in ("min_tokens", "ignore_eos") if sent(k))
    return tuple(out)


def answer_text(message: Any) -> str | None:
    """The answer of a chat completion message, reasoning left out; None when
    the model was still thinking when its budget ran out."""
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
        return None
    text = message["content"]
    if "<think>" in text or "</think>" in text:  # no reasoning parser on the server
        head, sep, tail = text.rpartition("</think>")
        if not sep:
            return None
        text = tail
    return text.strip()


def answer_is_right(text: str, expected: Sequence[str]) -> bool:
    """One of the expected words, whole, among the first ANSWER_WORDS words."""
    words = re.findall(r"\w+", text.casefold())[:ANSWER_WORDS]
    return any(e in words for e in expected)


def judge_answers(replies: Sequence[tuple[str, Sequence[str], str | None]],
                  refused: Sequence[str]) -> AnswerCheck:
    """(prompt, expected, answer or None if unfinished) per reply -> the verdict."""
    done = [(p, e, a) for p, e, a in replies if a is not None]
    if not done:
        why = refused[0] if refused else f"no answer finished within {ANSWER_TOKENS} tokens"
        return AnswerCheck("unchecked", reason=why)
    wrong = [(p, e, a) for p, e, a in done if not answer_is_right(a, e)]
    right = len(done) - len(wrong)
    status = "right" if right >= ANSWER_RIGHT_SHARE * len(done) else "wrong"
    example = None
    if wrong:
        p, e, a = wrong[0]
        cut = a if len(a) <= ANSWER_EXAMPLE_CHARS else a[:ANSWER_EXAMPLE_CHARS] + "..."
        example = AnswerExample(p, " or ".join(e), one_line(cut))
    return AnswerCheck(status, asked=len(done), right=right, example=example)


async def ask_known_answers(client: Any, spec: ModelSpec, refused: Sequence[str] = ()) -> AnswerCheck:
    """Ask the known-answer prompts in turn, at temperature 0, and judge them.

    A refusal (no chat template, a 4xx) or an unfinished answer makes the
    check "unchecked", never "wrong": only answers that came are judged.
    `refused`: the request fields the warm-up found the server refuses.
    """
    import httpx  # noqa: PLC0415

    async def ask(prompt: str) -> Any:
        body: dict[str, Any] = {"model": spec.model_id, "max_tokens": ANSWER_TOKENS,
                                "temperature": 0.0, "cache_salt": new_nonce(),
                                "messages": [{"role": "user", "content": prompt}]}
        if spec.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(spec.chat_template_kwargs)
        _drop_refused(body, refused)
        try:
            return await client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    replies, refused = [], []
    for prompt, expected in KNOWN_ANSWERS:  # one at a time: a signal meets one request
        r = await ask(prompt)
        if isinstance(r, str) or r.status_code != 200:
            refused.append(r if isinstance(r, str) else _error_message(r.status_code, r.content))
            continue
        try:
            choice = r.json()["choices"][0]
            text = answer_text(choice["message"])
        except (ValueError, LookupError, TypeError):
            refused.append("the answer was not a chat completion")
            continue
        if not text and choice.get("finish_reason") == "length":
            text = None  # still thinking when the budget ran out: not judged
        replies.append((prompt, expected, text))
    return judge_answers(replies, refused)


def describe_answer_check(check: AnswerCheck) -> str:
    """'answers wrong: 0 of 4 right; ...' (pure, for the summary and the tables)."""
    if check.status == "skipped":
        return "answer check skipped (--no-answer-check)"
    if check.status == "unchecked":
        return f"answers unchecked: {check.reason}"
    text = f"{check.right} of {check.asked} right"
    if check.status == "right":
        return f"answer check: {text}"
    return f"answers wrong: {text}; its speed figures are shown but not ranked"


async def check_answers(client: Any, result: ModelResult, cfg: RunConfig, events: Events) -> None:
    """The known-answer check at warm-up; with --require-correct-answers a
    wrong-answering model fails here, before any GPU time is spent measuring it."""
    if not cfg.answer_check:
        result.answer_check = AnswerCheck("skipped", reason="--no-answer-check")
        return
    check = result.answer_check = await ask_known_answers(
        client, result.spec, (result.server.knobs_refused or ()) if result.server else ())
    events.info(f"{result.spec.name}: {describe_answer_check(check)}")
    if check.ok is False and cfg.require_correct_answers:
        ex = check.example
        raise ModelFailed(f"answers wrong: {check.right} of {check.asked} right"
                          + (f" (asked {ex.prompt!r}, got {ex.answer!r})" if ex else "")
                          + " and --require-correct-answers is set")


# --- Scenarios: requests in turn, at once, or arriving open-loop --------------


async def measure_counted(raw: RawStream, payload: bytes, builder: PromptBuilder | None) -> Sample:
    """raw.measure(); a stream that came without usage is counted with the
    server's tokenizer instead (the prompt's chat template, the received
    text) and marked `tokens_counted`; without a tokenizer it stays failed."""
    sample = raw.measure()
    if sample.ok or builder is None or not (sample.error or "").startswith(NO_USAGE_ERROR):
        return sample
    body = json.loads(payload)
    tokens_in = await builder.count(body.get("messages") or [])
    tokens_out = await builder.count_text(stream_text(raw.reads))
    if tokens_in is None or tokens_out is None:
        return sample
    counted = measure_stream(raw.t_sent, raw.reads, raw.target_tokens_out, raw.t_scheduled,
                             raw.retries, usage_fallback={"prompt_tokens": tokens_in,
                                                          "completion_tokens": tokens_out})
    return dataclasses.replace(counted, tokens_counted=True) if counted.ok else counted


async def send_measured(client: Any, payload: bytes, target_tokens_out: int | None,
                        builder: PromptBuilder | None, *, clock: Clock = time.perf_counter,
                        sleep: Sleep = asyncio.sleep) -> Sample:
    """send_chat; when the warm-up found that the server never sends usage,
    its streams are counted (see measure_counted). (A stream without usage
    from a server that sends it is a failed sample.)"""
    got = await stream_chat(client, payload, target_tokens_out, clock=clock, sleep=sleep)
    if isinstance(got, Sample):
        return got
    return await measure_counted(got, payload, builder if builder and builder.usage_less else None)


async def _peak_metrics(client: Any, stop: asyncio.Event, interval_s: float = 0.5
                        ) -> dict[str, float]:
    """Peak KV-cache usage and queue length while a load level runs."""
    peak: dict[str, float] = {}
    while not stop.is_set():
        m = await scrape_metrics(client)
        for key, name in (("peak_kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
                          ("peak_requests_waiting", "vllm:num_requests_waiting")):
            if m and name in m:
                peak[key] = max(peak.get(key, 0.0), m[name])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    return peak


class ScenarioAborted(Exception):
    """The model's failure budget ran out, or its container died, mid-scenario."""

    def __init__(self, result: ScenarioResult, failure: ModelFailed):
        super().__init__(str(failure))
        self.result = result
        self.failure = failure


async def _after_failure(sample: Sample, check_alive: Callable[[], None] | None,
                         failures_left: int) -> ModelFailed | None:
    """After a failed request: a dead container or an exhausted budget ends the model."""
    if check_alive is not None:
        try:
            await asyncio.to_thread(check_alive)
        except ModelFailed as exc:
            return exc
    if failures_left <= 1:
        return ModelFailed(f"too many failed requests (limit --max-failures); last: {sample.error}")
    return None


async def _requests_in_turn(client: Any, spec: ModelSpec, scenario: Scenario,
                            builder: PromptBuilder, events: Events,
                            payload: Callable[[], Awaitable[bytes]], samples: list[Sample], *,
                            failures_left: int, check_alive: Callable[[], None] | None,
                            clock: Clock, sleep: Sleep) -> ModelFailed | None:
    """A sequential scenario's requests, one after the other, into `samples`;
    what ended the model early, if anything did."""
    for i in range(scenario.requests):
        try:
            body = await payload()
        except ModelFailed as exc:  # the server broke between requests: keep what we have
            return exc
        sample = await send_measured(client, body, scenario.target_tokens_out, builder,
                                     clock=clock, sleep=sleep)
        samples.append(sample)
        events.sample(spec.name, scenario, i, sample)
        if not sample.ok:
            failure = await _after_failure(sample, check_alive, failures_left)
            failures_left -= 1
            if failure:
                return failure
    return None


PREBUILT_PAYLOADS = 2048  # built before a level starts; the rest as its streams ask


class LazyPayloads:
    """A level's request bodies: the first ones built before it starts (so
    building costs the measured streams nothing), the rest one at a time as
    a stream asks, so that `--throughput-requests 1000000000` neither builds
    a billion bodies before the first request nor holds them."""

    def __init__(self, make: Callable[[], Awaitable[bytes]], count: int):
        self.make, self.count = make, count
        self.ready: dict[int, bytes] = {}

    def __len__(self) -> int:
        return self.count

    async def prebuild(self, n: int) -> None:
        for i in range(min(n, self.count)):
            self.ready[i] = await self.make()

    async def get(self, i: int) -> bytes:
        body = self.ready.pop(i, None)
        return body if body is not None else await self.make()


async def run_concurrent(client: Any, payloads: Sequence[bytes] | LazyPayloads,
                         scenario: Scenario, *,
                         clock: Clock = time.perf_counter, on_stream: StreamObserver | None = None,
                         sleep: Sleep = asyncio.sleep,
                         measured: list[Sample] | None = None) -> tuple[list[Sample], float]:
    """`scenario.concurrency` streams at once until every payload is sent.

    Each sample's TTFT counts from the moment its stream was free to send
    (`t_scheduled`), so any delay inside the client is counted, not hidden.
    Streams are measured (parsed) after the last one ended: parsing one while
    others run would delay their timestamps (their reads wait for the event
    loop). Returns the samples in payload order and the level's wall time;
    they are also appended to `measured`, even when the level is interrupted.
    """
    got: dict[int, tuple[RawStream | Sample, float]] = {}
    todo = iter(range(len(payloads)))
    t_start = clock()

    async def stream() -> None:
        for i in todo:
            body = await payloads.get(i) if isinstance(payloads, LazyPayloads) else payloads[i]
            t_scheduled = clock()
            got[i] = (await stream_chat(client, body, scenario.target_tokens_out,
                                        clock=clock, t_scheduled=t_scheduled, sleep=sleep),
                      t_scheduled - t_start)

    try:
        await asyncio.gather(*(stream() for _ in range(scenario.concurrency)))
    finally:  # an interrupt keeps the streams that finished
        done = [dataclasses.replace(r if isinstance(r, Sample) else r.measure(on_stream),
                                    start_s=start_s) for r, start_s in (got[i] for i in sorted(got))]
        if measured is not None:
            measured.extend(done)
    ends = [s.start_s + (s.total_s or 0.0) for s in done if s.ok]
    return done, (max(ends) if ends else clock() - t_start)


def throughput_aggregate(samples: Sequence[Sample], duration_s: float) -> Aggregate:
    """Whole-level figures: output tokens/s and requests/s over the wall time."""
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens_out or 0 for s in ok)
    return Aggregate(duration_s=duration_s, requests_ok=len(ok), errors=len(samples) - len(ok),
                     output_tps=tokens / duration_s if duration_s > 0 else None,
                     requests_per_s=len(ok) / duration_s if duration_s > 0 else None)


def client_streams(cfg: RunConfig) -> int:
    """Connections the client must be able to hold at once: the largest
    throughput level, capacity probe, or open-loop level (whose requests may
    all be in flight), so that no request waits for a connection."""
    rates = [sc.requests for sc in rate_scenarios(cfg, 1)]
    return max(1, *cfg.concurrency, *rates, cfg.max_concurrency if cfg.slo else 1)


def rate_scenarios(cfg: RunConfig, tokens_in: int) -> list[Scenario]:
    """Open-loop levels: about 20 s of arrivals each (at least 16 requests)."""
    out = []
    for rate in cfg.request_rates or ():
        n = cfg.throughput_requests or max(level_requests(cfg, 1), 16, math.ceil(20 * rate))
        out.append(Scenario(f"rate-{rate:g}", "throughput", tokens_in, cfg.throughput_tokens_out,
                            n, concurrency=n, request_rate=rate))
    return out


async def run_open_loop(client: Any, payloads: Sequence[bytes], scenario: Scenario,
                        arrivals_s: Sequence[float], *, clock: Clock = time.perf_counter,
                        sleep: Sleep = asyncio.sleep,
                        measured: list[Sample] | None = None) -> tuple[list[Sample], float]:
    """Send payload i at `arrivals_s[i]` after the start, whatever the server
    is doing (open loop). TTFT counts from the scheduled arrival, so a server
    that falls behind shows it; a request the client itself sent late has the
    lag in its `queued_ms`. Returns the samples in payload order and the wall time."""
    got: list[tuple[RawStream | Sample, float] | None] = [None] * len(payloads)
    t_start = clock()

    async def one(i: int) -> None:
        t_scheduled = t_start + arrivals_s[i]
        if (wait := t_scheduled - clock()) > 0:
            await sleep(wait)
        got[i] = (await stream_chat(client, payloads[i], scenario.target_tokens_out, clock=clock,
                                    t_scheduled=t_scheduled, sleep=sleep), arrivals_s[i])

    try:
        await asyncio.gather(*(one(i) for i in range(len(payloads))))
    finally:
        done = [dataclasses.replace(r if isinstance(r, Sample) else r.measure(),
                                    start_s=start_s) for r, start_s in filter(None, got)]
        if measured is not None:
            measured.extend(done)
    ends = [s.start_s + (s.total_s or 0.0) for s in done if s.ok]
    return done, (max(ends) if ends else clock() - t_start)


def level_requests(cfg: RunConfig, streams: int) -> int:
    """Requests of a throughput level or probe: --throughput-requests, else
    4 per stream (at least 8), and with --slo at least what the strictest
    percentile needs (p99: 100), so that it is more than the worst request."""
    if cfg.throughput_requests:
        return cfg.throughput_requests
    need = max((r.min_requests for r in parse_slo(cfg.slo)), default=1) if cfg.slo else 1
    return max(4 * streams, 8, need)


async def run_level(client: Any, payloads: Sequence[bytes], scenario: Scenario, cfg: RunConfig, *,
                    clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep,
                    measured: list[Sample] | None = None) -> tuple[list[Sample], float]:
    """A throughput level: `concurrency` streams (closed loop), or arrivals at
    `request_rate` from the seeded schedule (open loop)."""
    if scenario.request_rate is None:
        return await run_concurrent(client, payloads, scenario, clock=clock, sleep=sleep,
                                    measured=measured)
    arrivals = scheduled_arrivals(len(payloads), scenario.request_rate, cfg.burstiness,
                                  random.Random(f"{cfg.arrival_seed}:{scenario.name}"))
    return await run_open_loop(client, payloads, scenario, arrivals, clock=clock, sleep=sleep,
                               measured=measured)


def level_aggregate(samples: Sequence[Sample], duration_s: float, scenario: Scenario,
                    cfg: RunConfig, peak: Mapping[str, float]) -> Aggregate:
    """A level's whole figures, the /metrics peaks, and with --slo its goodput;
    an open-loop level also says how well the client kept its rate."""
    aggregate = dataclasses.replace(throughput_aggregate(samples, duration_s), **peak)
    if scenario.request_rate is not None:
        aggregate = dataclasses.replace(aggregate,
                                        **open_loop_aggregate(samples, scenario.request_rate))
    if cfg.slo:
        aggregate = dataclasses.replace(aggregate,
                                        **slo_aggregate(samples, duration_s, parse_slo(cfg.slo)))
    return aggregate


async def _requests_at_once(client: Any, spec: ModelSpec, scenario: Scenario, cfg: RunConfig,
                            events: Events, payload: Callable[[], Awaitable[bytes]],
                            samples: list[Sample], *, check_alive: Callable[[], None] | None,
                            clock: Clock, sleep: Sleep) -> tuple[Aggregate, ModelFailed | None]:
    """A level's requests, `concurrency` streams (or open-loop arrivals) at a
    time, into `samples`: its whole-level figures, and a dead server if
    every request failed because of one."""
    payloads = LazyPayloads(payload, scenario.requests)
    await payloads.prebuild(PREBUILT_PAYLOADS)
    stop = asyncio.Event()
    peak_task = asyncio.create_task(_peak_metrics(client, stop))
    done, duration_s = await run_level(client, payloads, scenario, cfg, clock=clock,
                                       sleep=sleep, measured=samples)
    samples[:] = done  # payload order, not completion order
    stop.set()
    peak = await peak_task
    for i, s in enumerate(samples):
        events.sample(spec.name, scenario, i, s)
    failure = None
    if all(not s.ok for s in samples) and check_alive is not None:
        try:
            await asyncio.to_thread(check_alive)
        except ModelFailed as exc:
            failure = exc
    return level_aggregate(samples, duration_s, scenario, cfg, peak), failure


async def run_scenario(client: Any, spec: ModelSpec, scenario: Scenario, cfg: RunConfig,
                       builder: PromptBuilder, events: Events, *, failures_left: int,
                       check_alive: Callable[[], None] | None = None,
                       clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep,
                       measured: list[Sample] | None = None) -> ScenarioResult:
    """Send a scenario's requests (sequentially, or `concurrency` at a time)
    and summarize them. Every request has a unique prompt head. Each sample
    is also appended to `measured` as it completes, so that a caller that is
    interrupted mid-scenario still holds what was measured."""
    kwargs = spec.chat_template_kwargs
    exact: list[bool] = []  # per prompt: its size was counted, not calibrated

    async def payload() -> bytes:
        nonce = new_nonce()
        if scenario.target_tokens_in is None:
            messages = latency_messages(nonce)
        else:
            messages, n = await builder.build(scenario.target_tokens_in, nonce)
            exact.append(n is not None)
        return chat_payload(spec.model_id, messages, scenario.target_tokens_out, cfg.temperature,
                            kwargs, nonce, builder.knobs)

    before = await scrape_metrics(client)
    samples: list[Sample] = [] if measured is None else measured
    aggregate: Aggregate | None = None
    if scenario.concurrency == 1 and scenario.kind != "throughput":
        failure = await _requests_in_turn(client, spec, scenario, builder, events, payload,
                                          samples, failures_left=failures_left,
                                          check_alive=check_alive, clock=clock, sleep=sleep)
    else:
        aggregate, failure = await _requests_at_once(client, spec, scenario, cfg, events,
                                                     payload, samples, check_alive=check_alive,
                                                     clock=clock, sleep=sleep)
    after = await scrape_metrics(client)
    result = ScenarioResult(scenario, tuple(samples), summarize_samples(samples),
                            aggregate, metrics_delta(before, after),
                            all(exact) if exact else None,
                            output_forced(samples, scenario.target_tokens_out))
    if failure is not None:
        raise ScenarioAborted(result, failure)
    return result


# --- Capacity under service levels: the search is pure, the probe does I/O ----


def probe_from_samples(concurrency: int, samples: Sequence[Sample], duration_s: float,
                       rules: Sequence[SloRule]) -> Probe:
    """One capacity-search level's record, from its requests (pure)."""
    agg = throughput_aggregate(samples, duration_s)
    values, failed, too_few = level_check(samples, rules)
    good = slo_aggregate(samples, duration_s, rules)
    rates = [s.tps for s in samples if s.ok and s.tps is not None and not s.bursty]
    return Probe(concurrency=concurrency, requests=len(samples), errors=agg.errors or 0,
                 duration_s=duration_s, good=good["good_requests"],
                 goodput_rps=good["goodput_rps"], output_tps=agg.output_tps,
                 decode_tps=statistics.fmean(rates) if rates else None,
                 values=values, failed=failed, too_few=too_few)


def next_concurrency(probes: Sequence[Probe], max_concurrency: int) -> int | None:
    """The next level to probe (pure): 1 first, then doubling while the SLOs
    hold (up to `max_concurrency`), then bisecting between the highest level
    that held and the lowest that broke; None when they are adjacent, when 1
    already broke, or when the bound held."""
    if not probes:
        return 1
    broke = [p.concurrency for p in probes if not p.holds]
    hi = min(broke) if broke else None
    lo = max((p.concurrency for p in probes if p.holds and (hi is None or p.concurrency < hi)),
             default=0)
    if hi is None:
        return None if lo >= max_concurrency else min(2 * lo, max_concurrency)
    return None if hi - lo <= 1 else (lo + hi) // 2


def _broken_rule_text(probe: Probe, rules: Sequence[SloRule]) -> str:
    parts = []
    for rule in rules:
        if rule.key in probe.failed:
            value = probe.values.get(rule.key)
            shown = ("no value" if value is None else "failed requests" if math.isinf(value)
                     else f"{value:.3g}")
            parts.append(f"{rule.key} {shown} (limit {rule.op} {rule.limit:g})")
    return ", ".join(parts)


def capacity_from_probes(probes: Sequence[Probe], slo: str, max_concurrency: int, *,
                         stopped: str | None = None, budget_s: float | None = None,
                         elapsed_s: float = 0.0) -> Capacity:
    """The capacity record of a search (pure): finished, or `stopped` early by
    "budget" (the next probe would not fit) or "interrupted" (a signal, or the
    model failed mid-search), when its capacity is at least the level that held."""
    rules = parse_slo(slo)
    broke = sorted((p for p in probes if not p.holds), key=lambda p: p.concurrency)
    first_broke = broke[0] if broke else None
    hi = first_broke.concurrency if first_broke else None
    held = [p for p in probes if p.holds and (hi is None or p.concurrency < hi)]
    best = max(held, key=lambda p: p.concurrency, default=None)
    lo = best.concurrency if best else 0
    if first_broke is not None:
        limited_by = next(r.key for r in rules if r.key in first_broke.failed)
        detail = f"{hi} streams broke {_broken_rule_text(first_broke, rules)}"
        step = hi - lo  # type: ignore[operator]
    elif stopped is not None:
        why = "the time budget ran out" if stopped == "budget" else "the search was interrupted"
        limited_by, detail, step = stopped, f"{why} while the SLOs held", lo
    else:
        limited_by, step = "max-concurrency", 0
        detail = f"the SLOs held at --max-concurrency {max_concurrency}"
    if stopped is not None and first_broke is not None and step > 1:
        detail += f"; the search stopped ({stopped}) before it closed in (below {hi})"
    return Capacity(slo=slo, streams=lo, goodput_rps=best.goodput_rps if best else None,
                    output_tps=best.output_tps if best else None, limited_by=limited_by,
                    broke_at=hi, step=step, probes=tuple(probes), detail=detail,
                    budget_s=budget_s, elapsed_s=elapsed_s)


async def search_capacity(probe: Callable[[int], Any], slo: str, *, max_concurrency: int,
                          budget_s: float, clock: Clock = time.monotonic,
                          probes: list[Probe] | None = None) -> Capacity:
    """Probe levels chosen by next_concurrency until it says stop, or until the
    next probe would not fit the time budget (estimated by the last one).
    `probe(concurrency)` is awaited and returns a Probe: it does the I/O. Each
    probe is also appended to `probes`, so a caller that is interrupted keeps them."""
    probes = [] if probes is None else probes
    t0 = clock()
    last_s, stopped = 0.0, None
    while (c := next_concurrency(probes, max_concurrency)) is not None:
        if probes and clock() - t0 + last_s > budget_s:
            stopped = "budget"
            break
        t = clock()
        probes.append(await probe(c))
        last_s = clock() - t
    return capacity_from_probes(probes, slo, max_concurrency, stopped=stopped,
                                budget_s=budget_s, elapsed_s=clock() - t0)


async def capacity_probe(client: Any, spec: ModelSpec, cfg: RunConfig, builder: PromptBuilder,
                         concurrency: int, *, clock: Clock = time.perf_counter,
                         sleep: Sleep = asyncio.sleep,
                         check_alive: Callable[[], None] | None = None) -> Probe:
    """One closed-loop level of the capacity search (the I/O side)."""
    rules = parse_slo(cfg.slo or "")
    tin = max(1, min(cfg.throughput_tokens_in, spec.max_context_tokens - cfg.throughput_tokens_out))
    n = level_requests(cfg, concurrency)
    scenario = Scenario(f"capacity-c{concurrency}", "throughput", tin, cfg.throughput_tokens_out,
                        n, concurrency=concurrency)
    payloads = []
    for _ in range(n):
        nonce = new_nonce()
        messages, _ = await builder.build(tin, nonce)
        payloads.append(chat_payload(spec.model_id, messages, scenario.target_tokens_out,
                                     cfg.temperature, spec.chat_template_kwargs, nonce))
    samples, duration_s = await run_concurrent(client, payloads, scenario, clock=clock,
                                               sleep=sleep)
    if all(not s.ok for s in samples) and check_alive is not None:
        await asyncio.to_thread(check_alive)  # a dead container ends the model, not the level
    return probe_from_samples(concurrency, samples, duration_s, rules)


async def find_capacity(client: Any, spec: ModelSpec, cfg: RunConfig, builder: PromptBuilder,
                        events: Events, *, clock: Clock = time.perf_counter,
                        sleep: Sleep = asyncio.sleep,
                        check_alive: Callable[[], None] | None = None,
                        probes: list[Probe] | None = None) -> Capacity:
    """The capacity search of one model, telling `events` about each probe
    (each also appended to `probes`, see search_capacity)."""
    assert cfg.slo is not None
    rules = parse_slo(cfg.slo)

    async def probe(c: int) -> Probe:
        p = await capacity_probe(client, spec, cfg, builder, c, clock=clock, sleep=sleep,
                                 check_alive=check_alive)
        verdict = "held" if p.holds else f"broke {_broken_rule_text(p, rules)}"
        few = f" (too few requests for {', '.join(p.too_few)})" if p.too_few else ""
        events.info(f"  capacity probe {c} streams, {p.requests} requests: {verdict}{few}")
        return p

    events.info(f"{spec.name}: capacity search under {cfg.slo} (up to {cfg.max_concurrency} "
                f"streams, {cfg.capacity_budget_s:g} s)")
    return await search_capacity(probe, cfg.slo, max_concurrency=cfg.max_concurrency,
                                 budget_s=cfg.capacity_budget_s, clock=clock, probes=probes)


# --- One model's measurement, from ready to its last scenario -----------------


async def benchmark_model(client: Any, result: ModelResult, cfg: RunConfig, events: Events, *,
                          check_alive: Callable[[], None] | None = None,
                          clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep,
                          gpu: GpuSampler | None = None) -> None:
    """Warm up, then run every scenario of the plan, appending each result to
    `result.scenarios` as soon as it is complete."""
    spec = result.spec
    result.server = await server_info(client, spec)
    engine = await detect_engine(client, spec.model_id, spec.engine)
    builder = PromptBuilder(client, spec.model_id, spec.chat_template_kwargs, engine=engine.name)
    knobs, ignored = await warm_up(client, spec, cfg, builder, clock=clock, sleep=sleep)
    result.server = engine_facts(result.server, engine, knobs, ignored)
    await check_answers(client, result, cfg, events)
    spec = result.spec = fit_context(spec, engine.context_tokens)
    failures_left = cfg.max_failed_samples + 1
    kept = {sr.scenario.name for sr in result.scenarios}  # by --resume: never measured twice
    for scenario in plan_scenarios(cfg, spec):
        if scenario.name in kept:
            continue
        events.info(f"{spec.name}: {describe_scenario(scenario)}")
        events.scenario_started(spec.name, scenario)
        measured: list[Sample] = []
        t_gpu = gpu.clock() if gpu else 0.0
        try:
            sr = await run_scenario(client, spec, scenario, cfg, builder, events,
                                    failures_left=failures_left, check_alive=check_alive,
                                    clock=clock, sleep=sleep, measured=measured)
        except ScenarioAborted as exc:
            result.scenarios.append(exc.result)
            events.scenario_done(result, exc.result)
            raise exc.failure from None
        except BaseException:  # interrupted (a signal cancels the scenario): keep its samples
            if measured:
                samples = tuple(measured)
                result.scenarios.append(ScenarioResult(scenario, samples, summarize_samples(samples)))
            raise
        if scenario.kind != "throughput":
            failures_left -= sr.failed
        sr = with_gpu_summary(sr, gpu, t_gpu)
        result.scenarios.append(sr)
        events.scenario_done(result, sr)
        if not any(s.ok for s in sr.samples):  # nothing measured is no result, whatever the engine
            last = next((s.error for s in reversed(sr.samples) if s.error), "no request was sent")
            raise ModelFailed(f"{scenario.name}: no request succeeded; last error: {last}")
    if cfg.slo:
        probes: list[Probe] = []
        try:
            result.capacity = await find_capacity(client, spec, cfg, builder, events, clock=clock,
                                                  sleep=sleep, check_alive=check_alive,
                                                  probes=probes)
        except BaseException:  # interrupted or failed mid-search: keep what the probes showed
            if probes:
                result.capacity = capacity_from_probes(probes, cfg.slo, cfg.max_concurrency,
                                                       stopped="interrupted")
            raise


# ============================================================================
# Winners (pure)
# ============================================================================


@dataclass(frozen=True)
class Ranking:
    """The best model for one metric of one scenario, or a tie.

    A winner must beat the runner-up with non-overlapping 95% confidence
    intervals; with a single iteration there is no interval and the best mean
    wins, marked untested.
    """

    scenario: str
    metric: str
    best: str
    runner_up: str | None
    tie: bool
    tested: bool
    ratio: float | None = None  # best / runner-up, in the metric's "better" direction
    ratio_err: float | None = None


def scenario_stat(model: ModelResult, scenario: str, metric: str) -> Stat | None:
    for sr in model.scenarios:
        if sr.scenario.name == scenario:
            return sr.summary.get(metric)
    return None


def rank(models: Sequence[ModelResult], scenario: str, metric: str) -> Ranking | None:
    """Rank the models on one metric of one scenario (None: fewer than two).
    A model whose answers were wrong takes no part: it is never crowned."""
    m = METRICS[metric]
    if m.higher_is_better is None:
        return None
    entries = [(mr.spec.name, st) for mr in models
               if mr.ranked and (st := scenario_stat(mr, scenario, metric)) is not None]
    if len(entries) < 2:
        return None
    entries.sort(key=lambda e: e[1].mean, reverse=m.higher_is_better)
    (best, a), (second, b) = entries[0], entries[1]
    tested = a.ci95 is not None and b.ci95 is not None
    tie = tested and intervals_overlap(a.ci95, b.ci95)  # type: ignore[arg-type]
    if b.mean == 0 or a.mean == 0:
        ratio, err = None, None
    elif m.higher_is_better:
        ratio, err = ratio_with_error(a, b)
    else:
        ratio, err = ratio_with_error(b, a)
    return Ranking(scenario, metric, best, second, tie, tested, ratio, err)


def ranked_metrics(kind: str) -> tuple[str, ...]:
    if kind == "latency":
        return ("ttft_ms", "tps", "total_s")
    if kind == "context":
        return ("ttft_ms", "prefill_tps", "total_s")
    return ("ttft_ms", "tps")


@dataclass(frozen=True)
class CapacityRanking:
    """The model that serves the most streams under the SLOs, or a tie.

    `close`: the two capacities lie within one probe step of each other (the
    larger step of the two searches, at least 1), so the search cannot tell
    them apart; `bounded`: both held at --max-concurrency, so both are at
    least that and neither is known to be better."""

    best: str
    runner_up: str
    best_streams: int
    runner_up_streams: int
    close: bool
    bounded: bool = False


def rank_capacity(models: Sequence[ModelResult]) -> CapacityRanking | None:
    """Rank the models' capacities (None: fewer than two have one); a model
    whose known-answer check was wrong is left out, as rank() leaves it out."""
    entries = [mr for mr in models if mr.capacity is not None and mr.ranked]
    if len(entries) < 2:
        return None
    entries.sort(key=lambda mr: mr.capacity.streams, reverse=True)  # type: ignore[union-attr]
    a, b = entries[0].capacity, entries[1].capacity
    assert a is not None and b is not None
    bounded = a.limited_by == b.limited_by == "max-concurrency"
    close = bounded or a.streams - b.streams <= max(a.step, b.step, 1)
    return CapacityRanking(entries[0].spec.name, entries[1].spec.name, a.streams, b.streams,
                           close, bounded)


def scenario_names(models: Sequence[ModelResult]) -> list[tuple[str, str]]:
    """(name, kind) of every scenario any model ran, in first-seen order."""
    seen: dict[str, str] = {}
    for mr in models:
        for sr in mr.scenarios:
            seen.setdefault(sr.scenario.name, sr.scenario.kind)
    return list(seen.items())


@dataclass(frozen=True)
class Unranked:
    """A ranked metric with no winner although several models ran the
    scenario: only the models in `have` have a value for it."""

    metric: str
    have: tuple[str, ...]
    ran: tuple[str, ...]


@dataclass(frozen=True)
class ScenarioWinners:
    """The outcome of ranking one scenario, computed once and rendered by
    every output (text, styled, Markdown, HTML)."""

    scenario: str
    kind: str
    rankings: tuple[Ranking, ...]
    unranked: tuple[Unranked, ...] = ()

    def winner(self, metric: str) -> str | None:
        """The model that won `metric` outright (None: a tie or no ranking)."""
        return next((r.best for r in self.rankings if r.metric == metric and not r.tie), None)


def scenario_winners(models: Sequence[ModelResult], scenario: str, kind: str) -> ScenarioWinners:
    """Rank every metric of the scenario's kind; say which could not be ranked."""
    rankings = tuple(r for metric in ranked_metrics(kind) if (r := rank(models, scenario, metric)))
    ran = tuple(mr.spec.name for mr in models
                if any(sr.scenario.name == scenario for sr in mr.scenarios))
    unranked = tuple(
        Unranked(metric, tuple(mr.spec.name for mr in models if mr.spec.name in ran and mr.ranked
                               and scenario_stat(mr, scenario, metric)), ran)
        for metric in ranked_metrics(kind)
        if len(ran) > 1 and all(r.metric != metric for r in rankings))
    return ScenarioWinners(scenario, kind, rankings, unranked)


def rank_scenarios(models: Sequence[ModelResult]) -> tuple[ScenarioWinners, ...]:
    """The Winners stage: every scenario any model ran, in first-seen order."""
    return tuple(scenario_winners(models, name, kind) for name, kind in scenario_names(models))


# ============================================================================
# Saved reports: the JSON edge
# ============================================================================


def _round(x: Any, digits: int = 3) -> Any:
    return round(x, digits) if isinstance(x, float) else x


def record_to_dict(rec: Any, absent_if_none: Iterable[str] = (), digits: int | None = None
                   ) -> dict[str, Any]:
    """A record's fields as JSON values, in field order: tuples as lists,
    records as dicts, floats rounded to `digits` when given. A field named in
    `absent_if_none` is left out while None (the key is absent, not null)."""
    out: dict[str, Any] = {}
    unsaved = getattr(rec, "unsaved", frozenset())
    for f in dataclasses.fields(rec):
        value = getattr(rec, f.name)
        if f.name == "unsaved" or f.name in unsaved or (value is None and f.name in absent_if_none):
            continue
        if dataclasses.is_dataclass(value):
            value = record_to_dict(value, ABSENT_IF_NONE.get(type(value), ()))
        elif isinstance(value, tuple):
            value = [record_to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = _round(value, digits) if digits is not None else value
    return out


def record_from_dict(cls: type, data: Mapping[str, Any], tuples: Iterable[str] = ()) -> Any:
    """The inverse of record_to_dict for a flat record: unknown keys ignored,
    missing ones take their default, the fields in `tuples` made tuples."""
    known = _known_fields(cls, data)
    for name in tuples:
        if known.get(name) is not None:
            known[name] = tuple(known[name])
    return cls(**known)


ABSENT_IF_NONE = {  # fields whose key a report leaves out while unknown
    Aggregate: ("peak_kv_cache_usage_perc", "peak_requests_waiting", "good_requests",
                "goodput_rps", "request_rate", "late_sends", "send_lag_max_ms",
                "achieved_rate_rps", "client_late"),
    ServerInfo: ("engine", "engine_forced", "context_tokens", "knobs_refused", "knobs_ignored"),
    ServerDelta: ("kv_cache_usage_perc", "prefill_tps", "decode_tps", "decode_calls",
                  "cached_tokens"),
    Lifecycle: tuple(f.name for f in dataclasses.fields(Lifecycle)),
    LoadFacts: tuple(f.name for f in dataclasses.fields(LoadFacts)),  # only what the log said
    PowerSummary: ("duration_s", "j_per_token", "sm_clock_min_mhz", "sm_clock_max_mhz",
                   "peak_temp_c", "throttled", "throttle_reasons"),
    Failure: ("service", "docker_host"),
    Environment: tuple(f.name for f in dataclasses.fields(Environment)),
}


def stat_to_dict(st: Stat) -> dict[str, Any]:
    d = {k: _round(v, 4) for k, v in dataclasses.asdict(st).items() if k != "ci95"}
    d["ci95"] = [_round(v, 4) for v in st.ci95] if st.ci95 else None
    return d


def sample_to_dict(s: Sample) -> dict[str, Any]:
    # seconds to the microsecond, milliseconds and rates to 3 decimals
    d = {k: _round(v, 6 if k.endswith("_s") else 3)
         for k, v in dataclasses.asdict(s).items()
         if k != "itl_ms" and not (k == "tokens_counted" and v is None)}
    d["itl_ms"] = [round(x, 3) for x in s.itl_ms]
    return d


def scenario_to_dict(sr: ScenarioResult) -> dict[str, Any]:
    sc = sr.scenario
    return {
        "name": sc.name, "kind": sc.kind,
        "target_tokens_in": sc.target_tokens_in, "requested_tokens_in": sc.requested_tokens_in,
        "clamped": sc.clamped, "target_tokens_out": sc.target_tokens_out,
        "requests": sc.requests, "concurrency": sc.concurrency,
        "request_rate": sc.request_rate,
        "samples": [sample_to_dict(s) for s in sr.samples],
        "summary": {k: stat_to_dict(v) for k, v in sr.summary.items()},
        "aggregate": (record_to_dict(sr.aggregate, ABSENT_IF_NONE[Aggregate], 3)
                      if sr.aggregate else None),
        "server_metrics": (record_to_dict(sr.server, ABSENT_IF_NONE[ServerDelta], 3)
                           if sr.server else None),
        "gpu": record_to_dict(sr.gpu, ABSENT_IF_NONE[PowerSummary]) if sr.gpu else None,
        **{k: v for k, v in (("output_forced", sr.output_forced),
                             ("tokens_in_exact", sr.tokens_in_exact)) if v is not None},
    }


def model_to_dict(mr: ModelResult, bandwidth_gbs: float) -> dict[str, Any]:
    spec = mr.spec
    ceiling = roofline_tps(spec, bandwidth_gbs)
    tps = scenario_stat(mr, "latency", "tps")
    return {
        "name": spec.name, "model_id": spec.model_id, "service": spec.service,
        "status": mr.status, "error": mr.error,
        "failure": record_to_dict(mr.failure, ABSENT_IF_NONE[Failure]) if mr.failure else None,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items()
                 if k not in ("name", "model_id", "service")
                 and (v or k not in ("docker_host", "url", "services"))  # only when used
                 and (k != "engine" or v is not None)},
        "server": record_to_dict(mr.server, ABSENT_IF_NONE[ServerInfo]) if mr.server else {},
        "lifecycle": record_to_dict(mr.lifecycle, ABSENT_IF_NONE[Lifecycle]),
        "roofline": {"bandwidth_gbs": bandwidth_gbs, "ceiling_tps": _round(ceiling),
                     "achieved_pct": _round(100 * tps.mean / ceiling, 1) if ceiling and tps else None},
        "answer_check": answer_check_to_dict(mr.answer_check),
        "scenarios": [scenario_to_dict(sr) for sr in mr.scenarios],
        "capacity": capacity_to_dict(mr.capacity) if mr.capacity else None,
    }


def answer_check_to_dict(check: AnswerCheck | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {"ok": check.ok, **dataclasses.asdict(check)}


def capacity_to_dict(cap: Capacity) -> dict[str, Any]:
    """The `capacity` of a model record: streams, goodput_rps, output_tps,
    limited_by (docs/metrics.md), then how the search got there."""
    probes = [{"concurrency": p.concurrency, "requests": p.requests, "errors": p.errors,
               "duration_s": _round(p.duration_s), "good_requests": p.good,
               "goodput_rps": _round(p.goodput_rps), "output_tps": _round(p.output_tps),
               "decode_tps": _round(p.decode_tps), "holds": p.holds,
               "values": {k: None if math.isinf(v) else _round(v) for k, v in p.values.items()},
               "failed": list(p.failed), "too_few": list(p.too_few)} for p in cap.probes]
    return {"streams": cap.streams, "goodput_rps": _round(cap.goodput_rps),
            "output_tps": _round(cap.output_tps), "limited_by": cap.limited_by,
            "broke_at": cap.broke_at, "step": cap.step, "detail": cap.detail, "slo": cap.slo,
            "budget_s": cap.budget_s, "elapsed_s": _round(cap.elapsed_s), "probes": probes}


def capacity_from_dict(data: Mapping[str, Any]) -> Capacity:
    _check_numbers(data, ("streams", "goodput_rps", "output_tps", "step"), "capacity")
    probes = tuple(Probe(
        concurrency=p["concurrency"], requests=p["requests"], errors=p.get("errors", 0),
        duration_s=p.get("duration_s", 0.0), good=p.get("good_requests", 0),
        goodput_rps=p.get("goodput_rps"), output_tps=p.get("output_tps"),
        decode_tps=p.get("decode_tps"),
        values={k: math.inf if v is None else v for k, v in (p.get("values") or {}).items()},
        failed=tuple(p.get("failed") or ()), too_few=tuple(p.get("too_few") or ()))
        for p in data.get("probes") or ())
    return Capacity(slo=data["slo"], streams=data["streams"], goodput_rps=data.get("goodput_rps"),
                    output_tps=data.get("output_tps"), limited_by=data["limited_by"],
                    broke_at=data.get("broke_at"), step=data.get("step", 0), probes=probes,
                    detail=data.get("detail", ""), budget_s=data.get("budget_s"),
                    elapsed_s=data.get("elapsed_s", 0.0))


def report_to_dict(report: Report) -> dict[str, Any]:
    """The JSON report: a stable contract (schema_version 1, docs/metrics.md)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "started_at": report.started_at, "finished_at": report.finished_at,
        "interrupted": report.interrupted,
        "config": dataclasses.asdict(report.config),
        "environment": record_to_dict(report.environment, ABSENT_IF_NONE[Environment]),
        "models": [model_to_dict(mr, report.config.bandwidth_gbs) for mr in report.models],
        # each start of the run (--resume adds one); absent in a report from before parts
        **({"parts": [part_to_dict(part) for part in report.parts]} if report.parts else {}),
    }


def part_to_dict(part: RunPart) -> dict[str, Any]:
    return {"started_at": part.started_at, "finished_at": part.finished_at,
            "interrupted": part.interrupted,
            "environment": record_to_dict(part.environment, ABSENT_IF_NONE[Environment]),
            "models": {name: {**dataclasses.asdict(pm), "scenarios": list(pm.scenarios)}
                       for name, pm in part.models.items()}}


def part_from_dict(data: Mapping[str, Any]) -> RunPart:
    models = {str(name): PartModel(**{**_known_fields(PartModel, pm),
                                      "scenarios": tuple(map(str, pm.get("scenarios") or ()))})
              for name, pm in (data.get("models") or {}).items()}
    for name, pm in models.items():
        _check_numbers(dataclasses.asdict(pm), ("load_s", "measure_s", "stop_s"), f"parts/{name}")
    return RunPart(str(data["started_at"]), data.get("finished_at"), data.get("interrupted"),
                   record_from_dict(Environment, data.get("environment") or {}), models)


def _known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of dataclass `cls`: a key this
    version does not know is ignored, a missing one takes its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _check_numbers(data: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    for key in keys:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {key} is {value!r}, not a number")


def stat_from_dict(data: Mapping[str, Any], where: str = "summary") -> Stat:
    _check_numbers(data, ("n", "mean", "stddev", "min", "max", "median", "p90", "p99"), where)
    ci = data.get("ci95")
    return Stat(**{**_known_fields(Stat, data), "ci95": (ci[0], ci[1]) if ci else None})


def sample_from_dict(data: Mapping[str, Any]) -> Sample:
    return Sample(**{**_known_fields(Sample, data), "itl_ms": tuple(data.get("itl_ms") or ())})


def scenario_from_dict(data: Mapping[str, Any], where: str) -> ScenarioResult:
    scenario = Scenario(
        name=data["name"], kind=data["kind"], target_tokens_in=data.get("target_tokens_in"),
        target_tokens_out=data["target_tokens_out"], requests=data["requests"],
        concurrency=data.get("concurrency", 1), requested_tokens_in=data.get("requested_tokens_in"),
        request_rate=data.get("request_rate"))
    where = f"{where}/{scenario.name}"
    aggregate, server = data.get("aggregate"), data.get("server_metrics")
    if aggregate is not None:  # only what compare reads: a newer text field is no damage
        _check_numbers(aggregate, AGGREGATE_METRICS, f"{where}/aggregate")
    return ScenarioResult(
        scenario, tuple(sample_from_dict(s) for s in data["samples"]),
        {k: stat_from_dict(v, f"{where}/{k}") for k, v in data["summary"].items()},
        record_from_dict(Aggregate, aggregate) if aggregate is not None else None,
        server_delta_from_dict(server) if server is not None else None,
        *(data.get(k) if isinstance(data.get(k), bool) else None
          for k in ("tokens_in_exact", "output_forced")),
        gpu=power_from_dict(data["gpu"]) if data.get("gpu") else None)


def server_delta_from_dict(data: Mapping[str, Any]) -> ServerDelta:
    unsaved = {f.name for f in dataclasses.fields(ServerDelta)} - set(data) - {"unsaved"}
    return dataclasses.replace(record_from_dict(ServerDelta, data), unsaved=frozenset(unsaved))


def lifecycle_from_dict(data: Mapping[str, Any]) -> Lifecycle:
    power, pull, load, memory = (data.get(k) for k in ("power", "pull", "vllm_load", "memory"))
    return dataclasses.replace(
        record_from_dict(Lifecycle, data, ("repo_digests", "command", "services")),
        power=power_from_dict(power) if power else None,
        pull=record_from_dict(PullRecord, pull) if pull else None,
        vllm_load=record_from_dict(LoadFacts, load) if load else None,
        memory=record_from_dict(MemoryRecord, memory) if memory else None,
        hosts=tuple(host_record_from_dict(h) for h in data["hosts"]) if data.get("hosts") else None)


def power_from_dict(data: Mapping[str, Any]) -> PowerSummary:
    return record_from_dict(PowerSummary, data, ("throttle_reasons",))


def host_record_from_dict(data: Mapping[str, Any]) -> HostRecord:
    hw = data.get("hardware")
    return HostRecord(data["service"], data["docker_host"],
                      record_from_dict(EngineHardware, hw, ("runtimes",)) if hw else None)


def model_from_dict(data: Mapping[str, Any]) -> ModelResult:
    spec_fields = {k: v for k, v in _known_fields(ModelSpec, data.get("spec") or {}).items()
                   if k not in ("name", "model_id", "service")}
    if spec_fields.get("services"):  # saved as a list of mappings
        spec_fields["services"] = tuple(ServiceRef(**_known_fields(ServiceRef, r))
                                        for r in spec_fields["services"] if isinstance(r, dict))
    spec = ModelSpec(name=data["name"], service=data.get("service"), model_id=data["model_id"],
                     **spec_fields)
    failure, server = data.get("failure"), data.get("server")
    return ModelResult(spec, status=data["status"], error=data.get("error"),
                       failure=record_from_dict(Failure, failure, ("log_tail",)) if failure else None,
                       server=record_from_dict(ServerInfo, server, ("knobs_refused",
                                                                    "knobs_ignored"))
                       if server else None,
                       lifecycle=lifecycle_from_dict(data.get("lifecycle") or {}),
                       scenarios=[scenario_from_dict(s, spec.name) for s in data["scenarios"]],
                       answer_check=answer_check_from_dict(data.get("answer_check")),
                       capacity=capacity_from_dict(data["capacity"]) if data.get("capacity") else None)


def answer_check_from_dict(data: Any) -> AnswerCheck | None:
    if not isinstance(data, Mapping):
        return None  # reports from before the check have none
    example = data.get("example")
    return dataclasses.replace(
        record_from_dict(AnswerCheck, data),
        example=record_from_dict(AnswerExample, example) if isinstance(example, Mapping) else None)


# RunConfig fields added after schema_version 1 was first written: None
# (unknown) when an older report is read back.
CONFIG_ADDED = ("answer_check", "require_correct_answers", "slo", "max_concurrency",
                "capacity_budget_s", "request_rates", "burstiness", "arrival_seed", "pull",
                "pull_timeout_s", "parallel")


def report_from_dict(data: Mapping[str, Any]) -> Report:
    """The inverse of report_to_dict: a saved report back in the records a
    run builds, so that comparing and exporting work the same on both.
    Raises KeyError, TypeError or ValueError on a malformed document."""
    config = {k: tuple(v) if isinstance(v, list) else v
              for k, v in _known_fields(RunConfig, data["config"]).items()}
    # A report from before an option existed did not use it: unknown, not its default.
    config.update({k: None for k in CONFIG_ADDED if k not in data["config"]})
    return Report(RunConfig(**config), data["started_at"],
                  [model_from_dict(m) for m in data["models"]],
                  environment=record_from_dict(Environment, data.get("environment") or {}),
                  finished_at=data.get("finished_at"), interrupted=data.get("interrupted"),
                  parts=[part_from_dict(p) for p in data.get("parts") or ()])


class _NonFinite(ValueError):
    """NaN or an infinity in a saved report: json.dumps never wrote one for us."""


def _refuse_non_finite(name: str) -> Any:
    raise _NonFinite(name)


def load_report(path: Path, what: str = "report") -> Report:
    """Read a JSON report this tool wrote; UsageError (one line that says what
    to do) for a missing file, non-JSON, another tool's file, another
    schema_version, or a damaged report."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"{what} {path} cannot be read ({why}): pass a .json report "
                         f"that {TOOL_NAME} wrote") from None
    try:
        data = json.loads(text, parse_constant=_refuse_non_finite)
    except _NonFinite as exc:
        raise UsageError(f"{what} {path} holds a non-finite number ({exc}), which no report "
                         f"of {TOOL_NAME} has: use the file the run wrote, unedited") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested deeper than any report: pass a .json "
                         f"report that {TOOL_NAME} wrote (docs/reports/*.json)") from None
    except ValueError as exc:
        raise UsageError(f"{what} {path} is not JSON ({exc}): pass a .json report "
                         f"that {TOOL_NAME} wrote (docs/reports/*.json)") from None
    tool = data.get("tool") if isinstance(data, dict) else None
    name = tool.get("name") if isinstance(tool, dict) else None
    if name != TOOL_NAME:
        raise UsageError(f"{what} {path} is not a report of {TOOL_NAME} (tool.name is {name!r}): "
                         f"pass a .json report that {TOOL_NAME} wrote (docs/reports/*.json)")
    version = data.get("schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise UsageError(f"{what} {path} has schema_version {version!r}, but {TOOL_NAME} "
                         f"{__version__} reads {SCHEMA_VERSION}: compare reports of the same "
                         "schema (re-run the baseline with this version)")
    try:
        return report_from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        why = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UsageError(f"{what} {path} is a damaged {TOOL_NAME} report ({why}): "
                         "use the file the run wrote, unedited") from None


# ============================================================================
# Comparison of saved reports (pure)
# ============================================================================

# A model's capacity under --slo, compared as the row "capacity" of each model.
CAPACITY_METRIC = Metric("capacity_streams", "Capacity", "streams", True)
CAPACITY_ROW = "capacity"
# Every metric with a direction can be compared; token counts cannot.
COMPARED_METRICS: dict[str, Metric] = {
    k: m for k, m in {**METRICS, **AGGREGATE_METRICS, CAPACITY_METRIC.key: CAPACITY_METRIC}.items()
    if m.higher_is_better is not None}
# A change of more than this many percent, in the worse direction, regresses.
# Metrics without a threshold are listed but not judged (--threshold adds one).
DEFAULT_THRESHOLDS_PCT: dict[str, float] = {
    "ttft_ms": 10.0, "tps": 5.0, "prefill_tps": 10.0, "total_s": 10.0, "output_tps": 5.0,
    "capacity_streams": 10.0}

REGRESSED, IMPROVED, NOISE, UNCHANGED = "regressed", "improved", "noise", "unchanged"
NOT_GATED = "not gated"
MISSING_IN_BASELINE, MISSING_IN_CANDIDATE = "missing in baseline", "missing in candidate"
VERDICTS = (REGRESSED, IMPROVED, NOISE, UNCHANGED, NOT_GATED, MISSING_IN_BASELINE,
            MISSING_IN_CANDIDATE)


def parse_thresholds(text: str) -> dict[str, float | None]:
    """'ttft_ms:10%,tps:5%' -> {'ttft_ms': 10.0, 'tps': 5.0}; 'ttfo_ms:off'
    -> {'ttfo_ms': None} (stop judging it). ValueError says the expected form."""
    rules: dict[str, float | None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        metric, sep, value = (s.strip() for s in part.partition(":"))
        if not sep or not metric or not value:
            raise ValueError(f"{part!r} is not METRIC:PERCENT (e.g. ttft_ms:10%)")
        if metric not in COMPARED_METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(COMPARED_METRICS)}")
        if metric in rules:
            raise ValueError(f"{metric} is given twice")
        if value.lower() == "off":
            rules[metric] = None
            continue
        if not value.endswith("%"):
            raise ValueError(f"{part!r}: give the threshold in percent, e.g. {metric}:{value}%")
        try:
            pct = float(value[:-1])
        except ValueError:
            raise ValueError(f"{part!r}: {value!r} is not a percentage like 10%") from None
        if not math.isfinite(pct) or pct < 0:
            raise ValueError(f"{part!r}: the threshold must be a percentage >= 0")
        rules[metric] = pct
    if not rules:
        raise ValueError("no thresholds given: expected e.g. ttft_ms:10%,tps:5%")
    return rules


def effective_thresholds(rules: Mapping[str, float | None]) -> dict[str, float]:
    """The defaults with `rules` on top; a rule of None removes a metric."""
    merged = {**DEFAULT_THRESHOLDS_PCT, **rules}
    return {k: v for k, v in merged.items() if v is not None}


@dataclass(frozen=True)
class Baseline:
    """A saved report to compare a run against, and the thresholds to judge by."""

    path: Path
    report: Report
    thresholds_pct: Mapping[str, float]


@dataclass(frozen=True)
class MetricChange:
    """One metric of one model's scenario in the baseline and the candidate.

    `change_pct` is (candidate - baseline) / baseline in percent, whatever the
    metric's direction; `verdict` knows the direction. `tested` is False when
    either side had a single value (no interval), so noise could not be told
    from a change and the threshold alone decided.
    """

    model: str
    scenario: str
    metric: str
    baseline: Stat | None
    candidate: Stat | None
    change_pct: float | None
    threshold_pct: float | None
    verdict: str
    tested: bool


@dataclass(frozen=True)
class Comparison:
    changes: tuple[MetricChange, ...]
    thresholds_pct: Mapping[str, float]
    notes: tuple[str, ...] = ()

    @property
    def regressions(self) -> tuple[MetricChange, ...]:
        return tuple(c for c in self.changes if c.verdict == REGRESSED)

    def counts(self) -> dict[str, int]:
        """How many metrics got each verdict, in VERDICTS order, zeros left out."""
        counted = {v: sum(c.verdict == v for c in self.changes) for v in VERDICTS}
        return {v: n for v, n in counted.items() if n}


def judge_change(metric: str, baseline: Stat, candidate: Stat, threshold_pct: float | None
                 ) -> tuple[str, float | None, bool]:
    """(verdict, change in %, tested) for one metric present on both sides.

    Within the threshold: unchanged. Past it (strictly more): noise when both
    sides have a 95% interval of the mean and the intervals overlap (the
    change is within the runs' own spread); otherwise improved or regressed by
    the metric's direction. A single run has no interval, so the threshold
    alone decides (`tested` False).
    """
    higher_is_better = COMPARED_METRICS[metric].higher_is_better
    tested = baseline.ci95 is not None and candidate.ci95 is not None
    base, cand = baseline.mean, candidate.mean
    change = (cand - base) / abs(base) * 100 if base != 0 else None
    if threshold_pct is None:
        return NOT_GATED, change, tested
    # 1e-9: a change of exactly the threshold stays unchanged despite float rounding
    past = cand != base if change is None else abs(change) - threshold_pct > 1e-9
    if not past:
        return UNCHANGED, change, tested
    if tested and intervals_overlap(baseline.ci95, candidate.ci95):  # type: ignore[arg-type]
        return NOISE, change, tested
    better = (cand > base) == higher_is_better
    return (IMPROVED if better else REGRESSED), change, tested


def scenario_stats(sr: ScenarioResult | None) -> dict[str, Stat]:
    """The comparable metrics of one scenario: the sample summaries with a
    direction, and a throughput level's whole-level figures (single values)."""
    if sr is None:
        return {}
    stats = {k: st for k, st in sr.summary.items() if k in COMPARED_METRICS}
    for key in AGGREGATE_METRICS:
        value = getattr(sr.aggregate, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            stats[key] = summarize([float(value)])  # type: ignore[assignment]
    return stats


def _workload(sr: ScenarioResult) -> tuple[Any, ...]:
    sc = sr.scenario
    return (sc.kind, sc.target_tokens_in, sc.target_tokens_out, sc.concurrency)


def compare_reports(baseline: Report, candidate: Report, thresholds_pct: Mapping[str, float]
                    ) -> Comparison:
    """Every model x scenario x metric present in either report, judged.

    Models and scenarios come in the baseline's order, then the candidate's
    new ones; what one side lacks is reported as missing, never raised.
    """
    base_models = {mr.spec.name: mr for mr in baseline.models}
    cand_models = {mr.spec.name: mr for mr in candidate.models}
    changes: list[MetricChange] = []
    notes: list[str] = []
    for model in dict.fromkeys([*base_models, *cand_models]):
        base_sc = {sr.scenario.name: sr for sr in getattr(base_models.get(model), "scenarios", ())}
        cand_sc = {sr.scenario.name: sr for sr in getattr(cand_models.get(model), "scenarios", ())}
        for scenario in dict.fromkeys([*base_sc, *cand_sc]):
            b_sr, c_sr = base_sc.get(scenario), cand_sc.get(scenario)
            if b_sr and c_sr and _workload(b_sr) != _workload(c_sr):
                notes.append(f"note: {model} {scenario}: the baseline measured "
                             f"{describe_scenario(b_sr.scenario)}, the candidate "
                             f"{describe_scenario(c_sr.scenario)}: not the same work")
            b_stats, c_stats = scenario_stats(b_sr), scenario_stats(c_sr)
            for metric in COMPARED_METRICS:
                b, c = b_stats.get(metric), c_stats.get(metric)
                if b is None and c is None:
                    continue
                threshold = thresholds_pct.get(metric)
                if b is None or c is None:
                    verdict = MISSING_IN_BASELINE if b is None else MISSING_IN_CANDIDATE
                    changes.append(MetricChange(model, scenario, metric, b, c, None, threshold,
                                                verdict, False))
                    continue
                verdict, change, tested = judge_change(metric, b, c, threshold)
                changes.append(MetricChange(model, scenario, metric, b, c, change, threshold,
                                            verdict, tested))
        capacity = capacity_change(model, base_models.get(model), cand_models.get(model),
                                   thresholds_pct.get(CAPACITY_METRIC.key))
        if capacity is not None:
            changes.append(capacity[0])
            notes.extend(capacity[1])
    if any(not c.tested and c.verdict in (REGRESSED, IMPROVED) for c in changes):
        notes.append("(untested) a single run on one side: no spread to tell noise from a "
                     "change, so the threshold alone decided (use --iterations 3 or more)")
    gpus = (baseline.environment.gpu, candidate.environment.gpu)
    if gpus[0] != gpus[1]:
        notes.append(f"note: the baseline ran on {gpus[0] or 'an unknown GPU'}, "
                     f"the candidate on {gpus[1] or 'an unknown GPU'}")
    notes.extend(hardware_changes(baseline, candidate))
    return Comparison(tuple(changes), dict(thresholds_pct), tuple(dict.fromkeys(notes)))


def capacity_change(model: str, base: ModelResult | None, cand: ModelResult | None,
                    threshold_pct: float | None) -> tuple[MetricChange, list[str]] | None:
    """A model's capacity under its SLO in both reports, judged, and notes
    on why it was not (None: neither side searched one).

    A capacity is known to one probe step (Capacity.step): a change within
    the larger step of the two, or within the threshold, is unchanged. It is
    not judged when the service levels differ, or when a side's search ran
    out of its time budget (its capacity is then a lower bound)."""
    b = base.capacity if base is not None else None
    c = cand.capacity if cand is not None else None
    if b is None and c is None:
        return None
    stat = lambda cap: summarize([float(cap.streams)]) if cap is not None else None  # noqa: E731
    if b is None or c is None:
        verdict = MISSING_IN_BASELINE if b is None else MISSING_IN_CANDIDATE
        return MetricChange(model, CAPACITY_ROW, CAPACITY_METRIC.key, stat(b), stat(c), None,
                            threshold_pct, verdict, False), []
    change = (c.streams - b.streams) / b.streams * 100 if b.streams else None
    notes: list[str] = []
    if b.slo != c.slo:
        notes.append(f"note: {model} capacity: the baseline searched under {b.slo}, the "
                     f"candidate under {c.slo}: not the same service levels, not judged")
    elif b.cut_short or c.cut_short:
        notes.append(f"note: {model} capacity: a search was cut short (its --capacity-budget, "
                     "or an interrupt), so its capacity is only a lower bound: not judged")
    if notes or threshold_pct is None:
        verdict = NOT_GATED
    elif abs(c.streams - b.streams) <= max(b.step, c.step, 1) or (
            change is not None and abs(change) - threshold_pct <= 1e-9):
        verdict = UNCHANGED
    else:
        verdict = IMPROVED if c.streams > b.streams else REGRESSED
    # tested: the probe step, not an interval, tells a change from the search's resolution
    return MetricChange(model, CAPACITY_ROW, CAPACITY_METRIC.key, stat(b), stat(c), change,
                        threshold_pct, verdict, True), notes


def hardware_changes(baseline: Report, candidate: Report) -> list[str]:
    """A note per model whose two runs had different machines under them
    (the engines' hardware profiles, recorded for models on named hosts)."""
    before = {mr.spec.name: mr.lifecycle.hardware for mr in baseline.models}
    return [f"note: {mr.spec.name}: the baseline ran on {before[mr.spec.name]}, the candidate "
            f"on {mr.lifecycle.hardware}: the change is the machine's as much as the model's"
            for mr in candidate.models
            if before.get(mr.spec.name) and mr.lifecycle.hardware
            and before[mr.spec.name] != mr.lifecycle.hardware]


# ============================================================================
# History of saved reports (pure)
# ============================================================================

# Runs on each side of a candidate step change: the level before and after it
# is the mean of up to this many runs' means (one run: its own interval).
HISTORY_WINDOW = 5


@dataclass(frozen=True)
class HistoryRun:
    """One saved report of a history: its file's name and its records."""

    label: str
    report: Report


@dataclass(frozen=True)
class StepChange:
    """The level of a series moved at `run` (the first run at the new level),
    past its threshold and beyond the runs' own noise."""

    run: int  # index into History.runs
    before: Stat  # the level over the window before
    after: Stat  # the level over the window from `run` on
    change_pct: float | None
    verdict: str  # REGRESSED | IMPROVED
    tested: bool
    differences: tuple[str, ...] = ()  # what its environment changed, e.g. "vLLM 0.11 -> 0.12"


@dataclass(frozen=True)
class Trend:
    """One model x scenario x metric over the runs (None where a run lacks it)."""

    model: str
    scenario: str
    metric: str
    points: tuple[Stat | None, ...]
    steps: tuple[StepChange, ...] = ()
    standing: StepChange | None = None  # a regression the newest level still shows


@dataclass(frozen=True)
class History:
    runs: tuple[HistoryRun, ...]
    trends: tuple[Trend, ...]
    thresholds_pct: Mapping[str, float]

    @property
    def standing(self) -> tuple[Trend, ...]:
        """The series whose newest level is worse than before their last step."""
        return tuple(t for t in self.trends if t.standing is not None)


def window_level(points: Sequence[Stat]) -> Stat:
    """The level of a window of runs: one run's own summary, or the summary
    of several runs' means (their interval is the run-to-run spread)."""
    if len(points) == 1:
        return points[0]
    return summarize([p.mean for p in points])  # type: ignore[return-value]


def _window(points: Sequence[Stat | None], start: int, stop: int) -> list[Stat]:
    return [p for p in points[max(0, start):max(0, stop)] if p is not None]


def _moved(level: Stat, point: Stat, change_pct: float | None, threshold_pct: float) -> bool:
    """The run's own mean is past the threshold from `level`, on the side the
    window moved to: a level that moved, not one noisy run pulling a mean."""
    if change_pct is None or level.mean == 0:
        return True
    own = (point.mean - level.mean) / abs(level.mean) * 100
    return own * change_pct > 0 and abs(own) > threshold_pct


def find_steps(metric: str, points: Sequence[Stat | None], threshold_pct: float | None,
               window: int = HISTORY_WINDOW) -> list[StepChange]:
    """Step changes in one series, oldest first.

    For every run k the level of the `window` runs before k is judged against
    the level of the `window` runs from k on, as compare judges two reports
    (direction, threshold, overlapping intervals are noise), and every run of
    the window after k must itself be past the threshold on the same side (a
    level that moved, not one outlier). Neighbouring runs that qualify in the
    same direction are one step, placed where the change is largest: the
    first run at the new level.
    """
    if threshold_pct is None:
        return []
    found: list[StepChange] = []
    for k in range(1, len(points)):
        before, after = _window(points, k - window, k), _window(points, k, k + window)
        if points[k] is None or not before or not after:
            continue
        b, a = window_level(before), window_level(after)
        verdict, change, tested = judge_change(metric, b, a, threshold_pct)
        if verdict in (REGRESSED, IMPROVED) and all(
                _moved(b, p, change, threshold_pct) for p in after):
            found.append(StepChange(k, b, a, change, verdict, tested))
    steps: list[StepChange] = []
    for step in found:
        last = steps[-1] if steps else None
        if last and last.verdict == step.verdict and step.run - last.run <= window:
            if abs(step.change_pct or 0) > abs(last.change_pct or 0):
                steps[-1] = step
            continue
        steps.append(step)
    return steps


def standing_regression(metric: str, points: Sequence[Stat | None], steps: Sequence[StepChange],
                        threshold_pct: float | None, window: int = HISTORY_WINDOW
                        ) -> StepChange | None:
    """The regression that stands: the newest level (the last `window` runs,
    none before the last step) is worse than the level before the last step,
    past its threshold, however many runs ago that step entered."""
    if not steps or threshold_pct is None:
        return None
    last = steps[-1]
    newest = _window(points, max(last.run, len(points) - window), len(points))
    if not newest:
        return None
    verdict, change, tested = judge_change(metric, last.before, window_level(newest), threshold_pct)
    if verdict != REGRESSED:
        return None
    return dataclasses.replace(steps[-1], after=window_level(newest), change_pct=change,
                               verdict=verdict, tested=tested)


def _model_facts(report: Report, model: str) -> dict[str, str]:
    """What a run's environment says about one model, for telling two runs apart."""
    mr = next((m for m in report.models if m.spec.name == model), None)
    life, server = (mr.lifecycle, mr.server) if mr else (Lifecycle(), None)
    digest = (life.repo_digests or (life.image_id,))[0] if life.repo_digests or life.image_id else None
    facts = {"image": life.image, "image digest": digest,
             "vLLM": server.version if server else None,
             "command": " ".join(life.command) if life.command else None,
             "GPU": report.environment.gpu, "host": report.environment.host,
             "hardware": report.config.hardware}
    return {k: v for k, v in facts.items() if v is not None}


def environment_differences(before: Report, after: Report, model: str) -> tuple[str, ...]:
    """'vLLM 0.11.0 -> 0.12.0', ... for every fact of the model that differs."""
    a, b = _model_facts(before, model), _model_facts(after, model)
    return tuple(f"{k} {a.get(k, '?')} -> {b.get(k, '?')}" for k in dict.fromkeys([*a, *b])
                 if a.get(k) != b.get(k))


def _previous_with(points: Sequence[Stat | None], k: int) -> int:
    return next((i for i in range(k - 1, -1, -1) if points[i] is not None), k - 1)


def build_history(runs: Sequence[HistoryRun], thresholds_pct: Mapping[str, float]) -> History:
    """Every model x scenario x metric any run has, as a series over the runs
    (in the order given: oldest first), with its step changes."""
    keys: dict[tuple[str, str], None] = {}
    per_run: list[dict[tuple[str, str], dict[str, Stat]]] = []
    slos = newest_slos(runs)
    for run in runs:
        table = {(mr.spec.name, sr.scenario.name): scenario_stats(sr)
                 for mr in run.report.models for sr in mr.scenarios}
        table.update(capacity_points(run.report, slos))
        keys.update(dict.fromkeys(table))
        per_run.append(table)
    trends = []
    for model, scenario in keys:
        for metric in COMPARED_METRICS:
            points = tuple(t.get((model, scenario), {}).get(metric) for t in per_run)
            if all(p is None for p in points):
                continue
            threshold = thresholds_pct.get(metric)
            steps = [dataclasses.replace(s, differences=environment_differences(
                        runs[_previous_with(points, s.run)].report, runs[s.run].report, model))
                     for s in find_steps(metric, points, threshold)]
            trends.append(Trend(model, scenario, metric, points, tuple(steps),
                                standing_regression(metric, points, steps, threshold)))
    return History(tuple(runs), tuple(trends), dict(thresholds_pct))


def newest_slos(runs: Sequence[HistoryRun]) -> dict[str, str]:
    """Each model's SLO of its newest capacity, however old that run is."""
    return {mr.spec.name: mr.capacity.slo for run in runs for mr in run.report.models
            if mr.capacity is not None}  # later runs overwrite earlier ones


def capacity_points(report: Report, slo: Mapping[str, str]
                    ) -> dict[tuple[str, str], dict[str, Stat]]:
    """A run's capacities as history points, (model, "capacity") -> its
    streams: only those searched under the SLO of the model's newest capacity
    (`slo`, from newest_slos: another SLO is another question), and not a
    search cut short (a lower bound, which would look like a step)."""
    return {(mr.spec.name, CAPACITY_ROW): {CAPACITY_METRIC.key: summarize([float(cap.streams)])}
            for mr in report.models if (cap := mr.capacity) is not None
            and cap.slo == slo.get(mr.spec.name) and not cap.cut_short}


def hardware_key(report: Report) -> str:
    """The hardware a report ran on: profile, bandwidth and GPU ('?' unknown)."""
    cfg = report.config
    return f"{cfg.hardware} ({cfg.bandwidth_gbs:g} GB/s), GPU {report.environment.gpu or '?'}"


def hardware_groups(runs: Sequence[HistoryRun]) -> dict[str, list[HistoryRun]]:
    """The runs by hardware, in first-seen order (within a group, oldest first)."""
    groups: dict[str, list[HistoryRun]] = {}
    for run in runs:
        groups.setdefault(hardware_key(run.report), []).append(run)
    return groups


# ============================================================================
# Rendering (pure: returns text)
# ============================================================================


TROPHY = "🏆"

# Text from a server or a file (a model id, an error message, a log line, a
# saved report) can hold control characters: it is shown escaped, so that it
# cannot drive a terminal (ESC sequences, OSC titles, a bare CR) or reorder
# the text (bidi overrides). Only the JSON report keeps it exact.
_UNSAFE = ({c: f"\\x{c:02x}" for c in (*range(32), 127, *range(0x80, 0xA0))}
           | {10: "\\n", 13: "\\r", 9: "\\t"}
           | {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_UNSAFE_IN_TEXT = {c: v for c, v in _UNSAFE.items() if c != 10}  # a text keeps its lines


def shown(text: Any) -> str:
    """One line of text, every control character escaped."""
    return str(text).translate(_UNSAFE)


def shown_text(text: str) -> str:
    """A text of lines, every control character but the newline escaped."""
    return text.translate(_UNSAFE_IN_TEXT)


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def fmt_bytes(n: float) -> str:
    """Decimal units, as registries and `docker images` count: '240.0 MB', '12.4 GB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_took(seconds: float) -> str:
    """How long a step took: '57.4 s' under a minute, '6 m 12 s' under an
    hour, else '1 h 05 m' (fmt_duration rounds for an estimate instead)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} m {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} m"


def format_pull_progress(p: PullProgress) -> str:
    """One progress line of a pull: layers, MB done of known total, rate."""
    rate = f", {fmt_bytes(p.bytes_done / p.elapsed_s)}/s" if p.elapsed_s > 0 and p.bytes_done else ""
    total = f" of {fmt_bytes(p.bytes_total)}" if p.bytes_total else ""
    return (f"pulling {p.image}: {p.layers_done}/{p.layers} layers, {fmt_bytes(p.bytes_done)}"
            f"{total}{rate}, {p.elapsed_s:.0f} s")


def fmt_pct(x: float | None) -> str:
    """A 0-1 fraction as a percentage."""
    return "-" if x is None else f"{x:.0%}"


def fmt_stat(st: Stat | None, digits: int = 0) -> str:
    """'190 ± 26' (mean ± sample stddev); '190' for a single value."""
    if st is None:
        return "-"
    if st.stddev is None:
        return fmt_num(st.mean, digits)
    return f"{fmt_num(st.mean, digits)} ± {fmt_num(st.stddev, digits)}"


def format_ranking(r: Ranking) -> str:
    m = METRICS[r.metric]
    name = f"{m.label} ({m.unit})" if m.unit else m.label
    if r.tie:
        return f"{name}: tie between {r.best} and {r.runner_up} (95% intervals overlap)"
    how = "faster" if not m.higher_is_better else "the " + m.label.lower()
    rel = ""
    if r.ratio is not None:
        err = f" ± {r.ratio_err:.2f}" if r.ratio_err is not None else ""
        rel = f": {r.ratio:.2f}{err}x {how} {'of' if m.higher_is_better else 'than'} {r.runner_up}"
    note = "" if r.tested else " (single run: untested)"
    return f"{name}: {TROPHY} {r.best}{rel}{note}"


@dataclass(frozen=True)
class TextTable:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()


def _cell(mr: ModelResult, metric: str, winners: ScenarioWinners) -> str:
    st = scenario_stat(mr, winners.scenario, metric)
    text = fmt_stat(st, METRICS[metric].digits)
    return f"{text} {TROPHY}" if winners.winner(metric) == mr.spec.name else text


def format_unranked(u: Unranked) -> str:
    """Why a metric has no winner, instead of leaving it out."""
    m = METRICS[u.metric]
    return (f"{m.label} ({m.unit}): not ranked: a value for {', '.join(u.have) or 'no model'} "
            f"only, of {', '.join(u.ran)} (see the notes above)")


def _answers_late(ttft: Stat | None, ttfo: Stat | None) -> bool:
    """A thinking model: its first answer token comes after its first token."""
    return bool(ttft and ttfo and ttfo.mean > ttft.mean * 1.001)


def retry_notes(model: str, sr: ScenarioResult) -> list[str]:
    """A note when requests were sent again (a 429/503 refusal, no
    connection): the table's figures count from the last try only."""
    retried = [s for s in sr.samples if s.retries]
    if not retried:
        return []
    return [f"(r) {model}: {len(retried)} retried of {len(sr.samples)} requests "
            f"({sum(s.retries for s in retried)} retries after a 429/503 or no connection); "
            "each one's figures count from its last try"]


@dataclass(frozen=True)
class _Columns:
    """Which columns a scenario's table has: by its kind, a TTFO column when
    a thinking model answers after its first token, a goodput column under --slo."""

    kind: str
    thinking: bool
    goodput: bool

    def headers(self) -> tuple[str, ...]:
        if self.kind == "throughput":
            return ("Model", "Streams", "Output (tok/s)", "Req/s",
                    *(("Goodput (req/s)",) if self.goodput else ()), "Decode/stream (tok/s)",
                    "TTFT p50 (ms)", "p90", "p99", "Server queue (ms)", "Peak KV", "Errors")
        if self.kind == "context":
            return ("Model", "Tokens in", "TTFT (ms)", "Server TTFT (ms)", "Prefill (tok/s)",
                    "Decode (tok/s)", "Tokens out", "Total (s)", "Failed")
        return ("Model", "TTFT (ms)", "Server TTFT (ms)",
                *(("TTFO (ms)",) if self.thinking else ()), "Decode (tok/s)", "ITL p50/p99 (ms)",
                "Tokens in", "Tokens out", "Total (s)", "Roofline", "Failed")


@dataclass(frozen=True)
class _RowCells:
    """The cells every kind of row shares, with their marks already on."""

    label: str
    decode: str
    tokens_out: str
    in_mark: str
    failed: str
    server: ServerDelta


def _throughput_row(mr: ModelResult, sr: ScenarioResult, cells: _RowCells, columns: _Columns,
                    notes: list[str]) -> tuple[str, ...]:
    agg = sr.aggregate or Aggregate()
    ttft = sr.summary.get("ttft_ms")
    late = _late_note(mr.spec.name, sr)
    if late:
        notes.append(late)
    streams = (f"open, {sr.scenario.request_rate:g}/s" if sr.scenario.request_rate
               else str(sr.scenario.concurrency))
    return (cells.label, streams, fmt_num(agg.output_tps, 1), fmt_num(agg.requests_per_s, 2),
            *((fmt_num(agg.goodput_rps, 2),) if columns.goodput else ()), cells.decode,
            fmt_num(ttft.median if ttft else None) + (" (late)" if late else ""),
            fmt_num(ttft.p90 if ttft else None), fmt_num(ttft.p99 if ttft else None),
            fmt_num(cells.server.queue_mean_ms), fmt_pct(agg.peak_kv_cache_usage_perc),
            str(agg.errors or 0))


def _context_row(mr: ModelResult, sr: ScenarioResult, cells: _RowCells,
                 winners: ScenarioWinners, notes: list[str]) -> tuple[str, ...]:
    tokens_in = fmt_stat(sr.summary.get("tokens_in")) + cells.in_mark
    if sr.scenario.clamped:
        tokens_in += " (c)"
        notes.append(f"(c) {mr.spec.name}: {sr.scenario.requested_tokens_in} tokens do not "
                     f"fit its {mr.spec.max_context_tokens}-token context; clamped to "
                     f"{sr.scenario.target_tokens_in}")
    return (cells.label, tokens_in, _cell(mr, "ttft_ms", winners),
            fmt_num(cells.server.ttft_mean_ms), _cell(mr, "prefill_tps", winners), cells.decode,
            cells.tokens_out, _cell(mr, "total_s", winners), cells.failed)


def _latency_row(mr: ModelResult, sr: ScenarioResult, cells: _RowCells, winners: ScenarioWinners,
                 columns: _Columns, bandwidth_gbs: float) -> tuple[str, ...]:
    ceiling = roofline_tps(mr.spec, bandwidth_gbs)
    tps = sr.summary.get("tps")
    roof = f"{tps.mean / ceiling:.0%} of {ceiling:,.1f}" if ceiling and tps else "-"
    itl = sr.summary.get("itl_ms")
    return (cells.label, _cell(mr, "ttft_ms", winners), fmt_num(cells.server.ttft_mean_ms),
            *((_cell(mr, "ttfo_ms", winners),) if columns.thinking else ()), cells.decode,
            f"{fmt_num(itl.median, 1)} / {fmt_num(itl.p99, 1)}" if itl else "-",
            fmt_stat(sr.summary.get("tokens_in")), cells.tokens_out,
            _cell(mr, "total_s", winners), roof, cells.failed)


def scenario_row(mr: ModelResult, sr: ScenarioResult, winners: ScenarioWinners,
                 columns: _Columns, bandwidth_gbs: float) -> tuple[tuple[str, ...], list[str]]:
    """A model's row of one scenario, and the notes that its marks refer to."""
    notes: list[str] = []
    if not mr.ranked and mr.answer_check is not None:
        notes.append(f"(w) {mr.spec.name}: {describe_answer_check(mr.answer_check)}")
    bursty = sum(s.bursty for s in sr.samples)
    if bursty:
        notes.append(f"(b) {mr.spec.name}: in {bursty} of {len(sr.samples)} requests the tokens "
                     "arrived in bursts (over 4 per network read): decode and ITL show how "
                     "the server flushed its output, not how fast it decoded")
    tokens_out = fmt_stat(sr.summary.get("tokens_out"))
    if any(s.ok and s.tokens_out_exact is False for s in sr.samples):
        tokens_out += " (!)"
        notes.append(output_note(mr, sr))
    in_mark, out_mark, marks = measured_as_asked(mr, sr)
    notes.extend(marks)
    cells = _RowCells(label=mr.spec.name if mr.ranked else f"{mr.spec.name} (w)",
                      decode=_cell(mr, "tps", winners) + (" (b)" if bursty else ""),
                      tokens_out=tokens_out + out_mark, in_mark=in_mark,
                      failed=str(sr.failed) if sr.failed else "",
                      server=sr.server or ServerDelta())
    if columns.kind == "throughput":
        row = _throughput_row(mr, sr, cells, columns, notes)
    elif columns.kind == "context":
        row = _context_row(mr, sr, cells, winners, notes)
    else:
        row = _latency_row(mr, sr, cells, winners, columns, bandwidth_gbs)
    if sr.gpu:  # NVML: mark a throttled GPU on the model's row, the figures below
        if sr.gpu.throttled:
            row = (f"{row[0]} (t)", *row[1:])
        notes.append(format_gpu_note(mr.spec.name, sr.gpu))
    if cells.server.prefix_cache_hits and columns.kind != "throughput":
        notes.append(f"warning: {mr.spec.name}: the server reports "
                     f"{cells.server.prefix_cache_hits} prefix-cache hit tokens during this "
                     "cold scenario")
    notes.extend(retry_notes(mr.spec.name, sr))
    return row, notes


def scenario_table(models: Sequence[ModelResult], winners: ScenarioWinners,
                   bandwidth_gbs: float) -> TextTable:
    """One scenario as a table: a row per model, a trophy per ranked metric."""
    name = winners.scenario
    results = {mr.spec.name: sr for mr in models for sr in mr.scenarios if sr.scenario.name == name}
    columns = _Columns(
        kind=winners.kind,
        thinking=any(_answers_late(scenario_stat(mr, name, "ttft_ms"),
                                   scenario_stat(mr, name, "ttfo_ms")) for mr in models),
        goodput=any(sr.aggregate is not None and sr.aggregate.good_requests is not None
                    for sr in results.values()))
    headers = columns.headers()
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for mr in models:
        sr = results.get(mr.spec.name)
        if sr is not None:
            row, row_notes = scenario_row(mr, sr, winners, columns, bandwidth_gbs)
            rows.append(row)
            notes.extend(row_notes)
        elif mr.status in ("failed", "interrupted"):
            rows.append((mr.spec.name, f"{mr.status.upper()}: {mr.error or ''}"[:70],
                         *[""] * (len(headers) - 2)))
    notes.extend(format_ranking(r) for r in winners.rankings)
    notes.extend(format_unranked(u) for u in winners.unranked)
    sc = next(sr.scenario for sr in results.values()) if results else None
    title = scenario_title(sc, list(results.values())) if sc else name
    return TextTable(title, headers, tuple(rows), tuple(dict.fromkeys(notes)))


def _late_note(model: str, sr: ScenarioResult) -> str | None:
    """An open-loop level the client could not keep: its TTFT holds the
    client's own delay in sending, which is not the server's latency."""
    agg = sr.aggregate or Aggregate()
    if not agg.client_late:
        return None
    return (f"(late) {model}: the client sent {agg.late_sends} of {len(sr.samples)} requests "
            f"more than {LATE_SEND_MS:g} ms after their scheduled arrival (worst "
            f"{fmt_num(agg.send_lag_max_ms)} ms): it could not keep "
            f"{sr.scenario.request_rate:g} req/s, so this TTFT holds the client's delay too")


def capacity_line(name: str, cap: Capacity) -> str:
    """'m: capacity 12 streams (goodput 3.1 req/s, output 610 tok/s); 16 streams broke ...'."""
    if cap.streams == 0:
        return f"{name}: capacity 0 streams: even 1 stream is too many; {cap.detail}"
    more = "at least " if cap.lower_bound else ""
    return (f"{name}: capacity {more}{cap.streams} streams (goodput {fmt_num(cap.goodput_rps, 2)} "
            f"req/s, output {fmt_num(cap.output_tps)} tok/s); {cap.detail}")


def format_capacity_ranking(r: CapacityRanking) -> str:
    if r.bounded:
        return (f"Capacity: {r.best} and {r.runner_up} both held at --max-concurrency "
                f"{r.best_streams}: raise it to tell them apart")
    if r.close:
        return (f"Capacity: {r.best} ({r.best_streams} streams) and {r.runner_up} "
                f"({r.runner_up_streams}) are within one probe step of each other: no clear winner")
    ratio = f": {r.best_streams / r.runner_up_streams:.2f}x" if r.runner_up_streams else ""
    return (f"Capacity: {TROPHY} {r.best} {r.best_streams} streams{ratio} the streams of "
            f"{r.runner_up} ({r.runner_up_streams})")


def capacity_table(models: Sequence[ModelResult]) -> TextTable | None:
    """Capacity under the SLOs: a row per model that was searched, the answer
    as a sentence per model, probes with too few requests, the ranking."""
    searched = [mr for mr in models if mr.capacity is not None]
    if not searched:
        return None
    rows, notes = [], []
    for mr in searched:
        cap = mr.capacity
        assert cap is not None
        rows.append((mr.spec.name, str(cap.streams), fmt_num(cap.goodput_rps, 2),
                     fmt_num(cap.output_tps, 1), "-" if cap.broke_at is None else str(cap.broke_at),
                     cap.limited_by, " ".join(str(p.concurrency) for p in cap.probes)))
        notes.append(capacity_line(mr.spec.name, cap))
        few = sorted({k for p in cap.probes for k in p.too_few})
        if few:
            small = min(p.requests for p in cap.probes if p.too_few)
            notes.append(f"(few) {mr.spec.name}: some probes had too few requests for "
                         f"{', '.join(few)} (as few as {small}): there the percentile is close "
                         "to the worst request (raise --throughput-requests)")
    if (r := rank_capacity(models)) is not None:
        notes.append(format_capacity_ranking(r))
    return TextTable(f"Capacity under {searched[0].capacity.slo}",  # type: ignore[union-attr]
                     ("Model", "Capacity (streams)", "Goodput (req/s)", "Output (tok/s)",
                      "Broke at", "Limited by", "Probes"), tuple(rows), tuple(notes))


def format_gpu_note(model: str, gpu: PowerSummary) -> str:
    """'GPU a: 142 W mean, 0.45 J/token, SM 1,980-2,100 MHz, peak 71 C', with
    '(t) ... throttled (power cap)' when the GPU slowed during the scenario."""
    parts = [f"{gpu.mean_w:.0f} W mean"]
    if gpu.j_per_token is not None:
        parts.append(f"{gpu.j_per_token:.3g} J/token")
    if gpu.sm_clock_min_mhz is not None and gpu.sm_clock_max_mhz is not None:
        lo, hi = gpu.sm_clock_min_mhz, gpu.sm_clock_max_mhz
        parts.append(f"SM {lo:,.0f} MHz" if lo == hi else f"SM {lo:,.0f}-{hi:,.0f} MHz")
    if gpu.peak_temp_c is not None:
        parts.append(f"peak {gpu.peak_temp_c:.0f} C")
    text = f"GPU {model}: {', '.join(parts)}"
    if gpu.throttled:
        text = (f"(t) {text}; the GPU throttled ({', '.join(gpu.throttle_reasons or ())}): "
                "this model's figures are not at the clocks of the others")
    return text


def received_text(samples: Iterable[Sample]) -> str:
    """The output lengths that came back: "300", or "3-14" when they differ."""
    got = sorted({s.tokens_out for s in samples if s.ok and s.tokens_out is not None})
    return "none" if not got else str(got[0]) if len(got) == 1 else f"{got[0]}-{got[-1]}"


def scenario_title(sc: Scenario, results: Sequence[ScenarioResult]) -> str:
    """describe_scenario, with "500 asked, 300 received" where answers came
    out shorter than asked."""
    title = describe_scenario(sc)
    if any(sr.output_forced is False for sr in results):
        got = received_text(s for sr in results for s in sr.samples)
        title = title.replace(f", {sc.target_tokens_out} out",
                              f", {sc.target_tokens_out} asked, {got} received", 1)
    return title


def output_note(mr: ModelResult, sr: ScenarioResult) -> str:
    """The (!) note of a scenario whose output lengths were not as asked."""
    asked = sr.scenario.target_tokens_out
    if sr.output_forced is not False:
        return f"(!) {mr.spec.name}: some samples did not produce exactly {asked} output tokens"
    server = mr.server or ServerInfo()
    ignored = [k for k in server.knobs_ignored or () if k in ("min_tokens", "ignore_eos")]
    refused = [k for k in server.knobs_refused or () if k in ("min_tokens", "ignore_eos")]
    why = "; ".join(filter(None, (f"it ignored {', '.join(ignored)}" if ignored else "",
                                  f"it refused {', '.join(refused)}" if refused else "")))
    return (f"(!) {mr.spec.name}: {asked} asked, {received_text(sr.samples)} received: the output "
            f"length could not be forced ({why or 'the server stopped early'}); answers under "
            f"{min(asked, MIN_DECODE_TOKENS)} tokens have no decode rate")


def measured_as_asked(mr: ModelResult, sr: ScenarioResult) -> tuple[str, str, list[str]]:
    """Marks for inputs that are only near their target (~) and token counts
    that the server did not report (n): (tokens-in mark, tokens-out mark, notes)."""
    notes: list[str] = []
    in_mark = out_mark = ""
    if sr.tokens_in_exact is False:
        in_mark = " (~)"
        notes.append(f"(~) {mr.spec.name}: the server has no chat tokenizer endpoint: inputs were "
                     f"sized from usage.prompt_tokens of one-token requests, near "
                     f"{sr.scenario.target_tokens_in} tokens, not exactly on it")
    if any(s.ok and s.tokens_counted for s in sr.samples):
        out_mark = " (n)"
        notes.append(f"(n) {mr.spec.name}: the server sent no usage: tokens were counted with its "
                     "tokenizer over the prompt and the received text, not reported by it")
    return in_mark, out_mark, notes


def render_table(table: TextTable, styled: bool) -> str:
    """A table as text with rich: box drawing and colour on a terminal, plain
    ASCII otherwise (so `| tee` and the report file hold clean text)."""
    import io  # noqa: PLC0415

    from rich import box  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415 (plain text: no markup from a model id)

    t = Table(title=Text(shown_text(table.title)), box=box.ROUNDED if styled else box.ASCII,
              title_justify="left", header_style="bold" if styled else "")
    for i, h in enumerate(table.headers):
        t.add_column(Text(shown_text(h)), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table.rows:
        t.add_row(*(Text(shown_text(cell)) for cell in row))
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=styled, no_color=not styled,
                      color_system="standard" if styled else None, highlight=False, emoji=False)
    console.print(t)
    for note in table.notes:
        console.print(Text(shown_text(note)))
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def run_header(report: Report) -> tuple[str, str, str | None]:
    """The run in words, for every output's header: what ran, the hardware
    (with its bandwidth), the GPU (None where unknown)."""
    cfg = report.config
    return (f"{TOOL_NAME} {__version__}: {len(report.models)} model(s), "
            f"{cfg.iterations} iteration(s), started {report.started_at}",
            f"{cfg.hardware} ({cfg.bandwidth_gbs:g} GB/s)", report.environment.gpu)


def format_results(report: Report, styled: bool = False,
                   winners: Sequence[ScenarioWinners] | None = None) -> str:
    """The complete results output: header, one table per scenario, summary.
    `winners`: the Winners stage's result (rank_scenarios) when it is at hand."""
    cfg = report.config
    winners = rank_scenarios(report.models) if winners is None else winners
    what, hardware, gpu = run_header(report)
    lines = [what, f"hardware: {hardware}, host {report.environment.host or '?'}"]
    if gpu:
        lines.append(f"gpu: {gpu}")
    if note := hardware_note(report.models):
        lines.append(note)
    parts = [shown_text("\n".join(lines)), ""]
    flags = flagged_models(report)
    for sw in winners:
        table = scenario_table(report.models, sw, cfg.bandwidth_gbs)
        parts.append(render_table(mark_flagged(table, flags), styled))
    for extra in (decode_detail_table(report.models), prefill_curve_table(report.models),
                  capacity_table(report.models)):
        if extra is not None:
            parts.append(render_table(extra, styled))
    parts.append(shown_text(format_summary(report)))
    return "\n".join(parts)


def decode_detail_table(models: Sequence[ModelResult]) -> TextTable | None:
    """TPOT, inter-token latency percentiles and end-to-end rate: a row per
    model and scenario."""
    rows = []
    for mr in models:
        for sr in mr.scenarios:
            itl, tpot, e2e = (sr.summary.get(k) for k in ("itl_ms", "tpot_ms", "e2e_tps"))
            if itl is None and tpot is None:
                continue
            rows.append((mr.spec.name, sr.scenario.name, fmt_stat(tpot, 2),
                         *(fmt_num(getattr(itl, q), 2) if itl else "-" for q in ("median", "p90", "p99")),
                         fmt_stat(e2e, 1)))
    if not rows:
        return None
    return TextTable("Decode detail", ("Model", "Scenario", "TPOT (ms)", "ITL p50 (ms)", "p90", "p99",
                                       "E2E (tok/s)"), tuple(rows))


def prefill_curve_table(models: Sequence[ModelResult]) -> TextTable | None:
    """TTFT and prefill rate against context size: a row per model."""
    sizes = [(name, sc) for mr in models for sr in mr.scenarios
             if (sc := sr.scenario).kind == "context" and (name := sc.name)]
    names = list(dict.fromkeys(name for name, _ in sizes))
    if not names:
        return None
    rows = []
    for mr in models:
        cells = []
        for name in names:
            ttft = scenario_stat(mr, name, "ttft_ms")
            rate = scenario_stat(mr, name, "prefill_tps")
            cells.append(f"{fmt_num(ttft.mean)} ms, {fmt_num(rate.mean)} tok/s"
                         if ttft and rate else "-")
        if any(c != "-" for c in cells):
            rows.append((mr.spec.name, *cells))
    return TextTable("Prefill curve: mean TTFT, prefill rate",
                     ("Model", *names), tuple(rows))


def hardware_note(models: Sequence[ModelResult]) -> str | None:
    """Said above the tables when the measured models ran on different
    machines (their engines' profiles differ): a winner is then as much the
    machine's as the model's."""
    seen = {mr.spec.name: mr.lifecycle.hardware for mr in models
            if mr.scenarios and mr.lifecycle.hardware}
    if len(set(seen.values())) < 2:
        return None
    where = "; ".join(f"{name} on {hw}" for name, hw in seen.items())
    return (f"note: these models ran on different hardware ({where}): the tables compare "
            "machines as much as models")


def format_model_environment(mr: ModelResult, bandwidth_gbs: float) -> list[str]:
    """Where the numbers came from: host, server version, image, command, power."""
    facts = []
    server, life = mr.server or ServerInfo(), mr.lifecycle
    if life.docker_host:
        facts.append(f"on {life.docker_host}" + (f" ({life.hardware})" if life.hardware else ""))
    engine = ENGINE_LABELS.get(server.engine or "vllm", server.engine)
    if server.version or server.engine:
        facts.append(f"{engine} {server.version or ''}".rstrip())
    if life.image:
        digest = (life.repo_digests or [life.image_id or ""])[0]
        facts.append(f"image {life.image}" + (f" ({digest})" if digest else ""))
    if server.chat_template_kwargs:
        facts.append(f"chat_template_kwargs {json.dumps(dict(server.chat_template_kwargs))}")
    ceiling = roofline_tps(mr.spec, bandwidth_gbs)
    tps = scenario_stat(mr, "latency", "tps")
    if ceiling:
        achieved = f", achieved {tps.mean / ceiling:.0%}" if tps else ""
        facts.append(f"decode roofline {ceiling:,.1f} tok/s{achieved}")
    power = life.power
    if power:
        per_j = power.tokens_per_j
        facts.append(f"GPU {power.mean_w:.0f} W mean, {power.energy_j / 1000:.1f} kJ"
                     + (f", {per_j:.2f} tokens/J" if per_j else ""))
    lines = [f"      {'; '.join(facts)}"] if facts else []
    if (load := format_load_facts(life.vllm_load)):
        lines.append(f"      {load}")
    lines.extend(f"      {line}" for line in format_knobs(server))
    if life.command:
        lines.append(f"      command: {' '.join(map(str, life.command))}")
    return lines


def format_answer_check(check: AnswerCheck) -> str:
    """The check as the summary shows it, with one wrong answer when there is one."""
    text = describe_answer_check(check)
    if check.example is not None:
        ex = check.example
        text += f" (asked {one_line(ex.prompt)!r}, expected {ex.expected}, got {ex.answer!r})"
    return text


def _status_line(mr: ModelResult) -> str:
    """'name: ok, loaded in 95.0 s' or 'name: failed: why'."""
    line = f"{mr.spec.name}: {mr.status}"
    steps = [step for step in (format_pull(mr.lifecycle.pull), format_load(mr.lifecycle.load_s))
             if step]
    if steps:
        line += ", " + "; ".join(steps)
    return line + (f": {mr.error}" if mr.error else "")


def fmt_duration(seconds: float) -> str:
    """35 s, 41 m, 1 h 5 m: a time left or elapsed, at a glance."""
    if seconds < 59.5:
        return f"{max(0.0, seconds):.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} m"
    return f"{minutes // 60} h {minutes % 60} m" if minutes % 60 else f"{minutes // 60} h"


def format_estimate(est: Estimate) -> str:
    """"about 1 h 5 m left", or what is not known yet, said as such."""
    if not est.unknown:
        return f"about {fmt_duration(est.known_s)} left"
    by_model: dict[str, list[str]] = {}
    for model, what in est.unknown:
        by_model.setdefault(model, []).append(what)
    named = [f"{m} {' and '.join(w)}" if set(w) <= {"load", "stop"} else m
             for m, w in by_model.items()]
    unknown = ", ".join(named)
    if est.known_s <= 0:
        return f"time left unknown (nothing measured yet for {unknown})"
    return f"at least {fmt_duration(est.known_s)} left (unknown yet: {unknown})"


def format_progress(steps: Sequence[CampaignStep], pos: CampaignPosition, elapsed_s: float,
                    est: Estimate) -> str:
    """model 2/3, scenario 4/6, elapsed 41 m, about 1 h 5 m left"""
    step = steps[pos.model]
    where = {"load": "loading", "stop": "stopping"}.get(pos.phase)
    if where is None:
        total = len(step.kept) + len(step.to_run)
        where = ("warm-up" if pos.scenario < 0
                 else f"scenario {len(step.kept) + pos.scenario + 1}/{total}")
    return (f"model {pos.model + 1}/{len(steps)}, {where}, elapsed {fmt_duration(elapsed_s)}, "
            f"{format_estimate(est)}")


def format_live_request(tokens: int, rate_tps: float | None) -> str:
    """The request in flight: tokens so far (counted events, never parsed) and their rate."""
    return f"{tokens} tokens" + (f", {rate_tps:.1f} tok/s" if rate_tps else "")


def format_plan(steps: Sequence[CampaignStep], cfg: RunConfig, *, managed: bool,
                resumed_from: str | None = None) -> str:
    """What a run will do, before it starts: models and services, scenarios
    with their sizes, iterations, requests; a resume says what it keeps."""
    to_run = [s for step in steps for s in step.to_run]
    requests = sum(s.requests for s in to_run)
    starting = sum(not step.keep_whole for step in steps)
    head = (f"plan: {len(steps)} model(s), {cfg.iterations} iteration(s), {len(to_run)} "
            f"scenario(s) and {requests} request(s) to measure"
            + (f" (+ a warm-up per model, {starting} service start(s))" if managed
               else " (+ a warm-up per model)"))
    lines = [head + (f"; resuming {resumed_from}" if resumed_from else "")]
    for step in steps:
        service = f" (service {step.spec.service})" if managed and step.spec.service else ""
        if step.keep_whole:
            prev = step.previous.status if step.previous else "ok"
            lines.append(f"  {step.spec.name}{service}: kept as measured ({prev}, "
                         f"{len(step.kept)} scenario(s)): not started")
            continue
        lines.append(f"  {step.spec.name}{service}:")
        lines.extend(f"    {sr.scenario.name}: kept as measured" for sr in step.kept)
        lines.extend(f"    {describe_scenario(s)}" for s in step.to_run)
    return shown_text("\n".join(lines)) + "\n"  # model names from a server


PART_FACTS = ("host", "gpu")  # of a part's environment; vLLM and image are per model


def part_differences(report: Report) -> dict[int, list[str]]:
    """Parts (index from 1) whose environment differs from the first part's:
    host, GPU, or a model's vLLM version or image (compared with the same
    model's in the first part, else with every version the first part saw)."""
    if len(report.parts) < 2:
        return {}
    first = report.parts[0]
    out: dict[int, list[str]] = {}
    for i, part in enumerate(report.parts[1:], start=2):
        was, now = first.environment, part.environment
        diffs = [f"{k} {getattr(was, k)} -> {getattr(now, k)}"
                 for k in PART_FACTS if getattr(was, k) != getattr(now, k)]
        for key, label in (("vllm", "vLLM"), ("image", "image")):
            seen = {getattr(pm, key) for pm in first.models.values()} - {None}
            for name, pm in part.models.items():
                value = getattr(pm, key)
                was = getattr(first.models[name], key) if name in first.models else None
                if value is not None and (value != was if was is not None
                                          else (seen and value not in seen)):
                    diffs.append(f"{name} {label} {was or '/'.join(sorted(seen))} -> {value}")
        if diffs:
            out[i] = diffs
    return out


def flagged_models(report: Report) -> dict[str, str]:
    """model -> why its results are flagged: some of its scenarios were
    measured in a part whose environment differs from the first part's."""
    differing = part_differences(report)
    flags: dict[str, str] = {}
    for i, diffs in differing.items():
        for name, pm in report.parts[i - 1].models.items():
            if pm.scenarios and name not in flags:
                flags[name] = (f"{', '.join(pm.scenarios)} measured in part {i} of the run, whose "
                               f"environment differs from part 1's: {'; '.join(diffs)}")
    return flags


def mark_flagged(table: TextTable, flags: Mapping[str, str]) -> TextTable:
    """Mark the rows of flagged models with (p) and say why under the table."""
    if not flags:
        return table
    names = {row[0] for row in table.rows} & set(flags)
    if not names:
        return table
    rows = tuple((f"{row[0]} (p)", *row[1:]) if row[0] in names else row for row in table.rows)
    notes = tuple(f"(p) {name}: {flags[name]}" for name in sorted(names))
    return dataclasses.replace(table, rows=rows, notes=(*table.notes, *notes))


def format_run_parts(report: Report) -> list[str]:
    """The summary's account of the run's parts and of each model's wall
    time (load, measure, stop), over all parts."""
    lines = []
    differing = part_differences(report)
    if len(report.parts) > 1:
        lines.append(f"  run in {len(report.parts)} parts:")
        for i, part in enumerate(report.parts, start=1):
            end = part.finished_at or "killed (no end recorded)"
            how = f", interrupted by {part.interrupted}" if part.interrupted else ""
            measured = [n for n, pm in part.models.items() if pm.scenarios]
            flag = f"; ENVIRONMENT DIFFERS: {'; '.join(differing[i])}" if i in differing else ""
            lines.append(f"    {i}. {part.started_at} to {end}{how}: measured "
                         f"{', '.join(measured) or 'nothing'}{flag}")
    walls = []
    for mr in report.models:
        got = [pm for part in report.parts if (pm := part.models.get(mr.spec.name))]
        phases = [(label, sum(v for pm in got if (v := getattr(pm, key)) is not None))
                  for key, label in (("load_s", "load"), ("measure_s", "measure"), ("stop_s", "stop"))
                  if any(getattr(pm, key) is not None for pm in got)]
        if phases:
            total = sum(v for _, v in phases)
            walls.append(f"    {mr.spec.name}: {total:.1f} s ("
                         + ", ".join(f"{label} {v:.1f} s" for label, v in phases) + ")")
    if walls:
        lines.append("  wall time per model:")
        lines.extend(walls)
    return lines


def format_pull(pull: PullRecord | None) -> str:
    """'pulled 12.4 GB in 6 m 12 s'; nothing when the image was already there."""
    if pull is None or pull.skipped or pull.pull_s is None:
        return ""
    return f"pulled {fmt_bytes(pull.bytes or 0)} in {fmt_took(pull.pull_s)}"


def format_load(load_s: float | None) -> str:
    return "" if load_s is None else f"loaded in {fmt_took(load_s)}"


def format_load_facts(facts: LoadFacts | None) -> str:
    """vLLM's own account of its load: 'KV cache 784,512 tokens (GPU, 71.84
    GiB), 23.94x concurrency at 32,768 tokens; model 29.97 GiB loaded in ...'.
    Facts the log did not give are left out."""
    if facts is None:
        return ""
    parts = []
    if facts.kv_cache_tokens is not None:
        where = ", ".join(x for x in (facts.kv_cache_device, facts.kv_cache_memory_gib is not None
                                      and f"{facts.kv_cache_memory_gib} GiB") if x)
        kv = f"KV cache {facts.kv_cache_tokens:,} tokens" + (f" ({where})" if where else "")
        if facts.max_concurrency is not None:
            kv += (f", {facts.max_concurrency:.2f}x concurrency at "
                   f"{facts.max_concurrency_tokens or 0:,} tokens")
        parts.append(kv)
    if facts.model_load_s is not None:
        gib = f"{facts.model_memory_gib} GiB " if facts.model_memory_gib is not None else ""
        parts.append(f"model {gib}loaded in {_fmt_logged_s(facts.model_load_s)}")
    for key, label in (("weights_download_s", "weights download"), ("weights_load_s", "weights"),
                       ("torch_compile_s", "torch.compile"), ("cuda_graph_s", "CUDA graphs"),
                       ("engine_init_s", "engine init")):
        if (value := getattr(facts, key)) is not None:
            parts.append(f"{label} {_fmt_logged_s(value)}")
    return "vLLM load: " + "; ".join(parts) if parts else ""


def _fmt_logged_s(seconds: float) -> str:
    """A duration vLLM logged: its own precision under a minute ('0.01 s')."""
    return f"{seconds:g} s" if seconds < 60 else fmt_took(seconds)


ENGINE_LABELS = {"vllm": "vLLM", "llama.cpp": "llama.cpp", "sglang": "SGLang", "tgi": "TGI",
                 "openai": "OpenAI-compatible server"}


def format_knobs(server: ServerInfo) -> list[str]:
    """What the server did not honour of the fields beyond OpenAI's own."""
    lines = []
    if server.knobs_refused:
        lines.append(f"the server refused (dropped from the requests): {', '.join(server.knobs_refused)}")
    if server.knobs_ignored:
        lines.append(f"the server ignored: {', '.join(server.knobs_ignored)}")
    return lines


def format_summary(report: Report) -> str:
    lines = ["Summary:"]
    for mr in report.models:
        lines.append(f"  {_status_line(mr)}")
        if mr.answer_check is not None:
            lines.append(f"      {format_answer_check(mr.answer_check)}")
        lines.extend(format_model_environment(mr, report.config.bandwidth_gbs))
        if mr.failure and mr.failure.log_tail:
            lines.extend(f"      | {ln}" for ln in mr.failure.log_tail[-5:])
    lines.extend(format_run_parts(report))
    if report.interrupted:
        lines.append(f"  interrupted by {report.interrupted}: the results above are partial")
    return "\n".join(lines) + "\n"


def fmt_change(pct: float | None) -> str:
    return "-" if pct is None else f"{pct:+.1f}%"


def metric_label(metric: str) -> str:
    m = COMPARED_METRICS[metric]
    return f"{m.label} ({m.unit})" if m.unit else m.label


def verdict_text(c: MetricChange) -> str:
    untested = not c.tested and c.verdict in (REGRESSED, IMPROVED)
    return f"{c.verdict} (untested)" if untested else c.verdict


COMPARISON_HEADERS = ("Model", "Metric", "Baseline", "Candidate", "Change", "Limit", "Verdict")


def comparison_row(c: MetricChange) -> tuple[str, ...]:
    """Model, metric, both values (mean ± stddev), change, threshold, verdict."""
    digits = COMPARED_METRICS[c.metric].digits
    limit = "-" if c.threshold_pct is None else f"{c.threshold_pct:g}%"
    return (c.model, metric_label(c.metric), fmt_stat(c.baseline, digits),
            fmt_stat(c.candidate, digits), fmt_change(c.change_pct), limit, verdict_text(c))


def changes_by_scenario(comparison: Comparison) -> dict[str, list[MetricChange]]:
    groups: dict[str, list[MetricChange]] = {}
    for c in comparison.changes:
        groups.setdefault(c.scenario, []).append(c)
    return groups


def comparison_tables(comparison: Comparison) -> list[TextTable]:
    """One table per scenario: a row per model and metric."""
    return [TextTable(scenario, COMPARISON_HEADERS, tuple(comparison_row(c) for c in changes))
            for scenario, changes in changes_by_scenario(comparison).items()]


def notable_changes(comparison: Comparison) -> list[MetricChange]:
    """The changes past a threshold (regressed, improved, noise), worst first."""
    order = {REGRESSED: 0, IMPROVED: 1, NOISE: 2}
    return sorted((c for c in comparison.changes if c.verdict in order),
                  key=lambda c: order[c.verdict])


def report_label(name: str, report: Report) -> str:
    """'base.json (started 2025-11-09T14:30:45+00:00, 2 models, 3 iterations)'."""
    return (f"{name} (started {report.started_at}, {len(report.models)} model(s), "
            f"{report.config.iterations} iteration(s))")


def format_thresholds(thresholds_pct: Mapping[str, float]) -> str:
    rules = ", ".join(f"{k}:{v:g}%" for k, v in thresholds_pct.items()) or "none"
    return (f"thresholds: {rules}; past its threshold a change is noise when the 95% "
            "intervals of the two means overlap; other metrics are not gated")


def format_verdict_counts(comparison: Comparison) -> str:
    counts = comparison.counts()
    return "verdicts: " + (", ".join(f"{n} {v}" for v, n in counts.items()) or "nothing to compare")


def regression_message(comparison: Comparison, limit: int = 5) -> str:
    """One line naming the regressions: what a CI log shows on exit 3."""
    regs = comparison.regressions
    if not regs:
        return "no metric regressed past its threshold"
    items = [f"{c.model} {c.scenario} {c.metric} {fmt_change(c.change_pct)} "
             f"(limit {c.threshold_pct:g}%)" for c in regs[:limit]]
    more = f" and {len(regs) - limit} more" if len(regs) > limit else ""
    return f"{len(regs)} metric(s) regressed past their threshold: {', '.join(items)}{more}"


def format_comparison(comparison: Comparison, labels: tuple[str, str], styled: bool = False) -> str:
    """The compare command's output: a table per scenario, notes, verdicts."""
    head = [f"baseline:  {labels[0]}", f"candidate: {labels[1]}",
            format_thresholds(comparison.thresholds_pct), ""]
    parts = [shown_text("\n".join(head))]
    parts.extend(render_table(t, styled) for t in comparison_tables(comparison))
    tail = [*comparison.notes, format_verdict_counts(comparison),
            f"REGRESSION: {regression_message(comparison)}" if comparison.regressions
            else "no regression past a threshold"]
    parts.append(shown_text("\n".join(tail)) + "\n")
    return "\n".join(parts)


def fmt_level(st: Stat | None, digits: int = 0) -> str:
    """'250.1 ±3.2': the mean and the half-width of its 95% interval."""
    if st is None:
        return "-"
    if st.ci95 is None:
        return fmt_num(st.mean, digits)
    return f"{fmt_num(st.mean, digits)} ±{fmt_num((st.ci95[1] - st.ci95[0]) / 2, digits)}"


def history_run_line(i: int, run: HistoryRun) -> str:
    r = run.report
    return f"  #{i + 1} {run.label}  started {r.started_at}, {len(r.models)} model(s), {r.config.hardware}"


def history_tables(history: History, last: int) -> list[TextTable]:
    """One table per model x scenario: a row per metric, a column per run
    (the newest `last`, newest last); '*' marks the run where a step entered."""
    shown = range(max(0, len(history.runs) - last), len(history.runs))
    by_key: dict[tuple[str, str], list[Trend]] = {}
    for t in history.trends:
        by_key.setdefault((t.model, t.scenario), []).append(t)
    tables = []
    for (model, scenario), trends in by_key.items():
        rows = []
        for t in trends:
            digits = COMPARED_METRICS[t.metric].digits
            marks = {s.run for s in t.steps}
            rows.append((metric_label(t.metric),
                         *(fmt_level(t.points[i], digits) + (" *" if i in marks else "")
                           for i in shown)))
        tables.append(TextTable(f"{model} / {scenario}", ("Metric", *(f"#{i + 1}" for i in shown)),
                                tuple(rows)))
    return tables


def describe_step(history: History, t: Trend, s: StepChange) -> str:
    run = history.runs[s.run]
    digits = COMPARED_METRICS[t.metric].digits
    text = (f"{t.model} {t.scenario} {metric_label(t.metric)}: {fmt_change(s.change_pct)} "
            f"({s.verdict}{'' if s.tested else ', untested'}) from run #{s.run + 1} "
            f"({run.label}, started {run.report.started_at}): "
            f"{fmt_level(s.before, digits)} -> {fmt_level(s.after, digits)}")
    changed = "; ".join(s.differences) if s.differences else "nothing in its environment record"
    return f"{text}; what changed: {changed}"


def format_history(history: History, last: int = 12, styled: bool = False) -> str:
    """The history command's output: the runs, a table per model x scenario,
    the step changes and the regressions that stand."""
    n = len(history.runs)
    head = [f"{TOOL_NAME} history: {n} run(s), oldest first",
            *(history_run_line(i, r) for i, r in enumerate(history.runs)),
            format_thresholds(history.thresholds_pct)]
    if n > last:
        head.append(f"(the tables show the newest {last} runs; --last N shows more)")
    parts = ["\n".join(head) + "\n"]
    parts.extend(render_table(t, styled) for t in history_tables(history, last))
    steps = [describe_step(history, t, s) for t in history.trends for s in t.steps]
    tail = ["step changes (* in the tables):", *(f"  {s}" for s in steps)] if steps else \
        ["no step change past a threshold"]
    if history.standing:
        tail.append("REGRESSION standing (the newest level is still worse than before the step):")
        tail.extend(f"  {describe_step(history, t, t.standing)}" for t in history.standing
                    if t.standing is not None)
    else:
        tail.append("no regression standing")
    parts.append("\n".join(tail) + "\n")
    return "\n".join(parts)


def _achieved(run: HistoryRun, model: str, st: Stat | None) -> str:
    mr = next((m for m in run.report.models if m.spec.name == model), None)
    ceiling = roofline_tps(mr.spec, run.report.config.bandwidth_gbs) if mr else None
    return f" ({st.mean / ceiling:.0%} of {ceiling:,.1f})" if st and ceiling else ""


def hardware_tables(runs: Sequence[HistoryRun]) -> list[TextTable]:
    """The same model on each hardware: the newest run of each group, a
    column per group, decode tok/s with its share of that box's roofline."""
    groups = hardware_groups(runs)
    newest = {key: group[-1] for key, group in groups.items()}
    keys = dict.fromkeys((mr.spec.name, sr.scenario.name) for run in newest.values()
                         for mr in run.report.models for sr in mr.scenarios)
    tables = []
    for model, scenario in keys:
        stats = {key: next((scenario_stats(sr) for mr in run.report.models if mr.spec.name == model
                            for sr in mr.scenarios if sr.scenario.name == scenario), {})
                 for key, run in newest.items()}
        rows = []
        for metric in COMPARED_METRICS:
            if not any(metric in s for s in stats.values()):
                continue
            digits = COMPARED_METRICS[metric].digits
            rows.append((metric_label(metric), *(
                fmt_level(stats[key].get(metric), digits)
                + (_achieved(newest[key], model, stats[key].get(metric)) if metric == "tps" else "")
                for key in newest)))
        tables.append(TextTable(f"{model} / {scenario}", ("Metric", *newest), tuple(rows)))
    return tables


def format_hardware(runs: Sequence[HistoryRun], styled: bool = False) -> str:
    """history --by hardware: each model on each hardware, side by side."""
    groups = hardware_groups(runs)
    head = [f"{TOOL_NAME} history by hardware: {len(groups)} hardware group(s)",
            *(f"  {key}: {len(g)} run(s), newest {g[-1].label}" for key, g in groups.items())]
    if len(groups) < 2:
        head.append("note: every report ran on the same hardware: nothing to set side by side")
    parts = ["\n".join(head) + "\n"]
    parts.extend(render_table(t, styled) for t in hardware_tables(runs))
    return "\n".join(parts)


# ============================================================================
# Exports (pure: return text/bytes)
# ============================================================================


@dataclass(frozen=True)
class ExportTargets:
    """Where the exports go: a file path, '-' for stdout, or None (not wanted)."""

    markdown: str | None = None
    csv: str | None = None
    html: str | None = None
    charts: Path | None = None  # a folder for the PNG files

    @property
    def to_stdout(self) -> str | None:
        """The option whose export takes stdout (at most one may)."""
        return next((f"--{k}" for k in ("markdown", "csv", "html") if getattr(self, k) == "-"), None)


def _md_cell(text: str) -> str:
    """Text in a Markdown table cell or line: control characters escaped, and
    no raw HTML, image or table break from a server's string."""
    return (shown(text.replace("\n", " ")).replace("|", "\\|").replace("<", "&lt;")
            .replace(">", "&gt;").replace("![", "!\\[")) or " "


def _md_code(text: str) -> str:
    """Text inside a `code span`: a backtick cannot close it early."""
    return shown(text).replace("`", "'")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; the first column left, the rest right."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def _md_notes(notes: Iterable[str]) -> str:
    return "".join(f"- {_md_cell(n)}\n" for n in notes)


def _run_line(report: Report) -> str:
    what, hardware, gpu = run_header(report)
    return (f"{what}; hardware {hardware}" + (f"; gpu {gpu}" if gpu else "")
            + (f"\n\n{note}" if (note := hardware_note(report.models)) else ""))


def format_comparison_markdown(comparison: Comparison, labels: tuple[str, str]) -> str:
    """For a PR comment: the verdict, the changes past a threshold, and every
    metric in a collapsed <details> block."""
    regs = comparison.regressions
    verdict = (f"**REGRESSION**: {_md_cell(regression_message(comparison))}" if regs
               else "**No regression** past a threshold")
    parts = [f"## Comparison with the baseline\n\n{verdict}\n",
             f"- baseline: `{_md_code(labels[0])}`\n- candidate: `{_md_code(labels[1])}`\n"
             f"- {_md_cell(format_thresholds(comparison.thresholds_pct))}\n"
             f"- {format_verdict_counts(comparison)}\n"]
    notable = notable_changes(comparison)
    parts.append("### Changes past a threshold\n")
    parts.append(markdown_table(("Scenario", *COMPARISON_HEADERS),
                                ((c.scenario, *comparison_row(c)) for c in notable))
                 if notable else "None: every judged metric is within its threshold.\n")
    details = [f"<details><summary>Every metric ({len(comparison.changes)} rows)</summary>\n"]
    for t in comparison_tables(comparison):
        details.append(f"#### {_md_cell(t.title)}\n\n{markdown_table(t.headers, t.rows)}")
    details.append("</details>\n")
    parts.append("\n".join(details))
    if comparison.notes:
        parts.append(_md_notes(comparison.notes))
    return "\n".join(parts)


def format_markdown(report: Report, comparison: Comparison | None = None,
                    labels: tuple[str, str] | None = None,
                    winners: Sequence[ScenarioWinners] | None = None) -> str:
    """The results as Markdown (a PR comment or a wiki page): the comparison
    first when there is one, then a table per scenario and the model status."""
    winners = rank_scenarios(report.models) if winners is None else winners
    parts = [f"# {TOOL_NAME} results\n\n{_md_cell(_run_line(report))}\n"]
    if comparison is not None:
        parts.append(format_comparison_markdown(comparison, labels or ("baseline", "candidate")))
    for sw in winners:
        t = mark_flagged(scenario_table(report.models, sw, report.config.bandwidth_gbs),
                         flagged_models(report))  # results of a part run elsewhere
        parts.append(f"### {_md_cell(t.title)}\n\n{markdown_table(t.headers, t.rows)}"
                     + (f"\n{_md_notes(t.notes)}" if t.notes else ""))
    if (cap := capacity_table(report.models)) is not None:
        parts.append(f"### {cap.title}\n\n{markdown_table(cap.headers, cap.rows)}\n"
                     f"{_md_notes(cap.notes)}")
    parts.append("### Models\n\n" + "".join(f"- {_md_cell(_status_line(mr))}\n"
                                            for mr in report.models))
    if report.interrupted:
        parts.append(f"Interrupted by {report.interrupted}: the results are partial.\n")
    return "\n".join(parts)


CSV_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample) if f.name != "itl_ms")


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return shown(value)
    return _round(value)


def format_csv(report: Report) -> str:
    """One row per sample (request): model, scenario, iteration (1-based,
    the request's index within a throughput level), then every Sample field
    but the per-token itl_ms. Numbers are rounded as in the JSON report."""
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("model", "scenario", "iteration", *CSV_SAMPLE_FIELDS))
    for mr in report.models:
        for sr in mr.scenarios:
            for i, s in enumerate(sr.samples, 1):
                writer.writerow((shown(mr.spec.name), sr.scenario.name, i,
                                 *(_csv_value(getattr(s, f)) for f in CSV_SAMPLE_FIELDS)))
    return buf.getvalue()


@dataclass(frozen=True)
class Series:
    """One line or set of bars: y (with optional error bars) against x.
    For bar charts x holds category indices. `color` indexes CHART_COLORS, so
    a model keeps its colour across charts; a baseline series is drawn dashed
    or hatched in its model's colour."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    yerr: tuple[float, ...] | None = None
    color: int = 0
    baseline: bool = False


@dataclass(frozen=True)
class Chart:
    name: str  # the PNG's file stem
    kind: str  # "line" | "bars"
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    categories: tuple[str, ...] = ()  # bars: the x tick labels
    x_format: str = "plain"  # "plain" | "kilo" (1000 -> 1k) | "log2" (concurrency levels)
    hlines: tuple[tuple[float, str], ...] = ()  # (y, label): a reference line, e.g. an SLO


CHART_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _stat_err(st: Stat) -> float:
    return st.stddev if st.stddev is not None else 0.0


def chart_data(report: Report, baseline: Report | None = None) -> tuple[Chart, ...]:
    """The charts' numbers (pure): the prefill curve (TTFT against input
    tokens, per model), decode tokens/s per model and scenario (mean ±
    stddev), and aggregate output tokens/s against concurrency when there are
    throughput levels. With a baseline, each model also gets a baseline series."""
    runs = [(False, report)] + ([(True, baseline)] if baseline is not None else [])
    # Models in the comparison's order: the baseline's, then the candidate's new ones.
    names = list(dict.fromkeys(mr.spec.name for _, r in reversed(runs) for mr in r.models))
    color = {n: i % len(CHART_COLORS) for i, n in enumerate(names)}
    ordered = sorted(((is_base, mr) for is_base, r in runs for mr in r.models),
                     key=lambda e: (names.index(e[1].spec.name), e[0]))

    def label(mr: ModelResult, is_base: bool) -> str:
        return f"{mr.spec.name} (baseline)" if is_base else mr.spec.name

    prefill, throughput, decode = [], [], []
    categories = list(dict.fromkeys(
        sr.scenario.name for _, r in runs for mr in r.models for sr in mr.scenarios
        if sr.scenario.kind != "throughput" and "tps" in sr.summary))
    for is_base, mr in ordered:
        points = []
        for sr in mr.scenarios:
            ttft, tin = sr.summary.get("ttft_ms"), sr.summary.get("tokens_in")
            if sr.scenario.kind == "context" and ttft is not None:
                points.append((tin.mean if tin else float(sr.scenario.target_tokens_in or 0), ttft))
        if points:
            points.sort(key=lambda p: p[0])
            prefill.append(Series(label(mr, is_base), tuple(p[0] for p in points),
                                  tuple(p[1].mean for p in points),
                                  tuple(_stat_err(p[1]) for p in points), color[mr.spec.name], is_base))
        levels = sorted((sr.scenario.concurrency, sr.aggregate.output_tps) for sr in mr.scenarios
                        if sr.scenario.kind == "throughput" and sr.aggregate
                        and sr.scenario.request_rate is None
                        and isinstance(sr.aggregate.output_tps, (int, float)))
        if levels:
            throughput.append(Series(label(mr, is_base), tuple(float(c) for c, _ in levels),
                                     tuple(float(v) for _, v in levels), None,
                                     color[mr.spec.name], is_base))
        bars = [(categories.index(sr.scenario.name), sr.summary["tps"]) for sr in mr.scenarios
                if sr.scenario.name in categories and "tps" in sr.summary]
        if bars:
            decode.append(Series(label(mr, is_base), tuple(float(i) for i, _ in bars),
                                 tuple(st.mean for _, st in bars), tuple(_stat_err(st) for _, st in bars),
                                 color[mr.spec.name], is_base))
    charts = []
    if prefill:
        charts.append(Chart("prefill-ttft", "line", "Prefill: time to first token against context size",
                            "Context (input tokens)", "TTFT (ms), mean ± stddev", tuple(prefill),
                            x_format="kilo"))
    if decode:
        charts.append(Chart("decode-tps", "bars", "Decode speed per request",
                            "Scenario", "Decode (tok/s), mean ± stddev", tuple(decode),
                            categories=tuple(categories)))
    if throughput:
        charts.append(Chart("throughput", "line", "Throughput against concurrency",
                            "Concurrent streams",
                            "Output (tok/s, all streams)", tuple(throughput), x_format="log2"))
    if (pareto := pareto_chart(report)) is not None:
        charts.append(pareto)
    return tuple(charts)


def slo_decode_floor(slo: str | None) -> tuple[float, str] | None:
    """The per-user decode rate the SLOs ask for, as a line on the Pareto
    chart: decode_tps>=X directly, or 1000 / X for tpot..._ms<=X (the
    strictest of them); None without such a rule."""
    if not slo:
        return None
    floors = []
    for r in parse_slo(slo):
        if r.metric == "decode_tps":
            floors.append((r.limit, r.text))
        elif r.metric == "tpot":
            floors.append(((1000.0 if r.unit == "ms" else 1.0) / r.limit, r.text))
    if not floors:
        return None
    y, rule = max(floors)
    return y, f"SLO {rule} ({y:,.1f} tok/s per user)"


def pareto_chart(report: Report) -> Chart | None:
    """The throughput-latency (Pareto) view: per model, each concurrency
    level's mean per-user decode tokens/s against its aggregate output
    tokens/s, from the throughput levels (and the capacity probes at levels
    they lack), joined in order of concurrency, with the SLO's decode floor
    drawn in. The best trade-offs lie up and to the right. Drawn for a run
    with --slo, whose capacity probes give every model its curve."""
    if not report.config.slo:
        return None
    series = []
    for i, mr in enumerate(report.models):
        points: dict[int, tuple[float, float]] = {}
        for p in mr.capacity.probes if mr.capacity else ():
            if p.output_tps is not None and p.decode_tps is not None:
                points[p.concurrency] = (p.output_tps, p.decode_tps)
        for sr in mr.scenarios:
            tps = sr.summary.get("tps")
            out = sr.aggregate.output_tps if sr.aggregate else None
            if (sr.scenario.kind == "throughput" and sr.scenario.request_rate is None and tps
                    and isinstance(out, (int, float))):
                points[sr.scenario.concurrency] = (float(out), tps.mean)
        if points:
            xy = [points[c] for c in sorted(points)]
            series.append(Series(mr.spec.name, tuple(x for x, _ in xy), tuple(y for _, y in xy),
                                 None, i % len(CHART_COLORS)))
    if not series:
        return None
    floor = slo_decode_floor(report.config.slo)
    return Chart("pareto", "line", "Throughput against per-user speed (Pareto)",
                 "Output (tok/s, all streams)", "Decode per user (tok/s, mean)", tuple(series),
                 hlines=(floor,) if floor else ())


def draw_chart(chart: Chart) -> Any:
    """A matplotlib Figure of one chart, drawn on the Agg canvas (no pyplot,
    no display, no global state). matplotlib is the optional `charts` extra."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullLocator, ScalarFormatter  # noqa: PLC0415

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if chart.kind == "bars":
        width = 0.8 / max(1, len(chart.series))
        for i, s in enumerate(chart.series):
            c = CHART_COLORS[s.color]
            xs = [x - 0.4 + width * (i + 0.5) for x in s.x]
            bars = ax.bar(xs, s.y, width, yerr=s.yerr, capsize=3, label=s.label, color=c,
                          edgecolor=c, alpha=0.45 if s.baseline else 0.9,
                          hatch="//" if s.baseline else None, error_kw={"elinewidth": 1.2})
            if len(chart.series) * len(chart.categories) <= 15:  # else the labels collide
                ax.bar_label(bars, labels=[f"{y:.1f}" if y < 100 else f"{y:,.0f}" for y in s.y],
                             padding=2, fontsize=8)
        ax.set_xticks(range(len(chart.categories)), chart.categories)
        ax.grid(True, axis="y", alpha=0.3)
    else:
        for s in chart.series:
            ax.errorbar(s.x, s.y, yerr=s.yerr, label=s.label, color=CHART_COLORS[s.color],
                        marker="s" if s.baseline else "o", linestyle="--" if s.baseline else "-",
                        alpha=0.6 if s.baseline else 1.0, capsize=4, linewidth=2, markersize=6)
        ax.grid(True, alpha=0.3)
    for y, text in chart.hlines:
        ax.axhline(y, color="#57606a", linestyle=":", linewidth=1.5, label=text)
    if chart.x_format == "kilo":
        ax.set_xlim(left=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    elif chart.x_format == "log2":
        levels = sorted({x for s in chart.series for x in s.x})
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        if len(levels) == 1:
            ax.set_xlim(levels[0] / 2, levels[0] * 2)
    ax.set_ylim(bottom=0)
    ax.set_title(chart.title, fontsize=12)
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    fig.legend(loc="outside right upper", fontsize=9)
    return fig


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes, without the Software stamp (reproducible files)."""
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def render_charts(report: Report, baseline: Report | None = None) -> dict[str, bytes]:
    """{'prefill-ttft.png': PNG bytes, ...} for every chart the data allows."""
    return {f"{c.name}.png": figure_png(draw_chart(c)) for c in chart_data(report, baseline)}


_HTML_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  margin:1.5rem auto;max-width:1200px;padding:0 1rem;color:#1f2328;line-height:1.45}
h1{font-size:1.7rem;margin:0 0 .3rem} h2{font-size:1.3rem;margin-top:2rem;
  border-bottom:1px solid #d0d7de;padding-bottom:.25rem} h3{font-size:1.05rem;margin:1.2rem 0 .3rem}
.meta,.notes{color:#57606a;font-size:.9rem} .notes{margin:.2rem 0 1rem;padding-left:1.2rem}
table{border-collapse:collapse;margin:.4rem 0 .6rem;font-size:.88rem}
th,td{border:1px solid #d0d7de;padding:.28rem .6rem;white-space:nowrap;text-align:right}
th{background:#f6f8fa} .l{text-align:left}
.banner{padding:.8rem 1rem;border-radius:6px;font-size:1.1rem;font-weight:600;margin:.6rem 0}
.bad{background:#ffebe9;color:#82071e;border:1px solid #ff8182}
.good{background:#dafbe1;color:#116329;border:1px solid #4ac26b}
tr.regressed td{background:#ffebe9} tr.regressed td.v{color:#82071e;font-weight:600}
tr.improved td{background:#dafbe1} tr.improved td.v{color:#116329;font-weight:600}
tr.noise td{background:#fff8c5} tr.missing td{color:#9a6700;font-style:italic}
figure{margin:1rem 0 1.5rem} figure img{max-width:100%;border:1px solid #d0d7de;border-radius:4px}
figcaption{color:#57606a;font-size:.9rem} details{margin:.6rem 0} summary{cursor:pointer;font-weight:600}
footer{margin-top:2.5rem;color:#57606a;font-size:.8rem} .win{color:#bf8700;font-weight:700}
"""


def _html_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
                left: Iterable[int] = (0,), row_classes: Iterable[str] | None = None) -> str:
    from html import escape  # noqa: PLC0415

    left = set(left)
    classes = list(row_classes) if row_classes is not None else None
    cls = lambda i: ' class="l"' if i in left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        tr = f' class="{classes[n]}"' if classes else ""
        cells = "".join(f"<td{_td_class(i in left, classes is not None and i == len(row) - 1)}>"
                        f"{_html_text(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr{tr}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>\n"


def _html_text(text: str) -> str:
    """Escaped text; the trophy becomes a star that every font has (a page
    viewed where no emoji font is installed would show a box)."""
    from html import escape  # noqa: PLC0415

    return escape(shown_text(text)).replace(TROPHY, '<span class="win" title="winner">\u2605</span>')


def _td_class(left: bool, verdict: bool) -> str:
    names = " ".join(n for n, on in (("l", left), ("v", verdict)) if on)
    return f' class="{names}"' if names else ""


def _html_notes(notes: Iterable[str]) -> str:
    items = "".join(f"<li>{_html_text(n)}</li>" for n in notes)
    return f'<ul class="notes">{items}</ul>\n' if items else ""


def _verdict_class(c: MetricChange) -> str:
    return "missing" if c.verdict.startswith("missing") else c.verdict.replace(" ", "-")


def _html_comparison(comparison: Comparison, labels: tuple[str, str]) -> str:
    from html import escape  # noqa: PLC0415

    regs = comparison.regressions
    banner = (f'<div class="banner bad">REGRESSION: {len(regs)} metric(s) regressed past their '
              "threshold</div>" if regs else '<div class="banner good">No regression past a threshold</div>')
    parts = ["<h2>Comparison with the baseline</h2>", banner,
             f'<p class="meta">baseline: {escape(labels[0])}<br>candidate: {escape(labels[1])}<br>'
             f"{escape(format_thresholds(comparison.thresholds_pct))}<br>"
             f"{escape(format_verdict_counts(comparison))}</p>",
             "<h3>Changes past a threshold</h3>"]
    notable = notable_changes(comparison)
    left = (0, 1, 2, 7)
    parts.append(_html_table(("Scenario", *COMPARISON_HEADERS),
                             [(c.scenario, *comparison_row(c)) for c in notable], left=left,
                             row_classes=[_verdict_class(c) for c in notable])
                 if notable else "<p>None: every judged metric is within its threshold.</p>")
    parts.append(f"<details><summary>Every metric ({len(comparison.changes)} rows)</summary>")
    for scenario, changes in changes_by_scenario(comparison).items():
        parts.append(f"<h3>{escape(scenario)}</h3>")
        parts.append(_html_table(COMPARISON_HEADERS, [comparison_row(c) for c in changes],
                                 left=(0, 1, 6), row_classes=[_verdict_class(c) for c in changes]))
    parts.append("</details>")
    parts.append(_html_notes(comparison.notes))
    return "\n".join(parts)


def format_html(report: Report, charts: Mapping[str, bytes], comparison: Comparison | None = None,
                labels: tuple[str, str] | None = None,
                winners: Sequence[ScenarioWinners] | None = None) -> str:
    """One self-contained HTML page: inline CSS, charts as base64 PNG, no
    script and no network reference, so it opens anywhere, offline."""
    import base64  # noqa: PLC0415
    from html import escape  # noqa: PLC0415

    winners = rank_scenarios(report.models) if winners is None else winners
    titles = {f"{c.name}.png": c.title for c in chart_data(report)}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(TOOL_NAME)} report {escape(report.started_at)}</title>",
             f"<style>{_HTML_CSS}</style></head><body>",
             f"<h1>{escape(TOOL_NAME)} report</h1>", f'<p class="meta">{escape(_run_line(report))}</p>']
    if comparison is not None:
        parts.append(_html_comparison(comparison, labels or ("baseline", "candidate")))
    if charts:
        parts.append("<h2>Charts</h2>")
        if comparison is not None:
            parts.append('<p class="meta">Dashed lines and hatched bars: the baseline.</p>')
    for name, png in charts.items():
        title = titles.get(name, name)
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{escape(title)}</figcaption></figure>")
    parts.append("<h2>Results</h2>")
    for sw in winners:
        t = mark_flagged(scenario_table(report.models, sw, report.config.bandwidth_gbs),
                         flagged_models(report))  # results of a part run elsewhere
        parts.append(f"<h3>{escape(t.title)}</h3>")
        parts.append(_html_table(t.headers, t.rows) + _html_notes(t.notes))
    if (cap := capacity_table(report.models)) is not None:
        parts.append(f"<h3>{escape(cap.title)}</h3>")
        parts.append(_html_table(cap.headers, cap.rows) + _html_notes(cap.notes))
    parts.append("<h2>Models</h2>")
    parts.append(_html_notes(_status_line(mr) for mr in report.models).replace(' class="notes"', ""))
    if report.interrupted:
        parts.append(f"<p>Interrupted by {escape(report.interrupted)}: the results are partial.</p>")
    parts.append(f"<footer>{escape(TOOL_NAME)} {escape(__version__)}: one file, no network "
                 "needed to view it.</footer></body></html>\n")
    return "\n".join(parts)


def history_charts(history: History) -> tuple[Chart, ...]:
    """A trend chart per scenario x metric: a line per model over the runs,
    with the 95% interval of each run's mean as error bars."""
    colors = {m: i % len(CHART_COLORS) for i, m in enumerate(dict.fromkeys(t.model for t in history.trends))}
    by_key: dict[tuple[str, str], list[Trend]] = {}
    for t in history.trends:
        by_key.setdefault((t.scenario, t.metric), []).append(t)
    charts = []
    for (scenario, metric), trends in by_key.items():
        series = []
        for t in trends:
            pts = [(i + 1, p) for i, p in enumerate(t.points) if p is not None]
            series.append(Series(t.model, tuple(float(x) for x, _ in pts), tuple(p.mean for _, p in pts),
                                 tuple((p.ci95[1] - p.ci95[0]) / 2 if p.ci95 else 0.0 for _, p in pts),
                                 color=colors[t.model]))
        charts.append(Chart(f"history-{scenario}-{metric}", "line",
                            f"{scenario}: {metric_label(metric)} over the runs",
                            "run (oldest first)", metric_label(metric), tuple(series)))
    return tuple(charts)


def format_history_markdown(history: History, last: int = 12) -> str:
    """The history as Markdown (a CI job summary): runs, tables, changes."""
    parts = [f"# {TOOL_NAME} history\n",
             "".join(f"- #{i + 1} `{r.label}`, started {r.report.started_at}\n"
                     for i, r in enumerate(history.runs))]
    for t in history_tables(history, last):
        parts.append(f"### {t.title}\n\n{markdown_table(t.headers, t.rows)}")
    steps = [describe_step(history, t, s) for t in history.trends for s in t.steps]
    parts.append("### Step changes\n\n" + (_md_notes(steps) if steps else "None past a threshold.\n"))
    standing = [describe_step(history, t, t.standing) for t in history.standing if t.standing]
    parts.append("### Regressions standing\n\n" + (_md_notes(standing) if standing else "None.\n"))
    return "\n".join(parts)


def format_history_html(history: History, charts: Mapping[str, bytes], last: int = 12) -> str:
    """The history as one self-contained HTML page, trend charts included."""
    import base64  # noqa: PLC0415
    from html import escape  # noqa: PLC0415

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(TOOL_NAME)} history</title>",
             f"<style>{_HTML_CSS}</style></head><body>", f"<h1>{escape(TOOL_NAME)} history</h1>",
             _html_notes(f"#{i + 1} {r.label}, started {r.report.started_at}"
                         for i, r in enumerate(history.runs))]
    for name, png in charts.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{data}"></figure>')
    for t in history_tables(history, last):
        parts.append(f"<h3>{escape(t.title)}</h3>" + _html_table(t.headers, t.rows))
    steps = [describe_step(history, t, s) for t in history.trends for s in t.steps]
    standing = [describe_step(history, t, t.standing) for t in history.standing if t.standing]
    parts.append("<h2>Step changes</h2>" + (_html_notes(steps) if steps else "<p>None.</p>"))
    parts.append("<h2>Regressions standing</h2>" + (_html_notes(standing) if standing else "<p>None.</p>"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ============================================================================
# Output: files, progress, signals (I/O)
# ============================================================================


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write via a temp file in the same folder and rename, so a reader (or a
    SIGKILL) never sees a half-written file.

    The file gets the mode a plain open() would give it (mkstemp's is 0600,
    which hid reports from the other users of a shared box). A SIGKILL between
    write and rename can leave one hidden `.NAME.*.tmp`; prepare_report_dir
    removes it on a later run."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes)
              else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(text)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


STALE_TEMP_S = 600  # a report write takes milliseconds: an older temp file is a killed run's


def remove_stale_temp_files(folder: Path, now: Callable[[], float] = time.time) -> None:
    """Remove the temp files a killed run left (atomic_write's, the write probe's)."""
    for pattern in (".model-comparison-*.tmp", ".write-test-*"):
        for p in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if now() - p.stat().st_mtime > STALE_TEMP_S:
                    p.unlink()


REPORT_GLOB = "model-comparison-*.json"  # the JSON reports a run saves (report_stem)


def report_stem(started: dt.datetime) -> str:
    """model-comparison-2025-11-09T14-30-45 (UTC), as the original named them."""
    return f"model-comparison-{started.strftime('%Y-%m-%dT%H-%M-%S')}"


def reserve_stem(folder: Path, stem: str, first: str = "") -> str:
    """A stem no report in `folder` has: `stem`, else `stem-2`, `stem-3`...
    Its .json is created exclusively (O_EXCL), holding `first`, so two runs
    started in the same second (two CI jobs, one folder) never share a name."""
    for n in range(1, 10_000):
        candidate = stem if n == 1 else f"{stem}-{n}"
        if (folder / f"{candidate}.txt").exists():
            continue
        try:
            fd = os.open(folder / f"{candidate}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        except OSError:  # the first save will say what is wrong
            return candidate
        with contextlib.suppress(OSError), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(first)
        return candidate
    return f"{stem}-{uuid.uuid4().hex[:8]}"


SPARE_DESCRIPTORS = 64  # beyond the streams: the pool's spares, report files, Docker, /proc


def ensure_descriptors(streams: int, resource_module: Any = None) -> int:
    """Make sure the process may open a socket per stream (and its spares):
    raise the soft RLIMIT_NOFILE up to the hard one when it is too low, else
    UsageError with the numbers. Returns the limit in force. Without this,
    EMFILE looks like a refused connection and the report writes fail."""
    if resource_module is None:
        try:
            import resource as resource_module  # noqa: PLC0415 (POSIX only)
        except ImportError:
            return -1
    need = streams + SPARE_DESCRIPTORS
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    infinity = resource_module.RLIM_INFINITY
    if soft == infinity or soft >= need:
        return soft
    if hard == infinity or hard >= need:
        with contextlib.suppress(ValueError, OSError):
            resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (need, hard))
            return need
    raise UsageError(f"--concurrency {streams} needs about {need} open files (a socket per "
                     f"stream and {SPARE_DESCRIPTORS} spare), but this process may open only "
                     f"{soft} (hard limit {hard}): raise it (ulimit -n {need}) or lower "
                     "--concurrency")


def prepare_report_dir(path: Path) -> Path:
    """Create the report folder and prove it is writable, before any model starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a buffered probe on a full disk failed again when it was
        # garbage-collected, printing "Exception ignored ..." after the error.
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"report folder {path} is not writable ({exc.strerror or exc}): "
                         "fix its permissions or free space, or choose --report-dir") from None
    remove_stale_temp_files(path)
    return path


def collect_environment(runner: Runner = subprocess.run) -> Environment:
    """Host, Python, the event loop, and the GPU from nvidia-smi when it is there."""
    gpu = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = runner(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if proc.returncode == 0 and proc.stdout.strip():
                gpu = proc.stdout.strip().splitlines()[0]
    return Environment(host=socket.gethostname(), python=sys.version.split()[0],
                       platform=sys.platform, event_loop=event_loop_name(), gpu=gpu)


def _write_export(path: Path, data: bytes, what: str) -> None:
    try:
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)  # a unique temp file, fsync, removed on failure
    except OSError as exc:
        raise PerftestError(f"cannot write {what} {path} ({exc.strerror or exc}): "
                            "check the folder's permissions and free space") from None


def write_exports(targets: ExportTargets, report: Report, stdout: Any, err: Any, *,
                  comparison: Comparison | None = None, labels: tuple[str, str] | None = None,
                  baseline: Report | None = None, compare_only: bool = False,
                  winners: Sequence[ScenarioWinners] | None = None) -> None:
    """Render and write each export that was asked for ('-' to `stdout`); the
    charts are drawn once for both --html and --charts, the winners ranked
    once for all. `compare_only`: the Markdown holds the comparison alone
    (the compare command)."""
    charts: dict[str, bytes] = {}
    winners = rank_scenarios(report.models) if winners is None else winners

    def get_charts() -> dict[str, bytes]:
        if not charts:
            charts.update(render_charts(report, baseline))
        return charts

    makers: dict[str, Callable[[], str]] = {
        "markdown": lambda: (format_comparison_markdown(comparison, labels or ("baseline", "candidate"))
                             if compare_only and comparison is not None
                             else format_markdown(report, comparison, labels, winners)),
        "csv": lambda: format_csv(report),
        "html": lambda: format_html(report, get_charts(), comparison, labels, winners),
    }
    emit_exports(targets, makers, get_charts, stdout, err)


def emit_exports(targets: ExportTargets, makers: Mapping[str, Callable[[], str]],
                 get_charts: Callable[[], Mapping[str, bytes]], stdout: Any, err: Any) -> None:
    """Write each wanted export ('-': to `stdout`) and the chart files, and
    say on `err` where each went."""
    for key, make in makers.items():
        dest = getattr(targets, key)
        if dest is None:
            continue
        if dest == "-":
            stdout.write(make())
            stdout.flush()
            continue
        _write_export(Path(dest), make().encode("utf-8"), f"--{key}")
        err.write(f"{key}: {dest}\n")
    if targets.charts is not None:
        for name, png in get_charts().items():
            _write_export(targets.charts / name, png, "--charts")
        err.write(f"charts: {', '.join(get_charts())} in {targets.charts}\n")


class SignalGuard:
    """Turns SIGTERM and SIGHUP into Interrupted (SIGINT stays
    KeyboardInterrupt), and holds any signal back while a service is being
    stopped, so that cleanup itself cannot be cut short."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)

    def __init__(self) -> None:
        self.holding = False
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holding:
            self.pending = signum
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop.is_closed():
            self._raise(signum)
        else:
            # Raise from a callback of the loop's own: raised inside a protocol
            # callback (data_received, where a streaming client spends its
            # time), uvloop takes it for a transport error and the signal is
            # lost; asyncio and uvloop both let it out of a callback.
            loop.call_soon_threadsafe(self._raise, signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum)


def served_by(mr: ModelResult) -> tuple[str | None, str | None]:
    """The vLLM version and the image (repo digest, else id) a model ran on."""
    digests = mr.lifecycle.repo_digests or (mr.lifecycle.image_id,)
    return (mr.server.version if mr.server else None), digests[0]


class CampaignProgress:
    """Where the campaign is and what each phase took, from the run's events
    (on `clock`'s time); the arithmetic is estimate_left's, the text
    format_progress's. `history`: what --estimate-from measured."""

    def __init__(self, steps: Sequence[CampaignStep], report: Report, *, managed: bool,
                 history: Mapping[str, ModelTimes] | None = None, clock: Clock = time.monotonic):
        self.steps, self.report, self.managed = tuple(steps), report, managed
        self.history = dict(history or {})
        self.clock = clock
        self.t0 = clock()
        self.model = 0
        self.phase_name, self.phase_t0 = "done", self.t0  # until the first model starts
        self.scenario, self.scenario_t0, self.request_t0, self.requests_done = -1, self.t0, self.t0, 0
        self.walls: dict[str, dict[str, float]] = {}  # model -> {"load_s": ...} in this part
        self.completed: dict[str, list[str]] = {}  # model -> scenarios completed in this part

    def start_model(self, index: int) -> None:
        self.model, self.scenario, self.requests_done = index, -1, 0
        self.phase_name, self.phase_t0 = ("load" if self.managed else "measure"), self.clock()

    def phase(self, model: str, phase: str) -> None:
        """`phase` began ("load", "measure", "stop", or "done"); the one before ended."""
        now = self.clock()
        if self.phase_name in ("load", "measure", "stop") and phase != self.phase_name:
            self.walls.setdefault(model, {})[f"{self.phase_name}_s"] = round(now - self.phase_t0, 2)
        self.phase_name, self.phase_t0 = phase, now

    def scenario_started(self, model: str, scenario: Scenario) -> None:
        names = [s.name for s in self.steps[self.model].to_run]
        self.scenario = names.index(scenario.name) if scenario.name in names else self.scenario
        self.scenario_t0 = self.request_t0 = self.clock()
        self.requests_done = 0

    def sample(self) -> None:
        self.requests_done += 1
        self.request_t0 = self.clock()

    def scenario_done(self, model: str, result: ScenarioResult) -> None:
        if len(result.samples) == result.scenario.requests:
            self.completed.setdefault(model, []).append(result.scenario.name)

    def times(self) -> dict[str, ModelTimes]:
        """This run's measurements of each model (kept scenarios included),
        else --estimate-from's."""
        out = dict(self.history)
        for mr in self.report.models:
            t, h = model_times(mr), self.history.get(mr.spec.name, ModelTimes())
            out[mr.spec.name] = ModelTimes(t.load_s if t.load_s is not None else h.load_s,
                                           t.points or h.points, t.levels or h.levels)
        return out

    def mean_stop_s(self) -> float | None:
        stops = [w["stop_s"] for w in self.walls.values() if "stop_s" in w]
        stops += [pm.stop_s for part in self.report.parts[:-1] for pm in part.models.values()
                  if pm.stop_s is not None]
        return statistics.fmean(stops) if stops else None

    def position(self) -> CampaignPosition:
        now = self.clock()
        phase = "measure" if self.phase_name == "done" else self.phase_name
        return CampaignPosition(self.model, phase, self.scenario, self.requests_done,
                                now - self.phase_t0, now - self.scenario_t0, now - self.request_t0)

    def estimate(self) -> Estimate:
        return estimate_left(self.steps, self.position(), self.times(),
                             warmup_tokens=self.report.config.warmup_tokens,
                             stop_s=self.mean_stop_s(), managed=self.managed)

    def status(self) -> str:
        return format_progress(self.steps, self.position(), self.clock() - self.t0, self.estimate())

    def close(self) -> None:
        """End the phase of the model in hand (the run ends, or was cut short)."""
        if self.steps and self.phase_name != "done":
            self.phase(self.steps[self.model].spec.name, "done")

    def part_models(self) -> dict[str, PartModel]:
        """This part's record of each model it touched."""
        out = {}
        for mr in self.report.models:
            name = mr.spec.name
            walls = self.walls.get(name)
            if walls is None and name not in self.completed:
                continue
            out[name] = PartModel(tuple(self.completed.get(name, ())), *served_by(mr), *(
                                      (walls or {}).get(k) for k in ("load_s", "measure_s", "stop_s")))
        return out


class ParallelProgress:
    """--parallel's view of a campaign: each model's own CampaignProgress (fed
    by the events of the thread that runs it), and one line for all of them."""

    def __init__(self, steps: Sequence[CampaignStep], report: Report,
                 lanes: Sequence[frozenset[str]], history: Mapping[str, ModelTimes] | None = None):
        self.steps, self.report, self.lanes = tuple(steps), report, tuple(lanes)
        self.models = [CampaignProgress((step,), report, managed=True, history=history)
                       for step in self.steps]

    def left(self, running: Iterable[int]) -> list[Estimate | None]:
        """Each model's time left (None: done, or kept whole by a resume);
        the stop time is the mean of the stops seen so far, of any model."""
        running = set(running)
        stops = [w["stop_s"] for p in self.models for w in p.walls.values() if "stop_s" in w]
        stop_s = statistics.fmean(stops) if stops else None
        return [None if step.keep_whole or self.report.models[i].status not in ("pending", "running")
                else estimate_left((step,), p.position() if i in running else CampaignPosition(0),
                                   p.times(), warmup_tokens=self.report.config.warmup_tokens,
                                   stop_s=stop_s)
                for i, (step, p) in enumerate(zip(self.steps, self.models))]

    def part_models(self) -> dict[str, PartModel]:
        """This part's record of each model it touched (as CampaignProgress's):
        what a --resume of this run keeps."""
        return {name: pm for p in self.models for name, pm in p.part_models().items()}

    def close(self) -> None:
        for p in self.models:
            p.close()

    def line(self, running: Iterable[int]) -> str:
        """'campaign: 1 of 4 models done, 2 running; about 35 m left' (a
        model whose thread ended but is not yet joined counts as done)."""
        left = self.left(running)
        busy = sum(self.report.models[i].status == "running" for i in running)
        return (f"campaign: {sum(est is None for est in left)} of {len(left)} models done, "
                f"{busy} running; {format_estimate(parallel_estimate(self.lanes, left))}")


async def watch_live_reads(events: Events, coro: Any, interval_s: float = 0.25) -> Any:
    """Await `coro` while, a few times a second, a task outside the streams
    counts the events of the request in flight (bytes.count over the reads
    the transport stamped: counted, never parsed) and tells `events.live`.
    The streams' own path gains one list append per request, none per read."""
    if not events.wants_live:
        return await coro
    streams: list[list[Read]] = []
    token = _LIVE_READS.set(streams)

    async def tick() -> None:
        watched: list[Read] | None = None
        counted = events_seen = 0
        while True:
            await asyncio.sleep(interval_s)
            if not streams:
                continue
            reads = streams[-1]
            del streams[:-1]  # only the latest request is shown
            if reads is not watched:
                watched, counted, events_seen = reads, 0, 0
            n = len(reads)
            events_seen += sum(payload.count(b"data:") for _, payload in reads[counted:n])
            counted = n
            tokens = max(0, events_seen - 1)  # the first event is the role chunk
            span = reads[n - 1][0] - reads[0][0] if n > 1 else 0.0
            events.live(tokens, (tokens - 1) / span if tokens > 1 and span > 0 else None)

    ticker = asyncio.create_task(tick())
    try:
        return await coro
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        _LIVE_READS.reset(token)


class ConsoleEvents(Events):
    """Progress to stderr: a live line on a terminal; in a log, one line
    every `quiet_s` seconds while waiting, so a long load is visible but
    does not flood."""

    def __init__(self, err: Any, tty: bool, on_scenario: Callable[[], None] = lambda: None,
                 quiet_s: float = 30.0, clock: Clock = time.monotonic,
                 progress: CampaignProgress | None = None):
        self.err, self.tty, self.on_scenario = err, tty, on_scenario
        self.quiet_s, self.clock = quiet_s, clock
        self.progress = progress
        self._last_wait = -math.inf
        self._last_pull = -math.inf
        self._live = False

    @property
    def wants_live(self) -> bool:  # type: ignore[override]
        return self.tty and self.progress is not None

    def _live_line(self, text: str) -> None:
        self.err.write("\r\x1b[2K" + text)
        self.err.flush()
        self._live = True

    def model_started(self, index: int, spec: ModelSpec) -> None:
        if self.progress is not None:
            self.progress.start_model(index)

    def phase(self, model: str, phase: str) -> None:
        if self.progress is not None:
            self.progress.phase(model, phase)

    def scenario_started(self, model: str, scenario: Scenario) -> None:
        if self.progress is not None:
            self.progress.scenario_started(model, scenario)

    def live(self, tokens: int, rate_tps: float | None) -> None:
        if self.wants_live:
            self._live_line(f"  {self.progress.status()} | request: "  # type: ignore[union-attr]
                            f"{format_live_request(tokens, rate_tps)}")

    def _line(self, text: str) -> None:
        if self._live:
            self.err.write("\n")
            self._live = False
        self.err.write(shown_text(text) + "\n")  # a server's model id or error, escaped
        self.err.flush()

    def info(self, text: str) -> None:
        self._line(text)

    def waiting(self, model: str, elapsed_s: float, last_log: Callable[[], str | None]) -> None:
        interval = 1.0 if self.tty else self.quiet_s
        now = self.clock()
        if now - self._last_wait < interval:
            return
        self._last_wait = now
        log = last_log()
        text = f"  {model}: waiting for health, {elapsed_s:.0f} s" + (f" | {shown(log[:100])}" if log else "")
        status = self.progress.status() if self.progress is not None else None
        if self.tty:
            self._live_line(f"  {status} | {text.strip()}" if status else text)
        else:
            self._line(text)
            if status:
                self._line(f"  {status}")

    def pulling(self, model: str, progress: PullProgress) -> None:
        """Like the health wait: live on a terminal, a line every `quiet_s` in a log."""
        interval = 0.5 if self.tty else self.quiet_s
        now = self.clock()
        if now - self._last_pull < interval or not progress.layers:  # no layer known yet
            return
        self._last_pull = now
        text = f"  {model}: {format_pull_progress(progress)}"
        if self.tty:
            self.err.write("\r\x1b[2K" + text)
            self.err.flush()
            self._live = True
        else:
            self._line(text)

    def sample(self, model: str, scenario: Scenario, index: int, sample: Sample) -> None:
        if self.progress is not None:
            self.progress.sample()
        if scenario.kind == "throughput" and index + 1 != scenario.requests:
            return
        head = f"  [{index + 1}/{scenario.requests}] {scenario.name}"
        if scenario.kind == "throughput":
            self._line(f"{head}: done")
        elif sample.ok:
            tps = f", {sample.tps:.1f} tok/s" if sample.tps else ""
            self._line(f"{head}: TTFT {sample.ttft_ms:.0f} ms{tps}, {sample.tokens_in} in, "
                       f"{sample.tokens_out} out, {sample.total_s:.2f} s")
        else:
            self._line(f"{head}: FAILED: {sample.error}")

    def scenario_done(self, model: ModelResult, result: ScenarioResult) -> None:
        if self.progress is not None:
            self.progress.scenario_done(model.spec.name, result)
            self._line(f"  {self.progress.status()}")
        self.on_scenario()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


class ClosedPipeSafe:
    """stdout that a closed reader (`| head -1`) cannot break: after
    BrokenPipeError the rest of the output is dropped (stdout goes to
    /dev/null, so the interpreter's last flush is quiet too), and the run
    goes on to write its files and exit with its own code."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.closed_by_reader = False

    def _broken(self) -> None:
        self.closed_by_reader = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._broken()
        return len(text)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._broken()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class ReportFiles:
    """The run's .json (rewritten after every scenario) and .txt reports.
    A write that fails mid-run is reported once; the results still go to stdout."""

    def __init__(self, folder: Path, stem: str, err: Any):
        self.json_path = folder / f"{stem}.json"
        self.txt_path = folder / f"{stem}.txt"
        self.err = err
        self.failed: str | None = None

    def _write(self, path: Path, text: str) -> bool:
        try:
            atomic_write(path, text)
            return True
        except OSError as exc:
            if self.failed is None:
                self.err.write(f"warning: cannot write {path} ({exc.strerror or exc}); "
                               "the results go to stdout instead\n")
            self.failed = str(exc)
            return False

    def save_json(self, report: Report) -> bool:
        return self._write(self.json_path, json.dumps(report_to_dict(report), indent=1) + "\n")

    def save_text(self, text: str) -> bool:
        return self._write(self.txt_path, text)


# ============================================================================
# Command line
# ============================================================================


# --- Options: the run's, compare's and history's ------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, via main()
        raise UsageError(f"{message} (see --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


def _token_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(parse_token_count(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 1k,8k,16k,32k (k = 1000) or plain numbers, got {exc.args[0]!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one size")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(_positive_int(t) for t in text.split(",") if t.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected levels like 1,4,16,64, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one level")
    return values


def _rate_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(_positive_float(t) for t in text.split(",") if t.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected rates in requests/s like 0.5,1,2, got {text!r}"
                                         ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one rate")
    return values


def _slo_rules(text: str) -> str:
    """--slo: checked here, kept as text (the report's config records it as given)."""
    try:
        parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return ",".join(p.strip() for p in text.split(",") if p.strip())


def _thresholds(text: str) -> dict[str, float | None]:
    try:
        return parse_thresholds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_help(models: Sequence[ModelSpec]) -> str:
    rows = [f"  {m.name:<20} {m.service or '-':<26} {m.model_id} ({m.max_context_tokens} ctx)"
            for m in models]
    return "models (name for --skip/--only, service, model id):\n" + "\n".join(rows)


def add_selection_options(p: argparse.ArgumentParser) -> None:
    sel = p.add_argument_group("which models")
    sel.add_argument("--skip", action="append", default=[], metavar="NAME",
                     help="skip this model (repeatable)")
    sel.add_argument("--only", action="append", default=[], metavar="NAME",
                     help="test only this model (repeatable)")
    sel.add_argument("--models", type=Path, metavar="FILE",
                     help="YAML file whose 'models:' list adds to or replaces the built-in table "
                          "(see docs/models-file.md)")
    sel.add_argument("--endpoint", metavar="URL",
                     help="benchmark the model(s) an already running OpenAI-compatible server "
                          "lists in /v1/models; no Compose at all")
    sel.add_argument("--api-key", metavar="KEY",
                     help="bearer token for the server (default: $VLLM_API_KEY or $OPENAI_API_KEY); "
                          "never written to reports")


def add_measure_options(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to measure")
    what.add_argument("--iterations", type=_positive_int, default=3, metavar="N",
                      help="runs per scenario (default 3)")
    what.add_argument("--context-sizes", type=_token_list, default=RunConfig.context_sizes,
                      metavar="LIST", help="input sizes of the context tests (default 1k,8k,16k,32k; "
                      "k = 1000 tokens)")
    what.add_argument("--concurrency", type=_int_list, default=(), metavar="LIST",
                      help="also run a throughput test at these numbers of parallel streams, "
                           "e.g. 1,4,16,64 (default: off)")
    what.add_argument("--throughput-requests", type=_positive_int, metavar="N",
                      help="requests per concurrency level (default: 4 x level, at least 8, and "
                           "with --slo at least what its percentiles need: 100 for p99)")
    what.add_argument("--request-rate", type=_rate_list, default=(), metavar="LIST",
                      help="also run open-loop levels at these arrival rates (requests/s), "
                           "e.g. 0.5,1,2: Poisson arrivals, TTFT from the scheduled arrival")
    what.add_argument("--burstiness", type=_positive_float, default=1.0, metavar="SHAPE",
                      help="gamma shape of the open-loop arrival gaps, as vLLM's bench serve "
                           "(default 1: Poisson; below 1 burstier, above 1 more regular)")
    what.add_argument("--hardware", choices=sorted(HARDWARE_BANDWIDTH_GBS), default="dgx-spark",
                      help="memory bandwidth profile for the decode roofline (default dgx-spark)")
    what.add_argument("--bandwidth-gbs", type=_positive_float, metavar="GBS",
                      help="memory bandwidth in GB/s (overrides --hardware)")
    check = what.add_mutually_exclusive_group()
    check.add_argument("--require-correct-answers", action="store_true",
                       help="fail a model whose answers to the known-answer check are wrong "
                            "(exit 1), instead of showing its figures unranked")
    check.add_argument("--no-answer-check", action="store_true",
                       help="skip the known-answer check at warm-up (recorded in the report)")


def add_slo_options(p: argparse.ArgumentParser) -> None:
    """--slo and the bounds of the capacity search."""
    slo = p.add_argument_group("service levels and capacity")
    slo.add_argument("--slo", type=_slo_rules, metavar="RULES",
                     help=f"service levels, e.g. {SLO_EXAMPLE} (also itl_p99_ms, e2e_p99_s, "
                          "decode_tps>=N; no _pNN: every request): goodput in the throughput "
                          "tables, and a capacity search per model (docs/metrics.md)")
    slo.add_argument("--max-concurrency", type=_positive_int, metavar="N",
                     help="the capacity search's upper bound in streams (default 256)")
    slo.add_argument("--capacity-budget", type=_positive_float, metavar="SECONDS",
                     help="time the capacity search may take per model (default 900)")


def add_service_options(p: argparse.ArgumentParser) -> None:
    env = p.add_argument_group("where and how long")
    env.add_argument("--compose-file", type=Path, default=Path("docker-compose.yml"), metavar="PATH",
                     help="compose file with the model services (default docker-compose.yml)")
    env.add_argument("--port", type=_port, default=8000, help="port the services publish (default 8000)")
    env.add_argument("--health-timeout", type=_positive_float, default=1800.0, metavar="SECONDS",
                     help="wait this long for a model to load (default 1800: a first download)")
    env.add_argument("--pull", choices=PULL_POLICIES, default="missing",
                     help="pull a model's image before starting it: when it is missing (default), "
                          "always (get the registry's latest), or never (fail if it is missing)")
    env.add_argument("--pull-timeout", type=_positive_float, default=PULL_TIMEOUT_S,
                     metavar="SECONDS", help=f"give up a pull after this long (default "
                     f"{PULL_TIMEOUT_S:.0f}: 20 GB at 2 MB/s); apart from --health-timeout")
    env.add_argument("--request-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                     help="fail a request after this long without a byte (default 300)")
    env.add_argument("--max-failures", type=int, default=3, metavar="N",
                     help="failed requests a model may have before it is marked failed (default 3)")
    env.add_argument("--report-dir", type=Path, default=Path("docs/reports"), metavar="DIR",
                     help="where the .txt and .json reports go (default docs/reports)")
    env.add_argument("--parallel", action="store_true",
                     help="run models on different Docker hosts (docker_host: in the --models "
                          "file) at the same time, one at a time per host")


def add_campaign_options(p: argparse.ArgumentParser) -> None:
    """The options of a long campaign: the plan, a resume, the estimate."""
    g = p.add_argument_group("long campaigns")
    g.add_argument("--dry-run", action="store_true",
                   help="check the compose file, the services, Docker, the port, the report folder "
                        "and the baseline, print the plan, and start nothing")
    g.add_argument("--resume", type=Path, metavar="REPORT.json",
                   help="continue the interrupted (or killed) run of this report: what it measured "
                        "completely is kept and not run again, the rest runs, and its files are "
                        "updated in place; the options that decide the numbers must be the same")
    g.add_argument("--rerun-failed", action="store_true",
                   help="with --resume: also run again the models that failed")
    g.add_argument("--estimate-from", type=Path, metavar="REPORT.json",
                   help="estimate the time left also from this earlier report of the same models")


def add_output_options(p: argparse.ArgumentParser, run: bool) -> None:
    """The comparison and export options, shared by a run and `compare`."""
    defaults = ", ".join(f"{k}:{v:g}%%" for k, v in DEFAULT_THRESHOLDS_PCT.items())
    g = p.add_argument_group("compare with a baseline, export" if run else "thresholds and exports")
    if run:
        g.add_argument("--baseline", type=Path, metavar="FILE",
                       help="after the run, compare with this saved JSON report and print the "
                            "comparison; exit 3 when a metric regressed past its threshold "
                            "(the file is checked before any model starts)")
    g.add_argument("--threshold", type=_thresholds, metavar="RULES",
                   help=f"regression thresholds in percent, e.g. ttft_ms:10%%,tps:5%%, on top of "
                        f"the defaults {defaults}; METRIC:off stops judging one")
    g.add_argument("--markdown", metavar="FILE|-",
                   help="also write Markdown tables (for a PR comment or a wiki); - writes to stdout")
    if run:
        g.add_argument("--csv", metavar="FILE|-",
                       help="also write one CSV row per request (sample); - writes to stdout")
    g.add_argument("--html", metavar="FILE|-",
                   help="also write one self-contained HTML page with tables and charts "
                        "(needs matplotlib: pip install 'perftest-models[charts]')")
    g.add_argument("--charts", type=Path, metavar="DIR",
                   help="also write the charts as PNG files into DIR (needs matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="perftest_models.py", description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\n" + _model_help(MODELS)
        + f"\n\nhardware profiles for --hardware: {', '.join(HARDWARE_BANDWIDTH_GBS)}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{TOOL_NAME} {__version__}")
    add_selection_options(p)
    add_measure_options(p)
    add_slo_options(p)
    add_service_options(p)
    add_campaign_options(p)
    add_output_options(p, run=True)
    return p


def _compare_epilog() -> str:
    metrics = "\n".join(f"  {k:<15} {metric_label(k):<28} "
                        f"{'higher' if m.higher_is_better else 'lower'} is better"
                        for k, m in COMPARED_METRICS.items())
    return f"""\
verdicts:
  regressed, improved  past the metric's threshold, in its worse or better direction
  noise                past the threshold, but the 95% intervals of the two means
                       overlap: the change is within the runs' own spread
  unchanged            within the threshold
  not gated            the metric has no threshold (add one with --threshold)
  missing in baseline, missing in candidate
                       one report lacks the model, the scenario or the metric
  A side with a single run has no interval: the threshold alone decides, and the
  verdict says "(untested)".

metrics (for --threshold):
{metrics}

examples:
  perftest_models.py compare main.json pr.json
  perftest_models.py compare main.json pr.json --threshold ttft_ms:5%,tps:3%,ttfo_ms:off
  perftest_models.py compare main.json pr.json --markdown - > pr-comment.md
  perftest_models.py compare main.json pr.json --html compare.html

exit codes: 0 no regression, 2 usage error (a file that is not a report of this
            tool, or has another schema_version), 3 a metric regressed past its
            threshold (missing models or scenarios are reported, not failed).
"""


def build_compare_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="perftest_models.py compare",
                description="Compare two saved JSON reports of this tool: every model, scenario "
                            "and metric, both values (mean ± stddev), the change, and a verdict.",
                epilog=_compare_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline_report", type=Path, metavar="BASELINE.json",
                   help="the report to compare against (e.g. from the main branch)")
    p.add_argument("candidate_report", type=Path, metavar="CANDIDATE.json",
                   help="the report to judge")
    add_output_options(p, run=False)
    return p


def _history_epilog() -> str:
    return f"""\
A folder stands for every {REPORT_GLOB} in it. The reports are put in the
order they were started (oldest first), whatever order they are given in.

step changes:
  For every run k, the level of the {HISTORY_WINDOW} runs before k (their means' mean and
  interval; one run: its own) is judged against the level of the {HISTORY_WINDOW} runs from
  k on, as compare judges two reports: past the metric's threshold and with
  intervals that do not overlap, and with each of those runs past the
  threshold on its own, is a change. Neighbouring runs that qualify in
  the same direction are one step, placed where the change is largest. Its
  run is named with what differed in its environment record (image digest,
  vLLM version, command, GPU, host).

--fail-on-change:
  exit 3 while a regression stands: the newest level ({HISTORY_WINDOW} runs at most, none
  from before the last step) is worse than the level before the last step,
  past its threshold, however many runs ago it entered. Fixing it (a step
  back) or accepting it (leave the runs before it out of the history) ends it.

examples:
  perftest_models.py history docs/reports
  perftest_models.py history docs/reports --fail-on-change --markdown summary.md
  perftest_models.py history spark/ h100/ --by hardware
"""


def build_history_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="perftest_models.py history",
                description="Show saved JSON reports over time: per model, scenario and metric "
                            "the series of means with their intervals, the runs where a step "
                            "change entered, and regressions that still stand.",
                epilog=_history_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", type=Path, nargs="+", metavar="REPORT.json|DIR",
                   help="saved reports, or folders of them")
    p.add_argument("--by", choices=("run", "hardware"), default="run",
                   help="run: the series over time (default); hardware: the newest run on each "
                        "hardware side by side, with the share of each box's roofline")
    p.add_argument("--fail-on-change", action="store_true",
                   help="exit 3 while a regression past its threshold stands")
    p.add_argument("--last", type=_positive_int, default=12, metavar="N",
                   help="runs shown in the tables (default 12, the newest); all are judged")
    g = p.add_argument_group("thresholds and exports")
    defaults = ", ".join(f"{k}:{v:g}%%" for k, v in DEFAULT_THRESHOLDS_PCT.items())
    g.add_argument("--threshold", type=_thresholds, metavar="RULES",
                   help=f"step thresholds in percent on top of the defaults {defaults}")
    g.add_argument("--markdown", metavar="FILE|-", help="also write it as Markdown (- for stdout)")
    g.add_argument("--html", metavar="FILE|-",
                   help="also write one HTML page with the trend charts (needs matplotlib)")
    g.add_argument("--charts", type=Path, metavar="DIR",
                   help="also write the trend charts as PNG files into DIR (needs matplotlib)")
    return p


# --- The plan: the options checked into a Plan before anything starts ---------


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked before anything starts."""

    cfg: RunConfig
    models: tuple[ModelSpec, ...]
    table: tuple[ModelSpec, ...]
    compose: ComposeFile | None
    base_url: str
    report_dir: Path
    api_key: str | None = field(default=None, repr=False)
    baseline: Baseline | None = None
    exports: ExportTargets = ExportTargets()
    steps: tuple[CampaignStep, ...] = ()  # per model: what to run, what a resume keeps
    resume: Path | None = None  # --resume: the report continued (updated in place)
    resumed: Report | None = None
    history: Mapping[str, ModelTimes] = field(default_factory=dict)  # --estimate-from
    dry_run: bool = False
    hosting: Hosting = field(default_factory=lambda: Hosting())


@dataclass(frozen=True)
class Hosting:
    """Where the models of a Compose run live: each docker_host resolved, each
    compose file read, each hosted model's URL."""

    hosts: Mapping[str | None, DockerHost] = field(default_factory=dict)
    compose_files: Mapping[str, ComposeFile] = field(default_factory=dict)
    urls: Mapping[str, str] = field(default_factory=dict)

    def lanes(self, spec: ModelSpec) -> frozenset[str]:
        """The engines a model occupies (a context and its URL are one engine)."""
        return frozenset(self.hosts[r.docker_host].url or "local" for r in model_services(spec))


def plan_hosting(compose: ComposeFile, models: Sequence[ModelSpec], port: int,
                 parallel: bool = False, runner: Runner = subprocess.run) -> Hosting:
    """Resolve the hosts, read the compose files and check each service is in
    its file, and settle each model's URL (`url:`, else from its host) when
    any model names a host, or with --parallel: then every model of the run
    takes the per-host path (run_hosted_model), the local ones too."""
    per_host = parallel or any(is_hosted(m) for m in models)
    hosts: dict[str | None, DockerHost] = {None: DockerHost(None)}
    files: dict[str, ComposeFile] = {"": compose}
    urls: dict[str, str] = {}
    for m in models:
        for ref in model_services(m):
            if ref.docker_host not in hosts:
                hosts[ref.docker_host] = resolve_docker_host(ref.docker_host, runner)
            key = ref.compose_file or ""
            if key not in files:
                files[key] = load_compose_file(Path(key))
            check_services(files[key], [ModelSpec(m.name, ref.service, m.model_id, 2)])
        if not per_host:
            continue
        engines = {hosts[r.docker_host].url for r in model_services(m)}
        if m.url is None and len(engines) > 1:
            raise UsageError(f"model {m.name}: its services run on {len(engines)} Docker hosts: "
                             "give its 'url:' (where the server answers) in the models file")
        urls[m.name] = m.url or default_model_url(engines.pop(), port)
    return Hosting(hosts, files, urls)


def make_plan(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Plan:
    """Validate the options and files into a Plan; UsageError on anything wrong."""
    check_campaign_options(args)
    baseline, exports = check_output_options(args)  # first: a wrong --baseline costs nothing
    _uvloop(environ)  # a wrong PERFTEST_LOOP, too
    table = load_models_file(args.models, MODELS) if args.models else MODELS
    api_key = args.api_key or environ.get("VLLM_API_KEY") or environ.get("OPENAI_API_KEY") or None
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures} (see --help)")
    for flag, value in (("--max-concurrency", args.max_concurrency),
                        ("--capacity-budget", args.capacity_budget)):
        if value is not None and args.slo is None:
            raise UsageError(f"{flag} bounds the capacity search, which needs service levels: "
                             f"add --slo, e.g. --slo {SLO_EXAMPLE}")
    compose, hosting = None, Hosting()
    if args.endpoint is not None and args.parallel:
        raise UsageError("--parallel runs models on several Docker hosts; --endpoint is one "
                         "server: drop one of them")
    if args.endpoint is not None:  # an empty --endpoint "$URL" must not start containers
        base_url = check_endpoint_url(args.endpoint)
        models = discover_endpoint_models(base_url, table, api_key)
        models = select_models(models, args.skip, args.only, what="the server's models")
    else:
        base_url = f"http://127.0.0.1:{args.port}"
        models = select_models(table, args.skip, args.only, what="models")
        compose = load_compose_file(args.compose_file)
        check_services(compose, [m for m in models if not m.services])
        hosting = plan_hosting(compose, models, args.port, args.parallel)
    largest = max(m.max_context_tokens for m in models)
    for size in args.context_sizes:
        if size > largest:
            raise UsageError(f"context size {size} tokens fits no selected model (largest context: "
                             f"{largest} tokens): drop it from --context-sizes")
    hardware_bw = args.bandwidth_gbs or HARDWARE_BANDWIDTH_GBS[args.hardware]
    cfg = RunConfig(
        iterations=args.iterations, context_sizes=tuple(args.context_sizes),
        concurrency=tuple(args.concurrency), throughput_requests=args.throughput_requests,
        port=args.port, health_timeout_s=args.health_timeout,
        pull=args.pull, pull_timeout_s=args.pull_timeout,
        request_timeout_s=args.request_timeout, max_failed_samples=args.max_failures,
        answer_check=not args.no_answer_check, require_correct_answers=args.require_correct_answers,
        hardware="custom" if args.bandwidth_gbs else args.hardware, bandwidth_gbs=hardware_bw,
        compose_file=str(args.compose_file) if compose else None,
        endpoint=base_url if args.endpoint is not None else None,
        models=tuple(m.name for m in models), slo=args.slo,
        max_concurrency=args.max_concurrency or RunConfig.max_concurrency,
        capacity_budget_s=args.capacity_budget or RunConfig.capacity_budget_s,
        request_rates=tuple(args.request_rate), burstiness=args.burstiness,
        parallel=args.parallel)
    plan = Plan(cfg, tuple(models), tuple(table), compose, base_url, args.report_dir, api_key,
                baseline=baseline, exports=exports, hosting=hosting)
    return campaign_plan(plan, args)


def check_campaign_options(args: argparse.Namespace) -> None:
    if getattr(args, "rerun_failed", False) and getattr(args, "resume", None) is None:
        raise UsageError("--rerun-failed reruns the failed models of a report: add --resume REPORT.json")


def campaign_plan(plan: Plan, args: argparse.Namespace) -> Plan:
    """The campaign's steps; with --resume, what the report keeps, after
    checking that its configuration is this run's (UsageError listing the
    differences otherwise: nothing has started yet)."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    history: dict[str, ModelTimes] = {}
    if get("estimate_from") is not None:
        earlier = load_report(get("estimate_from"), "--estimate-from file")
        ids = {m.name: m.model_id for m in plan.models}
        history = {mr.spec.name: model_times(mr) for mr in earlier.models
                   if ids.get(mr.spec.name) == mr.spec.model_id}
    steps, resumed = plan_campaign(plan.cfg, plan.models), None
    if get("resume") is not None:
        resumed = load_report(get("resume"), "--resume file")
        diffs = config_differences(resumed, plan.cfg, plan.models)
        if diffs:
            raise UsageError(f"--resume {get('resume')}: this run's configuration differs from the "
                             f"report's, so its numbers could not be merged: {'; '.join(diffs)}. "
                             "Run with the report's options (see its \"config\")")
        steps = plan_resume(resumed, plan.cfg, plan.models, rerun_failed=bool(get("rerun_failed")))
    return dataclasses.replace(plan, steps=steps, resume=get("resume"), resumed=resumed,
                               history=history, dry_run=bool(get("dry_run")))


def check_output_options(args: argparse.Namespace) -> tuple[Baseline | None, ExportTargets]:
    """Check the baseline and the export targets before anything runs: the
    baseline is a report of this tool, export folders exist, at most one
    export takes stdout, and matplotlib is there when charts are wanted."""
    get = lambda name: getattr(args, name, None)  # noqa: E731 (tests build partial Namespaces)
    targets = ExportTargets(markdown=get("markdown"), csv=get("csv"), html=get("html"),
                            charts=get("charts"))
    on_stdout = [f"--{k}" for k in ("markdown", "csv", "html") if get(k) == "-"]
    if len(on_stdout) > 1:
        raise UsageError(f"{' and '.join(on_stdout)} both write to stdout (-): send one to a file")
    for key in ("markdown", "csv", "html"):
        dest = get(key)
        if dest in (None, "-"):
            continue
        path = Path(dest)
        if path.is_dir():
            raise UsageError(f"--{key} {dest} is a folder: give a file name, "
                             f"e.g. {path / ('results.' + key)}")
        if not path.parent.is_dir():
            raise UsageError(f"--{key} {dest}: folder {path.parent} does not exist: create it first")
    if targets.charts is not None and targets.charts.exists() and not targets.charts.is_dir():
        raise UsageError(f"--charts {targets.charts} is a file: give a folder for the PNG files")
    wants_charts = [flag for flag, value in (("--html", targets.html), ("--charts", targets.charts))
                    if value is not None]
    if wants_charts:
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"{' and '.join(wants_charts)} draw charts with matplotlib, which is not "
                             "installed: pip install 'perftest-models[charts]' (or pip install matplotlib)")
    baseline = None
    if get("baseline") is not None:
        path = Path(get("baseline"))
        baseline = Baseline(path, load_report(path, "--baseline file"),
                            effective_thresholds(get("threshold") or {}))
    elif get("threshold") is not None and hasattr(args, "baseline"):
        raise UsageError("--threshold judges the comparison with a baseline: add --baseline FILE")
    return baseline, targets


def select_models(models: Sequence[ModelSpec], skip: Sequence[str], only: Sequence[str],
                  what: str) -> list[ModelSpec]:
    names = [m.name for m in models]
    for name in [*skip, *only]:
        if name not in names:
            raise UsageError(f"unknown model {name!r}; {what}: {', '.join(names)}")
    chosen = [m for m in models if (not only or m.name in only) and m.name not in skip]
    if not chosen:
        raise UsageError("every model is skipped: nothing to test (check --skip/--only)")
    return chosen


def check_endpoint_url(url: str) -> str:
    from urllib.parse import urlsplit  # noqa: PLC0415

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError:  # "http://[::1", "http://host:99999"
        ok = False
    if not ok:
        raise UsageError(f"--endpoint {url!r} is not an http(s) URL: use e.g. http://127.0.0.1:8000")
    if parts.username or parts.password:  # it would be echoed in errors and the report
        raise UsageError("--endpoint must not carry a user or password: give the key with "
                         "--api-key or VLLM_API_KEY instead")
    return url.rstrip("/").removesuffix("/v1")


def discover_endpoint_models(base_url: str, table: Sequence[ModelSpec], api_key: str | None
                             ) -> list[ModelSpec]:
    """The models a running server lists; a table entry with the same model id
    lends its details (roofline, chat template options)."""
    import httpx  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10.0)
    except (httpx.InvalidURL, ValueError):  # control characters, lone surrogates
        raise UsageError(f"--endpoint {base_url!r} is not a valid URL: use e.g. "
                         "http://127.0.0.1:8000") from None
    except httpx.HTTPError as exc:
        raise UsageError(unreachable_message(base_url, exc)) from None
    listed = served_models(json_body(r))
    if r.status_code == 401:
        raise UsageError(f"{base_url} wants an API key: pass --api-key or set VLLM_API_KEY")
    if not listed:
        raise UsageError(f"{base_url}/v1/models answered HTTP {r.status_code} without a model list: "
                         "is this an OpenAI-compatible server?")
    by_id: dict[str, ModelSpec] = {}
    for m in table:
        if m.model_id in by_id:
            raise UsageError(f"models {by_id[m.model_id].name} and {m.name} share the model id "
                             f"{m.model_id!r}: with --endpoint a served model must match one "
                             "entry; keep one of them in the --models file")
        by_id[m.model_id] = m
    out = []
    for entry in listed:
        known = by_id.get(entry["id"])
        if known:
            out.append(dataclasses.replace(known, service=None))
        else:
            size = served_context(entry) or 32768  # vLLM's max_model_len, llama.cpp's meta.n_ctx
            out.append(ModelSpec(name=entry["id"], service=None, model_id=entry["id"],
                                 max_context_tokens=size))
    return out


def unreachable_message(base_url: str, exc: BaseException) -> str:
    """Why a server could not be reached, with the real reason: a TLS
    certificate that failed verification says so, and how to trust it."""
    why = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in why or "certificate verify failed" in why:
        return (f"cannot reach {base_url}: TLS certificate verify failed ({why}): if you trust "
                "this server, point SSL_CERT_FILE at its certificate or CA bundle "
                "(SSL_CERT_FILE=/path/to/ca.pem)")
    return f"cannot reach {base_url} ({type(exc).__name__}: {why}): is the server running?"


def dry_run(plan: Plan, err: Any) -> int:
    """--dry-run: every check a run makes before its first model, then the
    plan; nothing is started and no request is sent."""
    checked = ["options"]
    if plan.compose is not None:
        compose = Compose(plan.compose, find_compose_command())
        client = docker_client()
        checked += [f"compose file {plan.compose.path} ({compose.version_label})",
                    f"services {', '.join(m.service or '-' for m in plan.models)}", "Docker"]
        port = plan.cfg.port
        if port_in_use(port):
            holder = who_holds_port(port, client, plan.compose.project, inference_services(plan))
            if holder.kind != "inference":
                raise SetupError(f"port {port} is already in use by {holder.description}: stop it, "
                                 "or publish the services on another port and pass --port")
            checked.append(f"port {port} (held by {holder.description}: a run stops it)")
        else:
            checked.append(f"port {port} (free)")
    else:
        checked.append(f"endpoint {plan.base_url}")
    folder = plan.resume.parent if plan.resume is not None else plan.report_dir
    prepare_report_dir(folder)
    checked.append(f"report folder {folder}")
    if plan.baseline is not None:
        checked.append(f"baseline {plan.baseline.path}")
    err.write(format_plan(plan.steps, plan.cfg, managed=plan.compose is not None,
                          resumed_from=str(plan.resume) if plan.resume else None))
    err.write(f"dry run: checked {', '.join(checked)}; nothing started\n")
    return 0


# --- One model's run: its image, start, measure, always stop ------------------


def _last_log_line(watch: DockerWatch) -> Callable[[], str | None]:
    def read() -> str | None:
        with contextlib.suppress(Exception):
            tail = watch.log_tail(1)
            return tail[-1] if tail else None
        return None
    return read


def inference_services(plan: Plan) -> list[str]:
    """The compose file's services that run a model of the table: the only
    containers the tool ever stops."""
    services = plan.compose.services if plan.compose else {}
    return [m.service for m in plan.table if m.service and m.service in services]


def ensure_image(plan: Plan, compose: Compose, docker: Any, result: ModelResult,
                 events: Events, *, service: str | None = None,
                 host: DockerHost | None = None) -> PullRecord | None:
    """The image step before `up`, by --pull, on the engine `docker` that
    will run `service` (default: the model's; `host` None: the local engine):
    pull a missing image (or any, with `always`) with progress; with `never`,
    a missing image fails the model. Recorded in `lifecycle.pull`, apart from
    the load; for a model of several services, the last one's."""
    name, policy = result.spec.name, plan.cfg.pull or "missing"
    image = service_image(compose.config(), service or result.spec.service or "")
    if image is None:  # built by Compose, or no image: nothing to pull
        return None
    remote = host is not None and host.url is not None
    present = image_present(docker, image)
    if present and policy != "always":
        record = PullRecord(image, policy, skipped=True)
    elif policy == "never":
        raise ModelFailed(f"image {image} is not on {host.label if remote else 'this machine'} "
                          "and --pull never forbids pulling it: pull it by hand, or use "
                          "--pull missing")
    else:
        events.info(f"{name}: pulling {image}" + (f" on {host.label}" if remote else ""))
        try:
            done = pull_image(image, plan.cfg.pull_timeout_s or PULL_TIMEOUT_S,
                              lambda p: events.pulling(name, p),
                              connect=lambda timeout_s: _pull_client(timeout_s, host))
        except PullFailed as exc:  # how far it got is recorded too
            result.lifecycle = dataclasses.replace(result.lifecycle, pull=PullRecord(
                image, policy, skipped=False, pull_s=round(exc.progress.elapsed_s, 2),
                bytes=exc.progress.bytes_done, layers=exc.progress.layers))
            raise
        record = PullRecord(image, policy, skipped=False, pull_s=round(done.elapsed_s, 2),
                            bytes=done.bytes_done, layers=done.layers)
        events.info(f"{name}: pulled {fmt_bytes(done.bytes_done)} in "
                    f"{fmt_took(done.elapsed_s)} ({done.layers} layers)")
    result.lifecycle = dataclasses.replace(result.lifecycle, pull=record)
    return record


async def measure_model(plan: Plan, result: ModelResult, events: Events, *,
                        service: RunningService | None = None, clock: Clock = time.perf_counter,
                        sleep: Sleep = asyncio.sleep) -> None:
    """Wait for the server (when we started it: `service`, on the same
    `clock`), then benchmark the model; every wait goes through `sleep`."""
    cfg = plan.cfg
    streams = client_streams(cfg)
    watch = service.watch if service else None
    async with http_client(plan.base_url, plan.api_key, cfg.request_timeout_s, streams) as client:
        check_alive = watch.check_alive if watch else None
        if service is not None and watch is not None:
            await wait_until_ready(client, result.spec, cfg.health_timeout_s, events,
                                   check_alive=check_alive, last_log=_last_log_line(watch),
                                   clock=clock, sleep=sleep)
            load_s = clock() - service.started_s
            result.lifecycle = dataclasses.replace(result.lifecycle, load_s=round(load_s, 2))
            events.info(f"{result.spec.name}: healthy after {load_s:.1f} s")
            record_load_facts(result, watch)
        events.phase(result.spec.name, "measure")
        nvml = Nvml.open()
        with GpuSampler(nvml) as gpu:
            try:
                await watch_live_reads(events, benchmark_model(client, result, cfg, events,
                                                               check_alive=check_alive,
                                                               clock=clock, sleep=sleep, gpu=gpu))
            except ModelFailed:
                if check_alive is not None:  # a dead container is the real reason: say it
                    await asyncio.to_thread(check_alive)
                raise
            finally:
                tokens = sum(s.tokens_out or 0 for sr in result.scenarios for s in sr.samples if s.ok)
                if (summary := gpu_summary(gpu.readings, tokens)) is not None:
                    result.lifecycle = dataclasses.replace(result.lifecycle, power=summary)
                if nvml is not None:
                    nvml.close()


def record_memory(result: ModelResult, memory: MemoryWatch, events: Events) -> None:
    """Memory before, at the peak and after the stop into `lifecycle.memory`;
    a warning naming the model when it was not given back."""
    record = memory.finish()
    if record is None:
        return
    result.lifecycle = dataclasses.replace(result.lifecycle, memory=record)
    if not record.given_back:
        events.info(f"warning: {result.spec.name}: {fmt_bytes(record.not_given_back_bytes)} of "
                    f"{record.kind} memory not given back after its stop (available "
                    f"{fmt_bytes(record.available_before_bytes)} before the start, "
                    f"{fmt_bytes(record.available_after_bytes)} after): a process or shared "
                    "memory left behind may make the next model fail; check `docker ps -a`, "
                    "`nvidia-smi` and /dev/shm")


def record_load_facts(result: ModelResult, watch: DockerWatch) -> None:
    """What vLLM said while loading (its container's log, read once it is
    healthy) into `lifecycle.vllm_load`; absent when it said nothing known."""
    try:
        lines = watch.log_lines(LOAD_LOG_LINES)
    except Exception:  # the SDK raises several types; the facts are a bonus
        return
    facts = parse_vllm_load_log(lines)
    if facts != LoadFacts():
        result.lifecycle = dataclasses.replace(result.lifecycle, vllm_load=facts)


def run_model(plan: Plan, result: ModelResult, events: Events,
              services: ServiceLifecycle | None, *, sleep: Sleep = asyncio.sleep) -> None:
    """One model's whole life: its image, start, measure, and always stop what
    we started (on the lifecycle's clock; every wait of the measurement
    through `sleep`); memory before the start and after the stop."""
    if services is None:
        run_async(measure_model(plan, result, events, sleep=sleep))
        return
    if result.spec.name in plan.hosting.urls:  # a run over named hosts: every model's path
        run_hosted_model(plan, result, events, services.compose.command, hold=services.hold,
                         clock=services.clock, sleep=sleep)
        return
    assert result.spec.service is not None
    docker = DockerWatch(services.compose.file.project, result.spec.service, services.docker).client
    ensure_image(plan, services.compose, docker, result, events)  # its own step and budget
    nvml = Nvml.open()
    memory = MemoryWatch(lambda: read_memory(nvml))
    memory.start()  # the baseline, before the model takes any
    events.phase(result.spec.name, "load")
    try:
        with services.running(result.spec.name, result.spec.service) as service:
            result.lifecycle = dataclasses.replace(service.lifecycle, pull=result.lifecycle.pull)
            try:
                run_async(measure_model(plan, result, events, service=service,
                                        clock=services.clock, sleep=sleep))
            finally:
                events.phase(result.spec.name, "stop")  # the lifecycle stops it on the way out
    finally:
        with services.hold():
            record_memory(result, memory, events)  # warns before the next model starts
            if nvml is not None:
                nvml.close()


def run_recorded(mr: ModelResult, events: Events, run: Callable[[], None], *,
                 internal_errors: bool = False) -> None:
    """Run one model, its status and failure recorded in `mr`: a failed model
    is data and the campaign goes on. `internal_errors`: a bug fails the model
    too (in a thread of --parallel); otherwise it ends the run with its traceback."""
    mr.status = "running"
    events.info(f"=== {mr.spec.name} ({mr.spec.model_id})")
    try:
        run()
        mr.status = "ok"
    except (ModelFailed, SetupError) as exc:
        mr.status, mr.error = "failed", str(exc)
        mr.failure = exc.details if isinstance(exc, ModelFailed) else None
    except Exception as exc:
        if not internal_errors:
            raise
        mr.status, mr.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
    if mr.status == "failed":
        events.info(f"{mr.spec.name}: FAILED: {mr.error}")
    events.phase(mr.spec.name, "done")


# --- Models on named Docker hosts, and --parallel -----------------------------


def _compose_step(p: Placement, step: Callable[..., Any], *args: Any) -> Any:
    """One Compose call of a hosted model: its failure fails the model, named."""
    try:
        return step(*args)
    except SetupError as exc:
        raise ModelFailed(str(exc), Failure(service=p.ref.service, docker_host=p.host.label)
                          ) from None


def place_services(plan: Plan, spec: ModelSpec, command: Sequence[str]) -> list[Placement]:
    """A hosted model's services, each with its Compose and watch on its own host."""
    out = []
    for ref in model_services(spec):
        host = plan.hosting.hosts[ref.docker_host]
        compose = HostCompose(plan.hosting.compose_files[ref.compose_file or ""], command, host)
        try:
            client = host_client(host)
        except ModelFailed as exc:
            raise ModelFailed(f"{exc} (service {ref.service})", dataclasses.replace(
                exc.details or Failure(), service=ref.service)) from None
        out.append(Placement(ref, host, compose, DockerWatch(compose.file.project, ref.service,
                                                             client)))
    return out


def start_services(result: ModelResult, url: str, placed: Sequence[Placement], events: Events,
                   started: list[Placement]) -> None:
    """Start the services in order, each running before the next starts;
    `started` grows before each `up`, so the caller stops exactly those."""
    from urllib.parse import urlsplit  # noqa: PLC0415

    name = result.spec.name
    for p in placed:  # one of ours left running (an earlier run killed): stop it first
        if _compose_step(p, p.compose.running, [p.ref.service]):
            events.info(f"{name}: {p.ref.service} already runs on {p.host.label}: stopping it")
            _compose_step(p, p.compose.stop, [p.ref.service])
    parts = urlsplit(url)
    if port_in_use(parts.port or (443 if parts.scheme == "https" else 80), parts.hostname or ""):
        raise ModelFailed(f"{url} already answers before {name}'s services started: something "
                          "else serves there; stop it, or give the model another url: (or --port)")
    for p in placed:
        events.info(f"{name}: starting {p.ref.service} on {p.host.label}")
        started.append(p)
        _compose_step(p, p.compose.up, p.ref.service)
        wait_running(p)
    with contextlib.suppress(Exception):  # the server's image and command: the last service's
        result.lifecycle = dataclasses.replace(placed[-1].watch.image(),
                                               pull=result.lifecycle.pull)
    record_hosts(result, url, placed)


def record_hosts(result: ModelResult, url: str, placed: Sequence[Placement]) -> None:
    """The report's record of where a model ran: each service's host and that
    engine's machine, one hardware profile for the model, its url."""
    hosts = []
    for p in placed:
        hw = None
        with contextlib.suppress(Exception):
            hw = engine_hardware(p.watch.client)
        hosts.append(HostRecord(p.ref.service, p.host.label, hw))
    profiles = [h.hardware.profile for h in hosts if h.hardware]
    result.lifecycle = dataclasses.replace(
        result.lifecycle, hosts=tuple(hosts), url=url,
        services=tuple(p.ref.service for p in placed),
        docker_host=" + ".join(dict.fromkeys(h.docker_host for h in hosts)),
        hardware=" + ".join(dict.fromkeys(profiles)) or None)


def stop_services(name: str, started: Sequence[Placement], events: Events) -> None:
    """Stop in reverse order whatever was started; a host that went away is named."""
    for p in reversed(started):
        try:
            p.compose.stop([p.ref.service])
            events.info(f"{name}: stopped {p.ref.service} on {p.host.label}")
        except PerftestError as exc:
            events.info(f"{name}: could not stop {p.ref.service}: {exc}")


async def measure_watched(plan: Plan, result: ModelResult, events: Events,
                          service: RunningService, *, clock: Clock, sleep: Sleep,
                          every_s: float = 2.0) -> None:
    """measure_model, with every service of the model checked every `every_s`
    seconds besides: a worker that dies, or a host that goes away, fails the
    model at once even while its server still answers."""
    task = asyncio.ensure_future(measure_model(plan, result, events, service=service,
                                               clock=clock, sleep=sleep))
    while not task.done():
        await asyncio.wait({task}, timeout=every_s)
        if task.done():
            break
        try:
            await asyncio.to_thread(service.watch.check_alive)
        except ModelFailed:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ModelFailed):
                await task
            raise
    task.result()


def run_hosted_model(plan: Plan, result: ModelResult, events: Events, command: Sequence[str], *,
                     hold: Callable[[], contextlib.AbstractContextManager[Any]],
                     clock: Clock = time.perf_counter, sleep: Sleep = asyncio.sleep) -> None:
    """A model whose services live on named Docker hosts: start them in order,
    measure at its url, and always stop them in reverse order (under `hold`)."""
    url = plan.hosting.urls[result.spec.name]
    started: list[Placement] = []
    events.phase(result.spec.name, "load")  # the campaign's clock: pulls and starts are the load
    try:
        placed = place_services(plan, result.spec, command)
        for p in placed:  # each image on its own engine, before any `up`
            ensure_image(plan, p.compose, p.watch.client, result, events, service=p.ref.service,
                         host=p.host)
        started_s = clock()  # the load time runs from the first `up` to healthy
        start_services(result, url, placed, events, started)
        group = GroupWatch(started)
        running = RunningService(" + ".join(p.ref.service for p in placed), group,  # type: ignore[arg-type]
                                 started_s, result.lifecycle)
        run_async(measure_watched(dataclasses.replace(plan, base_url=url), result, events,
                                  running, clock=clock, sleep=sleep))
    finally:
        events.phase(result.spec.name, "stop")
        with hold():
            stop_services(result.spec.name, started, events)


def startable(lanes: Sequence[frozenset[str]], busy: Iterable[str]) -> list[int]:
    """Which waiting models may start now (positions in `lanes`, in order):
    those whose engines are all free, one model per engine at a time."""
    taken = set(busy)
    chosen = []
    for i, need in enumerate(lanes):
        if not need & taken:
            chosen.append(i)
            taken |= need
    return chosen


class LinePrefixer:
    """One model's progress stream in --parallel: whole lines only, each
    prefixed with the model's name, written under a lock all models share."""

    def __init__(self, err: Any, prefix: str, lock: threading.Lock):
        self.err, self.prefix, self.lock, self.buf = err, prefix, lock, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        if lines:
            with self.lock:
                self.err.write("".join(f"{self.prefix}{line}\n" for line in lines))
                self.err.flush()
        return len(text)

    def flush(self) -> None: ...


def run_one_model(plan: Plan, mr: ModelResult, events: Events, command: Sequence[str]) -> None:
    """One model of a --parallel run, in its own thread; failures are recorded,
    a bug too (it must not leave the other models waiting forever). Signals
    reach the main thread only, which stops every model's services itself."""
    run_recorded(mr, events, lambda: run_hosted_model(plan, mr, events, command,
                                                      hold=contextlib.nullcontext),
                 internal_errors=True)


def stop_all_services(plan: Plan, models: Sequence[ModelResult], command: Sequence[str],
                      events: Events) -> None:
    """After an interrupt in --parallel: stop the services of every running
    model on every host still reachable (their threads then fail and end)."""
    for mr in models:
        for ref in reversed(model_services(mr.spec)):
            host = plan.hosting.hosts[ref.docker_host]
            file = plan.hosting.compose_files[ref.compose_file or ""]
            with contextlib.suppress(PerftestError):
                HostCompose(file, command, host).stop([ref.service])
                events.info(f"{mr.spec.name}: stopped {ref.service} on {host.label}")


def run_in_parallel(plan: Plan, report: Report, err: Any, services: ServiceLifecycle | None,
                    save: Callable[[], Any], signals: SignalGuard, campaign: ParallelProgress,
                    every_s: float = 60.0) -> None:
    """--parallel: models on different engines at the same time, one at a
    time per engine, each in a thread; the main thread schedules them and,
    every `every_s` and as each model ends, says how far the campaign is.
    Every model of such a run takes the per-host path (plan_hosting)."""
    assert services is not None  # --parallel needs Compose (make_plan)
    command = services.compose.command
    import queue  # noqa: PLC0415

    steps, lanes = campaign.steps, campaign.lanes
    last_said = time.monotonic()
    lock, save_lock = threading.Lock(), threading.Lock()
    done: queue.Queue[int] = queue.Queue()

    def save_safely() -> None:  # from any model's thread
        with save_lock:
            for _ in range(5):  # another thread may grow a list while it is dumped
                with contextlib.suppress(RuntimeError):
                    save()
                    return

    kept = {i for i, step in enumerate(steps) if step.keep_whole}  # a resume keeps them as measured
    pending, running = [i for i in range(len(report.models)) if i not in kept], {}
    try:
        while pending or running:
            busy = set().union(*(lanes[i] for i in running))
            for i in [pending[pos] for pos in startable([lanes[i] for i in pending], busy)]:
                pending.remove(i)
                mr = report.models[i]
                events = ConsoleEvents(LinePrefixer(err, f"{mr.spec.name} | ", lock), False,
                                       on_scenario=save_safely, progress=campaign.models[i])
                t = threading.Thread(target=lambda m=mr, e=events, j=i: (
                    run_one_model(plan, m, e, command), done.put(j)), daemon=True)
                running[i] = t
                t.start()
            with contextlib.suppress(queue.Empty):
                running.pop(done.get(timeout=0.5)).join()
                save_safely()
                last_said = 0.0  # a model ended: say where the campaign is now
            if (pending or running) and time.monotonic() - last_said >= every_s:
                with lock:
                    err.write(campaign.line(running) + "\n")
                last_said = time.monotonic()
    except (KeyboardInterrupt, Interrupted):
        cut = [report.models[i] for i in running]
        with signals.held():
            stop_all_services(plan, cut, command, ConsoleEvents(err, False))
            for t in running.values():
                t.join(60)
        for mr in cut:
            mr.status = "running"  # run_benchmark marks it interrupted
        raise


# --- The run: every model in turn, the report, the exit code ------------------


def start_report(plan: Plan, err: Any) -> tuple[Report, ReportFiles]:
    """The report a run fills in, and its files: a new one, or with --resume
    the report continued, its kept models as measured, under its own names."""
    started = _now()
    environment = collect_environment()
    part = RunPart(started.isoformat(), environment=environment)
    if plan.resumed is None or plan.resume is None:
        report_dir = prepare_report_dir(plan.report_dir)
        report = Report(plan.cfg, started.isoformat(), [ModelResult(m) for m in plan.models],
                        environment=environment, parts=[part])
        first = json.dumps(report_to_dict(report), indent=1) + "\n"  # the reserved name holds it
        return report, ReportFiles(report_dir, reserve_stem(report_dir, report_stem(started), first),
                                   err)
    old = plan.resumed
    parts = list(old.parts) or [RunPart(old.started_at, old.finished_at, old.interrupted,
                                        old.environment, first_part_models(old))]
    report = Report(old.config, old.started_at, [resumed_result(step) for step in plan.steps],
                    environment=old.environment, parts=[*parts, part])
    folder = prepare_report_dir(plan.resume.parent)
    return report, ReportFiles(folder, plan.resume.name.removesuffix(".json"), err)


def first_part_models(old: Report) -> dict[str, PartModel]:
    """A report written before parts were recorded: its one part ran every
    model it holds (the scenarios plan_resume keeps are the complete ones)."""
    out = {}
    for mr in old.models:
        out[mr.spec.name] = PartModel(tuple(sr.scenario.name for sr in mr.scenarios),
                                      *served_by(mr), mr.lifecycle.load_s)
    return out


def record_part(report: Report, progress: CampaignProgress | ParallelProgress,
                finished_at: str | None = None) -> Report:
    """Bring the report's last part (this run's) up to date; returns the report."""
    part = report.parts[-1]
    report.parts[-1] = dataclasses.replace(part, models=progress.part_models(),
                                           finished_at=finished_at, interrupted=report.interrupted)
    return report


def managed_services(plan: Plan, report: Report, events: ConsoleEvents,
                     signals: SignalGuard) -> ServiceLifecycle | None:
    """The Compose services' lifecycle (None for --endpoint), with the
    Compose version recorded in the report's environment."""
    if plan.compose is None:
        return None
    compose = Compose(plan.compose, find_compose_command())
    docker_client()  # a clear error now if the daemon is down
    events.info(f"using {compose.version_label} with {plan.compose.path}")
    if report.environment.compose is None:  # a resumed report keeps its first part's
        report.environment = dataclasses.replace(report.environment, compose=compose.version_label)
    report.parts[-1] = dataclasses.replace(report.parts[-1], environment=dataclasses.replace(
        report.parts[-1].environment, compose=compose.version_label))
    return ServiceLifecycle(compose, inference_services(plan), plan.cfg.port, events.info,
                            hold=signals.held)


def run_models_in_turn(plan: Plan, report: Report, progress: CampaignProgress,
                       events: ConsoleEvents, services: ServiceLifecycle | None,
                       save: Callable[[], object]) -> None:
    """Each model not kept whole by a resume, one after the other; a failed
    model is recorded and the run goes on; the report is saved after each."""
    for i, mr in enumerate(report.models):
        if progress.steps[i].keep_whole:
            continue
        events.model_started(i, mr.spec)
        run_recorded(mr, events, lambda m=mr: run_model(plan, m, events, services))
        save()


def mark_interrupted(report: Report, exc: BaseException) -> int:
    """Record a signal in the report: the running model interrupted, those
    not started skipped; its exit code."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    report.interrupted = signal.Signals(signum).name
    for mr in report.models:
        if mr.status == "running":
            mr.status, mr.error = "interrupted", f"interrupted by {report.interrupted}"
        elif mr.status == "pending":
            mr.status = "skipped"
    return interrupted_exit_code(exc)


def write_final_report(report: Report, progress: CampaignProgress | ParallelProgress,
                       files: ReportFiles,
                       winners: Sequence[ScenarioWinners], out: Any, err: Any, *,
                       styled: bool) -> None:
    """The finished report: the JSON and the text files, the results on
    `out` (and the JSON itself when no file could be written), where it went on `err`."""
    report.finished_at = _now().isoformat()
    progress.close()
    record_part(report, progress, finished_at=report.finished_at)
    plain = format_results(report, styled=False, winners=winners)
    saved = files.save_json(report) & files.save_text(plain)
    out.write(format_results(report, styled=True, winners=winners) if styled else plain)
    if not saved:
        out.write("\n" + json.dumps(report_to_dict(report), indent=1) + "\n")
    out.flush()
    where = f"{files.txt_path} and {files.json_path}" if saved else "stdout only"
    err.write(f"report: {where}\n")


def run_benchmark(plan: Plan, out: Any, err: Any, *, styled: bool = False,
                  err_tty: bool = False) -> int:
    """The main job: every selected model in turn; exit OK, FAILED, REGRESSION,
    INTERRUPTED or TERMINATED (ExitCode)."""
    out, stdout = (err, out) if plan.exports.to_stdout else (out, out)  # '-' export owns stdout
    ensure_descriptors(max(plan.cfg.concurrency, default=1))
    report, files = start_report(plan, err)
    progress = CampaignProgress(plan.steps or plan_campaign(plan.cfg, plan.models), report,
                                managed=plan.compose is not None, history=plan.history)
    # --parallel: each model's own progress (its thread's events), merged for the report
    parts: CampaignProgress | ParallelProgress = ParallelProgress(
        progress.steps, report, [plan.hosting.lanes(mr.spec) for mr in report.models],
        plan.history) if plan.cfg.parallel else progress
    save = lambda: files.save_json(record_part(report, parts))  # noqa: E731
    events = ConsoleEvents(err, err_tty, on_scenario=save, progress=progress)
    signals = SignalGuard()
    services = managed_services(plan, report, events, signals)
    err.write(format_plan(progress.steps, plan.cfg, managed=plan.compose is not None,
                          resumed_from=str(plan.resume) if plan.resume else None))
    code: int = ExitCode.OK
    signals.install()
    try:
        if plan.cfg.parallel:
            run_in_parallel(plan, report, err, services, save, signals, parts)  # type: ignore[arg-type]
        else:
            run_models_in_turn(plan, report, progress, events, services, save)
        code = ExitCode.FAILED if any(m.status == "failed" for m in report.models) else ExitCode.OK
    except (KeyboardInterrupt, Interrupted) as exc:
        code = mark_interrupted(report, exc)
    finally:
        winners: Sequence[ScenarioWinners] | None = None  # ranked once the run is over
        try:
            with signals.held():
                winners = rank_scenarios(report.models)  # once, for every output
                write_final_report(report, parts, files, winners, out, err, styled=styled)
        except (KeyboardInterrupt, Interrupted) as exc:
            # A signal held back while the report was written: the report is
            # complete, so exit as interrupted (a first signal's code stands).
            if not report.interrupted:
                code = interrupted_exit_code(exc)
        finally:
            signals.restore()
    return finish_run(plan, report, code, out=out, stdout=stdout, err=err, styled=styled,
                      winners=winners)


def regression_gate(comparison: Comparison, code: int, err: Any, prefix: str) -> int:
    """The regression exit of both compare and --baseline: past a threshold,
    one stderr line names each regression and the exit is REGRESSION, unless
    an earlier code stands (a failed model, an interrupt)."""
    if not comparison.regressions:
        return code
    err.write(f"{prefix}{shown(regression_message(comparison))}\n")  # names from a file
    return code or ExitCode.REGRESSION


def finish_run(plan: Plan, report: Report, code: int, *, out: Any, stdout: Any, err: Any,
               styled: bool = False, winners: Sequence[ScenarioWinners] | None = None) -> int:
    """After the reports are saved: compare with --baseline (the table goes to
    `out`), then write the exports. A regression turns exit 0 into 3; a failed
    model (1) or an interrupt (130, 143) keeps its code."""
    comparison, labels = None, None
    if plan.baseline is not None:
        comparison = compare_reports(plan.baseline.report, report, plan.baseline.thresholds_pct)
        labels = (report_label(str(plan.baseline.path), plan.baseline.report),
                  report_label("this run", report))
        out.write("\n" + format_comparison(comparison, labels, styled=styled))
        out.flush()
    try:
        write_exports(plan.exports, report, stdout, err, comparison=comparison, labels=labels,
                      baseline=plan.baseline.report if plan.baseline else None, winners=winners)
    except PerftestError as exc:
        err.write(f"warning: {exc}; the JSON report holds every result\n")
    if comparison is None:
        return code
    return regression_gate(comparison, code, err, f"{TOOL_NAME}: ")


# --- main, compare and history ------------------------------------------------


def history_files(paths: Sequence[Path]) -> list[Path]:
    """The report files: each file as given, each folder's saved reports."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob(REPORT_GLOB))
            if not found:
                raise UsageError(f"{path} holds no {REPORT_GLOB}: give report files or the "
                                 "folder the runs saved them in (--report-dir)")
            files.extend(found)
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def load_history(paths: Sequence[Path]) -> list[HistoryRun]:
    runs = [HistoryRun(p.name, load_report(p)) for p in history_files(paths)]
    return sorted(runs, key=lambda r: r.report.started_at)


def history_main(argv: Sequence[str], out: Any, err: Any) -> int:
    """history REPORT.json... | DIR: the trends on stdout (or the export named
    '-'); exit REGRESSION with --fail-on-change while one stands."""
    args = build_history_parser().parse_args(list(argv))
    _, exports = check_output_options(args)
    runs = load_history(args.reports)
    history = build_history(runs, effective_thresholds(args.threshold or {}))
    text_out = err if exports.to_stdout else out
    styled = text_out.isatty() and not os.environ.get("NO_COLOR")
    text_out.write(format_hardware(runs, styled) if args.by == "hardware"
                   else format_history(history, args.last, styled))
    text_out.flush()
    charts: dict[str, bytes] = {}

    def get_charts() -> dict[str, bytes]:
        if not charts:
            charts.update({f"{c.name}.png": figure_png(draw_chart(c)) for c in history_charts(history)})
        return charts

    emit_exports(exports, {"markdown": lambda: format_history_markdown(history, args.last),
                           "html": lambda: format_history_html(history, get_charts(), args.last)},
                 get_charts, out, err)
    if args.fail_on_change and history.standing:
        worst = "; ".join(f"{t.model} {t.scenario} {t.metric} {fmt_change(t.standing.change_pct)}"
                          for t in history.standing if t.standing)
        err.write(f"{TOOL_NAME}: error: {one_line(f'a regression stands: {worst}')}\n")
        return ExitCode.REGRESSION
    return ExitCode.OK


def compare_main(argv: Sequence[str], out: Any, err: Any) -> int:
    """compare BASELINE CANDIDATE: a table per scenario on stdout (or the
    export named '-'); exit OK, or REGRESSION past a threshold."""
    args = build_compare_parser().parse_args(list(argv))
    _, exports = check_output_options(args)
    baseline = load_report(args.baseline_report, "baseline")
    candidate = load_report(args.candidate_report, "candidate")
    comparison = compare_reports(baseline, candidate, effective_thresholds(args.threshold or {}))
    labels = (report_label(str(args.baseline_report), baseline),
              report_label(str(args.candidate_report), candidate))
    text_out = err if exports.to_stdout else out
    styled = text_out.isatty() and not os.environ.get("NO_COLOR")
    text_out.write(format_comparison(comparison, labels, styled=styled))
    text_out.flush()
    write_exports(exports, candidate, out, err, comparison=comparison, labels=labels,
                  baseline=baseline, compare_only=True)
    return regression_gate(comparison, ExitCode.OK, err, f"{TOOL_NAME}: error: ")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, plan, run; every PerftestError becomes its one-line message and exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    out, err = ClosedPipeSafe(sys.stdout), sys.stderr
    try:
        if args_list[:1] == ["compare"]:
            return compare_main(args_list[1:], out, err)
        if args_list[:1] == ["history"]:
            return history_main(args_list[1:], out, err)
        plan = make_plan(build_parser().parse_args(args_list))
        if plan.dry_run:
            return dry_run(plan, err)
        styled = out.isatty() and not os.environ.get("NO_COLOR")
        return run_benchmark(plan, out, err, styled=styled, err_tty=err.isatty())
    except PerftestError as exc:
        err.write(f"perftest-models: error: {one_line(str(exc))}\n")
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted) as exc:  # before the run started, or a second signal
        err.write("perftest-models: interrupted\n")
        return interrupted_exit_code(exc)


if __name__ == "__main__":
    raise SystemExit(main())
