#!/usr/bin/env bash
# Show the log of a job started with launch/tpu_train.sh.
#
#   launch/tpu_logs.sh --tpu-name NAME --zone ZONE [--run=NAME] [--worker=0|all] [--lines=N] [--follow]
#                      [--dry-run]
#
# Env instead of flags: TPU_NAME, ZONE, PROJECT, RUN (default: train). Default: the last 100 lines of
# worker 0 (process 0 prints the metrics). --follow keeps tailing (one worker only).
set -euo pipefail
source "$(dirname "$0")/tpu_common.sh"
RUN="${RUN:-train}"
worker=0
lines=100
follow=0
parse_common_flags "$@"
for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do
  case "$f" in
    --run=*) RUN="${f#*=}" ;;
    --worker=*) worker="${f#*=}" ;;
    --lines=*) lines="${f#*=}" ;;
    --follow) follow=1 ;;
    *) die "unknown flag $f" ;;
  esac
done
require_target
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run=$RUN: use letters, digits, '.', '_' or '-'"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines=$lines: expected a number"
[[ "$worker" == all || "$worker" =~ ^[0-9]+$ ]] || die "--worker=$worker: expected a number or 'all'"
if [[ "$follow" == 1 ]]; then
  [[ "$worker" != all ]] || die "--follow needs one worker (--worker=N)"
  tpu_ssh "$worker" "tail -n $lines -F ~/lmfusion-logs/$RUN.log"
else
  tpu_ssh "$worker" "echo \"== \$(hostname)\"; tail -n $lines ~/lmfusion-logs/$RUN.log"
fi
