"""Organ-label channels through both stages: data (one-hot samples and residual patches), training, the
checkpoint record, generation (labels/ obey the cohort contract), pairing and error cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from libs.channels import DEFAULT_LABEL_GROUPS, ChannelError, ChannelSet
from libs.cohort import Cohort
from libs.config import ConfigError, load_config
from libs.data import CohortVolumes, DataError, PolyphaseSamples, label_groups_volume
from libs.labels import label_id
from libs.lowres import LowresConfig, Standardize, channel_stats, train_lowres
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.superres import ResidualPatches, SRConfig, check_pairing, load_pairing, measure_residual_std, train_superres
from libs.volumes import read_volume
from tests.test_superres import write_pair

CS = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
GRID = (32, 32, 64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 14 mm phantom cohort with labels and the YAML of a tiny low-res + SR pair generating labels."""
    root = tmp_path_factory.mktemp("lab")
    write_phantom_cohort(root / "cohort", sampled_demographics(3, seed=5), seed=5, spacing_mm=14.0, progress=False)
    write_pair(root, root / "cohort", low_data={"labels": "default"})
    return root


def test_config_validates_the_label_set(tmp_path):
    assert load_config({"data": {"labels": "default"}}, LowresConfig).data.channel_set == CS
    custom = load_config({"data": {"labels": {"liver": ["liver"], "lungs": ["lung_upper_lobe_left"]}}}, LowresConfig)
    assert custom.data.channel_set.names == ["ct", "pet", "label:background", "label:liver", "label:lungs"]
    assert load_config({}, LowresConfig).data.channel_set.count == 2
    with pytest.raises(ConfigError, match="livr"):
        load_config({"data": {"labels": {"liver": ["livr"]}}}, LowresConfig)
    with pytest.raises(ConfigError, match="'default'"):
        load_config({"data": {"labels": "all"}}, LowresConfig)


def test_samples_are_one_hot_and_decode_to_the_labels_exactly(setup):
    vols = CohortVolumes(setup / "cohort", GRID, progress=False, channels=CS)
    groups = vols.labels[0]
    cohort = Cohort(setup / "cohort")
    direct = label_groups_volume(cohort, vols.records[0], GRID, CS)
    assert torch.equal(groups, direct) and groups.dtype == torch.uint8 and tuple(groups.shape) == GRID
    lab = read_volume(cohort.path("labels", vols.records[0].subject_id), "labels").array
    nz = lab.shape[2]
    src = np.floor((np.arange(GRID[2]) + 0.5) * nz / GRID[2]).astype(int)       # nearest, centres aligned
    want = CS.group_volume(lab)[:, :, src]
    assert np.array_equal(groups.numpy(), want), "z resampled by nearest neighbour onto the grid"
    assert int((groups == 1).sum()) > 0 and label_id("liver") in np.unique(lab)
    x, _ = PolyphaseSamples(vols, 4).batch([5])           # subject 0, offset (0, 1, 1)
    assert x.shape == (1, 13, 8, 8, 16)
    assert torch.equal(x[0, :2], vols.volumes[0][:, 0::4, 1::4, 1::4].float()), "image channels as before"
    assert torch.equal(CS.decode(x[0, 2:]), groups[0::4, 1::4, 1::4])
    assert torch.equal(x[0, 2:].sum(0), torch.ones(8, 8, 16))


def test_missing_labels_are_named(setup, tmp_path):
    cohort = tmp_path / "nolab"
    write_phantom_cohort(cohort, sampled_demographics(1, seed=1), seed=1, spacing_mm=14.0, progress=False)
    for f in (cohort / "labels").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"labels.*missing.*data\.labels"):
        CohortVolumes(cohort, GRID, progress=False, channels=CS)
    CohortVolumes(cohort, GRID, progress=False)               # a CT + PET model does not need them


def test_residual_patches_round_trip_and_label_channels_share_one_scale(setup):
    cfg = load_config(setup / "sr.yaml", SRConfig)
    pairing = load_pairing(cfg)
    assert pairing.channels == CS
    vols = CohortVolumes(setup / "cohort", pairing.grid, progress=False, channels=CS)
    std = Standardize(*CS.full_stats(*channel_stats(vols)), 0.5)
    patches = ResidualPatches(vols, pairing, cfg.data.patch, std)
    rng = np.random.default_rng(4)
    residual, cond = patches.draw(rng)
    assert residual.shape == (13, 16, 16, 32) and cond.shape == (13 + 4 + 3 + 1, 16, 16, 32)
    hr = std.from_net((residual + cond[:13])[None])[0]     # HR = up(LR) + residual, back in [0, 1]
    assert torch.allclose(hr[2:].sum(0), torch.ones(16, 16, 32), atol=1e-5)
    assert set(torch.unique(hr[2:].round()).tolist()) <= {0.0, 1.0}
    assert torch.allclose(hr[2:], hr[2:].round(), atol=1e-5), "the HR label channels are one-hot again"
    sd = measure_residual_std(patches, 8, 0)
    assert len(sd) == 13 and len(set(sd[2:])) == 1, "label channels share one residual SD"
    assert sd[0] != sd[1]


