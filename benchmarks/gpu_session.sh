#!/usr/bin/env bash
# Every prepared GPU run of a session with one GPU, as one command that ends within SECONDS:
#
#   benchmarks/gpu_session.sh OUT SECONDS
#
# 1. smoke (~1 min): environment, and the world study's path end to end on a tiny world (pretrain
#    method=softmask with the world config, evaluate world); stops here if that fails;
# 2. the world study (benchmarks/world_study.py): 5 variants x 3 seeds on a 10,000-image world, all
#    runs side by side on the GPU, steps chosen by calibration to fit what is left minus 3. and 4.;
# 3. the pretraining-step benchmark (benchmarks/gpu.sh, the 4m config, bf16, batch 64);
# 4. the retrieval-evaluation benchmark (benchmarks/retrieval_eval.py, the 4m model, fast vs plain).
#
# SMOKE=0 skips 1. (the study then fails fast by itself if the path is broken); BENCH=0 skips 3. and 4.
# and gives their time to the study.
#
# Results land in OUT as at most 8 files (the device tool's limit). Needs python3 with CUDA torch and
# this project's dependencies on PYTHONPATH (kornia, webdataset; the MiniLM package for the world config).
set -uo pipefail
OUT=${1:?output folder}
TOTAL=${2:?seconds}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
SMOKE=${SMOKE:-1}
BENCH=${BENCH:-1}
BENCH_RESERVE=$(( BENCH ? 125 : 5 ))  # 3. and 4. together, each under its own timeout

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, kornia, softmask; print('torch', torch.__version__, 'kornia', kornia.__version__, torch.cuda.get_device_name())" || exit 1

if (( SMOKE )); then
{
  W=/tmp/smoke_world
  python3 -m softmask -q world --out $W --images 120 --size 64 --workers 8 &&
  python3 -m softmask -q pretrain --config configs/pretrain/world.yaml world=$W method=softmask \
    output_dir=/tmp/smoke_run train.max_steps=5 train.batch_size=16 train.log_every=1 itc.queue_size=64 &&
  python3 -m softmask -q evaluate world --checkpoint /tmp/smoke_run --world $W --k 4 --json /tmp/smoke_eval.json &&
  echo "SMOKE OK at $(elapsed) s"
} > "$OUT/env_smoke.txt" 2>&1
cat "$OUT/env_smoke.txt" | tail -20
grep -q "SMOKE OK" "$OUT/env_smoke.txt" || { echo "smoke failed: stopping"; exit 1; }
fi

# The study: what is left, minus the benchmarks; world_study needs ~100 s of it outside training on an
# H200 (session 2: world generation + evaluating 15 runs 49 s, calibration 41 s), plus a margin.
STUDY=$(( TOTAL - $(elapsed) - BENCH_RESERVE ))
S=/tmp/study
# STUDY_ARGS replaces the calibrated budget, e.g. STUDY_ARGS="--variants albef --seeds 0 --steps 3000";
# STUDY_OVERRIDES are config overrides for every run (key=value ...).
timeout $STUDY python3 benchmarks/world_study.py --out $S --images 10000 --size 64 --k 16 \
  ${STUDY_ARGS:---budget-s $(( STUDY - 140 ))} ${STUDY_OVERRIDES:-} > "$OUT/study.log" 2>&1
echo "study rc $? at $(elapsed) s"
cp $S/study.json $S/study.md "$OUT/" 2>/dev/null
(cd $S && tar czf "$OUT/study_runs.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='events.*' \
   ./*_s* calibration 2>/dev/null)
tail -28 "$OUT/study.log"

(( BENCH )) || exit 0
STEPS=6 WARMUP=2 METHODS=albef,softmask timeout 60 bash benchmarks/gpu.sh > "$OUT/bench_step.json" 2> "$OUT/bench_step.err"
echo "step benchmark rc $? at $(elapsed) s"
cat "$OUT/bench_step.json"
timeout 60 python3 benchmarks/retrieval_eval.py --config configs/pretrain/4m.yaml --images 300 --k 64 \
  --repeats 2 --batch-size 256 --json > "$OUT/retrieval_4m.json" 2>> "$OUT/bench_step.err"
echo "retrieval benchmark rc $? at $(elapsed) s"
cat "$OUT/retrieval_4m.json"
