"""libs.checkpoint: safe round trips, refusal of code pickles, atomic writes, run folders, safetensors."""

from __future__ import annotations

import copy
import hashlib
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import libs
from libs import checkpoint as ckpt_mod
from libs.checkpoint import (
    CheckpointError,
    checkpoint_path,
    export_safetensors,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_safetensors_weights,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    sha256_file,
)

CONFIG = {"model": {"channels": 4, "channel_mult": [1, 2]}, "train": {"lr": 1e-3, "objective": "edm"}}
NORMALIZATION = {"ct_clip_hu": [-500.0, 500.0], "suv_max": 25.0, "pet_map": "log2(suv+1)/log2(26)"}


class Ema:
    """Minimal EMA stand-in: anything with state_dict() / load_state_dict()."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = copy.deepcopy(net)
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(0.5)

    def state_dict(self) -> dict:
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state)


class NotATensor:
    """An arbitrary class: a file pickling it must never be loaded."""

    def __init__(self) -> None:
        self.payload = "anything"


def tiny_parts(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.GroupNorm(1, 3),
                              torch.nn.Conv3d(3, 2, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    net(torch.randn(1, 2, 4, 4, 4)).square().mean().backward()
    opt.step()
    return net, Ema(net), opt


def save(path, step=5, **kwargs):
    net, ema, opt = tiny_parts(step)
    save_checkpoint(path, model=net, ema=ema, optimizer=opt, step=step, config=CONFIG,
                    normalization=NORMALIZATION, **kwargs)
    return net, ema, opt


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys(), f"keys {sorted(actual)} != {sorted(expected)}"
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"tensor {key!r} differs after the round trip"


def test_round_trip_restores_identical_state(tmp_path):
    path = tmp_path / "ckpt.pt"
    rng = torch.get_rng_state()
    net, ema, opt = save(path, step=123, extra={"rng": rng, "note": "x"})
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 123 and ckpt["config"] == CONFIG and ckpt["normalization"] == NORMALIZATION
    assert ckpt["versions"]["libs"] == libs.__version__ and ckpt["versions"]["torch"] == torch.__version__
    assert ckpt["extra"]["note"] == "x" and torch.equal(ckpt["extra"]["rng"], rng)
    assert_same_tensors(ckpt["model"], net.state_dict())
    assert_same_tensors(ckpt["ema"], ema.state_dict())

    fresh_net, fresh_ema, fresh_opt = tiny_parts(seed=99)
    assert restore_checkpoint(ckpt, model=fresh_net, ema=fresh_ema, optimizer=fresh_opt) == 123
    assert_same_tensors(fresh_net.state_dict(), net.state_dict())
    assert_same_tensors(fresh_ema.state_dict(), ema.state_dict())
    for group_state, expected in zip(fresh_opt.state_dict()["state"].values(),
                                     opt.state_dict()["state"].values(), strict=True):
        assert_same_tensors(group_state, expected)


def test_config_dataclass_and_numpy_scalars_are_stored_plain(tmp_path):
    @dataclass
    class Cfg:
        channels: int = 4
        lr: float = 1e-3

    path = tmp_path / "ckpt.pt"
    net, _, _ = tiny_parts()
    save_checkpoint(path, model=net, step=np.int64(7), config=Cfg(),
                    normalization={"mean": np.float32(0.25), "shape": (2, 3)})
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"channels": 4, "lr": 1e-3} and ckpt["step"] == 7
    assert ckpt["normalization"] == {"mean": 0.25, "shape": [2, 3]}
    assert ckpt["ema"] is None and ckpt["optimizer"] is None


def test_save_refuses_values_weights_only_could_not_load(tmp_path):
    net, _, _ = tiny_parts()
    with pytest.raises(TypeError, match=r"config\.model\.act: NotATensor is not a plain value"):
        save_checkpoint(tmp_path / "c.pt", model=net, step=1, config={"model": {"act": NotATensor()}},
                        normalization={})
    assert not list(tmp_path.iterdir()), "a refused save must write nothing"


def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "step": 1, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: the file pickles '.*NotATensor'"):
        load_checkpoint(path)


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"payload": NotATensor()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"plain\.pt: refused"):
        load_checkpoint(path)


def test_missing_truncated_and_foreign_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save(good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or truncated checkpoint"):
        load_checkpoint(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: corrupt"):
        load_checkpoint(empty)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a TotalGen checkpoint \(missing format"):
        load_checkpoint(foreign)


def test_atomic_save_leaves_only_the_final_file(tmp_path):
    save(tmp_path / "ckpt.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_failed_save_keeps_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save(path, step=1)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, step=2)
    assert path.read_bytes() == before, "the previous checkpoint must survive a failed save"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temp file may be left behind"
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_run_folder_names_and_listing(tmp_path):
    assert checkpoint_path(tmp_path, 1500).name == "ckpt-000001500.pt"
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for step in (30, 10, 20):
        save(checkpoint_path(tmp_path, step), step=step)
    (tmp_path / ".ckpt-000000040.pt.abc.tmp.pt").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20, 30]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 30)


def test_latest_skips_truncated_newest_with_warning(tmp_path):
    for step in (10, 20):
        save(checkpoint_path(tmp_path, step), step=step)
    newest = checkpoint_path(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:-200])
    with pytest.warns(UserWarning, match=r"ckpt-000000020\.pt: corrupt or truncated"):
        found = latest_checkpoint(tmp_path)
    assert found == checkpoint_path(tmp_path, 10)
    assert load_checkpoint(found)["step"] == 10


def test_prune_keeps_newest_and_newest_readable(tmp_path):
    for step in (1, 2, 3, 4):
        save(checkpoint_path(tmp_path, step), step=step)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt-000000001.pt", "ckpt-000000002.pt"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]

    checkpoint_path(tmp_path, 4).write_bytes(b"truncated")
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4], "the newest readable one must survive"
    save(checkpoint_path(tmp_path, 2), step=2)
    assert prune_checkpoints(tmp_path, keep=2) == [], "a damaged newest file is not counted against keep"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 4], "unreadable files are left for inspection"
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_export_safetensors_holds_ema_weights_and_config(tmp_path):
    path = tmp_path / "ckpt.pt"
    net, ema, _ = save(path, step=42)
    out = export_safetensors(path, tmp_path / "weights.safetensors")
    tensors, meta = load_safetensors_weights(out)
    assert_same_tensors(tensors, ema.state_dict())
    assert not any(torch.equal(tensors[k], v) for k, v in net.state_dict().items() if v.abs().sum() > 0), \
        "the export must hold the EMA weights, not the raw model"
    assert meta["config"] == CONFIG and meta["normalization"] == NORMALIZATION
    assert meta["weights"] == "ema" and meta["step"] == 42
    assert meta["source_sha256"] == sha256_file(path)
    assert meta["versions"]["libs"] == libs.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "weights.safetensors"]

    _, meta = load_safetensors_weights(export_safetensors(path, tmp_path / "raw.safetensors", which="model"))
    assert meta["weights"] == "model"


def test_export_without_ema_falls_back_to_model(tmp_path):
    path = tmp_path / "ckpt.pt"
    net, _, _ = tiny_parts()
    save_checkpoint(path, model=net, step=3, config=CONFIG, normalization=NORMALIZATION)
    with pytest.warns(UserWarning, match="no EMA"):
        out = export_safetensors(path, tmp_path / "w.safetensors")
    tensors, meta = load_safetensors_weights(out)
    assert_same_tensors(tensors, net.state_dict())
    assert meta["weights"] == "model"


def test_safetensors_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.safetensors: weights file not found"):
        load_safetensors_weights(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: corrupt"):
        load_safetensors_weights(bad)


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()
