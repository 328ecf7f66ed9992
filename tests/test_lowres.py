"""The low-resolution stage: data, training (loss falls, exact resume, DDP), CLIs end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from libs.cohort import Cohort
from libs.config import ConfigError, load_config, to_dict
from libs.data import CohortVolumes, DataError, PolyphaseSamples, batch_indices, offset_of, polyphase
from libs.lowres import LowresConfig, train_lowres
from libs.phantom.writer import sampled_demographics, write_phantom_cohort
from libs.volumes import read_volume

ROOT = Path(__file__).resolve().parents[1]
# 14 mm phantoms: 32 × 32 in-plane; training grid 32 × 32 × 64 → 8 × 8 × 16 samples.
TINY = {
    "in_plane_mm": 14.0,
    "data": {"grid": [32, 32, 64], "factor": 4, "load_workers": 1},
    "model": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_levels": [-1],
              "channels_per_head": 8},
    "optim": {"batch": 4, "lr_ref": 0.01, "ref_steps": 100, "warmup_steps": 2},
    "loop": {"steps": 6, "report_every": 2, "checkpoint_every": 3, "keep_checkpoints": 5, "loader_workers": 0},
    "sample": {"steps": 4},
}


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    write_phantom_cohort(out, sampled_demographics(3, seed=2), seed=2, spacing_mm=14.0, progress=False)
    return out


def tiny_config(cohort_dir, run_dir, **loop) -> LowresConfig:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["cohort"] = str(cohort_dir)
    raw["run_dir"] = str(run_dir)
    raw["loop"].update(loop)
    return load_config(raw, LowresConfig)


def test_polyphase_offsets_are_distinct_and_cover_the_volume():
    vol = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 8, 8, 8)
    parts = [polyphase(vol, 4, offset_of(k, 4)) for k in range(64)]
    assert all(p.shape == (1, 2, 2, 2) for p in parts)
    values = torch.cat([p.flatten() for p in parts])
    assert values.unique().numel() == 512, "the 64 offsets must tile every voxel exactly once"
    assert offset_of(0, 4) == (0, 0, 0) and offset_of(63, 4) == (3, 3, 3)


def test_batch_indices_disjoint_across_ranks_and_deterministic():
    a = batch_indices(5, 3, 0, 2, 40, seed=1)
    b = batch_indices(5, 3, 1, 2, 40, seed=1)
    assert not set(a) & set(b), f"ranks must see disjoint samples: {a} vs {b}"
    assert a == batch_indices(5, 3, 0, 2, 40, seed=1)
    epoch = [i for s in range(10) for i in batch_indices(s, 4, 0, 1, 40, seed=0)]
    assert sorted(epoch) == list(range(40)), "one epoch visits every sample once"


def test_dataset_shapes_ranges_and_demographics(cohort_dir):
    vols = CohortVolumes(cohort_dir, (32, 32, 64), progress=False)
    samples = PolyphaseSamples(vols, 4)
    assert len(samples) == 3 * 64 and samples.shape == (8, 8, 16)
    x, cond = samples.batch([0, 64 + 5, 130])
    assert x.shape == (3, 2, 8, 8, 16) and cond.shape == (3, 4)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    d = vols.records[1]
    np.testing.assert_allclose(cond[1].numpy(), d.encode(), rtol=1e-6)


def test_missing_cohort_file_is_named(cohort_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "demographics.csv").write_text((cohort_dir / "demographics.csv").read_text())
    with pytest.raises(DataError, match=r"ct/phantom_00000\.nii\.gz: missing"):
        CohortVolumes(broken, (32, 32, 64), progress=False)
    with pytest.raises(DataError, match="in-plane size 32×32 differs"):
        CohortVolumes(cohort_dir, (64, 64, 64), progress=False)


def test_bad_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model_chanels: 8\n")
    with pytest.raises(ConfigError, match=r"model\.model_chanels.*model_channels"):
        load_config(bad, LowresConfig)


def test_loss_falls_on_one_phantom_subject(tmp_path):
    out = tmp_path / "one"
    write_phantom_cohort(out, sampled_demographics(1, seed=4), seed=4, spacing_mm=14.0, progress=False)
    cfg = tiny_config(out, tmp_path / "run", steps=80, report_every=10, checkpoint_every=80)
    train_lowres(cfg, device="cpu", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-2:]])
    assert last < first - 0.3, f"loss should fall clearly: first report {first:.3f}, last {last:.3f}"


def _weights(run_dir: Path, step: int) -> dict:
    ckpt = torch.load(run_dir / f"ckpt-{step:09d}.pt", weights_only=True)
    return {"model": ckpt["model"], "ema": ckpt["ema"]["shadows"], "opt": ckpt["optimizer"]["state"]}


def test_resume_gives_identical_weights(cohort_dir, tmp_path):
    straight = tiny_config(cohort_dir, tmp_path / "a", steps=6)
    train_lowres(straight, device="cpu", progress=False)
    first = tiny_config(cohort_dir, tmp_path / "b", steps=3)
    train_lowres(first, device="cpu", progress=False)
    resumed = tiny_config(cohort_dir, tmp_path / "b", steps=6)
    train_lowres(resumed, device="cpu", progress=False)
    a, b = _weights(tmp_path / "a", 6), _weights(tmp_path / "b", 6)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"model weight {name} differs after resume"
    for sa, sb in zip(a["ema"], b["ema"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "EMA differs after resume"


def test_max_minutes_stops_at_a_report_with_a_checkpoint_and_a_rerun_finishes(cohort_dir, tmp_path):
    """A launch past its wall-clock budget stops at the next report (here the first, step 2 of 6) with a
    checkpoint, and a rerun without the budget continues to the very weights of an uninterrupted run."""
    budget = tiny_config(cohort_dir, tmp_path / "b", steps=6, report_every=2, checkpoint_every=6, max_minutes=1e-9)
    last = train_lowres(budget, device="cpu", progress=False)
    assert last is not None and last.name == "ckpt-000000002.pt", last
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*.pt")) == ["ckpt-000000002.pt"]
    train_lowres(tiny_config(cohort_dir, tmp_path / "b", steps=6, report_every=2, checkpoint_every=6),
                 device="cpu", progress=False)
    train_lowres(tiny_config(cohort_dir, tmp_path / "a", steps=6, report_every=2, checkpoint_every=6),
                 device="cpu", progress=False)
    a, b = _weights(tmp_path / "a", 6), _weights(tmp_path / "b", 6)
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items()), "budgeted + rerun != straight run"
    with pytest.raises(ValueError, match="max_minutes"):
        tiny_config(cohort_dir, tmp_path / "c", max_minutes=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from libs.lowres import LowresConfig as Cfg
    from libs.lowres import train_lowres as train
    train(load_config(cfg_dict, Cfg), device="cpu", progress=False)
    dist.barrier()                # both ranks done before either tears gloo down
    dist.destroy_process_group()
    os._exit(0)                   # skip static destructors: gloo's threads aborted the exit in ~1 of 15 runs


def test_ddp_training_script_path_runs_with_two_ranks(cohort_dir, tmp_path):
    """train_lowres under a 2-process gloo group: rank 0 alone writes checkpoint and log."""
    cfg = tiny_config(cohort_dir, tmp_path / "ddp", steps=3, checkpoint_every=3)
    mp.spawn(_ddp_worker, args=(2, _free_port(), to_dict(cfg)), nprocs=2, join=True)
    ckpt = torch.load(tmp_path / "ddp" / "ckpt-000000003.pt", weights_only=True)
    assert ckpt["step"] == 3
    lines = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 3], "only rank 0 may write the log"


def test_ddp_replicas_match_in_memory(cohort_dir, tmp_path):
    """Both ranks' live parameters are equal after DDP steps (compared with all_gather)."""
    cfg = tiny_config(cohort_dir, tmp_path / "ddp2", steps=2, checkpoint_every=2)
    mp.spawn(_ddp_compare, args=(2, _free_port(), to_dict(cfg), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "equal.txt").read_text() == "True"


def _ddp_compare(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from libs.data import CohortVolumes, PolyphaseSamples, batch_indices
    from libs.diffusion import EDM2Loss
    from libs.lowres import LowresConfig as Cfg
    from libs.lowres import expand_cond, normalization
    from libs.training import Trainer
    cfg = load_config(cfg_dict, Cfg)
    samples = PolyphaseSamples(CohortVolumes(cfg.data.cohort, cfg.data.grid, progress=False), cfg.data.factor)
    seen = []

    def batch(step, r, w):
        idx = batch_indices(step, cfg.optim.batch // w, r, w, len(samples), 0)
        seen.extend(idx)
        x, c = samples.batch(idx)
        return x * 2 - 1, expand_cond(c, samples.shape)

    trainer = Trainer(cfg.model.build(2, 4), EDM2Loss(), batch, cfg.optim, cfg.loop, cfg.run_dir, to_dict(cfg),
                      normalization(cfg), device="cpu", progress=False)
    trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    idx = torch.tensor(seen)
    all_idx = [torch.zeros_like(idx) for _ in range(world)]
    dist.all_gather(all_idx, idx)
    if rank == 0:
        disjoint = not set(all_idx[0].tolist()) & set(all_idx[1].tolist())
        Path(out, "equal.txt").write_text(str(torch.equal(gathered[0], gathered[1]) and disjoint))
    dist.barrier()                # both ranks done before either tears gloo down
    dist.destroy_process_group()
    os._exit(0)                   # skip static destructors: gloo's threads aborted the exit in ~1 of 15 runs


def _run(script: str, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd)


def test_cli_train_and_generate_end_to_end(cohort_dir, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    import yaml
    raw = json.loads(json.dumps(TINY))
    raw["data"]["cohort"] = str(cohort_dir)
    raw["run_dir"] = str(tmp_path / "run")
    cfg.write_text(yaml.safe_dump(raw))
    dry = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--dry-run")
    assert dry.returncode == 0 and "model_channels: 8" in dry.stdout, dry.stderr
    res = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--quiet", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    ckpt = tmp_path / "run" / "ckpt-000000006.pt"
    assert ckpt.is_file() and (tmp_path / "run" / "config.yaml").is_file()
    again = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--quiet", "--set", "model.model_channels=16")
    assert again.returncode != 0 and "other model settings" in again.stderr
    sampler = _run("1_Trainings/train_lowres.py", "--config", str(cfg), "--quiet", "--set", "sample.churn=3")
    assert sampler.returncode != 0 and "other sample settings" in sampler.stderr, "the checkpoints keep the old one"

    demo = tmp_path / "demo.csv"
    demo.write_text("subject_id,height_m,weight_kg,sex,age_years\nsynA,1.62,55,F,30\n"
                    "synB,175,80,M,50\nsynC,1.90,98,M,70\n")
    out = tmp_path / "gen"
    gen = _run("2_Tests/infer.py", "--lowres", str(ckpt), "--demographics", str(demo), "--out", str(out),
               "--batch", "2", "--quiet", "--device", "cpu")
    assert gen.returncode == 1, "a bad row must make the job exit non-zero"
    assert "line 3" in gen.stderr and "centimetres" in gen.stderr, gen.stderr
    assert "2 written" in gen.stdout
    cohort = Cohort(out)
    for sid, height in (("synA", 1.62), ("synC", 1.90)):
        ct = read_volume(cohort.path("ct", sid), "ct")
        assert ct.shape == (8, 8, 16)
        sx, sy, sz = ct.spacing
        assert sx == pytest.approx(14.0 * 4) and sz == pytest.approx((146.629 * height + 110.419) * 2 / 16)
        assert ct.array.min() >= -1000 and ct.array.max() <= 500
        suv = read_volume(cohort.path("suv", sid), "suv")
        assert 0 <= suv.array.min() and suv.array.max() <= 25
        meta = json.loads(cohort.path("meta", sid).read_text())
        assert meta["sampler"]["steps"] == 4 and len(meta["checkpoints"]["lowres"]["sha256"]) == 64
        assert cohort.path("previews", sid).is_file()
    again = _run("2_Tests/infer.py", "--lowres", str(ckpt), "--demographics", str(demo), "--out", str(out),
                 "--quiet", "--device", "cpu")
    assert "0 written, 2 already complete" in again.stdout, again.stdout

    st = tmp_path / "ema.safetensors"
    exp = _run("1_Trainings/export_safetensors.py", "--checkpoint", str(tmp_path / "run"), "--out", str(st))
    assert exp.returncode == 0, exp.stderr
    from safetensors import safe_open

    from libs.ema import PowerFunctionEMA
    from libs.lowres import LowresConfig as Cfg
    with safe_open(str(st), "pt") as fh:
        meta = fh.metadata()
        weights = {k: fh.get_tensor(k) for k in fh.keys()}
    cfg_back = load_config(json.loads(meta["config"]), Cfg)
    net = cfg_back.model.build(2, 4)
    net.load_state_dict(weights)
    raw = torch.load(ckpt, weights_only=True)
    ema = PowerFunctionEMA(net, cfg_back.loop.ema_sigma_rels)
    ema.load_state_dict(raw["ema"])
    assert torch.equal(weights["out_gain"], ema.shadows[0]["out_gain"]), "export must hold the first EMA"


def test_generation_is_per_subject_reproducible(cohort_dir, tmp_path):
    from libs.demographics import Demographics
    from libs.generate import load_lowres_model, sample_lowres, subject_seed
    cfg = tiny_config(cohort_dir, tmp_path / "run", steps=2, checkpoint_every=2)
    ckpt = train_lowres(cfg, device="cpu", progress=False)
    model = load_lowres_model(ckpt, torch.device("cpu"))
    subjects = [Demographics("a", 1.6, 60, "F", 40), Demographics("b", 1.8, 90, "M", 60)]
    seeds = [subject_seed(0, s.subject_id) for s in subjects]
    together = sample_lowres(model, subjects, seeds, cfg.sample, torch.device("cpu"))
    alone = sample_lowres(model, subjects[1:], seeds[1:], cfg.sample, torch.device("cpu"))
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    assert seeds[0] != seeds[1]


def test_standardization_round_trip_and_statistics(cohort_dir):
    from libs.lowres import Standardize, channel_stats
    vols = CohortVolumes(cohort_dir, (32, 32, 64), progress=False)
    mean, std = channel_stats(vols)
    allv = torch.stack([v.float() for v in vols.volumes])
    np.testing.assert_allclose(mean, allv.mean(dim=(0, 2, 3, 4)).tolist(), rtol=1e-4)
    np.testing.assert_allclose(std, allv.std(dim=(0, 2, 3, 4), unbiased=False).tolist(), rtol=1e-3)
    st = Standardize(mean, std, 0.5)
    x = st.to_net(allv)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 0.5) < 1e-2, "network data: zero mean, SD σ_data"
    torch.testing.assert_close(st.from_net(x), allv, atol=1e-5, rtol=0)


def test_cpu_bf16_flag_is_read_from_cpuinfo(tmp_path):
    from libs.training import cpu_has_native_bf16
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_cpu_autocasts_training_only_on_a_cpu_with_native_bf16(cohort_dir, tmp_path, monkeypatch, capsys,
                                                                   native):
    import torch.nn.functional as F

    import libs.training as training
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda *a, **k: native)
    dtypes, conv3d = set(), F.conv3d

    def recording_conv3d(*args, **kwargs):
        out = conv3d(*args, **kwargs)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(F, "conv3d", recording_conv3d)
    cfg = tiny_config(cohort_dir, tmp_path / "run", steps=2, report_every=2, bf16_cpu=True)
    train_lowres(cfg, device="cpu", progress=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    notice = "this CPU has no native bf16" in capsys.readouterr().out
    assert dtypes == ({torch.bfloat16} if native else {torch.float32})
    assert [r["bf16"] for r in rows] == [native] and np.isfinite(rows[0]["loss"])
    assert notice == (not native)
    dtypes.clear()                                    # the default (bf16_cpu false) stays fp32 on any CPU
    train_lowres(tiny_config(cohort_dir, tmp_path / "run_fp32", steps=2, report_every=2), device="cpu",
                 progress=False)
    assert dtypes == {torch.float32}


def test_cond_embed_reaches_the_network_and_survives_the_checkpoint(cohort_dir, tmp_path):
    """model.cond_embed: the demographics also enter every block's embedding; off by default and in configs
    that predate it; a trained checkpoint records it and rebuilds the same network (with the embedding)."""
    from libs.generate import load_stage
    assert LowresConfig().model.cond_embed is False, "the paper's conditioning (concatenation only) is the default"
    raw = json.loads(json.dumps(TINY))
    raw.update(run_dir=str(tmp_path / "run"))
    raw["data"]["cohort"] = str(cohort_dir)
    raw["model"]["cond_embed"] = True
    raw["loop"]["steps"] = 3
    train_lowres(load_config(raw, LowresConfig), device="cpu", progress=False)
    _, ckpt, cfg, net = load_stage(tmp_path / "run", LowresConfig, "lowres", torch.device("cpu"), ema=True)
    assert cfg.model.cond_embed is True and ckpt["config"]["model"]["cond_embed"] is True
    assert net.emb_label is not None and any(k.startswith("emb_label") for k in ckpt["model"])
    # the block embedding alone: only the mean of the demographic channels differs
    c_noise = torch.full((1,), 0.1)
    cond = torch.zeros(1, 4, 8, 8, 16)
    with torch.no_grad():
        e0, e1 = net.embedding(c_noise, cond), net.embedding(c_noise, cond + 1.0)
    assert not torch.allclose(e0, e1), "the demographics must move the block embedding"
    # a checkpoint whose config predates the option loads with it off
    old = json.loads(json.dumps(ckpt["config"]))
    del old["model"]["cond_embed"]
    assert load_config(old, LowresConfig).model.cond_embed is False
