"""Super-resolution stage and the cascade: windows, residuals, positions, length, training, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from libs.cascade import restore_length
from libs.cohort import Cohort
from libs.config import ConfigError, load_config
from libs.lowres import HeightLaw, Standardize
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.superres import ResidualPatches, SRConfig, check_pairing, load_pairing, train_superres
from libs.volumes import read_volume
from libs.windows import (
    WindowPlan,
    position_channels,
    upsample,
    upsample_crop,
    window_grid,
    window_weight,
    windowed_denoise,
)

ROOT = Path(__file__).resolve().parents[1]
LOWRES = {"in_plane_mm": 14.0, "data": {"grid": [32, 32, 64], "factor": 4, "load_workers": 1},
          "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_levels": [-1],
                    "channels_per_head": 8},
          "optim": {"batch": 4, "lr_ref": 0.01, "ref_steps": 100, "warmup_steps": 2},
          "loop": {"steps": 4, "report_every": 2, "checkpoint_every": 4, "loader_workers": 0}, "sample": {"steps": 3}}
SR = {"data": {"patch": [16, 16, 32], "load_workers": 1},
      "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_levels": [],
                "channels_per_head": 8},
      "diffusion": {"sigma_data_samples": 16},
      "optim": {"batch": 4, "lr_ref": 0.01, "ref_steps": 100, "warmup_steps": 2},
      "loop": {"steps": 4, "report_every": 2, "checkpoint_every": 4, "loader_workers": 0},
      "sample": {"steps": 3}, "window": {"overlap": 0.25, "batch": 4}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 14 mm phantom cohort and the YAML files of a tiny low-res + SR pair."""
    root = tmp_path_factory.mktemp("sr")
    write_phantom_cohort(root / "cohort", sampled_demographics(3, seed=6), seed=6, spacing_mm=14.0, progress=False)
    write_pair(root, root / "cohort")
    return root


def write_pair(root: Path, cohort: Path, low_data: dict | None = None, sr_model: dict | None = None,
               objectives: tuple[str, str] = ("edm", "edm")) -> None:
    """root/low.yaml and root/sr.yaml: the tiny pair on ``cohort``, runs under root/runs/{low,sr}; ``low_data`` and
    ``sr_model`` update the low-res data and SR model sections; ``objectives`` = (low-res, SR) diffusion.objective."""
    low = json.loads(json.dumps(LOWRES))
    low["data"].update(cohort=str(cohort), **(low_data or {}))
    low["diffusion"] = {"objective": objectives[0]}
    low["run_dir"] = str(root / "runs" / "low")
    (root / "low.yaml").write_text(yaml.safe_dump(low))
    sr = json.loads(json.dumps(SR))
    sr["model"].update(sr_model or {})
    sr["diffusion"]["objective"] = objectives[1]
    sr["data"]["cohort"], sr["run_dir"], sr["lowres_config"] = str(cohort), str(root / "runs" / "sr"), \
        str(root / "low.yaml")
    (root / "sr.yaml").write_text(yaml.safe_dump(sr))


