"""A real image registry on 127.0.0.1, a slow proxy in front of it, and an
image of a few hundred MB that must be pulled through them.

Why: the first run of perftest-models on a real box pulls a 10-20 GB vLLM
image.  To test that step here (no registry or hub is reachable), we run
Debian's ``docker-registry`` package (the CNCF distribution registry, 2.8) on
127.0.0.1, push a locally built image to it, remove the image locally, and let
Docker pull it back through :class:`SlowProxy`, a byte-rate-limited TCP proxy,
so that the pull takes tens of seconds as a real one takes minutes.

Docker treats registries on 127.0.0.0/8 as insecure (plain HTTP) by default,
so no daemon configuration is needed.

Usable from pytest fixtures::

    with LocalRegistry(root) as reg, SlowProxy(reg.port, rate_bps=8e6) as proxy:
        ref = push_test_image(reg.port, "issue-11-pull", size_mb=240)
        slow_ref = f"127.0.0.1:{proxy.port}/{ref.split('/', 1)[1]}"

and as a CLI for trying it by hand (``python3 tests/support/registry.py
--size-mb 300 --rate-mbps 8``: serves until Ctrl-C and prints the image name).
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REGISTRY_BIN = os.environ.get("PERFTEST_REGISTRY_BIN", "/usr/bin/docker-registry")
BASE_IMAGE = os.environ.get("PERFTEST_BASE_IMAGE", "perftest-base:local")

_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_available() -> bool:
    return Path(REGISTRY_BIN).is_file() and os.access(REGISTRY_BIN, os.X_OK)


class LocalRegistry:
    """`docker-registry serve` on 127.0.0.1:<free port>, storage under `root`."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "registry.log"

    def __enter__(self) -> LocalRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(_CONFIG.format(root=self.root / "data", port=self.port))
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"docker-registry did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SlowProxy:
    """A TCP proxy on 127.0.0.1:<free port> to 127.0.0.1:`target_port` that
    sends the answers (registry -> client) at no more than `rate_bps` bytes/s
    in all, shared by every connection, as one slow link would.

    `bytes_down` counts what went through; `active` the open connections (a
    pull that was stopped leaves none)."""

    CHUNK = 16 * 1024

    def __init__(self, target_port: int, rate_bps: float):
        self.target_port = target_port
        self.rate_bps = rate_bps
        self.port = 0
        self.bytes_down = 0
        self.active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._next_send = 0.0  # the shared token bucket: when the link is free again

    async def _throttle(self, n: int) -> None:
        now = time.monotonic()
        start = max(now, self._next_send)
        self._next_send = start + n / self.rate_bps
        if self._next_send > now:
            await asyncio.sleep(self._next_send - now)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    slow: bool) -> None:
        try:
            while data := await reader.read(self.CHUNK):
                if slow:
                    await self._throttle(len(data))
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with_suppress_close(writer)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            with_suppress_close(client_w)
            self.active -= 1
            return
        try:
            await asyncio.gather(self._pipe(client_r, up_w, slow=False),
                                 self._pipe(up_r, client_w, slow=True))
        finally:
            self.active -= 1

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> SlowProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),),
                                        name="slow-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("slow proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no connection is open (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.active == 0


def with_suppress_close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (ConnectionError, OSError, RuntimeError):
        pass


def _docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # DOCKER_BUILDKIT=0: the classic builder needs no buildx plugin and
    # reads FROM a local image without asking any registry.
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def push_test_image(registry_port: int, repo: str, size_mb: int = 240, layers: int = 3,
                    tag: str = "1", base: str = BASE_IMAGE) -> str:
    """Build an image of `base` plus `layers` layers of random data (`size_mb`
    in all: random so that gzip cannot shrink what is pulled), push it to the
    registry on 127.0.0.1:`registry_port` and remove it and its layers
    locally, so that Docker must pull it.  Returns ``repo:tag`` (no host)."""
    ref = f"127.0.0.1:{registry_port}/{repo}:{tag}"
    with tempfile.TemporaryDirectory(prefix=f"{repo}-") as ctx:
        lines = [f"FROM {base}"]
        per_layer = max(1, size_mb // layers) * 1024 * 1024
        for i in range(layers):
            with open(Path(ctx) / f"blob{i}", "wb") as f:
                for _ in range(per_layer // (1024 * 1024)):
                    f.write(os.urandom(1024 * 1024))
            lines.append(f"COPY blob{i} /data/blob{i}")
        lines.append('CMD ["/usr/bin/python3", "-c", "print(1)"]')
        (Path(ctx) / "Dockerfile").write_text("\n".join(lines) + "\n")
        _docker("build", "-q", "-t", ref, ctx)
    _docker("push", ref)
    remove_local_image(ref)
    return f"{repo}:{tag}"


def remove_local_image(ref: str) -> None:
    """Remove `ref` (and, as it is its only tag, its layers) if present."""
    _docker("image", "rm", "-f", ref, check=False)


@contextlib.contextmanager
def slow_image(root: Path, repo: str, size_mb: int, rate_bps: float
               ) -> Iterator[tuple[LocalRegistry, SlowProxy, str]]:
    """A registry under `root` holding `repo` (pushed as push_test_image
    builds it), behind a proxy of `rate_bps`: yields the registry, the proxy
    and the image's name through the proxy (127.0.0.1:<proxy>/<repo>:1).
    The image is removed locally at the end, and the registry stopped."""
    with LocalRegistry(root) as reg, SlowProxy(reg.port, rate_bps) as proxy:
        name = push_test_image(reg.port, repo, size_mb=size_mb)
        slow = f"127.0.0.1:{proxy.port}/{name}"
        try:
            yield reg, proxy, slow
        finally:
            remove_local_image(slow)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=300)
    p.add_argument("--rate-mbps", type=float, default=8.0, help="proxy rate, MB/s")
    p.add_argument("--repo", default="perftest-pull-demo")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="perftest-registry-"))
    try:
        with LocalRegistry(root) as reg, SlowProxy(reg.port, args.rate_mbps * 1e6) as proxy:
            name = push_test_image(reg.port, args.repo, args.size_mb)
            print(f"registry 127.0.0.1:{reg.port}; slow: 127.0.0.1:{proxy.port}/{name}", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
