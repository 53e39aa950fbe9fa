#!/usr/bin/env bash
# N local CPU processes as N emulated hosts (what tests/test_multiprocess.py does), e.g. to debug
# multi-host input sharding and checkpointing on a laptop:
#
#   bash launch/local_multiprocess.sh 2 configs/fashion_mnist_rdm.py runs/mp --config.train.num_steps=20
#   JOB=rdm_jax.sample bash launch/local_multiprocess.sh 2 configs/fashion_mnist_rdm.py runs/mp  # sample on 2
#   DRY_RUN=1 bash launch/local_multiprocess.sh 2 ...   # print each process's command instead
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
PORT=${PORT:-12355}
# tcmalloc where installed (as make demo/test): glibc malloc costs XLA:CPU page faults every step
TCMALLOC=${TCMALLOC:-/usr/lib/$(uname -m)-linux-gnu/libtcmalloc_minimal.so.4}
[[ -f "$TCMALLOC" ]] || TCMALLOC=""
for ((i = 0; i < N; i++)); do
  launch env XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4} JAX_PLATFORMS=cpu ${TCMALLOC:+LD_PRELOAD=$TCMALLOC} \
    ${PYTHON:-.venv/bin/python} -m ${JOB:-rdm_jax.train} --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    --coordinator_address=localhost:$PORT --num_processes="$N" --process_id=$i "$@" &
  [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]] && wait  # printed in order
done
wait
