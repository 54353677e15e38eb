#!/usr/bin/env bash
# Purify on a Cloud TPU VM slice (one process per host, jax.distributed from the TPU environment).
#
#   launch/tpu_vm.sh TPU_NAME ZONE ACCELERATOR_TYPE gs://BUCKET/RUN [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh recipe-v4 us-central2-b v4-16 gs://my-bucket/runs/purify \
#       --config.model.init_from=/gcs/my-bucket/models/suspicious \
#       --config.data.aux_path=/gcs/my-bucket/data/bookcorpus.tsv --config.data.streaming=True
#
# Creates the TPU VM if it does not exist (gcloud compute tpus tpu-vm create), copies this
# repository to every worker, installs it with jax[tpu], mounts the bucket with gcsfuse at
# /gcs/BUCKET on every worker (recipe_jax writes its workdir with ordinary file I/O, and Orbax
# needs one directory all hosts share) and runs `python -m recipe_jax.purify` on all workers with
# --config.distributed.auto=True. Rerunning the same command resumes from the newest checkpoint.
# Environment: PROJECT (default: gcloud's), CONFIG (default configs/purify.py:bert),
# RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT=1 for a preemptible VM, STAGE (default
# purify; attack and evaluate work the same way).
set -euo pipefail

usage() {
  echo "usage: launch/tpu_vm.sh TPU_NAME ZONE ACCELERATOR_TYPE gs://BUCKET/RUN [--config.KEY=VALUE ...]" >&2
  echo "       e.g. launch/tpu_vm.sh recipe-v4 us-central2-b v4-16 gs://my-bucket/runs/purify" >&2
  exit 2
}

[[ $# -ge 4 ]] || usage
tpu=$1 zone=$2 accelerator=$3 workdir_url=$4
shift 4
if [[ "$workdir_url" != gs://*/* ]]; then
  echo "tpu_vm.sh: the workdir '$workdir_url' must be gs://BUCKET/PATH" >&2; usage
fi
command -v gcloud > /dev/null || { echo "tpu_vm.sh: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
bucket=${workdir_url#gs://}; bucket=${bucket%%/*}
workdir="/gcs/$bucket/${workdir_url#gs://$bucket/}"
config=${CONFIG:-configs/purify.py:bert}
stage=${STAGE:-purify}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
gcloud_flags=(--zone "$zone")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project "$PROJECT")

# ------------------------------------------------------------------------- the VM
if ! gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_flags[@]}" > /dev/null 2>&1; then
  create=(gcloud compute tpus tpu-vm create "$tpu" "${gcloud_flags[@]}"
          --accelerator-type "$accelerator" --version "$runtime")
  [[ "${SPOT:-0}" == 1 ]] && create+=(--spot)
  "${create[@]}"
fi

# ------------------------------------------------------------- code on every worker
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
tar -C "$repo" --exclude=./runs --exclude=./.git -czf "$archive" .
gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/recipe_jax.tar.gz" "${gcloud_flags[@]}" --worker=all
setup="set -e; mkdir -p ~/recipe_jax && tar -C ~/recipe_jax -xzf ~/recipe_jax.tar.gz
cd ~/recipe_jax && pip install -q 'jax[tpu]' -r requirements.txt && pip install -q --no-deps -e .
if ! command -v gcsfuse > /dev/null; then
  echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket
mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs $bucket /gcs/$bucket"
gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all --command "$setup"

# --------------------------------------------------------------------- the run
args=(--config "$config" --workdir "$workdir" --config.distributed.auto=True "$@")
run="cd ~/recipe_jax && python -m recipe_jax.$stage $(printf '%q ' "${args[@]}")"
echo "tpu_vm.sh: on every worker of $tpu: $run" >&2
gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_flags[@]}" --worker=all --command "$run"
echo "tpu_vm.sh: done; outputs in $workdir_url (hf/, metrics.jsonl, checkpoints/)" >&2
echo "tpu_vm.sh: delete the VM with: gcloud compute tpus tpu-vm delete $tpu ${gcloud_flags[*]}" >&2
