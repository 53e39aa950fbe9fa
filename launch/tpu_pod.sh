#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker; jax.distributed detects the pod.
#
#   TPU=my-v4-64 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/imagenet_rdm \
#     bash launch/tpu_pod.sh --config.mesh.fsdp=8
#
# DRY_RUN=1 prints the gcloud command and, with WORKERS=N, what each of the N workers runs.
# Needs: this repo and its stores at the same path on every worker (or a shared filesystem),
# and a WORKDIR every worker can write (checkpoints are written by all processes together): a
# shared filesystem or a bucket (WORKDIR=gs://my-bucket/runs/imagenet_rdm).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"
: "${TPU:?name of the TPU VM}" "${ZONE:?zone}" "${WORKDIR:?shared run directory}"
CONFIG=${CONFIG:-configs/imagenet_rdm.py}
REPO_DIR=${REPO_DIR:-rdm_jax}
WORKER_CMD="cd $(printf '%q' "$REPO_DIR") && .venv/bin/python -m rdm_jax.train --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR") --distributed$(printf ' %q' "$@")"
launch gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$WORKER_CMD"
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then
  for ((w = 0; w < ${WORKERS:-1}; w++)); do echo "worker $w: $WORKER_CMD"; done
fi
