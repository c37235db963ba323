#!/usr/bin/env bash
# The GPU check of LLaVA-1.5-7B shapes in bf16: parity against HF, then the benchmark ratios.
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine: about 5-8 minutes in all
#   bash benchmarks/gpu_check.sh --device cpu         # the same steps with small shapes, on CPU
#
# Timeouts: each step has its own (PARITY_S, BENCH_S below); a step that runs out is reported as
# "timed out" and the next one still runs; the whole script stops at TOTAL_S. Results go to
# benchmarks/results/<gpu name>.md (CPU: results/cpu_check.md), with each step's own .md appended.
# It has NOT been run on a GPU yet: no GPU in the sessions that wrote it.
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE="${2:-cuda}"; fi
export PYTHONPATH="${PYTHONPATH:-.}:."
TOTAL_S=${TOTAL_S:-470}
if [ "$DEVICE" = "cpu" ]; then
  CONFIG=tiny; LAYERS=2; PARITY_S=${PARITY_S:-120}; BENCH_S=${BENCH_S:-240}
  NAME=cpu_check; BENCH_ARGS="--config tiny --quick --skip-probes --batches 1"
else
  CONFIG=llava-7b; LAYERS=32; PARITY_S=${PARITY_S:-200}; BENCH_S=${BENCH_S:-240}
  NAME=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || exit 1
  BENCH_ARGS="--config llava-7b --rounds 3 --batches 1 --new-tokens 16 --skip-probes"
fi
OUT=benchmarks/results/$NAME
mkdir -p "$OUT"
START=$(date +%s)
REPORT=benchmarks/results/$NAME.md
echo "# GPU check: $NAME ($(date '+%Y-%m-%d %H:%M:%S'))" > "$REPORT"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() {  # step <title> <seconds> <command...>
  local title=$1 limit=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt "$limit" ]; then limit=$budget; fi
  if [ "$limit" -le 10 ]; then echo -e "\n## $title\n\nskipped: no time left" >> "$REPORT"; return; fi
  echo "[gpu_check] $title (limit ${limit}s)"
  timeout "$limit" "$@"; local rc=$?
  if [ $rc -eq 124 ]; then echo -e "\n## $title\n\ntimed out after ${limit}s" >> "$REPORT";
  elif [ $rc -ne 0 ]; then echo -e "\n## $title\n\nfailed (exit $rc)" >> "$REPORT"; fi
}

step "parity bf16 ($CONFIG, $LAYERS LM layers, $DEVICE)" "$PARITY_S" \
  python benchmarks/parity_7b.py --config "$CONFIG" --lm-layers "$LAYERS" --device "$DEVICE" --repeats 3 --out "$OUT"
step "benchmark ratios ($CONFIG, $DEVICE)" "$BENCH_S" \
  python benchmarks/run.py $BENCH_ARGS --out "$OUT"
for f in "$OUT"/*.md; do [ -f "$f" ] && { echo; cat "$f"; } >> "$REPORT"; done
echo "[gpu_check] wrote $REPORT in $(( $(date +%s) - START ))s"
