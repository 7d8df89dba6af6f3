#!/usr/bin/env bash
# The prepared accelerator check, one command, for a session that is lent a GPU (see the device tool):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)  -> $OUT/gpu_check.log
# It prints, on a GPU: HVP time / (loss+grad) time and the per-probe cost of
# `hutchinson_trace` for OPT-125M and 1.3B (fp32, bench/hvp.py, with the cost of a 100-checkpoint sweep),
# then training-step MFU (bf16, bench/train_step.py); at most 8 minutes in all. The device image has jax, flax, optax, orbax,
# pandas; the trainer's data stack is not there: carry its wheels in .whl/ (README "Benchmarks") or the
# MFU part is skipped with a message. SMOKE=1 runs the same steps with tiny presets (a CPU check).
#   bash bench/gpu_check.sh wheels   (here, before the run: ~11 MB of cp312 wheels into .whl/)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then  # the trainer's data stack, missing from the device image (see its package list)
  plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: $plat -d .whl array_record==0.8.6 dm-tree==0.1.10 \
    docstring_parser==0.18.0 googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1 \
    importlib_resources==7.1.0 ml_collections==1.1.0 portpicker==1.6.0 simple-parsing==0.1.9 tensorboardX==2.6.5 \
    tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 &&
  python3 -m pip wheel -q --no-deps -w .whl promise==2.3 &&  # sdist only: build its pure-Python wheel here
  ls .whl && exit 0
  exit 1
fi
OUT=${OUT:-/tmp/lmtrace-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
exec > >(tee -a "$LOG") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
if [ "${SMOKE:-0}" = 1 ]; then
  HVP=(--presets=tiny --batch=2 --seq_len=64 --reps=2 --probes=4)
  MFU=("--preset=tiny --seq_len=64 --batch=4 --steps=3")
else
  HVP=(--presets=opt-125m,opt-1.3b --batch=8 --seq_len=512 --reps=5 --probes=8)
  MFU=("--preset=opt-125m --seq_len=2048 --batch=16 --dtype=bfloat16 --steps=30"
       "--preset=opt-1.3b --seq_len=2048 --batch=8 --dtype=bfloat16 --steps=20 --remat")
fi
echo "== HVP cost (bench/hvp.py ${HVP[*]})"
timeout 240 $PY -m bench.hvp "${HVP[@]}" --sweep_checkpoints=100 --sweep_probes=32
echo "== training-step MFU (bench/train_step.py --skip_loop)"
if $PY -c "import ml_collections, grain, tensorflow_datasets, array_record" 2>/dev/null; then
  for m in "${MFU[@]}"; do
    # shellcheck disable=SC2086
    timeout 120 $PY -m bench.train_step $m --skip_loop
  done
else
  echo "skipped: ml_collections / grain / tensorflow_datasets / array_record are not importable here; carry their wheels"
fi
echo "== done"
