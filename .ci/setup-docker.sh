#!/usr/bin/env bash
# Install and start a Docker engine with BOTH Compose v1 and Compose v2, on a
# Debian bookworm machine without systemd, as root.
#
# Why each piece:
#   * docker.io (engine 20.10, containerd, runc) and docker-compose (Compose v1
#     1.29, /usr/bin/docker-compose) come from bookworm itself: the tests
#     exercise the tool against both Compose flavours.
#   * bookworm has no Compose v2 package; trixie's `docker-compose` (2.26.x) is
#     a static Go binary that depends only on libc6 >= 2.34, so we fetch that
#     one .deb with a SEPARATE apt configuration (trixie lists, cache and state
#     in $PERFTEST_CACHE_DIR) and copy only the plugin binary to
#     /usr/libexec/docker/cli-plugins/docker-compose.  The system's apt
#     sources, lists, status and installed packages are not changed, and the
#     v1 /usr/bin/docker-compose from bookworm stays as it is.
#   * docker-registry (the CNCF distribution registry 2.8, /usr/bin/docker-registry)
#     from bookworm: tests/support/registry.py serves it on 127.0.0.1 so that the
#     image-pull tests pull a real image from a real registry (never started
#     as a service here; the package's own unit is not used).
#   * There is no systemd: dockerd is started in the background (nohup,
#     setsid, all fds redirected so it never holds the CI log pipe open) when
#     `docker info` fails, and left running.
#
# Idempotent and fast on a second run: every step checks first and skips.
# Env: PERFTEST_CACHE_DIR (default /var/cache/perftest), PERFTEST_DOCKERD_FLAGS
# (extra dockerd flags; default none), PERFTEST_DOCKERD_LOG (/var/log/dockerd.log).
set -euo pipefail

CACHE_DIR="${PERFTEST_CACHE_DIR:-/var/cache/perftest}"
DOCKERD_LOG="${PERFTEST_DOCKERD_LOG:-/var/log/dockerd.log}"
PLUGIN=/usr/libexec/docker/cli-plugins/docker-compose
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup-docker] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# 1. Engine + Compose v1 + docker-registry from bookworm
# ---------------------------------------------------------------------------
need=()
for pkg in docker.io docker-compose docker-registry; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    need+=("$pkg")
  fi
