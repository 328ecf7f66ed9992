"""NIfTI I/O contract: RAS+ world coordinates survive a round trip, reorientation on read, dtype per
kind, refusal of bad values and broken files, atomic writes, header codes."""

import os

import nibabel as nib
import numpy as np
import pytest

from libs.volumes import (
    VolumeError,
    centered_affine,
    read_volume,
    voxel_to_world,
    write_volume,
)

SHAPE = (12, 10, 8)
MARK = (3, 7, 5)  # a voxel away from every centre line and every edge


def _affine(spacing=(2.0, 2.5, 3.0), origin=(-100.0, 40.5, 812.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _marked(dtype=np.int16, value=100) -> np.ndarray:
    array = np.zeros(SHAPE, dtype=dtype)
    array[MARK] = value
    return array


def _marked_world(vol) -> np.ndarray:
    """World mm of the single voxel holding the array's maximum."""
    idx = np.argwhere(vol.array == vol.array.max())
    assert len(idx) == 1, f"expected one marked voxel, found {len(idx)}"
    return voxel_to_world(vol.affine, idx[0])


def test_round_trip_keeps_world_coordinates(tmp_path):
    affine = _affine()
    path = write_volume(tmp_path / "ct.nii.gz", _marked(), affine, "ct")
    vol = read_volume(path, "ct")
    assert vol.shape == SHAPE, f"shape: expected {SHAPE}, got {vol.shape}"
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5, err_msg="affine changed in the round trip")
    want = voxel_to_world(affine, MARK)
    np.testing.assert_allclose(want, [-100 + 2 * 3, 40.5 + 2.5 * 7, 812 + 3 * 5], err_msg="voxel_to_world")
    got = _marked_world(vol)
    np.testing.assert_allclose(got, want, atol=1e-4,
                               err_msg=f"marked voxel world mm: expected {want}, got {got}")
    assert vol.spacing == pytest.approx((2.0, 2.5, 3.0)), f"spacing: expected (2, 2.5, 3), got {vol.spacing}"


@pytest.mark.parametrize("name, linear", [
    ("LPS", np.diag([-2.0, -2.0, 2.0])),
    ("LAS", np.diag([-2.0, 2.5, 3.0])),
    # array axes permuted: i → S, j → R, k → P
    ("permuted", np.array([[0.0, 2.0, 0.0], [0.0, 0.0, -2.5], [3.0, 0.0, 0.0]])),
])
def test_foreign_orientation_is_reoriented_to_ras(tmp_path, name, linear):
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (150.0, -80.0, 300.0)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(_marked(), affine), str(path))  # written by nibabel, not by libs
    want = voxel_to_world(affine, MARK)

    vol = read_volume(path, "ct")
    lin = vol.affine[:3, :3]
    assert np.allclose(lin, np.diag(np.diag(lin))) and (np.diag(lin) > 0).all(), \
        f"{name}: expected a RAS+ affine with positive diagonal, got\n{vol.affine}"
    spacing = tuple(sorted(np.linalg.norm(linear, axis=0)))
    assert tuple(sorted(vol.spacing)) == pytest.approx(spacing), f"{name}: spacing {vol.spacing}"
    got = _marked_world(vol)
    np.testing.assert_allclose(got, want, atol=1e-4,
                               err_msg=f"{name}: marked voxel should stay at {want} mm, got {got}")


def test_dtype_per_kind(tmp_path):
    affine = _affine()
    ct = np.full(SHAPE, 12.6)
    ct[0, 0, 0] = -7.4
    vol = read_volume(write_volume(tmp_path / "ct.nii.gz", ct, affine, "ct"))
    assert vol.array.dtype == np.int16, f"ct dtype: expected int16, got {vol.array.dtype}"
    assert vol.array[1, 1, 1] == 13 and vol.array[0, 0, 0] == -7, \
        f"ct rounding: expected 13 and -7, got {vol.array[1, 1, 1]} and {vol.array[0, 0, 0]}"

    suv = np.full(SHAPE, 2.345678, dtype=np.float64)
    vol = read_volume(write_volume(tmp_path / "suv.nii.gz", suv, affine, "suv"))
    assert vol.array.dtype == np.float32, f"suv dtype: expected float32, got {vol.array.dtype}"
    assert vol.array[0, 0, 0] == np.float32(2.345678), f"suv value: got {vol.array[0, 0, 0]}"

    labels = _marked(np.int64, value=90)
    vol = read_volume(write_volume(tmp_path / "labels.nii.gz", labels, affine, "labels"))
    assert vol.array.dtype == np.uint8, f"labels dtype: expected uint8, got {vol.array.dtype}"
    assert vol.array[MARK] == 90, f"label value: expected 90, got {vol.array[MARK]}"

    for kind, dtype in (("ct", np.int16), ("suv", np.float32), ("labels", np.uint8)):
        on_disk = nib.load(str(tmp_path / f"{kind}.nii.gz")).get_data_dtype()
        assert on_disk == dtype, f"{kind} on-disk dtype: expected {np.dtype(dtype)}, got {on_disk}"


