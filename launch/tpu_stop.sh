#!/usr/bin/env bash
# Stop a job started with launch/tpu_train.sh on every worker, and optionally delete the slice.
#
#   launch/tpu_stop.sh --tpu-name NAME --zone ZONE [--run=NAME] [--delete] [--dry-run]
#
# Env instead of flags: TPU_NAME, ZONE, PROJECT, RUN (default: train). Sends SIGTERM to the recorded
# process on each worker (the trainer then saves a checkpoint and exits). --delete then deletes the TPU VM
# (billing stops; the checkpoints on gs:// stay).
set -euo pipefail
source "$(dirname "$0")/tpu_common.sh"
RUN="${RUN:-train}"
delete=0
parse_common_flags "$@"
for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do
  case "$f" in
    --run=*) RUN="${f#*=}" ;;
    --delete) delete=1 ;;
    *) die "unknown flag $f" ;;
  esac
done
require_target
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run=$RUN: use letters, digits, '.', '_' or '-'"
tpu_ssh all "pidfile=~/lmfusion-logs/$RUN.pid; if [ -f \$pidfile ]; then kill -TERM \$(cat \$pidfile) \
2>/dev/null && echo \"\$(hostname): sent SIGTERM\" || echo \"\$(hostname): not running\"; \
else echo \"\$(hostname): no \$pidfile\"; fi"
if [[ "$delete" == 1 ]]; then
  if [[ "$DRY_RUN" != 1 ]]; then sleep 60; fi   # give the checkpoint time to finish
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --quiet
fi