def _conv_net(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(2, 2, 3, padding=1, bias=False)
    return lambda x, sigma, cond: conv(x + cond[:, :2])


@torch.no_grad()
def test_windowed_equals_whole_volume_for_a_convolution():
    net = _conv_net()
    x = torch.randn(1, 2, 40, 36, 72)
    cond = torch.randn(1, 2, 40, 36, 72)
    whole = net(x, None, cond)

    def cond_fn(start, win):
        return cond[0, :, start[0]:start[0] + win[0], start[1]:start[1] + win[1], start[2]:start[2] + win[2]]

    tiled = windowed_denoise(net, x, torch.ones(1), cond_fn, (16, 16, 32), overlap=0.25, batch=5)
    _, starts, _ = window_grid((40, 36, 72), (16, 16, 32), 0.25)
    assert len(starts) > 8, "the test must really tile the volume"
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def _per_call_windowed(denoise, x, sigma, cond_fn, window, overlap, batch):
    """The blending before WindowPlan: weights and conditioning recomputed at every call (reference only)."""
    full = tuple(x.shape[2:])
    win, starts, overlap_vox = window_grid(full, window, overlap)
    out, norm = torch.zeros_like(x), torch.zeros(full)
    for i in range(0, len(starts), batch):
        chunk = starts[i:i + batch]
        xs = torch.cat([x[:, :, a:a + win[0], b:b + win[1], c:c + win[2]] for a, b, c in chunk])
        ys = denoise(xs, sigma.expand(len(chunk)), torch.stack([cond_fn(s, win) for s in chunk]))
        for (a, b, c), y in zip(chunk, ys):
            w = window_weight((a, b, c), win, full, overlap_vox)
            out[0, :, a:a + win[0], b:b + win[1], c:c + win[2]] += y * w
            norm[a:a + win[0], b:b + win[1], c:c + win[2]] += w
    return out / norm


@torch.no_grad()
def test_window_plan_constants_computed_once_equal_the_per_call_ones():
    conv = _conv_net(3)

    def net(x, sigma, cond):                   # depends on sigma too, as a denoiser does
        return conv(x, sigma, cond) / (1 + sigma[:, None, None, None, None])

    cond = torch.randn(1, 2, 40, 36, 72)
    calls = []

    def cond_fn(start, win):
        calls.append(tuple(start))
        return cond[0, :, start[0]:start[0] + win[0], start[1]:start[1] + win[1], start[2]:start[2] + win[2]]

    plan = WindowPlan((40, 36, 72), (16, 16, 32), 0.25, 5, cond_fn)
    assert len(calls) == len(plan.starts) > 8
    for sigma in (2.0, 0.3, 0.01):             # one plan serves every call of a sampler
        x = torch.randn(1, 2, 40, 36, 72)
        s = torch.tensor([sigma])
        torch.testing.assert_close(plan.denoise(net, x, s), _per_call_windowed(net, x, s, cond_fn, (16, 16, 32),
                                                                                0.25, 5), atol=1e-6, rtol=1e-6)
    assert len(calls) == 4 * len(plan.starts), "conditioning is computed once per window by the plan"
    assert plan.redundancy == pytest.approx(len(plan.starts) * 16 * 16 * 32 / (40 * 36 * 72))


@torch.no_grad()
def test_no_seams_for_a_smooth_position_dependent_network():
    """A network whose output drifts across its own window (a ramp along z) would leave a jump at every
    hard cut; the blend must keep neighbouring slices close."""
    def ramp_net(x, sigma, cond):
        z = torch.arange(x.shape[-1], dtype=torch.float32) / x.shape[-1]
        return x + z                                           # up to +1 at the window's top

    x = torch.zeros(1, 1, 8, 8, 96)
    out = windowed_denoise(ramp_net, x, torch.ones(1), lambda s, w: torch.zeros(1, *w), (8, 8, 32), 0.5, 4)
    steps = (out[0, 0, 4, 4, 1:] - out[0, 0, 4, 4, :-1]).abs()
    hard = torch.cat([ramp_net(torch.zeros(1, 1, 1, 1, 32), None, None)[0, 0, 0, 0]] * 3)
    hard_jump = (hard[1:] - hard[:-1]).abs().max()
    assert hard_jump > 0.9, "hard tiling of this network has a jump of ~1"
    assert steps.max() < 0.2, f"blended output jumps by {steps.max():.3f} between neighbouring slices"


def test_upsample_crop_is_exact():
    lr = torch.randn(1, 2, 8, 8, 16)
    full = upsample(lr, 4)
    for start in ((0, 0, 0), (5, 9, 17), (16, 16, 32), (3, 0, 60)):
        crop = upsample_crop(lr, 4, start, (16, 16, 4))
        ref = full[:, :, start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 4]
        torch.testing.assert_close(crop, ref, atol=0, rtol=0)


def test_position_channels_at_the_corners():
    pos = position_channels((0, 0, 0), (4, 4, 8), (32, 32, 64))
    assert pos.shape == (3, 4, 4, 8) and float(pos[:, 0, 0, 0].abs().max()) == 0.0
    last = position_channels((28, 28, 56), (4, 4, 8), (32, 32, 64))[:, -1, -1, -1]
    torch.testing.assert_close(last, torch.tensor([31 / 32, 31 / 32, 63 / 64]))
    assert float(last.max()) < 1.0, "positions lie in [0, 1)"


def test_residual_and_its_inverse_reproduce_hr(setup):
    from libs.data import CohortVolumes
    from libs.lowres import channel_stats
    cfg = load_config(setup / "sr.yaml", SRConfig)
    pairing = load_pairing(cfg)
    vols = CohortVolumes(cfg.data.cohort, pairing.grid, progress=False)
    std = Standardize(*channel_stats(vols), 0.5)
    patches = ResidualPatches(vols, pairing, cfg.data.patch, std)
    rng = np.random.default_rng(0)
    for _ in range(5):
        residual, cond = patches.draw(rng)
        up = cond[:2]
        hr = residual + up
        # locate the patch from its position channels and compare with the standardized volume
        start = [int(round(float(cond[6 + a].flatten()[0]) * g)) for a, g in enumerate(pairing.grid)]
        matches = [std.to_net(v[None].float())[0][:, start[0]:start[0] + 16, start[1]:start[1] + 16,
                                                  start[2]:start[2] + 32] for v in vols.volumes]
        assert any(torch.allclose(hr, m, atol=1e-6) for m in matches), "up(LR) + residual must equal HR"
        assert cond.shape == (10, 16, 16, 32)
        assert float(cond[9].abs().max()) == 0.0, "no augmentation level unless asked for"


def test_restored_length_follows_height():
    law = HeightLaw()
    for h in (1.55, 1.75, 1.95):
        out, affine = restore_length(torch.zeros(2, 8, 8, 384), h, law, 2.0)
        assert out.shape[-1] == round(146.629 * h + 110.419), f"height {h}: {out.shape[-1]} slices"
        assert abs(affine[2, 2] - (146.629 * h + 110.419) * 2 / out.shape[-1]) < 1e-9


def test_pairing_mismatch_is_refused(setup, tmp_path):
    norm = {"grid": [32, 32, 64], "factor": 4, "in_plane_mm": 14.0, "ct_range_hu": [-500, 500], "suv_max": 25,
            "pet_map": "x", "demographics": ["a"], "channel_mean": [0.1, 0.2], "channel_std": [0.3, 0.4]}
    check_pairing(norm, dict(norm))
    with pytest.raises(ConfigError, match="grid"):
        check_pairing(norm, {**norm, "grid": [64, 64, 64]})
    laws = {**norm, "height_law": [146.629, 110.419, 2.0]}
    with pytest.raises(ConfigError, match="height_law"):
        check_pairing(laws, {**laws, "height_law": [150.0, 110.419, 2.0]})
    raw = yaml.safe_load((setup / "sr.yaml").read_text())
    raw["data"]["patch"] = [64, 64, 64]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="larger than the paired grid"):
        load_pairing(load_config(bad, SRConfig))


