#!/usr/bin/env bash
# Run `lmfusion-jax prepare-data` as one job on every host: host p of P takes input shards p, p+P, ...; process
# 0 writes the dataset's metadata once every shard is written. Run the same command again to resume a killed
# or preempted job (committed shards are kept, half-written ones redone).
#
#   Every worker of a TPU slice, in the background (launch/tpu_train.sh; logs: ~/lmfusion-logs/prepare-data.log,
#   follow with launch/tpu_logs.sh --run=prepare-data, stop with launch/tpu_stop.sh --run=prepare-data):
#     launch/prepare_data.sh --tpu-name NAME --zone ZONE [--run=NAME] [--dry-run] -- \
#         --source 'gs://b/laion/{00000..09999}.tar' --format webdataset --out gs://b/tfds \
#         --image-size 256 --vae-dir gs://b/vae
#   N cooperating processes on this machine (CPU, gloo; launch/local_multihost.sh, logs in ./multihost_logs):
#     launch/prepare_data.sh --local N -- --source 'shards/*.tar' --format webdataset --out tfds --image-size 64
#
# Everything after `--` goes to `lmfusion-jax prepare-data`. Sources, --out and --vae-dir must be storage every
# host sees (gs://, NFS). Env: as launch/tpu_train.sh (TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE); RUN
# (default: prepare-data); for --local: DEVICES_PER_PROCESS, PORT, LOG_DIR.
set -euo pipefail
here="$(dirname "$0")"
die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
if [[ "$1" == "--local" ]]; then
  [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--local needs a process count, e.g. --local 2"
  n="$2"; shift 2
  [[ $# -gt 0 && "$1" == "--" ]] || die "put the prepare-data arguments after --"
  shift
  exec bash "$here/local_multihost.sh" "$n" lmfusion-jax prepare-data "$@"
fi
flags=()
while [[ $# -gt 0 && "$1" != "--" ]]; do flags+=("$1"); shift; done
[[ $# -gt 0 ]] || die "no prepare-data arguments: put them after --, e.g. -- --source ... --format ... --out ..."
shift
has_run=0
for f in "${flags[@]+"${flags[@]}"}"; do [[ "$f" == --run=* ]] && has_run=1; done
[[ "$has_run" == 1 ]] || flags+=("--run=${RUN:-prepare-data}")
exec bash "$here/tpu_train.sh" "${flags[@]}" -- lmfusion-jax prepare-data "$@"
