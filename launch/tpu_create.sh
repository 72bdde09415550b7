#!/usr/bin/env bash
# Create a TPU VM pod slice.
#
#   launch/tpu_create.sh --tpu-name NAME --zone ZONE [--project P] [--accelerator-type v5p-128]
#                        [--runtime-version VER] [--spot] [--dry-run] [-- EXTRA_GCLOUD_ARGS...]
#
# Env instead of flags: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (default v5p-128), RUNTIME_VERSION
# (default per generation: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
# v6e v2-alpha-tpuv6e). --spot asks for a preemptible (spot) slice; training resumes from its last
# checkpoint after a preemption. --dry-run prints the gcloud command instead of running it.
# Check first that the run fits: lmfusion-jax plan --config CFG --topology ACCELERATOR_TYPE.
set -euo pipefail
source "$(dirname "$0")/tpu_common.sh"
parse_common_flags "$@"
require_target
spot=()
for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do
  case "$f" in
    --spot) spot=(--spot) ;;
    *) die "unknown flag $f" ;;
  esac
done
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_LOCATION[@]}" \
  --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
  "${spot[@]+"${spot[@]}"}" "${REST_ARGS[@]+"${REST_ARGS[@]}"}"