def test_sr_loss_falls_on_phantom_patches(setup, tmp_path):
    raw = yaml.safe_load((setup / "sr.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["loop"].update(steps=60, report_every=10, checkpoint_every=60)
    cfg = load_config(raw, SRConfig)
    train_superres(cfg, device="cpu", progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-2:]])
    assert last < first - 0.3, f"SR loss should fall: {first:.3f} → {last:.3f}"
    ckpt = torch.load(tmp_path / "run" / "ckpt-000000060.pt", weights_only=True)
    norm = ckpt["normalization"]
    assert norm["sigma_data"] == 0.5 and len(norm["residual_std"]) == 2, "per-channel residual SDs are stored"
    assert all(0 < v < 0.5 for v in norm["residual_std"]), norm["residual_std"]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def test_cascade_cli_end_to_end_resume_and_bad_row(setup, tmp_path):
    for script, cfg in (("1_Trainings/train_lowres.py", "low.yaml"), ("1_Trainings/train_superres.py", "sr.yaml")):
        res = _run(script, "--config", str(setup / cfg), "--quiet", "--device", "cpu")
        assert res.returncode == 0, res.stderr
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nb,1.8,80,X,50\n"
                   "c,1.90,98,M,70\nd,1.70,70,F,66\n")
    out = tmp_path / "gen"
    args = ["--lowres", str(setup / "runs" / "low"), "--superres", str(setup / "runs" / "sr"), "--demographics",
            str(csv), "--out", str(out), "--quiet", "--device", "cpu", "--batch", "2", "--sr-sigma-max-ratio", "9"]
    res = _run("2_Tests/infer.py", *args)
    assert res.returncode == 1 and "line 3" in res.stderr and "sex" in res.stderr, res.stderr
    assert "3 written" in res.stdout, res.stdout
    cohort = Cohort(out)
    for sid, h in (("a", 1.60), ("c", 1.90), ("d", 1.70)):
        ct = read_volume(cohort.path("ct", sid), "ct")
        nz = round((146.629 * h + 110.419) * 2 / 14.0)
        assert ct.shape == (32, 32, nz), f"{sid}: {ct.shape}"
        assert ct.spacing[0] == pytest.approx(14.0) and ct.spacing[2] == pytest.approx(
            (146.629 * h + 110.419) * 2 / nz)
        meta = json.loads(cohort.path("meta", sid).read_text())
        assert {"lowres", "superres"} <= set(meta["checkpoints"]) and meta["seed_superres"] != meta["seed"]
        assert meta["sampler_superres"]["cond_noise"] == 0.0, "the inference augmentation level is recorded"
        assert meta["sampler_superres"]["sigma_max"] == pytest.approx(9 * 0.5), "--sr-sigma-max-ratio is used"
        assert "lr_labels" not in meta["sampler_superres"], "a CT + PET model's subjects do not depend on it"
    ct_c = cohort.path("ct", "c")
    ct_c.write_bytes(ct_c.read_bytes()[:100])
    again = _run("2_Tests/infer.py", *args)
    assert "1 written, 2 already complete" in again.stdout, again.stdout
    assert read_volume(ct_c, "ct").shape[0] == 32


