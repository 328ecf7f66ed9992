"""Classifier-free guidance of the low-res stage: condition dropout in training (the "given" channel), the
guided denoiser, the record a checkpoint keeps, and what sampling feeds the network."""

from __future__ import annotations

import json

import pytest
import torch

import libs.lowres as lowres
from libs.config import ConfigError, load_config
from libs.demographics import Demographics, encode_many
from libs.lowres import (
    NONE_CHANNEL_KEY,
    LowresConfig,
    SampleConfig,
    demographic_input,
    dropout_mask,
    init_none_channel,
    lowres_cond_channels,
    standardize_demographics,
    train_lowres,
)
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.samplers import guided
from tests.test_lowres import TINY, _run

NORM_Z = {"cond_mean": [0.7, 0.4, 0.5, 0.5], "cond_std": [0.1, 0.15, 0.5, 0.2]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg_cohort")
    write_phantom_cohort(out, sampled_demographics(4, seed=5), seed=5, spacing_mm=14.0, progress=False)
    return out


def _config(cohort, run_dir, dropout: float, **sample) -> LowresConfig:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["cohort"], raw["run_dir"] = str(cohort), str(run_dir)
    raw["model"]["standardize_demographics"] = True
    raw["diffusion"] = {"cond_dropout": dropout}
    raw["loop"].update(steps=2, checkpoint_every=2)
    raw["sample"].update(sample)
    return load_config(raw, LowresConfig)


class _Linear:
    """A denoiser whose output is a known function of the conditioning: D = x · 0 + Σ cond over channels."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append(len(x))
        return x * 0 + cond.sum(1, keepdim=True).expand_as(x)


def test_guided_denoiser_extrapolates_inside_its_sigma_interval_only():
    x = torch.zeros(2, 1, 2, 2, 2)
    cond = torch.full((2, 2, 2, 2, 2), 1.5)         # D_cond = 3
    none = torch.full((2, 2, 2, 2, 2), 0.25)        # D_none = 0.5
    net = _Linear()
    fn = guided(net, none, 3.0, (0.1, 5.0))
    inside = fn(x, torch.full((2,), 1.0), cond)
    torch.testing.assert_close(inside, torch.full_like(x, 0.5 + 3.0 * (3.0 - 0.5)))
    assert net.batches == [4], "conditional and unconditional share one call on a doubled batch"
    for s in (0.05, 6.0):
        torch.testing.assert_close(fn(x, torch.full((2,), s), cond), torch.full_like(x, 3.0))
    assert net.batches == [4, 2, 2], "outside the interval: the conditional denoiser alone"
    plain = _Linear()
    torch.testing.assert_close(guided(plain, none, 1.0)(x, torch.full((2,), 1.0), cond), torch.full_like(x, 3.0))
    assert plain.batches == [2], "weight 1 is no guidance and costs no second evaluation"


def test_demographic_input_zeroes_dropped_rows_and_appends_the_given_flag():
    demo = torch.from_numpy(encode_many([Demographics("a", 1.6, 60, "F", 40), Demographics("b", 1.9, 95, "M", 70)]))
    four = demographic_input(demo, NORM_Z)
    torch.testing.assert_close(four, standardize_demographics(demo, NORM_Z))
    with pytest.raises(ValueError, match="cond_dropout"):
        demographic_input(demo, NORM_Z, given=False)
    norm5 = {**NORM_Z, NONE_CHANNEL_KEY: True}
    assert lowres_cond_channels(NORM_Z) == 4 and lowres_cond_channels(norm5) == 5
    five = demographic_input(demo, norm5, given=torch.tensor([True, False]))
    torch.testing.assert_close(five[0], torch.cat([four[0], torch.ones(1)]))
    assert torch.equal(five[1], torch.zeros(5)), "a dropped row is the learned 'none': zeros and flag 0"
    assert torch.equal(demographic_input(demo, norm5, given=False), torch.zeros(2, 5))


def test_dropout_mask_rate_and_reproducibility():
    masks = torch.stack([dropout_mask(8, 0.25, seed=3, step=s, rank=0) for s in range(2000)])
    assert 0.72 < float(masks.float().mean()) < 0.78, "about 1 − p of the samples keep their demographics"
    assert torch.equal(dropout_mask(8, 0.25, 3, 17, 0), masks[17]), "a resumed run drops the same samples"
    assert not torch.equal(dropout_mask(8, 0.25, 3, 17, 1), masks[17]) or not torch.equal(
        dropout_mask(8, 0.25, 4, 17, 0), masks[17]), "other ranks and seeds draw other masks"
    assert bool(dropout_mask(64, 0.0, 0, 0, 0).all())


def test_config_validation():
    with pytest.raises(ValueError, match="cond_dropout"):
        load_config({"diffusion": {"cond_dropout": 1.0}}, LowresConfig)
    with pytest.raises(ValueError, match="guidance_sigma"):
        SampleConfig(guidance=2.0, guidance_sigma=[3.0, 1.0])
    with pytest.raises(ValueError, match="guidance"):
        SampleConfig(guidance=-1.0)
    assert not SampleConfig().guided and SampleConfig(guidance=1.5).guided


def test_fine_tune_keeps_the_conditioning_channels_of_its_weights():
    init_none_channel({NONE_CHANNEL_KEY: True}, 0.1, "w.safetensors")
    init_none_channel({}, 0.0, "w.safetensors")
    with pytest.raises(ConfigError, match="cond_dropout > 0"):
        init_none_channel({NONE_CHANNEL_KEY: True}, 0.0, "w.safetensors")
    with pytest.raises(ConfigError, match="cond_dropout 0"):
        init_none_channel({}, 0.2, "w.safetensors")


def test_training_batches_drop_the_demographics_at_the_configured_rate(cohort, tmp_path, monkeypatch):
    captured = {}

    class FakeTrainer:
        def __init__(self, net, loss, batch, *args, **kwargs):
            captured.update(net=net, batch=batch, norm=args[4])

        def run(self):
            return None

    monkeypatch.setattr(lowres, "Trainer", FakeTrainer)
    train_lowres(_config(cohort, tmp_path / "r", 0.5), device="cpu", progress=False)
    assert captured["net"].cond_channels == 5 and captured["norm"][NONE_CHANNEL_KEY] is True
    flags, rows = [], 0
    for step in range(40):
        _, cond = captured["batch"](step, 0, 1)
        c = cond[:, :, 0, 0, 0]
        flags.append(c[:, 4])
        dropped = c[:, 4] == 0
        assert torch.equal(c[dropped], torch.zeros_like(c[dropped])), "dropped samples carry no demographics"
        assert bool((c[~dropped, :4].abs().sum(1) > 0).all())
        rows += len(c)
    rate = float((torch.cat(flags) == 0).float().mean())
    assert 0.35 < rate < 0.65, f"half the samples should be unconditional at cond_dropout 0.5, got {rate:.2f}"
    first = captured["batch"](7, 0, 1)[1]
    assert torch.equal(first, captured["batch"](7, 0, 1)[1]), "the same step draws the same mask again"

    train_lowres(_config(cohort, tmp_path / "plain", 0.0), device="cpu", progress=False)
    assert captured["net"].cond_channels == 4 and NONE_CHANNEL_KEY not in captured["norm"]
    assert captured["batch"](0, 0, 1)[1].shape[1] == 4, "without dropout: the paper's four channels"


class _Recorder:
    def __init__(self, denoiser):
        self.denoiser, self.conds = denoiser, []

    def __call__(self, x, sigma, cond):
        self.conds.append((float(sigma.reshape(-1)[0]), cond.detach().clone()))
        return self.denoiser(x, sigma, cond)


def test_trained_model_samples_with_guidance_and_records_it(cohort, tmp_path):
    from libs.cohort import Cohort
    from libs.generate import generate_lowres_cohort, load_lowres_model, sample_lowres
    ckpt = train_lowres(_config(cohort, tmp_path / "run", 0.2, guidance=2.0, guidance_sigma=[0.5, 10.0]),
                        device="cpu", progress=False)
    assert torch.load(ckpt, weights_only=True)["normalization"][NONE_CHANNEL_KEY] is True
    model = load_lowres_model(ckpt, torch.device("cpu"))
    assert model.denoiser.net.cond_channels == 5
    model.denoiser = _Recorder(model.denoiser)
    people = [Demographics("a", 1.55, 52, "F", 30), Demographics("b", 1.92, 110, "M", 80)]
    sample = model.config.sample
    out = sample_lowres(model, people, [1, 2], sample, torch.device("cpu"))
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    guided_calls = [(s, c) for s, c in model.denoiser.conds if len(c) == 4]
    plain_calls = [(s, c) for s, c in model.denoiser.conds if len(c) == 2]
    assert guided_calls and plain_calls
    assert all(0.5 <= s <= 10.0 for s, _ in guided_calls) and all(not 0.5 <= s <= 10.0 for s, _ in plain_calls)
    c = guided_calls[0][1][:, :, 0, 0, 0]
    assert torch.equal(c[:2, 4], torch.ones(2)) and torch.equal(c[2:], torch.zeros(2, 5)), \
        "first half: the subjects' demographics, flag 1; second half: the learned 'none'"

    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\ns1,1.70,70,M,50\n")
    generate_lowres_cohort(ckpt, csv, tmp_path / "gen", 0, sample, 1, "cpu", True, False, False, False)
    meta = json.loads(Cohort(tmp_path / "gen").path("meta", "s1").read_text())
    assert meta["sampler"]["guidance"] == 2.0 and meta["sampler"]["guidance_sigma"] == [0.5, 10.0]

    res = _run("2_Tests/infer.py", "--lowres", str(ckpt), "--demographics", str(csv), "--out", str(tmp_path / "cli"),
               "--lr-guidance", "1.5", "--lr-guidance-sigma", "0.2", "3", "--quiet", "--no-previews")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads(Cohort(tmp_path / "cli").path("meta", "s1").read_text())
    assert meta["sampler"]["guidance"] == 1.5 and meta["sampler"]["guidance_sigma"] == [0.2, 3.0], \
        "the command-line guidance reaches the sampler and the record"


def test_guidance_on_a_model_without_dropout_is_refused(cohort, tmp_path):
    from libs.generate import load_lowres_model, sample_lowres
    ckpt = train_lowres(_config(cohort, tmp_path / "run", 0.0), device="cpu", progress=False)
    model = load_lowres_model(ckpt, torch.device("cpu"))
    with pytest.raises(ValueError, match="cond_dropout"):
        sample_lowres(model, [Demographics("a", 1.7, 70, "M", 50)], [0], SampleConfig(steps=2, guidance=2.0),
                      torch.device("cpu"))
