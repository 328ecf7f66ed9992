"""DICOM → SUV: pydicom-written PET/CT studies with known dose, times, weight and activity → known SUV."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from libs.preprocess.convert import convert_tree
from libs.preprocess.dicom_io import read_stack, rescaled
from libs.preprocess.errors import SkipStudy
from libs.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
NAME, PID, INSTITUTION = "Secretperson^Jane", "PID98765XYZ", "Hospital Confidential"
HALF_LIFE, DOSE, WEIGHT = 6586.2, 3.7e8, 72.5
PET_SLOPES = [0.5, 0.75, 1.25, 2.0]
PET_STORED = [100, 200, 300, 400]


def _base(modality: str, study_uid: str, series_uid: str, z: float, shape=(3, 4)) -> FileDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128" if modality == "PT" else "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
    ds.PatientName, ds.PatientID, ds.InstitutionName = NAME, PID, INSTITUTION
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19661103", "F", "057Y"
    ds.PatientSize, ds.PatientWeight = "1.68", str(WEIGHT)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240102"
    ds.SeriesTime, ds.AcquisitionTime = "110000", "110000"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.PixelSpacing = [4.0, 4.0]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_study(root: Path, units="BQML", pet_stored=PET_STORED, slopes=PET_SLOPES, edit=None, ct_edit=None) -> Path:
    """A CT series (3 slices, 2 mm) and a PET series (4 slices, 3 mm) under deliberately misleading folders;
    ``edit(ds)`` changes each PET slice header."""
    study, ct_uid, pt_uid = generate_uid(), generate_uid(), generate_uid()
    for k in range(3):
        ds = _base("CT", study, ct_uid, 2.0 * k)
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.full((3, 4), 1024 + 40 * k, np.int16).tobytes()
        if ct_edit:
            ct_edit(ds)
        (root / "PET_folder").mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "PET_folder" / f"c{k}.dcm", enforce_file_format=True)
    for k in [2, 0, 3, 1]:  # files out of order: the reader sorts by position
        ds = _base("PT", study, pt_uid, 3.0 * k)
        ds.Units, ds.CorrectedImage, ds.DecayCorrection = units, ["ATTN", "DECAY", "SCAT"], "START"
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], 0
        item = pydicom.Dataset()
        item.RadionuclideTotalDose, item.RadionuclideHalfLife = str(DOSE), str(HALF_LIFE)
        item.RadiopharmaceuticalStartTime = "100000"
        ds.RadiopharmaceuticalInformationSequence = [item]
        ds.PixelData = np.full((3, 4), pet_stored[k], np.int16).tobytes()
        if edit:
            edit(ds)
        (root / "CT" / "deep").mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "CT" / "deep" / f"p{k}.dcm", enforce_file_format=True)
    return root


def expected_bqml(uptake_s: float) -> np.ndarray:
    activity = np.array(PET_STORED) * np.array(PET_SLOPES)
    return activity * WEIGHT * 1000.0 / (DOSE * 2.0 ** (-uptake_s / HALF_LIFE))


def convert(tmp_path: Path, **kw):
    raw = write_study(tmp_path / "raw", **kw)
    report = convert_tree(raw, tmp_path / "work", progress=False)
    return report, tmp_path / "work"


def slice_values(work: Path, sid: str) -> np.ndarray:
    suv = read_volume(work / "suv" / f"{sid}.nii.gz", "suv").array
    assert np.allclose(suv, suv[:1, :1, :]), "each PET slice of the fixture is uniform"
    return suv[0, 0, :].astype(np.float64)


def check(report, work, expected):
    assert not report.skipped and not report.failed, (report.skipped, report.failed)
    (sid,) = report.written
    np.testing.assert_allclose(slice_values(work, sid), expected, rtol=1e-4)
    return sid


def test_siemens_bqml_start_with_per_slice_slopes(tmp_path):
    report, work = convert(tmp_path)
    sid = check(report, work, expected_bqml(3600.0))
    ct = read_volume(work / "ct" / f"{sid}.nii.gz", "ct")
    assert ct.shape == (4, 3, 3) and ct.spacing == pytest.approx((4.0, 4.0, 2.0))
    assert list(ct.array[0, 0, :]) == [0, 40, 80], "HU = stored · slope + intercept, slices sorted inferior→superior"
    row = (work / "demographics.csv").read_text().splitlines()[1]
    assert row == f"{sid},1.680,72.5,F,57.0"


def test_injection_datetime_preferred(tmp_path):
    def edit(ds):
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20240102103000"
    report, work = convert(tmp_path, edit=edit)
    check(report, work, expected_bqml(1800.0))


def test_decay_across_midnight(tmp_path):
    def edit(ds):
        ds.SeriesDate = ds.AcquisitionDate = "20240103"
        ds.SeriesTime, ds.AcquisitionTime = "003000", "003000"
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = "233000"
    report, work = convert(tmp_path, edit=edit)
    check(report, work, expected_bqml(3600.0))


def test_midnight_with_study_date_after_midnight(tmp_path):
    def edit(ds):
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240103"
        ds.SeriesTime, ds.AcquisitionTime = "001500", "001500"
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = "234500"
    report, work = convert(tmp_path, edit=edit)
    check(report, work, expected_bqml(1800.0))


def test_ge_private_scan_time(tmp_path):
    def edit(ds):
        ds.SeriesTime = "140000"  # reset by post-processing, after the acquisition
        block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
        block.add_new(0x0D, "DT", "20240102104500")
    report, work = convert(tmp_path, edit=edit)
    check(report, work, expected_bqml(2700.0))


def test_ge_series_after_acquisition_without_private_time_is_skipped(tmp_path):
    def edit(ds):
        ds.SeriesTime = "140000"
    report, work = convert(tmp_path, edit=edit)
    assert not report.written and "GE private scan time" in next(iter(report.skipped.values()))
    assert "skipped" in (work / "skipped.csv").read_text()


def _philips(factor_tag: int, value: str):
    def edit(ds):
        block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
        block.add_new(factor_tag, "DS", value)
    return edit


def test_philips_cnts_suv_scale_factor(tmp_path):
    report, work = convert(tmp_path, units="CNTS", edit=_philips(0x00, "0.000321"))
    check(report, work, np.array(PET_STORED) * np.array(PET_SLOPES) * 0.000321)


def test_philips_cnts_activity_scale_factor(tmp_path):
    report, work = convert(tmp_path, units="CNTS", edit=_philips(0x09, "1.5"))
    check(report, work, expected_bqml(3600.0) * 1.5)


def test_gml_is_already_suv(tmp_path):
    report, work = convert(tmp_path, units="GML")
    check(report, work, np.array(PET_STORED) * np.array(PET_SLOPES))


def _delete(*keys):
    def edit(ds):
        for key in keys:
            target = ds.RadiopharmaceuticalInformationSequence[0] if key.startswith("Radio") else ds
            delattr(target, key)
    return edit


@pytest.mark.parametrize("kw, reason", [
    ({"edit": _delete("PatientWeight")}, "PatientWeight"),
    ({"edit": _delete("RadionuclideTotalDose")}, "RadionuclideTotalDose"),
    ({"edit": _delete("RadiopharmaceuticalStartTime")}, "RadiopharmaceuticalStartTime"),
    ({"edit": _delete("RadionuclideHalfLife")}, "RadionuclideHalfLife"),
    ({"units": "PROPCPS"}, "Units (0054,1001) PROPCPS"),
    ({"units": "CNTS"}, "without Philips"),
    ({"edit": lambda ds: setattr(ds, "DecayCorrection", "ADMIN")}, "DecayCorrection"),
    ({"edit": lambda ds: setattr(ds, "CorrectedImage", ["ATTN"])}, "lacks DECAY"),
    ({"edit": _delete("PatientSize"), "ct_edit": _delete("PatientSize")}, "PatientSize"),
    ({"edit": lambda ds: setattr(ds, "PatientSex", "O"), "ct_edit": lambda ds: setattr(ds, "PatientSex", "O")},
     "PatientSex"),
])
def test_untrusted_studies_are_skipped_with_reason(tmp_path, kw, reason):
    report, work = convert(tmp_path, **kw)
    assert not report.written and not report.failed
    assert reason in next(iter(report.skipped.values()))
    assert reason in (work / "skipped.csv").read_text()
    assert not list((work / "suv").glob("*")) if (work / "suv").exists() else True


def test_height_from_ct_header_when_pet_lacks_it(tmp_path):
    report, work = convert(tmp_path, edit=_delete("PatientSize"))
    check(report, work, expected_bqml(3600.0))


def test_age_from_birth_date(tmp_path):
    report, work = convert(tmp_path, edit=_delete("PatientAge"), ct_edit=_delete("PatientAge"))
    check(report, work, expected_bqml(3600.0))
    assert (work / "demographics.csv").read_text().splitlines()[1].endswith(",F,57.0")


def test_no_identifying_field_in_outputs_or_log(tmp_path):
    raw = write_study(tmp_path / "raw")
    write_study(tmp_path / "raw" / "second", edit=_delete("PatientWeight"))  # a skipped study too
    headers = [pydicom.dcmread(p) for p in sorted((tmp_path / "raw").rglob("*.dcm"))]
    secrets = {NAME, PID, INSTITUTION, "19661103", *(str(h.StudyInstanceUID) for h in headers),
               *(str(h.SeriesInstanceUID) for h in headers), *(str(h.SOPInstanceUID) for h in headers)}
    out = tmp_path / "work"
    run = subprocess.run([sys.executable, str(ROOT / "0_Preprocess" / "1_dicom_to_nifti.py"), "--input", str(raw),
                          "--output", str(out), "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    texts = [run.stdout, run.stderr]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            texts.append((gzip.decompress(data) if path.suffix == ".gz" else data).decode("latin-1"))
    assert len(texts) >= 2 + 4, "ct, suv, meta, demographics.csv, skipped.csv expected"
    assert "1 written" in run.stdout and "1 skipped" in run.stdout
    for secret in secrets:
        for text in texts:
            assert secret.lower() not in text.lower(), f"{secret!r} leaked"
    meta = json.loads(next((out / "meta").glob("*.json")).read_text())
    assert meta["suv_units"] == "BQML" and meta["uptake_s"] == pytest.approx(3600.0)
    rerun = subprocess.run([sys.executable, str(ROOT / "0_Preprocess" / "1_dicom_to_nifti.py"), "--input", str(raw),
                            "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert "1 already complete" in rerun.stdout, rerun.stdout


def _ct_small_copies(tmp_path: Path, offsets) -> list[str]:
    src = pydicom.data.get_testdata_file("CT_small.dcm")
    paths = []
    for k, dz in enumerate(offsets):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + \
            [float(ds.ImagePositionPatient[2]) + dz]
        ds.SOPInstanceUID = generate_uid()
        paths.append(str(tmp_path / f"s{k}.dcm"))
        ds.save_as(paths[-1])
    return paths


def test_pydicom_ct_small_through_our_reader(tmp_path):
    src = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    stack = read_stack(_ct_small_copies(tmp_path, [5.0, 0.0]), "CT series")
    hu = rescaled(stack)
    expected = src.pixel_array.T * float(src.RescaleSlope) + float(src.RescaleIntercept)
    np.testing.assert_allclose(hu[..., 0], expected)
    # the brightest pixel's DICOM position (PS3.3 C.7.6.2) in LPS, then RAS, equals affine · voxel index
    j, i = np.unravel_index(np.argmax(src.pixel_array), src.pixel_array.shape)
    row, col = np.array(src.ImageOrientationPatient[:3], float), np.array(src.ImageOrientationPatient[3:], float)
    lps = np.array(src.ImagePositionPatient, float) + i * float(src.PixelSpacing[1]) * row + \
        j * float(src.PixelSpacing[0]) * col
    world = stack.affine @ np.array([i, j, 0, 1.0])
    np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-6)
    assert np.linalg.norm(stack.affine[:3, 2]) == pytest.approx(5.0)


def test_gap_in_series_is_named(tmp_path):
    with pytest.raises(SkipStudy, match="CT series: uneven slice spacing"):
        read_stack(_ct_small_copies(tmp_path, [0.0, 5.0, 15.0]), "CT series")


def test_cli_help_and_single_study(tmp_path):
    assert "--workers" in subprocess.run([sys.executable, str(ROOT / "0_Preprocess/1_dicom_to_nifti.py"), "--help"],
                                         capture_output=True, text=True, cwd=ROOT).stdout
    raw = write_study(tmp_path / "one")
    run = subprocess.run([sys.executable, str(ROOT / "0_Preprocess/1_dicom_to_nifti.py"), "--study", str(raw),
                          "--output", str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "1 written" in run.stdout, run.stdout + run.stderr
    shutil.rmtree(tmp_path / "w")


def test_run_preprocessing_detects_dicom_and_stops_at_the_failing_step(tmp_path):
    write_study(tmp_path / "raw")
    (tmp_path / "no_labels").mkdir()
    run = subprocess.run(["bash", "run_preprocessing.sh", "--input_dir", str(tmp_path / "raw"), "--output_dir",
                          str(tmp_path / "out"), "--labels_from", str(tmp_path / "no_labels"), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT / "0_Preprocess")
    assert run.returncode != 0
    assert "input: dicom" in run.stderr and "== step 1: 1_dicom_to_nifti.py" in run.stderr, run.stderr
    assert "step 2 (2_segment_organs.py) failed" in run.stderr and "step 3" not in run.stderr, run.stderr
    assert len((tmp_path / "out" / "work" / "demographics.csv").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "cohort").exists()


def _phantom_as_dicom(root: Path, ph, demo) -> str:
    """The phantom's CT (HU) and PET (BQML, per-slice slopes, 1 h uptake) as axial DICOM series; its StudyUID."""
    a = ph.affine
    assert np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))) and (np.diag(a)[:3] > 0).all()
    nx, ny, nz = ph.ct.shape
    study, ct_uid, pt_uid = generate_uid(), generate_uid(), generate_uid()
    decayed = DOSE * 2.0 ** (-3600.0 / HALF_LIFE)
    for k in range(nz):
        ras = a @ np.array([nx - 1, ny - 1, k, 1.0])        # the voxel DICOM pixel (0, 0) shows
        for modality, uid in (("CT", ct_uid), ("PT", pt_uid)):
            ds = _base(modality, study, uid, float(ras[2]), shape=(ny, nx))
            ds.ImagePositionPatient = [float(-ras[0]), float(-ras[1]), float(ras[2])]
            ds.PixelSpacing = [float(a[1, 1]), float(a[0, 0])]
            ds.PatientSize, ds.PatientWeight = f"{demo.height_m:.3f}", f"{demo.weight_kg:.1f}"
            ds.PatientSex, ds.PatientAge = demo.sex, f"{int(demo.age_years):03d}Y"
            ras_slice = (ph.ct if modality == "CT" else ph.suv)[::-1, ::-1, k].T   # rows = -A, columns = -R
            if modality == "CT":
                ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
                stored = ras_slice.astype(np.int32) + 1024
            else:
                ds.Units, ds.CorrectedImage, ds.DecayCorrection = "BQML", ["ATTN", "DECAY"], "START"
                item = pydicom.Dataset()
                item.RadionuclideTotalDose, item.RadionuclideHalfLife = str(DOSE), str(HALF_LIFE)
                item.RadiopharmaceuticalStartTime = "100000"
                ds.RadiopharmaceuticalInformationSequence = [item]
                bqml = ras_slice.astype(np.float64) * decayed / (demo.weight_kg * 1000.0)
                slope = max(bqml.max(), 1e-3) / 30000.0
                ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", 0
                stored = np.rint(bqml / float(f"{slope:.10g}"))
            ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16).tobytes()
            (root / uid[-6:]).mkdir(parents=True, exist_ok=True)
            ds.save_as(root / uid[-6:] / f"{k:04d}.dcm", enforce_file_format=True)
    return study