def _patches(setup):
    from libs.data import CohortVolumes
    from libs.lowres import channel_stats
    cfg = load_config(setup / "sr.yaml", SRConfig)
    pairing = load_pairing(cfg)
    vols = CohortVolumes(cfg.data.cohort, pairing.grid, progress=False)
    return cfg, pairing, vols, ResidualPatches(vols, pairing, cfg.data.patch, Standardize(*channel_stats(vols), 0.5))


def _old_draw(patches, rng):
    """The patch sampler before the speed fix: standardize the whole volume, then cut (reference only)."""
    from libs.data import offset_of, polyphase
    from libs.lowres import expand_cond
    f, grid = patches.pairing.factor, patches.pairing.grid
    i = int(rng.integers(len(patches.volumes)))
    hr = patches.std.to_net(patches.volumes.volumes[i][None].float())
    lr = polyphase(hr, f, offset_of(int(rng.integers(f**3)), f))
    start = [int(rng.integers(g - p + 1)) for g, p in zip(grid, patches.patch)]
    up = upsample_crop(lr, f, start, patches.patch)[0]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patches.patch))
    demo = expand_cond(patches.volumes.cond[i:i + 1], patches.patch)[0]
    return hr[0][(slice(None), *sl)] - up, torch.cat([up, demo, position_channels(start, patches.patch, grid)])


def test_patch_sampler_returns_the_patches_of_the_whole_volume_formula(setup):
    _, _, _, patches = _patches(setup)
    new_rng, old_rng = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(12):
        residual, cond = patches.draw(new_rng)
        ref_residual, ref_cond = _old_draw(patches, old_rng)
        assert torch.equal(residual, ref_residual), "residual differs from the whole-volume formula"
        assert torch.equal(cond[:9], ref_cond), "conditioning differs from the whole-volume formula"


def test_residual_scaling_round_trips_exactly_and_gives_sd_sigma_data(setup):
    from libs.superres import measure_residual_std, residual_scaling
    _, _, _, patches = _patches(setup)
    residual_std = measure_residual_std(patches, 64, seed=0)
    scale = residual_scaling({"residual_std": residual_std, "sigma_data": 0.5})
    r, _ = patches.batch(np.random.default_rng(3), 32)
    x = scale.to_net(r)
    sd = x.transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(sd, torch.full((2,), 0.5), atol=0.08, rtol=0)
    torch.testing.assert_close(scale.from_net(x), r, atol=1e-7, rtol=1e-6)
    two = residual_scaling({"residual_std": [0.1, 0.4], "sigma_data": 0.5})
    unit = torch.ones(1, 2, 2, 2, 2)
    torch.testing.assert_close(two.to_net(unit)[0, :, 0, 0, 0], torch.tensor([5.0, 1.25]))
    assert torch.equal(two.from_net(two.to_net(unit)), unit)
    with pytest.raises(ConfigError, match="residual_std"):
        residual_scaling({"sigma_data": 0.05})