def test_nan_is_refused_naming_the_file(tmp_path):
    suv = np.ones(SHAPE, dtype=np.float32)
    suv[MARK] = np.nan
    path = tmp_path / "nan_suv.nii.gz"
    with pytest.raises(VolumeError, match="nan_suv.nii.gz"):
        write_volume(path, suv, _affine(), "suv")
    assert not path.exists(), "a refused volume must not be written"

    nib.save(nib.Nifti1Image(suv, _affine()), str(path))  # a NaN file from elsewhere
    with pytest.raises(VolumeError, match="nan_suv.nii.gz"):
        read_volume(path, "suv")


def test_out_of_range_values_are_refused(tmp_path):
    ct = np.zeros(SHAPE, dtype=np.int32)
    ct[MARK] = 40000
    path = tmp_path / "big_ct.nii.gz"
    with pytest.raises(VolumeError, match="big_ct.nii.gz") as info:
        write_volume(path, ct, _affine(), "ct")
    assert "int16" in str(info.value), f"message should name the int16 range, got: {info.value}"
    assert not path.exists(), "an out-of-range CT must not be written (it would wrap around)"
    with pytest.raises(VolumeError):
        write_volume(tmp_path / "lab.nii.gz", _marked(np.int64, value=-1), _affine(), "labels")


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeError, match="absent.nii.gz"):
        read_volume(path)


@pytest.mark.parametrize("keep", [0.5, 200])
def test_truncated_file_names_the_file(tmp_path, keep):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, SHAPE).astype(np.int16)  # incompressible enough to be long
    good = write_volume(tmp_path / "good.nii.gz", array, _affine(), "ct")
    raw = good.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    assert n < len(raw), f"test setup: file of {len(raw)} bytes too short to truncate to {n}"
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[:n])
    with pytest.raises(VolumeError, match="cut.nii.gz"):
        read_volume(bad)


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    final = write_volume(tmp_path / "s.nii.gz", _marked(), _affine(), "ct")
    before = final.read_bytes()
    seen = []

    def broken_save(img, filename):
        seen.append(str(filename))
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(final, _marked(value=7), _affine(), "ct")
    assert seen and seen[0] != str(final), f"save must target a temporary path, got {seen}"
    assert final.read_bytes() == before, "the previous final file was modified by a failed write"
    left = sorted(os.listdir(tmp_path))
    assert left == ["s.nii.gz"], f"expected only s.nii.gz in the directory, got {left}"


def test_written_file_has_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_volume(tmp_path / "perm.nii.gz", _marked(), _affine(), "ct")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    got, want = path.stat().st_mode & 0o777, plain.stat().st_mode & 0o777
    assert got == want, \
        f"permissions: expected {oct(want)} like any new file (umask {oct(umask)}), got {oct(got)}"


@pytest.mark.parametrize("shape, spacing", [((56, 56, 96), 8.0), ((7, 10, 5), (2.0, 2.5, 3.0))])
def test_centered_affine_puts_centre_at_origin(shape, spacing):
    affine = centered_affine(shape, spacing)
    centre = (np.asarray(shape) - 1) / 2.0
    got = voxel_to_world(affine, centre)
    np.testing.assert_allclose(got, 0.0, atol=1e-9, err_msg=f"centre voxel {centre} at {got}, expected 0 mm")
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    np.testing.assert_allclose(np.diag(affine)[:3], sp, err_msg="diagonal should be the (positive) spacing")
    first, last = voxel_to_world(affine, [0, 0, 0]), voxel_to_world(affine, np.asarray(shape) - 1)
    np.testing.assert_allclose(first, -last, err_msg=f"corners not symmetric: {first} vs {last}")


def test_header_codes_and_units(tmp_path):
    affine = _affine()
    path = write_volume(tmp_path / "h.nii.gz", _marked(), affine, "ct")
    img = nib.load(str(path))
    hdr = img.header
    assert int(hdr["qform_code"]) == 1, f"qform_code: expected 1 (scanner), got {hdr['qform_code']}"
    assert int(hdr["sform_code"]) == 1, f"sform_code: expected 1 (scanner), got {hdr['sform_code']}"
    assert hdr.get_xyzt_units()[0] == "mm", f"spatial units: expected mm, got {hdr.get_xyzt_units()}"
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-5, err_msg="qform differs from the affine")
    np.testing.assert_allclose(hdr.get_sform(), affine, atol=1e-5, err_msg="sform differs from the affine")
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0, \
        f"values must be stored unscaled, got slope {img.dataobj.slope} inter {img.dataobj.inter}"
