#!/usr/bin/env bash
# Build (once) llama.cpp's own OpenAI-compatible server, `llama-server`, for the CPU.
#
# Where the sources come from: the llama-cpp-python sdist on PyPI vendors the
# whole llama.cpp tree (vendor/llama.cpp), so `pip download` (an ordinary
# registry client) is the only network access; nothing comes from a model hub
# or an image registry.
#
# Where it goes: $PERFTEST_LLAMACPP_DIR (default /opt/perftest-llamacpp), a
# FIXED path outside the clone, so it survives between CI runs on one machine
# (a build takes ~6 min on 2 cores).  bin/llama-server is linked statically
# against ggml/llama (BUILD_SHARED_LIBS=OFF): a container that bind-mounts the
# host's /usr plus this folder can run it (see tests/support/README.md).
#
# Options that matter:
#   * LLAMA_USE_PREBUILT_UI=OFF, LLAMA_BUILD_UI=OFF: the web UI would otherwise
#     be fetched from a model hub bucket at build time; the API needs no UI.
#   * LLAMA_OPENSSL=OFF: the server serves plain HTTP on 127.0.0.1 in tests.
#   * only the llama-server target is built (no tests, examples, other tools).
#
# Also kept: $DIR/gguf-py, the gguf package of the same sources (the writer
# tests/support/make_tiny_gguf.py uses).
#
# Idempotent: when the marker file records the wanted version and the binary
# still starts (`llama-server --version`), everything is skipped.
set -euo pipefail

DIR="${PERFTEST_LLAMACPP_DIR:-/opt/perftest-llamacpp}"
VERSION="${PERFTEST_LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${PERFTEST_BUILD_JOBS:-$(nproc)}"
MARKER="$DIR/.perftest-llamacpp-ok"
WANT="llama-cpp-python==$VERSION llama-server"
BIN="$DIR/bin/llama-server"

log() { printf '[setup-llamacpp] %s\n' "$*" >&2; }

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$BIN" && -f "$DIR/gguf-py/gguf/__init__.py" ]] \
   && "$BIN" --version >/dev/null 2>&1; then
  log "already built: $WANT in $DIR (marker $MARKER); skipping"
  exit 0
fi

start=$(date +%s)
# The toolchain: Debian's packages, only where missing (a fresh machine).
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v ninja >/dev/null || missing+=(ninja-build)
command -v g++ >/dev/null || missing+=(g++)
if (( ${#missing[@]} )); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
mkdir -p "$DIR"
rm -f "$MARKER"
work=$(mktemp -d "${TMPDIR:-/tmp}/perftest-llamacpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "pip download llama-cpp-python==$VERSION (sdist)"
python3 -m pip download --no-input --progress-bar off --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$src/CMakeLists.txt" ]] || { log "no llama.cpp sources in the sdist ($src)"; exit 1; }

log "cmake configure ($src)"
cmake -S "$src" -B "$work/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2

log "building llama-server with $JOBS jobs (several minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j "$JOBS" >&2

mkdir -p "$DIR/bin"
install -m 0755 "$work/build/bin/llama-server" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
# The gguf writer of these very sources (tests/support/make_tiny_gguf.py
# imports it), so the tiny GGUF is written in the format this build reads.
rm -rf "$DIR/gguf-py"
cp -r "$src/gguf-py" "$DIR/gguf-py"
log "verifying: $BIN --version"
"$BIN" --version >&2

echo "$WANT" >"$MARKER"
log "done in $(( $(date +%s) - start )) s"