def test_training_sigmas_follow_the_scaled_residual(setup):
    """The network target has SD σ_data = 0.5 per channel, so ln σ ~ N(−0.4, 1) puts Φ((ln 0.5 + 0.4) / 1)
    ≈ 38 % of the draws below σ_data — not the few per cent of an unscaled residual of SD ≈ 0.1."""
    from scipy import stats

    from libs.diffusion import EDM2Loss
    from libs.superres import measure_residual_std, residual_scaling
    cfg, _, _, patches = _patches(setup)
    residual_std = measure_residual_std(patches, 64, seed=0)
    target = residual_scaling({"residual_std": residual_std, "sigma_data": 0.5}).to_net(
        patches.batch(np.random.default_rng(5), 32)[0])
    data_sd = target.transpose(0, 1).flatten(1).std(dim=1)
    loss = EDM2Loss(cfg.diffusion.P_mean, cfg.diffusion.P_std, cfg.diffusion.sigma_data)
    _, sigma = loss.noisy(torch.zeros(20000, 1), torch.Generator().manual_seed(0))
    q = np.quantile(np.log(sigma.numpy()), [0.1, 0.5, 0.9])
    np.testing.assert_allclose(q, stats.norm.ppf([0.1, 0.5, 0.9], -0.4, 1.0), atol=0.04)
    for c in range(2):
        below = float((sigma < data_sd[c]).float().mean())
        expected = stats.norm.cdf((np.log(float(data_sd[c])) + 0.4) / 1.0)
        assert abs(below - expected) < 0.02 and 0.3 < below < 0.46, f"channel {c}: {below:.3f} of σ below σ_data"


def test_conditioning_augmentation_only_in_training_at_its_level(setup):
    from libs.superres import AugmentConfig
    _, pairing, _, patches = _patches(setup)
    aug = AugmentConfig(max_level=0.3, probability=1.0)
    clean_r, clean_c = patches.batch(np.random.default_rng(2), 6)
    r, c = patches.batch(np.random.default_rng(2), 6, aug, np.random.default_rng(9))
    assert torch.equal(r, clean_r), "the target keeps the clean LR"
    assert torch.equal(c[:, 2:9], clean_c[:, 2:9]), "demographics and positions are untouched"
    levels = c[:, 9].flatten(1)
    assert torch.equal(levels.min(1).values, levels.max(1).values), "the level channel is constant per patch"
    levels = levels[:, 0] * 0.5
    assert float(levels.min()) > 0 and float(levels.max()) <= 0.3
    for k in range(6):      # the LR noise of level s, upsampled: its RMS is below s and well above 0
        rms = float((c[k, :2] - clean_c[k, :2]).pow(2).mean().sqrt())
        assert 0.2 * float(levels[k]) < rms < float(levels[k]), (rms, float(levels[k]))
    off = AugmentConfig(max_level=0.0)
    r0, c0 = patches.batch(np.random.default_rng(2), 6, off, np.random.default_rng(9))
    assert torch.equal(c0, clean_c) and torch.equal(r0, clean_r)


def test_writer_thread_writes_what_the_sequential_loop_writes(tmp_path):
    """run_job with overlap_writes (a subject written while the next is sampled, used on GPUs) gives the same
    files and report as writing each subject before sampling the next; a failing subject fails alone."""
    import numpy as np

    from libs.generate import run_job
    from libs.volumes import centered_affine
    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nb,1.85,90,M,70\nc,1.7,70,F,50\n")

    def produce(chunk):
        for d in chunk:
            if d.subject_id == "b":
                yield d, RuntimeError("sampling went wrong")
                continue
            rng = np.random.default_rng(len(d.subject_id) + int(d.age_years))
            ct = rng.integers(-1000, 1000, size=(6, 5, 8)).astype(np.int16)
            yield d, (ct, rng.random((6, 5, 8)).astype(np.float32), centered_affine((6, 5, 8), (8.0, 8.0, 9.0)),
                      {"note": "test"})

    reports = {}
    for overlap in (False, True):
        out = tmp_path / f"out_{overlap}"
        reports[overlap] = run_job(csv, out, 2, False, True, False, produce, lambda d: {"id": d.subject_id},
                                   overlap_writes=overlap)
        assert sorted(reports[overlap].written) == ["a", "c"] and list(reports[overlap].failed) == ["b"]
    for sid in ("a", "c"):
        for kind in ("ct", "suv"):
            a = read_volume(Cohort(tmp_path / "out_False").path(kind, sid), kind)
            b = read_volume(Cohort(tmp_path / "out_True").path(kind, sid), kind)
            assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)
        assert Cohort(tmp_path / "out_True").path("previews", sid).stat().st_size > 0


