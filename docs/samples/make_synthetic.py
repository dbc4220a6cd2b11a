#!/usr/bin/env python3
"""Write docs/samples/baseline.json and candidate.json: SYNTHETIC reports.

The numbers are made up (seeded, so the files are reproducible) to show every
output of the tool on two models and every kind of scenario; they are not a
measurement of any model or GPU. The candidate differs from the baseline on
purpose: a slower prefill for one model at long context, a faster decode for
the other, a throughput drop, and noise.

    python3 docs/samples/make_synthetic.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import perftest_models as pm  # noqa: E402

CONTEXT_SIZES = (1000, 8000, 16000, 32000)
LEVELS = (1, 4, 16)


def dense(tokens_in: int) -> tuple[float, float]:
    """(TTFT ms, decode tok/s) of the made-up dense model."""
    return 150 + 0.5 * tokens_in + 1e-6 * tokens_in**2, 6.4 * (1 - tokens_in / 250_000)


def moe(tokens_in: int) -> tuple[float, float]:
    return 80 + 0.125 * tokens_in + 2e-6 * tokens_in**2, 47.0 * (1 - tokens_in / 150_000)


def sample(rng: random.Random, tokens_in: int, tokens_out: int, ttft_ms: float, tps: float,
           jitter: float) -> pm.Sample:
    ttft_ms *= 1 + rng.gauss(0, jitter)
    tps *= 1 + rng.gauss(0, jitter / 3)
    total_s = ttft_ms / 1000 + (tokens_out - 1) / tps
    return pm.Sample(ok=True, ttft_ms=ttft_ms, ttfo_ms=ttft_ms, tps=tps, tpot_ms=1000 / tps,
                     e2e_tps=tokens_out / total_s, prefill_tps=tokens_in / (ttft_ms / 1000),
                     total_s=total_s, tokens_in=tokens_in, tokens_out=tokens_out,
                     tokens_out_exact=True)


def model_run(rng: random.Random, spec: pm.ModelSpec, cfg: pm.RunConfig, speed, *,
              ttft_factor: dict[str, float], tps_factor: float, jitter: dict[str, float],
              throughput_factor: dict[int, float]) -> pm.ModelResult:
    scenarios = []
    for sc in pm.plan_scenarios(cfg, spec):
        tin = sc.target_tokens_in or 44
        ttft, tps = speed(tin)
        ttft *= ttft_factor.get(sc.name, 1.0)
        tps *= tps_factor
        aggregate = None
        if sc.kind == "throughput":
            # Streams share the GPU: each slows as the level grows.
            share = 1 / (1 + 0.09 * (sc.concurrency - 1))
            tps *= share * throughput_factor.get(sc.concurrency, 1.0)
            ttft *= 1 + 0.15 * (sc.concurrency - 1)
        ss = [sample(rng, tin, sc.target_tokens_out, ttft, tps, jitter.get(sc.name, 0.02))
              for _ in range(sc.requests)]
        if sc.kind == "throughput":
            duration_s = max(s.total_s for s in ss) * sc.requests / sc.concurrency
            aggregate = pm.throughput_aggregate(ss, duration_s)
        scenarios.append(pm.ScenarioResult(sc, tuple(ss), pm.summarize_samples(ss), aggregate))
    return pm.ModelResult(spec, status="ok", lifecycle=pm.Lifecycle(load_s=95.0 if speed is dense else 60.0),
                          scenarios=scenarios)


def report(seed: int, started: str, candidate: bool) -> dict:
    rng = random.Random(seed)
    cfg = pm.RunConfig(iterations=3, context_sizes=CONTEXT_SIZES, concurrency=LEVELS,
                       throughput_requests=8, compose_file=None, endpoint=None,
                       models=("dense-32b", "moe-30b-a3b"))
    dense_spec = pm.ModelSpec("dense-32b", None, "synthetic/dense-32b", 32_768,
                              "Dense 32B (synthetic)", 32.8, 32.8, 1.0)
    moe_spec = pm.ModelSpec("moe-30b-a3b", None, "synthetic/moe-30b-a3b", 32_768,
                            "MoE 30B, 3B active (synthetic)", 30.5, 3.3, 1.0)
    models = [
        model_run(rng, dense_spec, cfg, dense, ttft_factor={"context-1k": 1.12} if candidate else {},
                  tps_factor=1.08 if candidate else 1.0, jitter={"context-1k": 0.15},
                  throughput_factor={}),
        model_run(rng, moe_spec, cfg, moe,
                  ttft_factor={"context-16k": 1.18, "context-32k": 1.22} if candidate else {},
                  tps_factor=1.0, jitter={},
                  throughput_factor={16: 0.9} if candidate else {}),
    ]
    r = pm.Report(cfg, started, models, finished_at=started,
                  environment=pm.Environment(host="synthetic", python="3.11", platform="linux",
                                             gpu="synthetic data: no GPU was measured"))
    return pm.report_to_dict(r)


def main() -> None:
    for name, seed, started, candidate in (
            ("baseline.json", 1, "2026-01-05T10:00:00+00:00", False),
            ("candidate.json", 2, "2026-01-12T10:00:00+00:00", True)):
        (HERE / name).write_text(json.dumps(report(seed, started, candidate), indent=1) + "\n")
        print(HERE / name)


if __name__ == "__main__":
    main()