def test_phantom_through_dicom_and_every_step_end_to_end(tmp_path):
    """Phantom → DICOM → run_preprocessing.sh (steps 1, 2 with --labels_from, 3) → the phantom again."""
    from libs.cohort import Cohort
    from libs.demographics import Demographics
    from libs.phantom.build import make_phantom
    from libs.volumes import write_volume

    demo = Demographics("x", 1.71, 74.5, "M", 63.0)
    ph = make_phantom(demo, seed=5, spacing_mm=8.0)
    study = _phantom_as_dicom(tmp_path / "raw", ph, demo)
    sid = "sub-" + hashlib.sha256(study.encode()).hexdigest()[:12]   # the contract, computed independently
    write_volume(tmp_path / "seg" / f"{sid}.nii.gz", ph.labels, ph.affine, "labels")
    run = subprocess.run(["bash", "run_preprocessing.sh", "--input_dir", str(tmp_path / "raw"), "--output_dir",
                          str(tmp_path / "out"), "--labels_from", str(tmp_path / "seg"), "--spacing_mm", "8",
                          "--size", "48", "--margin", "2", "--no_height_fit", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT / "0_Preprocess")
    assert run.returncode == 0, run.stderr
    cohort = Cohort(tmp_path / "out" / "cohort")
    (got,) = cohort.demographics()
    assert (got.subject_id, got.sex, got.age_years) == (sid, "M", 63.0)
    assert abs(got.height_m - 1.71) < 1e-6 and abs(got.weight_kg - 74.5) < 1e-6
    ct = read_volume(cohort.path("ct", sid), "ct")
    suv = read_volume(cohort.path("suv", sid), "suv")
    labels = read_volume(cohort.path("labels", sid), "labels")
    # same spacing and axes: the cohort grid is the phantom grid shifted by whole voxels
    shift = np.linalg.inv(ph.affine) @ ct.affine
    assert np.allclose(shift[:3, :3], np.eye(3)) and np.allclose(shift[:3, 3], np.rint(shift[:3, 3]), atol=1e-4)
    off = np.rint(shift[:3, 3]).astype(int)
    idx = np.indices(ct.array.shape).reshape(3, -1) + off[:, None]
    inside = ((idx >= 0) & (idx < np.array(ph.ct.shape)[:, None])).all(axis=0)
    body = (ct.array.reshape(-1) > -1000) & inside
    assert body.sum() > 0.2 * ct.array.size
    src = tuple(idx[:, body])
    np.testing.assert_array_equal(ct.array.reshape(-1)[body], ph.ct[src])
    np.testing.assert_allclose(suv.array.reshape(-1)[body], ph.suv[src], rtol=2e-4, atol=2e-4 * ph.suv.max())
    np.testing.assert_array_equal(labels.array.reshape(-1)[body], ph.labels[src])