@pytest.mark.parametrize("factor", [2, 4])
def test_anchored_upsample_inverts_the_polyphase_subsample(factor):
    """LR anchors: LR voxel j lands exactly on HR voxel f·j + offset, linear in between, and a crop computed from
    the LR region it reads equals the crop of the whole upsampled volume."""
    from libs.data import polyphase
    from libs.windows import anchor_mask, anchored_region, anchored_upsample
    hr = torch.rand(1, 2, 12, 8, 16, generator=torch.Generator().manual_seed(factor))
    for offset in [(0, 0, 0), (1, 0, factor - 1), (factor - 1,) * 3]:
        lr = polyphase(hr, factor, offset)
        up = anchored_upsample(lr, factor, offset)
        assert up.shape == hr.shape
        assert torch.equal(polyphase(up, factor, offset), lr), "the anchors must hold the LR values exactly"
        mask = anchor_mask((0, 0, 0), hr.shape[2:], factor, offset)[0].bool()
        assert int(mask.sum()) == lr[0, 0].numel() and torch.equal(up[0, :, mask], hr[0, :, mask])
        # halfway between two anchors along z (x, y on anchors): the mean of the two LR voxels
        x, y, z = offset[0], offset[1], offset[2] + factor // 2
        torch.testing.assert_close(up[0, :, x, y, z], 0.5 * (lr[0, :, 0, 0, 0] + lr[0, :, 0, 0, 1]))
        start, size = (3, 1, 5), (5, 6, 7)
        region = anchored_region(start, size, factor, offset, lr.shape[2:])
        crop = anchored_upsample(lr[(slice(None), slice(None), *region)], factor, offset, start, size,
                                 lr.shape[2:], [r.start for r in region])
        assert torch.equal(crop, up[:, :, 3:8, 1:7, 5:12])


def test_anchored_patches_match_the_whole_volume_formula(setup):
    """With data.lr_anchors the residual is HR − anchored up(LR) of the drawn offset (0 on the anchors), and the
    last conditioning channel marks exactly the anchors; the draws consume the same random numbers as before."""
    from libs.data import offset_of, polyphase
    from libs.windows import anchor_mask, anchored_upsample
    cfg, pairing, vols, plain = _patches(setup)
    anchored = ResidualPatches(vols, pairing, cfg.data.patch, plain.std, anchors=True)
    f, grid = pairing.factor, pairing.grid
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(6):
        residual, cond = anchored.draw(rng)
        i = int(ref.integers(len(vols)))
        offset = offset_of(int(ref.integers(f**3)), f)
        start = [int(ref.integers(g - p + 1)) for g, p in zip(grid, anchored.patch)]
        hr = plain.std.to_net(vols.volumes[i][None].float())
        up = anchored_upsample(polyphase(hr, f, offset), f, offset)
        sl = (slice(None), slice(None), *(slice(s, s + p) for s, p in zip(start, anchored.patch)))
        torch.testing.assert_close(residual, (hr - up)[sl][0], rtol=0, atol=1e-6)
        mask = anchor_mask(start, anchored.patch, f, offset)
        assert cond.shape[0] == 11 and torch.equal(cond[10:], mask)
        assert torch.equal(residual[:, mask[0].bool()], torch.zeros_like(residual[:, mask[0].bool()]))
        assert torch.equal(cond[:2], up[sl][0])


