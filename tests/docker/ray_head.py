#!/usr/bin/env python3
"""Plays a Ray head + `vllm serve --tensor-parallel-size 2` in the multi-host tests.

Usage: ray_head.py WORKER_URL STANDIN_ARGS...  (STANDIN_ARGS must include --port)

The stand-in server starts "loading" (/health answers 503) and stays so until
the worker, on the OTHER Docker engine, answers /health: like a head whose
engine cannot start before the worker has joined.  When the worker stops
answering later, the head exits with code 5 (a lost worker kills a real
tensor-parallel engine too), unless PERFTEST_HEAD_EXIT_ON_LOSS=0: then it
goes on serving, and only a watch of the worker itself can notice.
Standard library only, like tests/standin.py.
"""

import json
import os
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) + "/..")
sys.path.insert(0, "/app")  # where the compose file mounts tests/
import standin  # noqa: E402


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def watch(worker: str, own: str) -> None:
    while not answers(worker):
        time.sleep(0.3)
    print(f"ray_head: worker at {worker} joined; engine ready", flush=True)
    req = urllib.request.Request(own + "/_standin/config", data=json.dumps({"load_s": 0}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    for _ in range(100):  # our own server may not listen yet
        try:
            urllib.request.urlopen(req, timeout=2).close()
            break
        except OSError:
            time.sleep(0.1)
    misses = 0
    while True:
        time.sleep(0.5)
        misses = 0 if answers(worker) else misses + 1
        if misses >= 3 and os.environ.get("PERFTEST_HEAD_EXIT_ON_LOSS", "1") != "0":
            print(f"ray_head: lost the worker at {worker}; exiting with code 5", flush=True)
            os._exit(5)


def main() -> int:
    worker, args = sys.argv[1], sys.argv[2:]
    port = args[args.index("--port") + 1]
    print(f"ray_head: waiting for the worker at {worker}", flush=True)
    threading.Thread(target=watch, args=(worker, f"http://127.0.0.1:{port}"), daemon=True).start()
    return standin.main([*args, "--load-s", "100000"])


if __name__ == "__main__":
    sys.exit(main())
