#!/usr/bin/env bash
# The original project's Quick Start entry point: raw studies -> a training cohort directory.
#
#   bash run_preprocessing.sh --input_dir /path/to/raw_data --output_dir /path/to/processed [options]
#
# It only runs the numbered scripts of this folder, in order, and stops at the first one that fails:
#   1  1_dicom_to_nifti.py          (DICOM input)           or
#   1b 1b_import_autopet_nifti.py   (AutoPET NIfTI release: folders with CT.nii.gz and SUV.nii.gz)
#   2  2_segment_organs.py          (TotalSegmentator, or --labels_from)
#   3  3_crop_and_resample.py       (clavicles-to-pelvis crop, 2 mm, 224 x 224)
#   4  4_fit_height_scaler.py       (slices = a * height_m + b, written to the cohort's height_law.yaml)
# Output: OUTPUT_DIR/work (converted studies, skipped.csv), OUTPUT_DIR/cohort (the cohort directory that
# data.cohort of 1_Trainings/config_lowres.yaml points to) and OUTPUT_DIR/cohort/height_law.yaml.
# Every step is resumable: run the same line again and finished studies are kept.
set -u

usage() {
    cat <<'EOF'
Usage: bash run_preprocessing.sh --input_dir RAW --output_dir OUT [options]

  --input_dir DIR      DICOM studies (any depth) or the AutoPET NIfTI release (detected).
  --output_dir DIR     Writes DIR/work and DIR/cohort.
  --workers N          Parallel processes for every step that has them (default 1).
  --device DEV         TotalSegmentator device: auto, cpu, cuda, cuda:N, mps (default auto).
  --labels_from DIR    Reuse organ segmentations DIR/<subject id>.nii.gz instead of running TotalSegmentator.
  --metadata CSV       AutoPET only: the release's metadata CSV (default: the single *.csv in --input_dir).
  --demographics CSV   AutoPET only: study,height_m,weight_kg per study.
  --dicom_root DIR     AutoPET only: read height/weight from the DICOM release instead.
  --salt TEXT          Secret mixed into the subject-id hash (keep it to reproduce ids).
  --spacing_mm MM      Output voxel size of step 3 (default 2).
  --size N             Output in-plane grid of step 3 (default 224).
  --margin SLICES      Slices kept beyond the landmarks in step 3 (default 20).
  --no_height_fit      Skip step 4 (it needs at least 10 subjects).
  --overwrite          Redo studies that are already complete.
  --quiet              No progress bars.
  -h, --help           This message.
Python: $PYTHON if set, else the repository's .venv, else python3.
EOF
}

die() { echo "run_preprocessing.sh: $*" >&2; exit 2; }

INPUT="" OUTPUT="" WORKERS=1 DEVICE=auto LABELS="" METADATA="" DEMOGRAPHICS="" DICOM_ROOT="" SALT=""
SPACING=2 SIZE=224 MARGIN=20 FIT=1 OVERWRITE=() QUIET=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --no_height_fit) FIT=0; shift; continue ;;
        --overwrite) OVERWRITE=(--overwrite); shift; continue ;;
        --quiet) QUIET=(--quiet); shift; continue ;;
    esac
    [ $# -ge 2 ] || die "option $1 needs a value (see --help)"
    case "$1" in
        --input_dir) INPUT="$2" ;;
        --output_dir) OUTPUT="$2" ;;
        --workers) WORKERS="$2" ;;
        --device) DEVICE="$2" ;;
        --labels_from) LABELS="$2" ;;
        --metadata) METADATA="$2" ;;
        --demographics) DEMOGRAPHICS="$2" ;;
        --dicom_root) DICOM_ROOT="$2" ;;
        --salt) SALT="$2" ;;
        --spacing_mm) SPACING="$2" ;;
        --size) SIZE="$2" ;;
        --margin) MARGIN="$2" ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
[ -n "$INPUT" ] || die "--input_dir is required (see --help)"
[ -n "$OUTPUT" ] || die "--output_dir is required (see --help)"
[ -d "$INPUT" ] || die "--input_dir $INPUT: no such folder"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$HERE/../.venv/bin/python" ]; then PY="$HERE/../.venv/bin/python"
else PY=python3
fi
WORK="$OUTPUT/work"
COHORT="$OUTPUT/cohort"

step() {  # step NAME SCRIPT ARGS...: run one numbered script; stop the whole run if it fails
    local name="$1" script="$2"
    shift 2
    echo "== step $name: $script" >&2
    "$PY" "$HERE/$script" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "run_preprocessing.sh: step $name ($script) failed with exit code $rc; later steps not run." >&2
        exit $rc
    fi
}

# What the input is: the AutoPET release has study folders with CT.nii.gz and SUV.nii.gz; DICOM files
# carry "DICM" at byte 128 (the part-10 preamble) whatever their names.
if [ -n "$(find "$INPUT" -name SUV.nii.gz -print -quit)" ]; then
    KIND=autopet
elif [ -n "$("$PY" - "$INPUT" <<'EOF'
import os, sys
for top, _, files in os.walk(sys.argv[1]):
    for name in files:
        try:
            with open(os.path.join(top, name), "rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    print("dicom")
                    sys.exit(0)
        except OSError:
            pass
EOF
)" ]; then
    KIND=dicom
else
    die "$INPUT: neither DICOM files nor AutoPET study folders (CT.nii.gz + SUV.nii.gz) found"
fi
echo "input: $KIND ($INPUT)" >&2

if [ "$KIND" = dicom ]; then
    step 1 1_dicom_to_nifti.py --input "$INPUT" --output "$WORK" --workers "$WORKERS" --salt "$SALT" \
        "${OVERWRITE[@]}" "${QUIET[@]}"
else
    if [ -z "$METADATA" ]; then
        mapfile -t CSVS < <(find "$INPUT" -maxdepth 1 -name '*.csv')
        [ ${#CSVS[@]} -eq 1 ] || die "AutoPET input: pass --metadata CSV (found ${#CSVS[@]} *.csv in $INPUT)"
        METADATA="${CSVS[0]}"
    fi
    BODY=()
    [ -n "$DEMOGRAPHICS" ] && BODY+=(--demographics "$DEMOGRAPHICS")
    [ -n "$DICOM_ROOT" ] && BODY+=(--dicom-root "$DICOM_ROOT")
    [ ${#BODY[@]} -gt 0 ] || die "AutoPET input: height and weight come from --demographics CSV or --dicom_root DIR"
    step 1b 1b_import_autopet_nifti.py --input "$INPUT" --metadata "$METADATA" "${BODY[@]}" --output "$WORK" \
        --workers "$WORKERS" --salt "$SALT" "${OVERWRITE[@]}" "${QUIET[@]}"
fi

SEG=(--device "$DEVICE" --workers "$WORKERS")
[ -n "$LABELS" ] && SEG+=(--labels-from "$LABELS")
step 2 2_segment_organs.py --work "$WORK" "${SEG[@]}" "${OVERWRITE[@]}" "${QUIET[@]}"
step 3 3_crop_and_resample.py --work "$WORK" --out "$COHORT" --spacing-mm "$SPACING" --size "$SIZE" \
    --margin "$MARGIN" --workers "$WORKERS" "${OVERWRITE[@]}" "${QUIET[@]}"
if [ "$FIT" = 1 ]; then
    step 4 4_fit_height_scaler.py --cohort "$COHORT"
fi
echo "cohort ready: $COHORT (set data.cohort of 1_Trainings/config_lowres.yaml to it)" >&2