def test_anchored_sr_keeps_the_lr_sample_and_old_checkpoints_stay_plain(setup, tmp_path):
    """A model trained with LR anchors gets the extra channel, records it, and its output's polyphase component at
    the subject's anchor offset is the LR sample it was given; one trained without keeps 10 channels."""
    from libs.cascade import anchor_offset, load_sr_model, sample_sr
    from libs.data import polyphase
    from libs.demographics import Demographics
    raw = yaml.safe_load((setup / "sr.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    raw["data"]["lr_anchors"] = True
    cfg = load_config(raw, SRConfig)
    ckpt = train_superres(cfg, device="cpu", progress=False)
    norm = torch.load(ckpt, weights_only=True)["normalization"]
    assert norm["lr_anchors"] is True and norm["cond"][-1] == "anchor mask"
    model = load_sr_model(ckpt, torch.device("cpu"))
    assert model.anchors
    lr = torch.rand(2, *[g // model.factor for g in model.grid], generator=torch.Generator().manual_seed(0))
    lr = lr * 0.8 + 0.1                          # inside (0, 1): the final clamp does not touch the anchors
    person = Demographics("a", 1.7, 70, "M", 40)
    for seed in (1, 2, 3):
        out = sample_sr(model, lr, person, seed, cfg.sample, cfg.window, torch.device("cpu"))
        torch.testing.assert_close(polyphase(out, model.factor, anchor_offset(seed, model.factor)), lr,
                                   rtol=0, atol=1e-5)
    assert len({anchor_offset(s, 4) for s in range(40)}) > 8, "offsets are drawn per subject"
    plain = load_sr_model(train_superres(load_config({**raw, "run_dir": str(tmp_path / "plain"),
                                                      "data": {**raw["data"], "lr_anchors": False}}, SRConfig),
                                         device="cpu", progress=False), torch.device("cpu"))
    assert not plain.anchors and plain.normalization["cond"][-1].startswith("augmentation level")


def test_blur_augmentation_matches_blurring_the_whole_lr_and_targets_its_upsampling(setup):
    """A blurred draw's conditioning is up() of the whole LR blurred (image channels, Gaussian of the drawn SD)
    and cut, its target HR − that same up(), so up + target = HR exactly as generation adds them; the patches,
    offsets and noise draws are those of the unblurred sampler, and blur_max 0 changes nothing."""
    from scipy import ndimage

    from libs.data import offset_of, polyphase
    from libs.superres import BLUR_TRUNCATE, AugmentConfig
    from libs.windows import upsample
    cfg, pairing, vols, patches = _patches(setup)
    f, grid = pairing.factor, pairing.grid
    for sd in (0.4, 1.3):        # 1.3: a margin of 4 LR voxels, wider than the patch's own LR margin
        rng, ref = np.random.default_rng(8), np.random.default_rng(8)
        for _ in range(4):
            residual, cond = patches.draw(rng, blur=sd)
            i = int(ref.integers(len(vols)))
            offset = offset_of(int(ref.integers(f**3)), f)
            start = [int(ref.integers(g - p + 1)) for g, p in zip(grid, patches.patch)]
            hr = patches.std.to_net(vols.volumes[i][None].float())
            lr = polyphase(hr, f, offset).clone().numpy()        # not a view of hr
            lr[0, :2] = np.stack([ndimage.gaussian_filter(c, sd, mode="nearest", truncate=BLUR_TRUNCATE)
                                  for c in lr[0, :2]])
            up = upsample(torch.from_numpy(lr), f)
            sl = (slice(None), slice(None), *(slice(s, s + p) for s, p in zip(start, patches.patch)))
            torch.testing.assert_close(cond[:2], up[sl][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(residual + cond[:2], hr[sl][0], rtol=0, atol=1e-5)
    # the sharp draw differs from the blurred one (the blur does something) on the same patch
    sharp_r, sharp_c = patches.draw(np.random.default_rng(8))
    blur_r, blur_c = patches.draw(np.random.default_rng(8), blur=1.3)
    assert torch.equal(sharp_c[2:], blur_c[2:]), "only the up(LR) channels change"
    assert float((sharp_c[:2] - blur_c[:2]).abs().max()) > 0.05
    # in batches: blur drawn from the augmentation stream, after the noise level; 0 leaves the batch as before
    clean_r, clean_c = patches.batch(np.random.default_rng(2), 6)
    r0, c0 = patches.batch(np.random.default_rng(2), 6, AugmentConfig(max_level=0.0, blur_max=0.0,
                                                                      blur_probability=1.0), np.random.default_rng(9))
    assert torch.equal(r0, clean_r) and torch.equal(c0, clean_c)
    r1, c1 = patches.batch(np.random.default_rng(2), 6, AugmentConfig(max_level=0.0, blur_max=0.8,
                                                                      blur_probability=1.0), np.random.default_rng(9))
    assert torch.equal(c1[:, 2:], clean_c[:, 2:])
    changed = [float((c1[k, :2] - clean_c[k, :2]).abs().max()) for k in range(6)]
    assert sum(d > 0.05 for d in changed) >= 3, changed      # SDs near 0 leave a patch as it was
    torch.testing.assert_close(r1 + c1[:, :2], clean_r + clean_c[:, :2], rtol=0, atol=1e-5)   # both are HR
    with pytest.raises(ValueError, match="blur_probability"):
        AugmentConfig(blur_probability=1.5)
