#!/usr/bin/env bash
# The dSprites Table 3 grid (bench.dsprites_table) on one GPU, run from the repo root:
# beta-VAE, FactorVAE, AD-FactorVAE and AD-FactorVAE with --ad-maps normalized, seeds 0-2,
# all 12 runs at once sharing the GPU, >= 30k steps each, sized by a calibration so that
# the whole script ends inside TOTAL_SECONDS; first bench.speed_limit's rows for that GPU.
#
#     bash bench/gpu_dsprites.sh             # summaries in $OUT (or runs/gpu-dsprites)
#
# The same on the CPU at tiny size (a smoke run of this script):
#     REQUIRE_GPU=0 SEEDS=0 MODELS=beta_vae JOBS=1 STEPS=4 MIN_STEPS=2 CALIBRATE=2 \
#     SPEED="--quick" TINY="--batch-size 8 --metric-train-votes 4 --metric-eval-votes 4 \
#     --metric-samples 4 --metric-variance-samples 64 --eval-images 16" \
#     bash bench/gpu_dsprites.sh
#
# Installs nothing: it needs a Python whose TensorFlow sees a GPU ($PYTHON, else the
# repo's .venv, else python3) and stops with a clear message when there is none. The run
# folders stay in runs/gpu-dsprites; $OUT gets the few summary files only.
set -euo pipefail

RUNS=${RUNS:-runs/gpu-dsprites}
SUMMARY=${OUT:-$RUNS}
STEPS=${STEPS:-30000}
MIN_STEPS=${MIN_STEPS:-30000}
TOTAL_SECONDS=${TOTAL_SECONDS:-570}
JOBS=${JOBS:-12}
SEEDS=${SEEDS:-0 1 2}
MODELS=${MODELS:-beta_vae factor_vae ad_factor_vae ad_factor_vae-normalized}
CALIBRATE=${CALIBRATE:-200}
SPEED=${SPEED:---models factorvae adfactorvae --repeats 10 --budget 10}
TINY=${TINY:-}
mkdir -p "$RUNS" "$SUMMARY"

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import tensorflow" 2>/dev/null; then
    echo "error: $PYTHON has no TensorFlow; set PYTHON to a Python that has it" >&2
    exit 3
fi
export TF_CPP_MIN_LOG_LEVEL=2 TF_FORCE_GPU_ALLOW_GROWTH=true PYTHONUNBUFFERED=1
"$PYTHON" -c "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); \
print('TensorFlow', tf.__version__, 'GPUs:', gpus); \
raise SystemExit(0 if gpus or '${REQUIRE_GPU:-1}' == '0' else 4)" \
    || { echo "error: TensorFlow in $PYTHON sees no GPU" >&2; exit 4; }

# shellcheck disable=SC2086  # word splitting of the option lists is meant
"$PYTHON" -m bench.speed_limit $SPEED 2>&1 | tee "$SUMMARY/speed_limit.txt"

# the 2000-step table's trainer flags (bench/RESULTS.md), with bf16 and XLA
BUDGET_MINUTES=$("$PYTHON" -c "print(round(($TOTAL_SECONDS - $SECONDS) / 60, 2))")
echo "grid budget: $BUDGET_MINUTES minutes"
# shellcheck disable=SC2086
"$PYTHON" -m bench.dsprites_table --steps "$STEPS" --min-steps "$MIN_STEPS" \
    --seeds $SEEDS --models $MODELS --jobs "$JOBS" --budget-minutes "$BUDGET_MINUTES" \
    --calibrate-steps "$CALIBRATE" --out "$RUNS/table3" -- \
    --epochs 10 --batch-size 64 --lr 1e-3 --d-lr 1e-3 \
    --metric-train-votes 500 --metric-eval-votes 500 \
    --precision mixed_bfloat16 --jit-compile $TINY 2>&1 | tee "$SUMMARY/table3.txt"
cp "$RUNS/table3/table.json" "$RUNS/table3/table.png" "$SUMMARY/"
