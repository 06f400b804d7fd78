#!/usr/bin/env bash
# One device call for issue 7's QLoRA work: the machine's ceilings, llama-8b 4-bit LoRA beside Unsloth (with and
# without parking up_proj's output), a profile of fasttune's step, then `pytest -m gpu`. Everything under $OUT.
# Device tool: carry [".whl", ".peerpkgs"]; PROFILE=0 / TESTS=0 / PARK=0 skip pieces.
set -uo pipefail
OUT="${OUT:?OUT must name the output folder}"
source scripts/device_setup.sh || exit 1
export FASTTUNE_GIT_COMMIT="${FASTTUNE_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
timeout 60 python3 scripts/gpu_ceilings.py --json "$OUT/ceilings.json" 2>&1 | tail -12
JOBS=${JOBS:-"train:fasttune:llama-8b:4bit:lora:2048:2 train:unsloth:llama-8b:4bit:lora:2048:2"}
args=(); for j in $JOBS; do args+=(--job "$j"); done
timeout 300 python3 -m fasttune.bench "${args[@]}" --results-root "$OUT/res" --log "$OUT/bench.log" 2>&1 | tail -6
if [ "${PARK:-1}" = 1 ]; then
  FASTTUNE_PARK_MLP_UP=1 timeout 120 python3 -m fasttune.bench --job train:fasttune:llama-8b:4bit:lora:2048:2 \
    --results-root "$OUT/res_park" --log "$OUT/bench_park.log" 2>&1 | tail -3
fi
if [ "${PROFILE:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/profile_train.py --stack fasttune --model llama-8b --quant 4bit --warmup 2 --steps 2 \
    --rows 50 --shapes > "$OUT/profile.txt" 2>&1; grep "ms/step" "$OUT/profile.txt"
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout "${TESTS_S:-220}" python3 -m pytest -m gpu -q --maxfail=10 -p no:cacheprovider tests > "$OUT/gpu-tests.txt" 2>&1
  tail -15 "$OUT/gpu-tests.txt"
fi
