#!/usr/bin/env bash
# The closed-loop fidelity benchmark on one GPU in a fixed wall-clock budget (a lent GPU session):
#   1. bench/fidelity.py with the *_bench_gpu.yaml presets (bench resolution, wider network, batch 16, bf16),
#      each stage trained for half of what the budget leaves after generation and comparison (loop.max_minutes;
#      the report gives the steps reached), held-out cohort seed 1, floor seed 2;
#   2. the same trained stages on another held-out cohort, floor and sampling seed (11 / 12 / 11) if time is left.
# Every part has a time limit; OUT/fidelity.md, OUT_h11/fidelity.md and OUT/part{1,2}.log say what was reached.
# On a bare GPU image (no .venv): PY=python3 PYTHONPATH=$PWD BUDGET=555 SECOND=75 bash bench/gpu_fidelity.sh OUT
# (the README's run: 3.1 min per stage in a 15-minute lease; BUDGET=330 gave 1.25 min).
#
#   BUDGET=555 bash bench/gpu_fidelity.sh [OUT]            # OUT defaults to bench_out/fidelity_gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/fidelity_gpu}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-480}         # seconds for everything below
RESERVE=${RESERVE:-110}       # seconds kept for phantoms, start-up, generation and comparison of part 1
SECOND=${SECOND:-70}          # seconds part 2 needs; skipped when less is left
EXTRA=${EXTRA:-}              # more bench/fidelity.py options (e.g. --subjects 16 --train-subjects 32 for a smoke)
mkdir -p "$OUT"
start=$SECONDS
minutes=$("$PY" -c "print(max(0.2, ($BUDGET - $RESERVE - $SECOND) / 120))")
echo "training budget per stage: $minutes min" >&2
timeout $((BUDGET - SECOND)) "$PY" bench/fidelity.py --out "$OUT" --device "$DEVICE" --quiet $EXTRA \
    --lowres-config 1_Trainings/configs/lowres_bench_gpu.yaml \
    --superres-config 1_Trainings/configs/superres_bench_gpu.yaml --train-minutes "$minutes" \
    > "$OUT/part1.log" 2>&1
echo "part 1: exit $? after $((SECONDS - start)) s" >&2
left=$((BUDGET - (SECONDS - start)))
if [ -d "$OUT/runs/superres" ] && [ "$left" -ge "$SECOND" ]; then
    timeout "$left" "$PY" bench/fidelity.py --out "${OUT}_h11" --runs-from "$OUT/runs" --heldout-seed 11 \
        --device "$DEVICE" --quiet $EXTRA \
        --lowres-config 1_Trainings/configs/lowres_bench_gpu.yaml \
        --superres-config 1_Trainings/configs/superres_bench_gpu.yaml > "$OUT/part2.log" 2>&1
    echo "part 2: exit $? after $((SECONDS - start)) s" >&2
else
    echo "part 2: skipped ($left s left)" >&2
fi
tail -n 1 "$OUT/part1.log" "$OUT/part2.log" 2>/dev/null
