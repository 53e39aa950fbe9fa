#!/usr/bin/env bash
# The GPU measurements in one call, for a lent NVIDIA machine that has jax, flax, torch and
# transformers but cannot reach a package index (the project's device machine: H100/H200).
#
#   bash benchmarks/gpu.sh --fetch-wheels   # here, with pip access: the missing packages as
#                                           # wheels in .whl/ (git-ignored through .git/info/exclude)
#   bash benchmarks/gpu.sh                  # there, from the repository root, .whl/ carried along
#
# Installs the wheels into /tmp/site, prints the GPU and the versions, then times the full
# ImageNet UNet's train step (benchmarks/train_throughput.py --only=imagenet): XLA's and cuDNN's
# attention against diffusers' UNet on the same GPU, with MFU. Logs go to $OUT when it is set.
# Variables: BATCH (64), ATTENTION (xla,cudnn), STEPS (10), ROUNDS (3), LIMIT seconds (500).
set -uo pipefail
cd "$(dirname "$0")/.."

# diffusers for the PyTorch reference; the rest are what rdm_jax needs beyond such an image.
WHEELS=(diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata==10.2.0 optax==0.2.8)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# XLA takes 55% of the GPU's memory; PyTorch, in the same process, the rest.
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.55}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv \
  2>&1 | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax, torch, diffusers; d = jax.devices()[0]
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__,
      'diffusers', diffusers.__version__, '|', d.platform, d.device_kind, 'x', jax.device_count())" \
  2>&1 | tee -a "$out/gpu.txt"
timeout "${LIMIT:-500}" python3 benchmarks/train_throughput.py --only=imagenet --conv=xla \
    --batch="${BATCH:-64}" --attention="${ATTENTION:-xla,cudnn}" --steps="${STEPS:-10}" --rounds="${ROUNDS:-3}" \
  2>&1 | grep --line-buffered -v -i warning | tee "$out/train_throughput.log"
status=$?
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$out/gpu.txt"
exit $status
