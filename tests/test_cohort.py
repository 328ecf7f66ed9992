"""Cohort directory: write/load round trip, grid checks, completeness used to resume batch jobs."""

import numpy as np
import pytest

from libs.cohort import Cohort
from libs.demographics import Demographics
from libs.volumes import VolumeError, centered_affine, write_volume

SHAPE = (10, 8, 12)
SUBJECT = Demographics("s001", 1.75, 80.0, "M", 50.0)


def _volumes(seed=0):
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
    suv = rng.gamma(2.0, 1.0, SHAPE).astype(np.float32)
    labels = rng.integers(0, 6, SHAPE).astype(np.uint8)
    return ct, suv, labels


def _cohort(tmp_path, labels=True):
    cohort = Cohort(tmp_path / "cohort")
    cohort.write_demographics([SUBJECT])
    ct, suv, lab = _volumes()
    affine = centered_affine(SHAPE, (2.0, 2.5, 3.0))
    cohort.write_subject(SUBJECT.subject_id, ct, suv, affine, labels=lab if labels else None,
                         meta={"seed": 3})
    return cohort, ct, suv, lab, affine


def test_write_then_load_round_trip(tmp_path):
    cohort, ct, suv, lab, affine = _cohort(tmp_path)
    for key in (SUBJECT.subject_id, SUBJECT):
        s = cohort.load(key)
        assert s.demographics == SUBJECT, f"demographics: expected {SUBJECT}, got {s.demographics}"
        for name, vol, want, dtype in (("ct", s.ct, ct, np.int16), ("suv", s.suv, suv, np.float32),
                                       ("labels", s.labels, lab, np.uint8)):
            assert vol is not None, f"{name} missing after load"
            assert vol.array.dtype == dtype, \
                f"{name} dtype: expected {np.dtype(dtype)}, got {vol.array.dtype}"
            np.testing.assert_array_equal(vol.array, want, err_msg=f"{name} array changed in the round trip")
            np.testing.assert_allclose(vol.affine, affine, atol=1e-5, err_msg=f"{name} affine changed")
    assert cohort.load(SUBJECT, labels=False).labels is None, "labels=False should skip the labels"
    assert cohort.path("meta", SUBJECT.subject_id).is_file(), "meta sidecar not written"
    with pytest.raises(VolumeError, match="nobody"):
        cohort.load("nobody")


@pytest.mark.parametrize("change", ["origin", "spacing", "shape"])
def test_suv_on_another_grid_is_refused(tmp_path, change):
    cohort, ct, suv, _, affine = _cohort(tmp_path, labels=False)
    other = affine.copy()
    if change == "origin":
        other[:3, 3] += (0.0, 0.0, 6.0)
    elif change == "spacing":
        other[0, 0] = 4.0
    else:
        suv = suv[:, :, :-1]
    suv_path = cohort.path("suv", SUBJECT.subject_id)
    write_volume(suv_path, suv, other, "suv")
    with pytest.raises(VolumeError) as info:
        cohort.load(SUBJECT)
    assert str(suv_path) in str(info.value), \
        f"expected the SUV path {suv_path} in the message, got: {info.value}"


def test_is_complete(tmp_path):
    cohort, *_ = _cohort(tmp_path, labels=False)
    sid = SUBJECT.subject_id
    assert cohort.is_complete(sid), "a freshly written subject should be complete"
    assert not cohort.is_complete(sid, labels=True), "labels were not written, so labels=True is incomplete"
    assert not cohort.is_complete("s999"), "a subject with no files is not complete"

    ct_path = cohort.path("ct", sid)
    raw = ct_path.read_bytes()
    ct_path.write_bytes(raw[: len(raw) // 2])
    assert not cohort.is_complete(sid), "a subject whose CT is truncated to half must not count as complete"
    ct_path.write_bytes(raw)
    assert cohort.is_complete(sid), "restoring the CT should make the subject complete again"
    cohort.path("suv", sid).unlink()
    assert not cohort.is_complete(sid), "a subject without its SUV file is not complete"
