#!/usr/bin/env bash
# Sets up what is missing (scripts/setup_env.py), then runs README's CPU quick start: the
# synthetic_shapes dataset, training and evaluation (--resume: a finished run only evaluates
# again), and the demo picture in output/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$("${PYTHON:-python3}" scripts/setup_env.py)
"$PY" tools/prepare_synthetic.py
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" train_net.py \
    --config-file configs/synthetic/retinamask_synthetic.yaml --resume MODEL.DEVICE cpu
"$PY" demo/demo.py --config-file configs/synthetic/retinamask_synthetic.yaml \
    --input datasets/synthetic_shapes/val/images/000044.png --output output/demo \
    --scale 3 --confidence-threshold 0.4 \
    MODEL.WEIGHTS output/synthetic_retinamask/model_final.pth MODEL.DEVICE cpu
