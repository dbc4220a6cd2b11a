"""Build a tiny local Docker base image without any image registry.

Why: CI and the developer machines reach no image registry (no ``docker
pull``), yet the end-to-end tests start model services with Docker Compose.
So we ``docker import`` a skeleton root filesystem: empty top-level folders,
``bin``/``lib``/``lib64``/``sbin`` symlinked into ``usr/`` (Debian bookworm is
usr-merged) and a handful of tiny files in ``etc/``.  Services then bind-mount
the host's ``/usr`` read-only and run ``/usr/bin/python3`` (and the vLLM venv,
mounted at the same path as on the host) from it.

Usable from pytest fixtures::

    from tests.support.images import ensure_base_image
    ensure_base_image()              # -> "perftest-base:local"

and as a CLI (``python3 tests/support/images.py [--tag T] [--force] [--check]``).
Only the standard library is used, so any Python 3.8+ runs it.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import time

DEFAULT_TAG = "perftest-base:local"

# Bump when the skeleton below changes: ensure_base_image() rebuilds an image
# whose recorded version differs.
BASE_IMAGE_VERSION = "1"
_VERSION_ENV = "PERFTEST_BASE_IMAGE_VERSION"

_DIRS = ["etc", "tmp", "proc", "sys", "dev", "usr", "root", "opt", "run", "var", "var/tmp", "home"]
_SYMLINKS = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
_FILES = {
    # getpass.getuser()/pwd lookups (torch, huggingface) need an entry for
    # whatever uid the container runs as; root is what Compose uses by default.
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    # Docker bind-mounts its own /etc/hosts, /etc/hostname and /etc/resolv.conf
    # over these at run time; they exist so `docker run` has mount targets.
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/hostname": "perftest\n",
    "etc/resolv.conf": "",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def _skeleton_tar() -> bytes:
    buf = io.BytesIO()
    mtime = 0  # fixed timestamps: the tarball is byte-for-byte reproducible
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in _DIRS:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d in ("tmp", "var/tmp") else 0o755
            info.mtime = mtime
            tar.addfile(info)
        for name, target in _SYMLINKS.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            info.mtime = mtime
            tar.addfile(info)
        for name, text in _FILES.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _docker(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], input=input, capture_output=True, check=check)


def _image_version(tag: str) -> str | None:
    """The skeleton version recorded in an existing image, or None when absent."""
    res = _docker("image", "inspect", "--format", "{{json .Config.Env}}", tag, check=False)
    if res.returncode != 0:
        return None
    for item in res.stdout.decode().strip().strip("[]").split(","):
        item = item.strip().strip('"')
        if item.startswith(_VERSION_ENV + "="):
            return item.split("=", 1)[1]
    return ""


def ensure_base_image(tag: str = DEFAULT_TAG, force: bool = False) -> str:
    """Make sure the local skeleton image ``tag`` exists; return the tag.

    Idempotent and fast when the image is already there (one ``docker image
    inspect``).  Raises ``subprocess.CalledProcessError`` when Docker fails.
    """
    if not force and _image_version(tag) == BASE_IMAGE_VERSION:
        return tag
    _docker(
        "import",
        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", f"ENV {_VERSION_ENV}={BASE_IMAGE_VERSION}",
        "--change", "WORKDIR /tmp",
        "--message", "perftest skeleton base image (bind-mount the host /usr)",
        "-",
        tag,
        input=_skeleton_tar(),
    )
    return tag


def check_base_image(tag: str = DEFAULT_TAG, port: int = 18080) -> None:
    """Smoke test: python from the host /usr runs, and a published port answers."""
    out = _docker("run", "--rm", "-v", "/usr:/usr:ro", tag, "/usr/bin/python3", "-c", "print(1)").stdout
    assert out.strip() == b"1", out
    name = f"perftest-base-check-{port}"
    _docker("rm", "-f", name, check=False)
    _docker(
        "run", "-d", "--name", name, "-v", "/usr:/usr:ro", "-p", f"127.0.0.1:{port}:8000",
        tag, "/usr/bin/python3", "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory", "/etc",
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=2) as r:
                    body = r.read()
                    assert r.status == 200, r.status
                    print(f"http.server in container answered on 127.0.0.1:{port}: {body!r}")
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        _docker("rm", "-f", name, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", default=DEFAULT_TAG)
    p.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    p.add_argument("--check", action="store_true", help="also run the smoke test")
    args = p.parse_args(argv)
    print(ensure_base_image(args.tag, force=args.force))
    if args.check:
        check_base_image(args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
