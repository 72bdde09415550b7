# Shared by launch/tpu_*.sh (sourced, not run). Settings come from the environment or from flags:
#   --tpu-name NAME          TPU_NAME          (required)
#   --zone ZONE              ZONE              (required, e.g. us-east5-a)
#   --project PROJECT        PROJECT           (default: gcloud's configured project)
#   --accelerator-type TYPE  ACCELERATOR_TYPE  (default: v5p-128)
#   --runtime-version VER    RUNTIME_VERSION   (default: the TPU VM image for the accelerator's generation)
#   --dry-run                print the gcloud commands instead of running them
#   -h, --help               show the script's usage
# Anything after `--` is left in REST_ARGS for the script.

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-128}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
DRY_RUN=0
REST_ARGS=()
EXTRA_FLAGS=()   # script-specific flags (--flag or --flag=value), for the script to interpret

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

parse_common_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --tpu-name) TPU_NAME="${2:?--tpu-name needs a value}"; shift 2 ;;
      --tpu-name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --zone=*) ZONE="${1#*=}"; shift ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --project=*) PROJECT="${1#*=}"; shift ;;
      --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
      --runtime-version) RUNTIME_VERSION="${2:?--runtime-version needs a value}"; shift 2 ;;
      --runtime-version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; REST_ARGS=("$@"); return 0 ;;
      --*) EXTRA_FLAGS+=("$1"); shift ;;
      *) die "unexpected argument '$1' (commands go after --; see --help)" ;;
    esac
  done
}

default_runtime_version() {
  case "$ACCELERATOR_TYPE" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: unknown generation; set RUNTIME_VERSION" ;;
  esac
}

require_target() {
  [[ -n "$TPU_NAME" ]] || die "TPU_NAME is not set (env TPU_NAME or --tpu-name)"
  [[ -n "$ZONE" ]] || die "ZONE is not set (env ZONE or --zone)"
  if [[ -z "$RUNTIME_VERSION" ]]; then RUNTIME_VERSION="$(default_runtime_version)"; fi
  GCLOUD_LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then GCLOUD_LOCATION+=(--project="$PROJECT"); fi
}

# Runs a command, or prints it (shell-quoted, one line) with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm ssh on workers ($1: "all" or an index) running the shell command $2.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$1" --command="$2"
}
