#!/usr/bin/env bash
# The GPU measurements of the Performance section, as one prepared run on one H100/H200 (≤ 8 minutes by default; every
# part has its own time limit, so a slow part is recorded as such and the rest still runs):
#   1. network FLOPs per subject of the standard recipes (meta tensors, seconds);
#   2. seconds per subject at the paper size, random weights (time does not depend on them), peak memory:
#      the paper presets' sampler (Heun 24 + Euler 10 over the 125 paper windows; the bench presets' too), eager
#      (and under torch.compile with COMPILE_SAMPLING=1),
#      and the research code's recipe (Heun 100 + Heun 100, four 224 x 224 x 112 SR chunks) timed on 10 of its
#      100 steps per stage (19 of 199 calls; a call costs the same at every step, so its 199-call time is
#      extrapolated in gpu_suite.json and labelled so);
#   3. training images/s of both stages: low-res eager and compiled (bench/lowres_bench.py), SR eager (one
#      Trainer.train_step in bench/cascade_bench.py; compiled with COMPILE_SAMPLING=1).
# Without the project's .venv (a bare GPU image): PY=python3 PYTHONPATH=$PWD bash bench/gpu_suite.sh.
# Writes OUT/<part>.md, OUT/<part>.json, OUT/<part>.log and the summary OUT/gpu_suite.json.
#
#   bash bench/gpu_suite.sh [OUT]                                 # OUT defaults to bench_out/gpu_suite
#   DEVICE=cpu SIZE=demo LIMIT=300 bash bench/gpu_suite.sh /tmp/gpu_suite_smoke   # the script itself, on a CPU
#   COMPILE_SAMPLING=1 bash bench/gpu_suite.sh                                    # + compiled sampling (~12 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu_suite}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-paper}
# seconds per part, sized from the first H200 run (2026-12-04): eager sampling of both recipes ~2 min; the
# low-res training cells ~20 s eager, then torch.compile of the paper UNet's forward 46 s and its backward more
# than 85 s. The compiled sampling part (compile of both paper networks, then 2 repeats) is off unless asked for.
LIMIT=${LIMIT:-}                          # one limit for every part (overrides the three below)
SAMPLE_LIMIT=${LIMIT:-${SAMPLE_LIMIT:-160}}
TRAIN_LIMIT=${LIMIT:-${TRAIN_LIMIT:-260}}
COMPILE_LIMIT=${LIMIT:-${COMPILE_LIMIT:-240}}
COMPILE_SAMPLING=${COMPILE_SAMPLING:-0}   # 1: also time the new recipe under torch.compile
mkdir -p "$OUT"
RESEARCH="research code, 10 of 100 steps: lowres=heun:10, sr=heun:10, window=224x224x112, overlap=0.1, sigma_max=80"
NEW="paper presets: lowres=heun:24, sr=euler:10, window=56x56x96, overlap=0.25, sigma_max=20·σ_data"
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
part sampling_eager "$SAMPLE_LIMIT" "$PY" bench/cascade_bench.py --size "$SIZE" --device "$DEVICE" --allow-paper-cpu \
    --recipe "$NEW" --recipe "$RESEARCH" --warmup 1 --repeats 2 --json-out "$OUT/sampling_eager.json"
[ "$COMPILE_SAMPLING" = 1 ] && part sampling_compiled "$COMPILE_LIMIT" "$PY" bench/cascade_bench.py --size "$SIZE" \
    --device "$DEVICE" --allow-paper-cpu --recipe "$NEW" --compile --warmup 1 --repeats 2 \
    --json-out "$OUT/sampling_compiled.json"
LOWRES_SIZE=()
[ "$SIZE" = demo ] && LOWRES_SIZE=(--tiny)
part train_lowres "$TRAIN_LIMIT" "$PY" bench/lowres_bench.py --device "$DEVICE" --batch 8 --compile --cudnn-benchmark \
    --warmup 2 --repeats 5 \
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
