#!/usr/bin/env bash
# Run a recipe_jax stage on this machine: all local devices (GPUs, TPU chips or CPU) in one mesh.
#
#   launch/local.sh [--dry-run] STAGE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/local.sh purify configs/purify.py:bert runs/purify \
#       --config.model.init_from=minilm --config.data.aux_path=path/to/sentences.txt
#
# STAGE is purify | attack | evaluate | prune. Environment:
#   CPU_DEVICES=N     simulate N CPU devices (XLA_FLAGS); for trying meshes without accelerators
#   NUM_PROCESSES=P   start P processes on this host joined by jax.distributed (a local
#                     coordinator on COORDINATOR_PORT, default 12355), each seeing the devices
#                     CPU_DEVICES gives it; process 0 writes the logs to stdout, the others to
#                     WORKDIR/process_<i>.log
# Rerunning the same command resumes from the newest checkpoint in WORKDIR.
set -euo pipefail

usage() {
  sed -n '4,5p' "$0" | sed 's/^# *//' >&2
  echo "usage: launch/local.sh [--dry-run] STAGE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
}

dry_run=""
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ $# -ge 3 ]] || usage
stage=$1 config=$2 workdir=$3
shift 3
case "$stage" in
  purify|attack|evaluate|prune) ;;
  *) echo "local.sh: unknown stage '$stage'; use purify, attack, evaluate or prune" >&2; usage ;;
esac
num_processes=${NUM_PROCESSES:-1}
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES='$num_processes' must be a positive integer" >&2; exit 2
fi
if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi

cmd=(python -m "recipe_jax.$stage" --config "$config" --workdir "$workdir" "$@")
if [[ "$num_processes" == 1 ]]; then
  if [[ -n "$dry_run" ]]; then echo "${cmd[*]}"; exit 0; fi
  exec "${cmd[@]}"
fi

port=${COORDINATOR_PORT:-12355}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  dist=(--config.distributed.coordinator_address="localhost:$port"
        --config.distributed.num_processes="$num_processes" --config.distributed.process_id="$i")
  if [[ -n "$dry_run" ]]; then echo "${cmd[*]} ${dist[*]}"; continue; fi
  if [[ $i == 0 ]]; then
    "${cmd[@]}" "${dist[@]}" &
  else
    mkdir -p "$workdir"
    "${cmd[@]}" "${dist[@]}" > "$workdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
