"""Demographic channels as z-scores of the training cohort (model.standardize_demographics): the record a
checkpoint stores, what training and both generation stages feed the network, fine-tune consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from libs.config import ConfigError, load_config
from libs.data import CohortVolumes
from libs.demographics import Demographics, encode_many
from libs.lowres import (
    DEMOGRAPHIC_SD_FLOOR,
    LowresConfig,
    Standardize,
    channel_stats,
    demographic_scaling,
    init_demographic_scaling,
    standardize_demographics,
    train_lowres,
)
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from tests.test_lowres import TINY
from tests.test_superres import write_pair


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("zcohort")
    write_phantom_cohort(out, sampled_demographics(4, seed=8), seed=8, spacing_mm=14.0, progress=False)
    return out


def test_scaling_gives_z_scores_and_floors_constant_demographics():
    cond = torch.tensor([[0.6, 0.3, 0.0, 0.3], [0.8, 0.5, 0.0, 0.5], [0.7, 0.9, 0.0, 0.7]])
    rec = demographic_scaling(cond)
    z = standardize_demographics(cond, rec)
    torch.testing.assert_close(z[:, [0, 1, 3]].mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[:, [0, 1, 3]].std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    assert rec["cond_std"][2] == DEMOGRAPHIC_SD_FLOOR, "one sex only: the SD is floored, not zero"
    man = torch.tensor([[0.7, 0.5, 1.0, 0.5]])
    assert float(standardize_demographics(man, rec)[0, 2]) == pytest.approx(1.0 / DEMOGRAPHIC_SD_FLOOR)
    assert torch.equal(standardize_demographics(cond, {"channel_mean": [0.1, 0.2]}), cond), \
        "without a scaling record (paper encoding, older checkpoints) the encoding is fed unchanged"


def test_fine_tune_must_agree_with_its_initial_weights():
    rec = {"cond_mean": [0.0] * 4, "cond_std": [1.0] * 4, "channel_mean": [0.5, 0.1]}
    assert init_demographic_scaling(rec, True, "w.safetensors") == {"cond_mean": [0.0] * 4, "cond_std": [1.0] * 4}
    assert init_demographic_scaling({"channel_mean": [0.5, 0.1]}, False, "w.safetensors") == {}
    with pytest.raises(ConfigError, match="standardize_demographics: true"):
        init_demographic_scaling(rec, False, "w.safetensors")
    with pytest.raises(ConfigError, match="standardize_demographics: false"):
        init_demographic_scaling({"channel_mean": [0.5, 0.1]}, True, "w.safetensors")


def _tiny_lowres(cohort, run_dir, standardize: bool) -> LowresConfig:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["cohort"], raw["run_dir"] = str(cohort), str(run_dir)
    raw["model"]["standardize_demographics"] = standardize
    raw["loop"].update(steps=2, checkpoint_every=2)
    return load_config(raw, LowresConfig)


class _Recorder:
    """Wraps a denoiser and keeps the conditioning of its first call."""

    def __init__(self, denoiser):
        self.denoiser, self.cond = denoiser, None

    def __call__(self, x, sigma, cond):
        if self.cond is None:
            self.cond = cond.detach().clone()
        return self.denoiser(x, sigma, cond)


def test_lowres_training_records_the_scaling_and_generation_feeds_z_scores(cohort, tmp_path):
    from libs.generate import load_lowres_model, sample_lowres
    train_lowres(_tiny_lowres(cohort, tmp_path / "raw", False), device="cpu", progress=False)
    assert "cond_mean" not in torch.load(tmp_path / "raw" / "ckpt-000000002.pt", weights_only=True)["normalization"]

    ckpt = train_lowres(_tiny_lowres(cohort, tmp_path / "z", True), device="cpu", progress=False)
    norm = torch.load(ckpt, weights_only=True)["normalization"]
    train_cond = CohortVolumes(cohort, (32, 32, 64), progress=False).cond
    assert norm["cond_mean"] == demographic_scaling(train_cond)["cond_mean"]
    assert norm["cond_std"] == demographic_scaling(train_cond)["cond_std"]

    model = load_lowres_model(ckpt, torch.device("cpu"))
    model.denoiser = _Recorder(model.denoiser)
    people = [Demographics("a", 1.55, 52, "F", 30), Demographics("b", 1.92, 110, "M", 80)]
    sample_lowres(model, people, [1, 2], model.config.sample, torch.device("cpu"))
    want = (torch.from_numpy(encode_many(people)) - torch.tensor(norm["cond_mean"])) / torch.tensor(norm["cond_std"])
    got = model.denoiser.cond
    torch.testing.assert_close(got[:, :, 0, 0, 0], want)
    assert torch.equal(got, got[:, :, :1, :1, :1].expand_as(got)), "demographic channels are constant in space"


def test_superres_patches_and_cascade_feed_the_recorded_z_scores(cohort, tmp_path):
    from libs.cascade import load_sr_model, sample_sr
    from libs.superres import ResidualPatches, SRConfig, load_pairing, train_superres
    write_pair(tmp_path, cohort, sr_model={"standardize_demographics": True})
    cfg = load_config(tmp_path / "sr.yaml", SRConfig)
    ckpt = train_superres(cfg, device="cpu", progress=False)
    norm = torch.load(ckpt, weights_only=True)["normalization"]
    pairing = load_pairing(cfg)
    vols = CohortVolumes(cohort, pairing.grid, progress=False)
    assert norm["cond_std"] == demographic_scaling(vols.cond)["cond_std"]

    patches = ResidualPatches(vols, pairing, cfg.data.patch, Standardize(*channel_stats(vols), 0.5), norm)
    rng = np.random.default_rng(3)
    subject = int(np.random.default_rng(3).integers(len(vols)))      # the draw's first choice
    _, cond = patches.draw(rng)
    want = standardize_demographics(vols.cond[subject:subject + 1], norm)[0]
    torch.testing.assert_close(cond[2:6, 0, 0, 0], want)

    model = load_sr_model(ckpt, torch.device("cpu"))
    model.denoiser = _Recorder(model.denoiser)
    person = Demographics("c", 1.7, 75, "F", 50)
    lr = torch.rand(2, *[g // pairing.factor for g in pairing.grid])
    sample_sr(model, lr, person, 4, cfg.sample, cfg.window, torch.device("cpu"))
    want = standardize_demographics(torch.from_numpy(encode_many([person])), norm)[0]
    torch.testing.assert_close(model.denoiser.cond[0, 2:6, 0, 0, 0], want)
