#!/usr/bin/env python
"""Draw the TotalGen pipeline overview (Resource/pipeline.png): `make figures` runs this."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, width, height, colour, text)
    "raw": (0.2, 3.1, 2.2, 1.0, "#d9d9d9", "DICOM studies or\nAutoPET NIfTI"),
    "pre": (3.0, 3.1, 2.6, 1.0, "#c6dbef", "0_Preprocess\nSUVbw · 2 mm · crop\nclavicles→pelvis"),
    "cohort": (6.2, 3.1, 2.4, 1.0, "#fdd0a2", "cohort directory\nCT (HU) · SUV · labels\ndemographics.csv"),
    "phantom": (6.2, 4.6, 2.4, 0.8, "#fdd0a2", "phantom cohort\n(built-in default)"),
    "lowres": (9.3, 3.9, 2.8, 1.0, "#c7e9c0", "1_Trainings: low-res\n56×56×96 · 8 mm\nEDM2 UNet + demographics"),
    "sr": (9.3, 2.3, 2.8, 1.0, "#c7e9c0", "1_Trainings: super-res\nresidual on 56×56×96 patches\n+ up(LR) + position"),
    "csv": (0.2, 0.6, 2.2, 0.9, "#d9d9d9", "height · weight\nsex · age (CSV)"),
    "infer": (3.0, 0.5, 5.6, 1.1, "#dadaeb", "2_Tests/infer.py: LR sample → whole-volume SR (blended windows)\n"
                                             "→ length from height → CT (HU) + SUV, 224×224×Z at 2 mm"),
    "eval": (9.3, 0.5, 2.8, 1.1, "#fcbba1", "3_Evaluations (vs a reference cohort)\nTotalSegmentator · organ stats\n"
                                            "Welch · ANOVA · violins"),
}
ARROWS = [  # (from point, to point) in axes units, routed so that no arrow crosses a box
    ((2.4, 3.6), (3.0, 3.6)), ((5.6, 3.6), (6.2, 3.6)), ((7.4, 4.6), (7.4, 4.1)),
    ((8.6, 3.8), (9.3, 4.3)), ((8.6, 3.4), (9.3, 2.8)),
    ((10.7, 3.9), (10.7, 3.3)), ((2.4, 1.05), (3.0, 1.05)), ((9.3, 2.45), (8.6, 1.6)),
    ((8.6, 1.05), (9.3, 1.05)),
]
LABELS = [  # (x, y, text) beside an arrow
    (10.8, 3.6, "LR config: grid, height law"), (8.1, 2.05, "both checkpoints"),
]


def draw(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(12.6, 5.2), dpi=100)
    for x, y, w, h, colour, text in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc=colour, ec="#444444", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)
    for a, b in ARROWS:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#333333", lw=1))
    for x, y, text in LABELS:
        ax.text(x, y, text, fontsize=7.5, style="italic", color="#333333", va="center")
    ax.set_xlim(0, 12.3)
    ax.set_ylim(0.2, 5.6)
    ax.axis("off")
    ax.set_title("TotalGen: cascaded 3D diffusion for whole-body FDG PET/CT from demographics", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("pipeline.png")
    print(draw(out))
