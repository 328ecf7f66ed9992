"""Channel set and label encoding: exact round trip on phantom labels, nearest-class decoding, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libs.channels import DEFAULT_LABEL_GROUPS, LUNG_LOBES, ChannelError, ChannelSet, check_total_ids
from libs.cohort import Cohort
from libs.labels import label_id
from libs.phantom.writer import sampled_demographics, write_phantom_cohort


@pytest.fixture(scope="module")
def phantom_labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    demo = sampled_demographics(1, seed=3)
    write_phantom_cohort(out, demo, seed=3, spacing_mm=14.0, progress=False)
    return Cohort(out).load(demo[0], labels=True).labels.array


def test_default_set_names_ids_and_sizes():
    cs = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
    assert cs.n_classes == 11 and cs.count == 13
    assert cs.names[:4] == ["ct", "pet", "label:background", "label:liver"]
    assert cs.written_ids()[:2] == [0, label_id("liver")]
    assert cs.written_ids()[6] == label_id(LUNG_LOBES[0]), "a group is written as its first member's id"
    assert ChannelSet.from_groups(None).count == 2 and not ChannelSet().has_labels


def test_round_trip_on_phantom_labels_is_exact(phantom_labels):
    cs = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
    groups = cs.group_volume(phantom_labels)
    present = set(np.unique(groups).tolist())
    assert {0, 1, 5, 6}.issubset(present), f"the phantom should hold liver, heart and lungs, got {present}"
    code = cs.one_hot(torch.from_numpy(groups))
    assert code.shape == (11, *groups.shape) and set(torch.unique(code).tolist()) == {0.0, 1.0}
    assert torch.equal(code.sum(0), torch.ones(groups.shape)), "exactly one class per voxel"
    assert np.array_equal(cs.decode(code).numpy(), groups)
    assert np.array_equal(cs.decode((code - 0.5) / 0.5 * 0.5).numpy(), groups), "any shared affine decodes the same"
    written = cs.to_total_ids(groups)
    liver = phantom_labels == label_id("liver")
    assert written.dtype == np.uint8 and np.all(written[liver] == label_id("liver"))
    lungs = np.isin(phantom_labels, [label_id(n) for n in LUNG_LOBES])
    assert np.all(written[lungs] == label_id(LUNG_LOBES[0]))
    ungrouped = ~np.isin(phantom_labels, [label_id(m) for ms in DEFAULT_LABEL_GROUPS.values() for m in ms])
    assert np.all(written[ungrouped] == 0), "classes outside the groups are background"
    check_total_ids(written, "generated")


def test_noisy_codes_decode_to_the_nearest_class():
    cs = ChannelSet.from_groups({"liver": ["liver"], "heart": ["heart"], "bone": ["sacrum", "sternum"]})
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 7, 8), generator=gen)
    noisy = cs.one_hot(truth) + 0.45 * torch.randn(4, 6, 7, 8, generator=gen)
    codes = torch.eye(4)                                                   # the code words
    dist = ((noisy.flatten(1).T[:, None, :] - codes[None]) ** 2).sum(-1)   # (voxels, classes)
    nearest = dist.argmin(1).reshape(6, 7, 8)
    decoded = cs.decode(noisy)
    assert torch.equal(decoded.long(), nearest)
    assert 0.5 < float((decoded.long() == truth).float().mean()) < 1.0, "the noise should flip some, not most"


def test_bad_label_sets_are_refused_with_the_reason():
    with pytest.raises(ChannelError, match="not a TotalSegmentator"):
        ChannelSet.from_groups({"liver": ["livre"]})
    with pytest.raises(ChannelError, match="two label groups"):
        ChannelSet.from_groups({"a": ["liver"], "b": ["liver", "spleen"]})
    with pytest.raises(ChannelError, match="reserved"):
        ChannelSet.from_groups({"background": ["liver"]})
    with pytest.raises(ChannelError, match="no member"):
        ChannelSet.from_groups({"liver": []})
    with pytest.raises(ChannelError, match="not TotalSegmentator"):
        check_total_ids(np.array([0, 5, 250], np.uint8), "x.nii.gz")


def test_record_round_trip_and_written_id_mismatch():
    cs = ChannelSet.from_groups(DEFAULT_LABEL_GROUPS)
    rec = cs.record()
    assert ChannelSet.from_record(rec) == cs
    assert ChannelSet.from_record({"channel_mean": [0.5, 0.1]}) == ChannelSet()
    rec["label_groups"][0]["written_id"] = 99
    with pytest.raises(ChannelError, match="written as id 99"):
        ChannelSet.from_record(rec)
