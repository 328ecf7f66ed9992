#!/usr/bin/env python
"""What the organ-label channels cost: FLOPs per network call, parameters and data memory of the label
model (CT + PET + one-hot labels) against the two-channel model, for both stages at bench and paper size.

    .venv/bin/python bench/label_overhead.py                     # a few seconds: counted on the meta device

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on meta tensors (nothing is computed), for
one call of each stage's network on its sample (low-res) or window (super-resolution) shape; the label set
is libs.channels.DEFAULT_LABEL_GROUPS unless ``--groups`` names a YAML mapping.  Data memory: bytes of one
network input (float32) and of one subject kept in memory for training (float16 images + uint8 group
indices).  The last line printed is the summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_flops import CallCounter  # noqa: E402

from libs.channels import DEFAULT_LABEL_GROUPS, ChannelSet  # noqa: E402
from libs.config import load_config  # noqa: E402
from libs.lowres import LowresConfig  # noqa: E402
from libs.nn import count_parameters  # noqa: E402
from libs.superres import SRConfig, sr_cond_channels  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "1_Trainings" / "configs"
SIZES = {"bench": ("lowres_bench.yaml", "superres_bench.yaml"), "paper": ("lowres_paper.yaml", "superres_paper.yaml")}


def call_cost(cfg, channels: ChannelSet, stage: str, shape) -> tuple[float, int]:
    """(FLOPs of one forward call on ``shape``, parameters) of a stage's network for ``channels``."""
    cond = sr_cond_channels(channels, cfg.data.lr_anchors) if stage == "superres" else 4
    with torch.device("meta"):
        net = cfg.model.build(in_channels=channels.count, cond_channels=cond)
    return CallCounter(cfg, cfg, channels).call(stage, shape), count_parameters(net)


def rows_for(size: str, labelled: ChannelSet) -> list[dict]:
    low_name, sr_name = SIZES[size]
    low = load_config(CONFIGS / low_name, LowresConfig)
    sr = load_config(CONFIGS / sr_name, SRConfig)
    window = tuple(sr.window.size or sr.data.patch)
    grid = tuple(low.data.grid)
    out = []
    for stage, cfg, shape in (("lowres", low, low.sample_shape), ("superres", sr, window)):
        base_flops, base_params = call_cost(cfg, ChannelSet(), stage, shape)
        flops, params = call_cost(cfg, labelled, stage, shape)
        voxels = int(torch.tensor(shape).prod())
        inputs_2ch = 2 + (sr_cond_channels(ChannelSet(), sr.data.lr_anchors) if stage == "superres" else 4)
        inputs_labels = labelled.count + (sr_cond_channels(labelled, sr.data.lr_anchors) if stage == "superres" else 4)
        out.append({"size": size, "stage": stage, "shape": shape, "flops_2ch": base_flops, "flops_labels": flops,
                    "flop_overhead_pct": 100 * (flops / base_flops - 1), "params_2ch": base_params,
                    "params_labels": params, "input_mb_2ch": inputs_2ch * voxels * 4 / 1e6,
                    "input_mb_labels": inputs_labels * voxels * 4 / 1e6})
    subject_voxels = int(torch.tensor(grid).prod())
    out.append({"size": size, "stage": "training data per subject", "shape": grid,
                "memory_mb_2ch": subject_voxels * 2 * 2 / 1e6, "memory_mb_labels": subject_voxels * 5 / 1e6})
    return out


@click.command()
@click.option("--groups", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML mapping group -> [TotalSegmentator class names] [the default groups].")
def main(groups):
    labelled = ChannelSet.from_groups(yaml.safe_load(Path(groups).read_text()) if groups else DEFAULT_LABEL_GROUPS)
    print(f"label channels: {labelled.n_classes} ({', '.join(labelled.names[2:])})")
    print("| size | stage | call shape | GFLOP 2 ch | GFLOP labels | FLOP overhead | parameters 2 ch → labels | "
          "network input MB 2 ch → labels |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for size in SIZES:
        for r in rows_for(size, labelled):
            if "flops_2ch" in r:
                worst = max(worst, r["flop_overhead_pct"])
                print(f"| {size} | {r['stage']} | {'×'.join(map(str, r['shape']))} | {r['flops_2ch'] / 1e9:.1f} | "
                      f"{r['flops_labels'] / 1e9:.1f} | +{r['flop_overhead_pct']:.2f} % | "
                      f"{r['params_2ch'] / 1e6:.2f} M → {r['params_labels'] / 1e6:.2f} M | "
                      f"{r['input_mb_2ch']:.1f} → {r['input_mb_labels']:.1f} |")
            else:
                print(f"| {size} | {r['stage']} | {'×'.join(map(str, r['shape']))} | | | | | "
                      f"{r['memory_mb_2ch']:.1f} → {r['memory_mb_labels']:.1f} (float16 images + uint8 labels) |")
    print(f"label channels ({labelled.n_classes} classes): FLOP overhead per network call at most +{worst:.2f} %")


if __name__ == "__main__":
    main()