done
if ((${#need[@]})); then
  log "installing ${need[*]} (bookworm)"
  apt-get update -qq
  # A package's postinst must not start its service (docker-registry's init
  # script would serve on :5000 on every interface): deny it, as Docker's
  # own images do, unless the machine already has a policy.
  policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [[ -n "$policy" ]]; then rm -f "$policy"; fi
else
  log "docker.io, docker-compose (v1) and docker-registry already installed"
fi

# ---------------------------------------------------------------------------
# 2. Compose v2 plugin from trixie's docker-compose .deb
# ---------------------------------------------------------------------------
compose_v2_ok() {
  [[ -x "$PLUGIN" ]] && [[ "$(docker compose version --short 2>/dev/null)" == 2.* ]]
}
if compose_v2_ok; then
  log "Compose v2 plugin already installed ($(docker compose version --short))"
else
  work="$CACHE_DIR/compose-v2-apt"
  rm -rf "$work"
  mkdir -p "$work/sources.list.d" "$work/preferences.d" "$work/state/lists/partial" \
           "$work/cache/archives/partial" "$work/dl"
  : >"$work/sources.list"
  : >"$work/state/status"
  # Derive the trixie source from the system's own configuration: same
  # mirror/URIs and keyring, only the suite changes; security suites dropped.
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    awk 'BEGIN { RS = ""; ORS = "\n\n" } !/security/' /etc/apt/sources.list.d/debian.sources \
      | sed -E 's/^Suites:.*$/Suites: trixie/' >"$work/sources.list.d/debian.sources"
  elif [[ -f /etc/apt/sources.list ]]; then
    awk '$1 == "deb" && $0 !~ /security/' /etc/apt/sources.list | head -n1 \
      | sed -E 's/^(deb([[:space:]]+\[[^]]*\])?[[:space:]]+[^[:space:]]+[[:space:]]+)[^[:space:]]+/\1trixie/' \
      >"$work/sources.list.d/trixie.list"
  else
    log "ERROR: no /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list to derive a trixie source from"
    exit 1
  fi
  # Config read after the system's: drop hooks that would act on the
  # system's cache (e.g. docker-clean's post-invoke rm of *.deb).
  cat >"$work/apt.conf" <<'EOF'
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Post-Invoke;
Acquire::Languages "none";
EOF
  apt_opts=(
    -c "$work/apt.conf"
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=$work/sources.list.d"
    -o "Dir::Etc::preferences=$work/preferences"
    -o "Dir::Etc::preferencesparts=$work/preferences.d"
    -o "Dir::State=$work/state"
    -o "Dir::State::Lists=$work/state/lists"
    -o "Dir::State::status=$work/state/status"
    -o "Dir::Cache=$work/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
  )
  log "fetching trixie's docker-compose (Compose v2) with a private apt configuration in $work"
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work/dl" && apt-get "${apt_opts[@]}" download docker-compose)
  deb=$(ls "$work"/dl/docker-compose_*.deb)
  dpkg-deb -x "$deb" "$work/dl/x"
  # The binary's place in the .deb: /usr/libexec/docker/cli-plugins (trixie
  # 2.26.1-4; /usr/bin/docker-compose there is only a symlink to it).  Take
  # whichever is the real file.
  src=""
  for cand in usr/libexec/docker/cli-plugins/docker-compose usr/lib/docker/cli-plugins/docker-compose usr/bin/docker-compose; do
    if [[ -f "$work/dl/x/$cand" && ! -L "$work/dl/x/$cand" ]]; then src="$work/dl/x/$cand"; break; fi
  done
  [[ -n "$src" ]] || { log "ERROR: no docker-compose binary inside $deb"; dpkg-deb -c "$deb" >&2; exit 1; }
  install -D -m 0755 "$src" "$PLUGIN"
  log "installed $(basename "$deb") binary as $PLUGIN"
  rm -rf "$work/dl/x" "$work/state/lists" "$work/cache"   # keep only the .deb
  compose_v2_ok || { log "ERROR: 'docker compose version' does not report v2"; docker compose version >&2 || true; exit 1; }
fi

# ---------------------------------------------------------------------------
# 3. Start dockerd (no systemd here)
# ---------------------------------------------------------------------------
wait_for_docker() {  # $1 = seconds, $2 = pid of our dockerd (optional)
  local i
  for ((i = 0; i < $1 * 2; i++)); do
    docker info >/dev/null 2>&1 && return 0
    if [[ -n "${2:-}" ]] && ! kill -0 "$2" 2>/dev/null; then return 1; fi
    sleep 0.5
  done
  return 1
}

if docker info >/dev/null 2>&1; then
  log "Docker engine already running"
elif pgrep -x dockerd >/dev/null && wait_for_docker 60; then
  log "Docker engine (already started) became ready"
else
  # A pid file left by a dead dockerd makes a new one refuse to start.
  if [[ -f /var/run/docker.pid ]] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
  fi
  # Defaults work in this sandbox (overlay2 on ext4, iptables via nf_tables,
  # cgroup v1): published ports on 127.0.0.1 reach the containers.  The
  # fallbacks are for machines where iptables or overlayfs is not usable;
  # with --iptables=false, docker-proxy still forwards published ports.
  started=0
  for flags in "${PERFTEST_DOCKERD_FLAGS:-}" "--iptables=false --ip-masq=false" "--iptables=false --ip-masq=false --storage-driver=vfs"; do
    log "starting dockerd ${flags:-(default flags)}; log: $DOCKERD_LOG"
    # shellcheck disable=SC2086
    setsid nohup dockerd $flags >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
    if wait_for_docker 60 "$pid"; then
      started=1
      break
    fi
    log "dockerd ${flags:-(default flags)} did not become ready; log tail:"
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f /var/run/docker.pid
    if [[ -n "${PERFTEST_DOCKERD_FLAGS:-}" ]]; then break; fi   # explicit flags: no fallbacks
  done
  if ((!started)); then
    log "ERROR: could not start dockerd"
    exit 1
  fi
  log "dockerd running (pid $pid)"
fi

# ---------------------------------------------------------------------------
# 4. Report
# ---------------------------------------------------------------------------
docker version
docker compose version
docker-compose version
docker info --format 'storage={{.Driver}} cgroup={{.CgroupDriver}} v{{.CgroupVersion}} server={{.ServerVersion}}'
