"""3_Evaluations/1_segment.py and libs.evaluation.segment: offline behaviour of the real TotalSegmentator path.

No test downloads anything: each script run happens in a child interpreter whose sockets refuse to
connect and report the attempt on stderr, so a download or usage-statistics call would show up (and fail
fast) instead of hanging.  The end-to-end run uses *fake* nnU-Net weights (a two-stage UNet whose output
layer always votes 'liver') laid out exactly like TotalSegmentator's datasets 297 / 298.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from libs.cohort import Cohort
from libs.demographics import Demographics
from libs.evaluation import EvaluationError
from libs.evaluation.segment import CROP_TASK_ID, check_roi, choose_device, required_models
from libs.labels import label_id, total_class_map
from libs.volumes import centered_affine

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "3_Evaluations" / "1_segment.py"
NO_NETWORK_RUNNER = """
import runpy, socket, sys, traceback
def refuse(what):
    sys.stderr.write(f"NETWORK ATTEMPT ({what})\\n" + "".join(traceback.format_stack(limit=8)))
    raise OSError("network disabled in this test")
local_connect, local_connect_ex = socket.socket.connect, socket.socket.connect_ex
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse(address)
    return local_connect(self, address)
def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        refuse(address)
    return local_connect_ex(self, address)
socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.create_connection = lambda address, *args, **kwargs: refuse(address)
socket.getaddrinfo = lambda host, *args, **kwargs: refuse(host)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stderr.write(f"TORCHVISION IMPORTED: {'torchvision' in sys.modules}\\n")
"""


def run_offline(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOTALSEG_")}
    env["TOTALSEG_HOME_DIR"] = str(home)
    return subprocess.run([sys.executable, "-c", NO_NETWORK_RUNNER, str(SCRIPT), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def tiny_cohort(root: Path) -> Cohort:
    """One subject whose CT is a 96 mm soft-tissue box in air (8 mm voxels): physically small, so fast."""
    cohort = Cohort(root)
    cohort.write_demographics([Demographics("t1", 1.70, 70.0, "M", 50.0)])
    ct = np.full((12, 12, 12), -1000, np.int16)
    ct[2:10, 2:10, :] = 40
    cohort.write_subject("t1", ct, np.ones(ct.shape, np.float32), centered_affine(ct.shape, 8.0))
    return cohort


def test_missing_weights_stop_before_anything_runs(tmp_path):
    home = tmp_path / "empty_home"
    home.mkdir()
    cohort = tiny_cohort(tmp_path / "coh")
    res = run_offline(home, "--cohort", str(cohort.root), "--quiet")
    assert res.returncode == 1, res.stderr
    assert "NETWORK ATTEMPT" not in res.stderr
    message = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(message) == 1 and "Traceback" not in res.stderr, res.stderr
    text = message[0]
    assert f"{home}/nnunet/results" in text and "TOTALSEG_WEIGHTS_PATH" in text
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in text and "Dataset298" in text
    assert "totalseg_download_weights -t total_fast" in text
    assert not (cohort.root / "labels").exists() and not list(home.iterdir()), "nothing written before the check"


def test_required_models_follow_totalsegmentators_tables():
    fast = required_models(True, ("liver",))
    assert [m.task_id for m in fast] == [297, CROP_TASK_ID]
    assert [m.task_id for m in required_models(True, ())] == [297], "no ROI subset, no crop model"
    assert [m.task_id for m in required_models(False, ())] == [291, 292, 293, 294, 295]


def test_roi_and_device_checks():
    assert check_roi(["liver", " heart", "liver", ""]) == ("liver", "heart")
    with pytest.raises(EvaluationError, match="'livr'"):
        check_roi(["livr"])
    assert choose_device("cpu") == "cpu"
    assert choose_device("auto") in ("cpu", "gpu", "mps")
    with pytest.raises(EvaluationError, match="expected auto"):
        choose_device("tpu")


def _plans(folder: str, spacing: float, arch: dict) -> dict:
    resample = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [32, 32, 32], "median_image_size_in_voxels": [64, 64, 64],
              "spacing": [spacing] * 3, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resample,
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_seg_kwargs": resample | {"is_seg": True},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": resample, "architecture": arch, "batch_dice": False}
    return {"dataset_name": folder, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [spacing] * 3,
            "original_median_shape_after_transp": [64, 64, 64], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 3000.0, "mean": 0.0, "median": 0.0, "min": -1000.0, "percentile_00_5": -1000.0,
                "percentile_99_5": 1000.0, "std": 500.0}},
            "configurations": {"3d_fullres": config}}


def write_fake_model(results: Path, folder: str, spacing: float, winner: str) -> None:
    """An nnU-Net v2 results folder whose network outputs class ``winner`` everywhere."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kwargs = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
              "n_conv_per_stage_decoder": [1], "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    labels = {"background": 0} | total_class_map()
    model = results / folder / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(_plans(folder, spacing, arch)))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                    "numTraining": 1, "file_ending": ".nii.gz"}))
    net = PlainConvUNet(1, 2, [4, 8], torch.nn.Conv3d, 3, [1, 2], [1, 1], len(labels), [1], True,
                        torch.nn.InstanceNorm3d, kwargs["norm_op_kwargs"], None, None, torch.nn.LeakyReLU,
                        kwargs["nonlin_kwargs"], deep_supervision=False)
    state = net.state_dict()
    for key in [k for k in state if "seg_layers" in k]:
        state[key] = torch.zeros_like(state[key])
        if key.endswith("bias"):
            state[key][labels[winner]] = 10.0
    torch.save({"network_weights": state, "trainer_name": "nnUNetTrainer_4000epochs_NoMirroring",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               model / "fold_0" / "checkpoint_final.pth")


@pytest.mark.slow
def test_real_totalsegmentator_path_offline_with_fake_weights(tmp_path):
    home = tmp_path / "home"
    results = home / "nnunet" / "results"
    write_fake_model(results, "Dataset297_TotalSegmentator_total_3mm_1559subj", 3.0, "liver")
    write_fake_model(results, "Dataset298_TotalSegmentator_total_6mm_1559subj", 6.0, "liver")
    cohort = tiny_cohort(tmp_path / "coh")
    res = run_offline(home, "--cohort", str(cohort.root), "--roi", "liver,spleen", "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NETWORK ATTEMPT" not in res.stderr, "usage statistics or a download tried the network"
    assert "TORCHVISION IMPORTED: False" in res.stderr
    subject = cohort.load("t1")
    assert subject.labels is not None and subject.labels.shape == subject.ct.shape
    assert set(np.unique(subject.labels.array)) == {label_id("liver")}
    config = json.loads((home / "config.json").read_text())
    assert config["send_usage_stats"] is False
    again = run_offline(home, "--cohort", str(cohort.root), "--roi", "spleen,liver", "--device", "cpu", "--quiet")
    assert again.returncode == 0 and "0 segmented, 1 already labelled" in again.stdout, again.stdout


def test_labels_are_reused_only_when_made_from_this_ct_with_these_settings(tmp_path, monkeypatch):
    """Issue 13 (found beyond its list): labels were reused because a file existed, even after the CT
    changed.  TotalSegmentator itself is replaced by a thresholding stand-in; the bookkeeping is real."""
    import libs.evaluation.segment as seg
    from libs.manifest import ManifestError
    from libs.volumes import Volume, read_volume

    seen = []

    def fake_segment(ct_path, segmenter):
        seen.append(segmenter.roi)
        ct = read_volume(ct_path, "ct")
        return Volume(np.where(ct.array > 0, label_id("liver"), 0).astype(np.uint8), ct.affine)

    monkeypatch.setattr(seg, "prepare", lambda fast, roi, device: seg.Segmenter(fast, seg.check_roi(roi), "cpu"))
    monkeypatch.setattr(seg, "segment_ct", fake_segment)
    cohort = tiny_cohort(tmp_path / "coh")

    def run(root=cohort.root, roi=("liver",), **kw):
        return seg.segment_cohort(root, roi=roi, device="cpu", progress=False, **kw)

    assert run().written == ["t1"]
    assert run().skipped == ["t1"] and len(seen) == 1
    assert run(roi=("liver", "spleen")).written == ["t1"], "labels of another ROI lack organs"
    ct = np.full((12, 12, 12), -1000, np.int16)
    ct[4:8, 4:8, :] = 40                                     # the CT changes: a smaller body
    cohort.write_subject("t1", ct, np.ones(ct.shape, np.float32), centered_affine(ct.shape, 8.0))
    assert run(roi=("liver", "spleen")).written == ["t1"]
    assert (cohort.load("t1").labels.array > 0).sum() == 4 * 4 * 12, "labels follow the new CT"
    # labels this job did not write (a phantom's truth, preprocessing's) are refused, --overwrite replaces them
    other = tiny_cohort(tmp_path / "other")
    truth = np.zeros((12, 12, 12), np.uint8)
    other.write_subject("t1", ct, np.ones(ct.shape, np.float32), centered_affine(ct.shape, 8.0), truth)
    with pytest.raises(ManifestError, match="--overwrite"):
        run(other.root)
    assert (other.load("t1").labels.array == 0).all(), "refused before anything was written"
    assert run(other.root, overwrite=True).written == ["t1"]
    with pytest.raises(EvaluationError, match="expected auto"):
        seg.segment_cohort(cohort.root, roi=("liver",), device="tpu", progress=False)
