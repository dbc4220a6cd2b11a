#!/usr/bin/env bash
# A SECOND Docker engine on this machine, for the multi-host tests (issue 15):
# the tool drives "another host" through DOCKER_HOST=unix:///run/perftest-docker2.sock.
#
#   bash .ci/docker2.sh [start]   start it unless it answers (idempotent), build the
#                                 skeleton base image in it, print `docker version`
#   bash .ci/docker2.sh stop      stop it gracefully (SIGTERM; its containers stop)
#   bash .ci/docker2.sh kill      "the host goes away": SIGKILL the engine, its
#                                 containerd and every process of its containers
#   bash .ci/docker2.sh status    exit 0 when it answers
#
# Why each flag: its own socket, --data-root, --exec-root (so its own managed
# containerd) and --pidfile, so it shares nothing with the main engine (which
# other people use at the same time: this script never touches it).  No bridge,
# no iptables, no ip-forward/masquerade: it must not change the main engine's
# networking; its containers use host networking (network_mode: host) on their
# own 127.0.0.1 ports.  --cgroup-parent puts its containers under their own
# cgroup, so `kill` finds exactly their processes and no others.
#
# Env: PERFTEST_DOCKER2_NAME (default perftest-docker2) names every path:
# /run/NAME.sock, /var/lib/NAME, /run/NAME (exec-root), /run/NAME.pid,
# /var/log/NAME.log, cgroup /NAME; PERFTEST_BASE_IMAGE (perftest-base:local).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NAME="${PERFTEST_DOCKER2_NAME:-perftest-docker2}"
SOCK="/run/$NAME.sock"
DATA_ROOT="/var/lib/$NAME"
EXEC_ROOT="/run/$NAME"
PIDFILE="/run/$NAME.pid"
BRIDGE="${PERFTEST_DOCKER2_BRIDGE:-ptdocker2}"  # its own bridge interface (see start)
LOG="/var/log/$NAME.log"
CGROUP="/$NAME"
export DOCKER_HOST="unix://$SOCK"

log() { printf '[docker2] %s\n' "$*" >&2; }

answers() { docker info >/dev/null 2>&1; }

daemon_pid() { [[ -f "$PIDFILE" ]] && cat "$PIDFILE"; }

alive() { local pid; pid=$(daemon_pid) && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }

start() {
  if answers; then
    log "engine at $DOCKER_HOST already answers"
  else
    if ! alive; then rm -f "$PIDFILE"; fi
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
    # A bridge of its own, never `--bridge none`: a dockerd started with no
    # bridge deletes the host's docker0 at start-up (libnetwork's
    # removeDefaultBridgeInterface), which breaks the main engine's default
    # network for everyone on the machine. Its containers use host networking.
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    log "starting dockerd at $DOCKER_HOST; log: $LOG"
    setsid nohup dockerd --host "$DOCKER_HOST" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
      --pidfile "$PIDFILE" --bridge "$BRIDGE" --iptables=false --ip-masq=false --ip-forward=false \
      --cgroup-parent "$CGROUP" >>"$LOG" 2>&1 </dev/null &
    local pid=$! i
    for ((i = 0; i < 120; i++)); do
      answers && break
      if ! kill -0 "$pid" 2>/dev/null; then log "dockerd exited; log tail:"; tail -n 30 "$LOG" >&2; exit 1; fi
      sleep 0.5
    done
    answers || { log "ERROR: dockerd did not answer in 60 s; log tail:"; tail -n 30 "$LOG" >&2; exit 1; }
    log "dockerd running (pid $pid)"
  fi
  python3 tests/support/images.py --tag "${PERFTEST_BASE_IMAGE:-perftest-base:local}" >/dev/null
  docker version --format 'docker2: client {{.Client.Version}}, server {{.Server.Version}}'
}

wait_gone() {  # $1 = pid
  local i
  for ((i = 0; i < 60; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  return 1
}

stop() {
  local pid
  if ! alive; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  pid=$(daemon_pid)
  # A graceful stop leaves containers running only with live-restore (off here):
  # stop them first so nothing outlives the engine.
  docker ps -q | xargs -r docker rm -f >/dev/null 2>&1 || true
  kill -TERM "$pid"
  wait_gone "$pid" || { log "dockerd $pid ignored SIGTERM for 30 s: killing"; kill_all; }
  log "stopped"
}

cgroup_pids() {  # every process of the engine's containers (cgroup v1 or v2)
  local f
  for f in /sys/fs/cgroup/pids"$CGROUP"/*/cgroup.procs /sys/fs/cgroup"$CGROUP"/*/cgroup.procs; do
    [[ -f "$f" ]] && cat "$f"
  done 2>/dev/null || true
}

shim_pids() {  # the containerd shims of THIS engine (their -address is under its exec-root)
  local d
  for d in /proc/[0-9]*; do
    tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -q -- "-address $EXEC_ROOT/containerd/" && echo "${d#/proc/}"
  done
  return 0
}

kill_all() {
  local pid ctr_pid
  pid=$(daemon_pid || true)
  ctr_pid=$(cat "$EXEC_ROOT/containerd/containerd.pid" 2>/dev/null || true)
  # The engine and its containerd first (so nothing restarts a container),
  # then the shims of its containers, then the containers' own processes.
  for p in $pid $ctr_pid; do kill -KILL "$p" 2>/dev/null || true; done
  for p in $(shim_pids); do kill -KILL "$p" 2>/dev/null || true; done
  for p in $(cgroup_pids); do kill -KILL "$p" 2>/dev/null || true; done
  [[ -n "$pid" ]] && wait_gone "$pid" || true
  log "killed (engine ${pid:-none}, containerd ${ctr_pid:-none})"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  kill) kill_all ;;
  status) answers ;;
  *) echo "usage: $0 [start|stop|kill|status]" >&2; exit 2 ;;
esac
