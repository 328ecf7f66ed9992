"""FLOP accounting of sampling recipes (bench/recipe_flops.py, bench/cascade_bench.py --flops): the counted FLOPs
of a network call equal a hand count of its convolutions, linear layers and attention; a subject's FLOPs
compose from calls and windows; recipes parse and refuse bad specs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from libs.channels import ChannelSet
from libs.config import load_config
from libs.lowres import LowresConfig
from libs.nn import Block, MPConv3d
from libs.superres import SRConfig, sr_cond_channels
from libs.windows import window_grid
from tests.test_superres import LOWRES, SR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from recipe_flops import (  # noqa: E402
    RESEARCH,
    CallCounter,
    Recipe,
    network_calls,
    parse_recipe,
    subject_flops,
)


def _tiny() -> tuple[LowresConfig, SRConfig]:
    low = json.loads(json.dumps(LOWRES))
    low["model"]["attn_levels"] = [-1]                      # one attention level, so attention is counted too
    low["data"]["cohort"] = "unused"
    sr = json.loads(json.dumps(SR))
    sr["data"]["cohort"], sr["lowres_config"] = "unused", "unused.yaml"
    return load_config(low, LowresConfig), load_config(sr, SRConfig)


@torch.no_grad()
def _hand_count(net: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor) -> float:
    """2 · multiply-adds of every convolution and linear layer, plus 4 · L² · C for each attention block
    (q kᵀ and the weighted sum of v over L tokens of C channels), from shapes seen in a real forward."""
    total = [0.0]

    def conv_hook(module, inputs, output):
        w = module.weight
        if w.ndim == 2:                                    # linear on (B, in)
            total[0] += 2 * output.shape[0] * w.shape[0] * w.shape[1]
        else:                                              # 'same' convolution: every output voxel
            total[0] += 2 * output.numel() * w.shape[1] * math.prod(w.shape[2:])

    def block_hook(module, inputs, output):
        if module.num_heads:
            b, c, *spatial = output.shape
            total[0] += 4 * b * math.prod(spatial) ** 2 * c

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules() if isinstance(m, MPConv3d)]
    hooks += [m.register_forward_hook(block_hook) for m in net.modules() if isinstance(m, Block)]
    net.eval()(x, torch.zeros(x.shape[0]), cond)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.mark.parametrize("stage", ["lowres", "superres"])
def test_counted_call_flops_equal_a_hand_count(stage):
    low, sr = _tiny()
    counter = CallCounter(low, sr)
    shape = (16, 16, 32)
    cond_channels = 4 if stage == "lowres" else sr_cond_channels(ChannelSet(), sr.data.lr_anchors)
    cfg = low if stage == "lowres" else sr
    net = cfg.model.build(in_channels=2, cond_channels=cond_channels)
    hand = _hand_count(net, torch.randn(1, 2, *shape), torch.randn(1, cond_channels, *shape))
    counted = counter.call(stage, shape)
    assert hand > 0 and counted == pytest.approx(hand, rel=1e-9), (counted, hand)


def test_subject_flops_compose_from_calls_and_windows():
    low, sr = _tiny()
    counter = CallCounter(low, sr)
    grid = (32, 32, 64)
    recipe = Recipe("r", "heun", 5, "euler", 3, (16, 16, 32), 0.25)
    got = subject_flops(recipe, counter, grid)
    # window_starts(32, 16, 0.25) = [0, 8, 16] and (64, 32, 0.25) = [0, 16, 32]: 27 windows of 16×16×32
    assert got["windows"] == 27 and got["redundancy"] == pytest.approx(27 * 16 * 16 * 32 / (32 * 32 * 64))
    assert got["lowres_calls"] == 9 and got["sr_calls"] == 3
    one_window = counter.call("superres", (16, 16, 32))
    assert got["sr_flops"] == pytest.approx(3 * 27 * one_window)
    assert got["lowres_flops"] == pytest.approx(9 * counter.call("lowres", low.sample_shape))
    assert got["total_flops"] == pytest.approx(got["lowres_flops"] + got["sr_flops"])
    whole = subject_flops(Recipe("one", "heun", 5, "euler", 3, (32, 32, 64), 0.25), counter, grid)
    assert whole["windows"] == 1 and whole["redundancy"] == 1.0


def test_research_recipe_and_recipe_specs():
    assert network_calls("heun", 100) == 199 and network_calls("euler", 10) == network_calls("dpmpp_2m", 10) == 10
    _, starts, _ = window_grid((224, 224, 384), RESEARCH.window, RESEARCH.overlap)
    assert [s[2] for s in starts] == [0, 91, 181, 272], "the research code's four 112-slice chunks"
    assert {s[:2] for s in starts} == {(0, 0)}
    r = parse_recipe("fast: lowres=heun:16, sr=euler:8, window=112x112x192, overlap=0.1, sigma_max=2")
    assert (r.name, r.lowres_calls, r.sr_calls, r.window, r.overlap, r.sr_sigma_max) == (
        "fast", 31, 8, (112, 112, 192), 0.1, "2")
    for bad, match in (("no name", "expected 'NAME:"), ("x: lowres=heun:4, sr=euler:2", "missing overlap, window"),
                       ("x: lowres=rk4:4, sr=euler:2, window=8x8x8, overlap=0", "got 'rk4'"),
                       ("x: lowres=heun:4, sr=euler:2, window=8x8, overlap=0", "three positive sizes"),
                       ("x: lowres=heun:4, sr=euler:2, window=8x8x8, overlap=0, steps=3", "unknown steps")):
        with pytest.raises(ValueError, match=match):
            parse_recipe(bad)


def test_cascade_bench_flops_cli(tmp_path):
    out = tmp_path / "flops.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "cascade_bench.py"), "--flops", "--recipe",
                          "mine: lowres=heun:16, sr=euler:8, window=56x56x96, overlap=0.25", "--json-out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| research code |" in res.stdout and "| mine |" in res.stdout
    rows = json.loads(out.read_text())
    assert rows[0]["ratio_to_research"] == 1.0 and rows[0]["sr_calls"] == 199 and rows[0]["windows"] == 4
    mine = rows[-1]
    assert mine["windows"] == 125 and mine["sr_calls"] == 8 and mine["lowres_calls"] == 31
    assert mine["ratio_to_research"] == pytest.approx(rows[0]["total_flops"] / mine["total_flops"])
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "cascade_bench.py"), "--flops", "--recipe", "x: a=b"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown a" in bad.stderr


def test_cascade_bench_times_recipes(tmp_path):
    """Timing mode with --recipe: each recipe's solvers, steps and SR windows are what its cells ran."""
    out = tmp_path / "time.json"
    recipes = ["a: lowres=dpmpp_2m:2, sr=euler:2, window=28x28x48, overlap=0.25",
               "b: lowres=heun:2, sr=heun:2, window=56x56x96, overlap=0.25"]
    args = ["--size", "demo", "--device", "cpu", "--threads", "1", "--warmup", "0", "--repeats", "1", "--train-batch",
            "1", "--json-out", str(out)] + [arg for r in recipes for arg in ("--recipe", r)]
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "cascade_bench.py"), *args], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["pairs"]}
    assert set(rows) == {"a", "b"} and all(r["cascade_s"] > 0 for r in rows.values())
    cells = {(r["kind"], r.get("solver")): r for r in data["results"]}
    assert cells[("lowres", "dpmpp_2m")]["evals"] == 2 and cells[("lowres", "heun")]["evals"] == 3
    assert cells[("sr", "euler")]["evals"] == 2 and cells[("sr", "heun")]["evals"] == 3
    grid = data["environment"]["grid"]
    assert cells[("sr", "euler")]["windows"] == len(window_grid(grid, (28, 28, 48), 0.25)[1]) > 1
    assert cells[("sr", "heun")]["windows"] == 1
    assert "| a |" in res.stdout and "| b |" in res.stdout
    train = next(r for r in data["results"] if r["kind"] == "train")
    assert "error" not in train and train["images_per_s"] > 0, train.get("error")
    both = subprocess.run([sys.executable, str(ROOT / "bench" / "cascade_bench.py"), "--recipe", recipes[0],
                           "--steps-sr", "3"], capture_output=True, text=True, cwd=ROOT)
    assert both.returncode != 0 and "not both" in both.stderr
