#!/usr/bin/env bash
# Start a job on every worker of a TPU VM slice, in the background (nohup), logging to
# ~/lmfusion-logs/<run>.log on each worker.
#
#   launch/tpu_train.sh --tpu-name NAME --zone ZONE [--run=NAME] [--dry-run] -- \
#       lmfusion-jax train --config configs/llama3_8b_lmfusion.py:v5p-128 --config.workdir=gs://B/run ...
#
# Env instead of flags: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE, RUN (default: train).
# Multi-host: every worker runs the same command from ~/lmfusion-jax (see launch/tpu_setup.sh). JAX finds
# the coordinator, process count and process id from the TPU VM itself; lmfusion_jax/distributed.py calls
# jax.distributed.initialize() when TPU_ACCELERATOR_TYPE is set, which this script exports. Workdirs, data
# and init checkpoints must be on shared storage (gs://...): the workers share no disk.
# Follow with launch/tpu_logs.sh; stop with launch/tpu_stop.sh (SIGTERM: a checkpoint is saved).
set -euo pipefail
source "$(dirname "$0")/tpu_common.sh"
RUN="${RUN:-train}"
parse_common_flags "$@"
for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do
  case "$f" in
    --run=*) RUN="${f#*=}" ;;
    *) die "unknown flag $f (use --run=NAME)" ;;
  esac
done
require_target
[[ ${#REST_ARGS[@]} -gt 0 ]] || die "no command given: put it after --, e.g. -- lmfusion-jax train --config ..."
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run=$RUN: use letters, digits, '.', '_' or '-'"
cmd=""
for a in "${REST_ARGS[@]}"; do cmd+="$(printf '%q' "$a") "; done
# `nohup` execs the command, so $! is the job's own pid (what tpu_stop.sh signals).
remote="mkdir -p ~/lmfusion-logs && cd ~/lmfusion-jax || exit 1; \
export TPU_ACCELERATOR_TYPE=$(printf '%q' "$ACCELERATOR_TYPE") PATH=\$HOME/.local/bin:\$PATH; \
nohup ${cmd% } > ~/lmfusion-logs/$RUN.log 2>&1 < /dev/null & echo \$! > ~/lmfusion-logs/$RUN.pid"
tpu_ssh all "$remote"
