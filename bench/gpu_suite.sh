#!/usr/bin/env bash
# The GPU measurements of the Performance section, as one prepared run on one H100/H200 (≤ 8 minutes; every
# part has its own time limit, so a slow part is recorded as such and the rest still runs):
#   1. network FLOPs per subject of the standard recipes (meta tensors, seconds);
#   2. seconds per subject at the paper size, random weights (time does not depend on them), peak memory:
#      the bench presets' sampler (Heun 24 + Euler 10 over the 125 paper windows), eager and under torch.compile,
#      and the research code's recipe (Heun 100 + Heun 100, four 224 x 224 x 112 SR chunks) timed on 10 of its
#      100 steps per stage (19 of 199 calls; a call costs the same at every step, so its 199-call time is
#      extrapolated in gpu_suite.json and labelled so);
#   3. training images/s of both stages, eager and compiled (low-res: bench/lowres_bench.py; SR: one
#      Trainer.train_step in bench/cascade_bench.py).
# Writes OUT/<part>.md, OUT/<part>.json, OUT/<part>.log and the summary OUT/gpu_suite.json.
#
#   bash bench/gpu_suite.sh [OUT]                                 # OUT defaults to bench_out/gpu_suite
#   DEVICE=cpu SIZE=demo LIMIT=300 bash bench/gpu_suite.sh /tmp/gpu_suite_smoke   # the script itself, on a CPU
#   LIMIT=100 COMPILE_SAMPLING=0 bash bench/gpu_suite.sh                          # a shorter lease
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu_suite}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-paper}
LIMIT=${LIMIT:-150}          # seconds per part
COMPILE_SAMPLING=${COMPILE_SAMPLING:-1}   # 0: skip the compiled sampling part (a lease too short for it)
mkdir -p "$OUT"
RESEARCH="research code, 10 of 100 steps: lowres=heun:10, sr=heun:10, window=224x224x112, overlap=0.1, sigma_max=80"
NEW="bench sampler: lowres=heun:24, sr=euler:10, window=56x56x96, overlap=0.25, sigma_max=4·σ_data"
STATUS=()

part() {          # part NAME SECONDS COMMAND...: run with a time limit, keep its output, note how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    STATUS+=("$name $rc $((SECONDS - t0))")
    echo "$name: exit $rc after $((SECONDS - t0)) s" >&2
}

part flops 60 "$PY" bench/cascade_bench.py --flops --json-out "$OUT/flops.json"
# eager: the new recipe, the research recipe's calls, SR training; compiled: the new recipe and SR training
part sampling_eager "$LIMIT" "$PY" bench/cascade_bench.py --size "$SIZE" --device "$DEVICE" --allow-paper-cpu \
    --recipe "$NEW" --recipe "$RESEARCH" --warmup 1 --repeats 2 --json-out "$OUT/sampling_eager.json"
[ "$COMPILE_SAMPLING" = 1 ] && part sampling_compiled "$LIMIT" "$PY" bench/cascade_bench.py --size "$SIZE" \
    --device "$DEVICE" --allow-paper-cpu --recipe "$NEW" --compile --warmup 1 --repeats 2 \
    --json-out "$OUT/sampling_compiled.json"
LOWRES_SIZE=()
[ "$SIZE" = demo ] && LOWRES_SIZE=(--tiny)
part train_lowres "$LIMIT" "$PY" bench/lowres_bench.py --device "$DEVICE" --batch 8 --compile --warmup 2 --repeats 5 \
    "${LOWRES_SIZE[@]}" --json-out "$OUT/train_lowres.json"

"$PY" - "$OUT" "${STATUS[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
summary = {"parts": {}}
for item in sys.argv[2:]:
    name, rc, seconds = item.split()
    path = out / f"{name}.json"
    summary["parts"][name] = {"exit": int(rc), "seconds": int(seconds),
                              "result": json.loads(path.read_text()) if path.is_file() and int(rc) == 0 else None}
eager = summary["parts"].get("sampling_eager", {}).get("result")
for row in (eager or {}).get("pairs", []):
    if row["name"].startswith("research code") and "cascade_s" in row:
        scale = 199 / 19                     # Heun 100 steps = 199 calls; timed: Heun 10 steps = 19 calls per stage
        summary["research_code_s_per_subject_extrapolated"] = {
            "lowres_s": row["lowres_s"] * scale, "sr_s": row["sr_s"] * scale, "post_s": row["post_s"],
            "cascade_s": (row["lowres_s"] + row["sr_s"]) * scale + row["post_s"],
            "how": "19-call (10 Heun steps) times per stage scaled to the recipe's 199 calls"}
(out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
bad = [n for n, p in summary["parts"].items() if p["exit"] != 0]
print(f"{out}/gpu_suite.json: {len(summary['parts']) - len(bad)} of {len(summary['parts'])} parts measured"
      + (f"; failed or timed out: {', '.join(bad)}" if bad else ""))
EOF
