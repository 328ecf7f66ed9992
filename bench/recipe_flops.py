"""Network FLOPs per generated subject for a sampling recipe of the cascade, counted (not estimated).

A recipe is: the low-res solver and steps, the super-resolution solver and steps (and, for the record, the SR
starting noise level, which changes no FLOP by itself), and the SR window size and overlap.  One network call
of each stage is counted by torch.utils.flop_counter.FlopCounterMode on meta tensors (nothing is computed; a
multiply-add counts 2), once per distinct input shape; a subject costs

    (low-res calls) × (one low-res call) + (SR calls) × Σ over the SR windows of (one call on that window),

with Heun's 2N − 1 calls for N steps (the last step is an Euler step), Euler's and DPM-Solver++(2M)'s N.
Networks are the paper presets' (lowres_paper.yaml, superres_paper.yaml).

    .venv/bin/python bench/cascade_bench.py --flops                      # the table for the standard recipes
    .venv/bin/python bench/cascade_bench.py --flops --recipe "mine: lowres=heun:16, sr=euler:8, window=112x112x192"
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from libs.channels import ChannelSet
from libs.lowres import LowresConfig
from libs.samplers import network_calls
from libs.superres import SRConfig, sr_cond_channels
from libs.windows import window_grid


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one subject is sampled, as far as cost goes."""

    name: str
    lowres_solver: str
    lowres_steps: int
    sr_solver: str
    sr_steps: int
    window: tuple[int, int, int]
    overlap: float
    sr_sigma_max: str = ""

    def __post_init__(self):
        network_calls(self.lowres_solver, self.lowres_steps)
        network_calls(self.sr_solver, self.sr_steps)
        if len(self.window) != 3 or min(self.window) < 1:
            raise ValueError(f"recipe {self.name!r}: window must be three positive sizes, got {self.window}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"recipe {self.name!r}: overlap must lie in [0, 1), got {self.overlap}")

    @property
    def lowres_calls(self) -> int:
        return network_calls(self.lowres_solver, self.lowres_steps)

    @property
    def sr_calls(self) -> int:
        return network_calls(self.sr_solver, self.sr_steps)

    def describe(self) -> str:
        start = f" from σ {self.sr_sigma_max}" if self.sr_sigma_max else ""
        return (f"{self.lowres_solver} {self.lowres_steps} + {self.sr_solver} {self.sr_steps}{start}, windows "
                f"{'×'.join(map(str, self.window))} overlap {self.overlap:g}")


# The research code: 100 Heun steps per stage on the 100-step Karras grid, SR in four 112-slice chunks of the
# full 224 × 224 plane (window 224 × 224 × 112; overlap 0.1 gives exactly its 4 chunks over 384 slices).
RESEARCH = Recipe("research code", "heun", 100, "heun", 100, (224, 224, 112), 0.1, "80")


def parse_recipe(text: str) -> Recipe:
    """``"NAME: lowres=heun:32, sr=euler:10, window=56x56x96, overlap=0.25, sigma_max=2"`` → Recipe.

    Every key is required except sigma_max (recorded only)."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"recipe {text!r}: expected 'NAME: lowres=SOLVER:N, sr=SOLVER:N, window=XxYxZ, overlap=F'")
    fields = {}
    for item in body.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ValueError(f"recipe {name.strip()!r}: {item.strip()!r} is not KEY=VALUE")
        fields[key] = value
    missing = {"lowres", "sr", "window", "overlap"} - set(fields)
    unknown = set(fields) - {"lowres", "sr", "window", "overlap", "sigma_max"}
    if missing or unknown:
        raise ValueError(f"recipe {name.strip()!r}: " + "; ".join(
            ([f"missing {', '.join(sorted(missing))}"] if missing else [])
            + ([f"unknown {', '.join(sorted(unknown))}"] if unknown else [])))
    try:
        (lo_solver, lo_steps), (sr_solver, sr_steps) = (fields[k].split(":") for k in ("lowres", "sr"))
        window = tuple(int(v) for v in fields["window"].lower().split("x"))
        return Recipe(name.strip(), lo_solver, int(lo_steps), sr_solver, int(sr_steps), window,
                      float(fields["overlap"]), fields.get("sigma_max", ""))
    except ValueError as exc:
        raise ValueError(f"recipe {name.strip()!r}: {exc}") from None


def preset_recipe(name: str, low: LowresConfig, sr: SRConfig) -> Recipe:
    """The sampler and window settings of a pair of presets."""
    return Recipe(name, low.sample.solver, low.sample.steps, sr.sample.solver, sr.sample.steps,
                  tuple(sr.window.size or sr.data.patch), sr.window.overlap, f"{sr.sample.sigma_max_ratio:g}·σ_data")


class CallCounter:
    """FLOPs of one network call of each stage, counted once per input shape on meta tensors."""

    def __init__(self, low: LowresConfig, sr: SRConfig, channels: ChannelSet | None = None):
        self.low, self.sr = low, sr
        self.channels = channels or ChannelSet()
        self._call = cache(self._count)

    def _count(self, stage: str, shape: tuple[int, int, int]) -> float:
        cfg = self.sr if stage == "superres" else self.low
        cond = sr_cond_channels(self.channels, self.sr.data.lr_anchors) if stage == "superres" else 4
        with torch.device("meta"):
            net = cfg.model.build(in_channels=self.channels.count, cond_channels=cond)
            x, c = torch.zeros(1, self.channels.count, *shape), torch.zeros(1, cond, *shape)
            with FlopCounterMode(display=False) as counter:
                net(x, torch.zeros(1), c)
        return float(counter.get_total_flops())

    def call(self, stage: str, shape) -> float:
        return self._call(stage, tuple(int(s) for s in shape))


def subject_flops(recipe: Recipe, counter: CallCounter, grid) -> dict:
    """Network FLOPs of one subject on the full ``grid`` under ``recipe``: per stage, the windows and their
    redundancy (window voxels per volume voxel), and the total."""
    grid = tuple(int(g) for g in grid)
    win, starts, _ = window_grid(grid, recipe.window, recipe.overlap)
    shapes = [tuple(min(w, g - s) for w, s, g in zip(win, start, grid)) for start in starts]
    sr_call = sum(counter.call("superres", shape) for shape in shapes)
    low_call = counter.call("lowres", counter.low.sample_shape)
    out = {"recipe": recipe, "lowres_calls": recipe.lowres_calls, "lowres_call_flops": low_call,
           "lowres_flops": recipe.lowres_calls * low_call, "sr_calls": recipe.sr_calls, "windows": len(starts),
           "redundancy": sum(math.prod(s) for s in shapes) / math.prod(grid), "sr_call_flops": sr_call,
           "sr_flops": recipe.sr_calls * sr_call}
    out["total_flops"] = out["lowres_flops"] + out["sr_flops"]
    return out


def flop_table(rows: list[dict], reference: dict) -> str:
    """Markdown: one row per recipe, with the ratio of the reference's FLOPs to each recipe's."""
    lines = ["| recipe | sampler (low-res + SR), SR windows | network calls (low-res + SR) | SR windows per call "
             "(redundancy) | PFLOP low-res | PFLOP SR | PFLOP per subject | fewer FLOPs than the research code |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = r["recipe"]
        lines.append(f"| {rec.name} | {rec.describe()} | {r['lowres_calls']} + {r['sr_calls']} | {r['windows']} "
                     f"({r['redundancy']:.2f}×) | {r['lowres_flops'] / 1e15:.2f} | {r['sr_flops'] / 1e15:.2f} | "
                     f"{r['total_flops'] / 1e15:.2f} | {reference['total_flops'] / r['total_flops']:.1f}× |")
    return "\n".join(lines)
