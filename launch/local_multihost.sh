#!/usr/bin/env bash
# Start N cooperating processes of one lmfusion-jax job on this machine (CPU, gloo collectives): the
# multi-host code path without a pod. Each process sees DEVICES_PER_PROCESS fake CPU devices.
#
#   launch/local_multihost.sh N lmfusion-jax train --config configs/tiny.py --config.workdir=/tmp/mh ...
#
# Env: DEVICES_PER_PROCESS (default 2), PORT (default: a free port), LOG_DIR (default: ./multihost_logs).
# Exit status: non-zero if any process fails (all are stopped then).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
n="$1"; shift
devices="${DEVICES_PER_PROCESS:-2}"
port="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
log_dir="${LOG_DIR:-./multihost_logs}"
mkdir -p "$log_dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
# SIGTERM / SIGINT to this script (a preemption notice) go to every process, which save and exit 0 together.
trap cleanup INT TERM
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
  LMFUSION_COORDINATOR="127.0.0.1:${port}" LMFUSION_NUM_PROCESSES="$n" LMFUSION_PROCESS_ID="$i" \
    "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!pids[@]}"; do
  while true; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # a trapped signal interrupts `wait` (rc > 128) while the process still runs: wait again
    if [[ $rc -gt 128 ]] && kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 ]]; then
    echo "process $i failed (exit $rc); see $log_dir/process_$i.log" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
    status=1
    cleanup
  fi
done
exit "$status"
