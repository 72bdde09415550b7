#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM slice and install it there with the TPU extra.
#
#   launch/tpu_setup.sh --tpu-name NAME --zone ZONE [--project P] [--src DIR] [--dry-run]
#
# Env instead of flags: TPU_NAME, ZONE, PROJECT, SRC_DIR (default: the repository this script is in).
# Packs the git-tracked files of SRC_DIR (plus untracked, not ignored ones) into a tarball, copies it to
# ~/ on all workers (gcloud compute tpus tpu-vm scp --worker=all), unpacks it into ~/lmfusion-jax and runs
# `pip install '.[tpu]'` there (jax[tpu] pins the matching libtpu). Idempotent: rerun after code changes.
set -euo pipefail
source "$(dirname "$0")/tpu_common.sh"
SRC_DIR="${SRC_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
parse_common_flags "$@"
for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do
  case "$f" in
    --src=*) SRC_DIR="${f#*=}" ;;
    *) die "unknown flag $f (use --src=DIR)" ;;
  esac
done
require_target
tarball="${TMPDIR:-/tmp}/lmfusion-jax-src.tar.gz"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# pack $SRC_DIR (git ls-files --cached --others --exclude-standard) -> $tarball"
else
  (cd "$SRC_DIR" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - -czf "$tarball.tmp") && mv "$tarball.tmp" "$tarball"
fi
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/lmfusion-jax-src.tar.gz" \
  "${GCLOUD_LOCATION[@]}" --worker=all
tpu_ssh all "set -e; rm -rf ~/lmfusion-jax.new && mkdir -p ~/lmfusion-jax.new && \
tar -xzf ~/lmfusion-jax-src.tar.gz -C ~/lmfusion-jax.new && rm -rf ~/lmfusion-jax && \
mv ~/lmfusion-jax.new ~/lmfusion-jax && cd ~/lmfusion-jax && python3 -m pip install -q --upgrade pip && \
python3 -m pip install -q '.[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.device_count())'"