def test_both_stages_train_and_the_cascade_writes_contract_labels(setup, tmp_path):
    from libs.cascade import generate_cascade_cohort
    from libs.generate import generate_lowres_cohort
    low_ckpt = train_lowres(load_config(setup / "low.yaml", LowresConfig), device="cpu", progress=False)
    sr_ckpt = train_superres(load_config(setup / "sr.yaml", SRConfig), device="cpu", progress=False)
    low_norm = torch.load(low_ckpt, weights_only=True)["normalization"]
    sr_norm = torch.load(sr_ckpt, weights_only=True)["normalization"]
    assert ChannelSet.from_record(low_norm) == CS and ChannelSet.from_record(sr_norm) == CS
    assert low_norm["channel_mean"][2:] == [0.5] * 11 and len(sr_norm["residual_std"]) == 13
    check_pairing(low_norm, sr_norm)

    csv = tmp_path / "demo.csv"
    csv.write_text("subject_id,height_m,weight_kg,sex,age_years\na,1.60,55,F,30\nb,1.85,90,M,70\n")
    allowed = set(CS.written_ids())
    report = generate_lowres_cohort(low_ckpt, csv, tmp_path / "low", device="cpu", progress=False)
    assert sorted(report.written) == ["a", "b"]
    report = generate_cascade_cohort(low_ckpt, sr_ckpt, csv, tmp_path / "gen", device="cpu", progress=False)
    assert sorted(report.written) == ["a", "b"], report.failed
    for out in ("low", "gen"):
        cohort = Cohort(tmp_path / out)
        for sid in ("a", "b"):
            ct = read_volume(cohort.path("ct", sid), "ct")
            lab = read_volume(cohort.path("labels", sid), "labels")
            assert lab.array.dtype == np.uint8 and lab.shape == ct.shape
            np.testing.assert_allclose(lab.affine, ct.affine)
            assert set(np.unique(lab.array).tolist()) <= allowed
            meta = json.loads(cohort.path("meta", sid).read_text())
            assert meta["labels"]["source"] == "generated"
            assert [g["name"] for g in meta["labels"]["groups"]] == list(DEFAULT_LABEL_GROUPS)
    again = generate_cascade_cohort(low_ckpt, sr_ckpt, csv, tmp_path / "gen", device="cpu", progress=False)
    assert sorted(again.skipped) == ["a", "b"], "complete subjects (labels included) are kept"
    Cohort(tmp_path / "gen").path("labels", "a").unlink()
    again = generate_cascade_cohort(low_ckpt, sr_ckpt, csv, tmp_path / "gen", device="cpu", progress=False)
    assert again.written == ["a"], "a subject whose labels are gone is made again"
    meta = json.loads(Cohort(tmp_path / "gen").path("meta", "a").read_text())
    assert meta["sampler_superres"]["lr_labels"] == "onehot"
    _sr_sees_the_generated_lr_labels_as_one_hot(sr_ckpt)


def _sr_sees_the_generated_lr_labels_as_one_hot(sr_ckpt):
    """lr_labels 'onehot': soft generated LR label channels reach the SR network as the one-hot code of their
    argmax (the form SR was trained on) — the same result as giving it that code; 'soft' passes them as they are."""
    import dataclasses

    from libs.cascade import load_sr_model, sample_sr
    from libs.demographics import Demographics
    model = load_sr_model(sr_ckpt, torch.device("cpu"))
    lr_shape = [g // model.factor for g in model.grid]
    gen = torch.Generator().manual_seed(0)
    soft = torch.rand(CS.count, *lr_shape, generator=gen)
    snapped = torch.cat([soft[:2], CS.one_hot(CS.decode(soft[2:]))])
    demo = Demographics("a", 1.6, 55.0, "F", 30.0)
    onehot = model.config.sample
    as_given = dataclasses.replace(onehot, lr_labels="soft")
    cpu, window = torch.device("cpu"), model.config.window
    a = sample_sr(model, soft, demo, 3, onehot, window, cpu)
    b = sample_sr(model, snapped, demo, 3, as_given, window, cpu)
    c = sample_sr(model, soft, demo, 3, as_given, window, cpu)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c), "soft label channels reach the network unchanged"
    with pytest.raises(ValueError, match="lr_labels must be"):
        dataclasses.replace(onehot, lr_labels="bits")


def test_pairing_and_fine_tunes_refuse_another_label_set(setup):
    base = {"channels": ["ct", "pet"], "channel_mean": [0.5, 0.1]}
    with_labels = {**base, **CS.record()}
    with pytest.raises(ConfigError, match="label_groups"):
        check_pairing(with_labels, base)
    from libs.channels import check_same_channels
    with pytest.raises(ChannelError, match="trained on the channels"):
        check_same_channels(base, CS, "w.safetensors")
    check_same_channels(with_labels, CS, "w.safetensors")


def test_label_channels_share_one_loss_weight_and_do_not_outvote_the_images():
    channels = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
    weights = channels.loss_weights(1.0)
    assert len(weights) == channels.count == 13 and weights[:2] == [1.0, 1.0]
    assert sum(weights[2:]) == pytest.approx(1.0), "all label channels together weigh like one image channel"
    assert ChannelSet.from_groups(None).loss_weights(1.0) is None, "CT + PET only: the plain mean, as before"
    err2 = torch.zeros(3, 13, 4, 4, 4)
    err2[:, 2:] = 1.0                              # images perfect, every label channel wrong by 1
    from libs.diffusion import EDM2Loss, channel_mean
    assert channel_mean(err2).tolist() == pytest.approx([11 / 13] * 3), "unweighted: the labels dominate"
    assert channel_mean(err2, torch.tensor(weights)).tolist() == pytest.approx([1 / 3] * 3)
    err2[:, 0] = 4.0                               # and CT wrong by 2
    assert channel_mean(err2, torch.tensor(channels.loss_weights(0.5))).tolist() == pytest.approx([4.5 / 2.5] * 3)
    assert EDM2Loss(channel_weights=weights).channel_weights.tolist() == pytest.approx(weights)
    with pytest.raises(ConfigError, match="label_weight"):
        load_config({"diffusion": {"label_weight": 0}}, LowresConfig)
