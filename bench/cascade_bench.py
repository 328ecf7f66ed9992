#!/usr/bin/env python
"""Full-cascade benchmark: seconds per subject (low-res + super-res sampling + post-processing) for several
sampler step counts, peak memory, and images/s of super-resolution training.

    taskset -c 0,1 .venv/bin/python bench/cascade_bench.py --size demo --device cpu --json-out cpu.json
    .venv/bin/python bench/cascade_bench.py --size paper --device cuda --window-batch 16 --batch 8 \\
        --steps-lowres 100 --steps-sr 100 --steps-lowres 32 --steps-sr 32 --steps-lowres 12 --steps-sr 12
    .venv/bin/python bench/cascade_bench.py --steps-lowres 2 --steps-sr 2 --repeats 1 --skip-train  # smoke

The networks are built, randomly initialised, from the YAML presets (``--size demo``: lowres_demo.yaml +
superres_demo.yaml; ``--size paper``: lowres_paper.yaml + superres_paper.yaml) — the cost of a sampler
step does not depend on the weights — and wrapped exactly as inference wraps loaded checkpoints
(libs.diffusion.Denoiser in a libs.generate.Model / libs.cascade.SRModel, the latter with stand-in
normalization constants).  What is timed is the library's own code path:

- low-res: libs.generate.sample_lowres on ``--batch`` subjects at once, reported per subject;
- SR: libs.cascade.sample_sr for one subject, every denoiser evaluation covering the whole grid with
  overlapping blended windows, ``--window-batch`` windows per network call (bf16 autocast on CUDA, as the
  library does);
- post: libs.cascade.to_physical_hr (body length from height, HU / SUV, background) of one subject;
- SR training: one libs.training.Trainer.train_step (EDM2Loss forward + backward + Adam + EMA update) on
  ``--train-batch`` residual patches from libs.superres.ResidualPatches (assembled beforehand: in training
  that is the loader workers' job). On a CPU with native bf16 (AMX / AVX512-BF16) it is timed twice: fp32
  and with the bf16 autocast of ``loop.bf16_cpu``.

Times are medians over the timed repeats after ``--warmup`` untimed ones (a 1-step sampling call for the
samplers, a training step for training; CUDA synchronized).  Speedups are against the first step pair
given (by default the reference's 100 + 100).  Peak memory: CUDA torch.cuda.max_memory_allocated; CPU the
rise of the process's peak RSS (ru_maxrss) over its value after imports, each cell in a fresh subprocess.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from libs.cascade import SRModel, sample_sr, to_physical_hr
from libs.channels import ChannelSet
from libs.config import load_config, to_dict
from libs.demographics import Demographics, encode_many
from libs.diffusion import Denoiser, EDM2Loss
from libs.generate import Model, sample_lowres, subject_seed
from libs.lowres import LowresConfig, Standardize
from libs.nn import count_parameters
from libs.samplers import network_calls
from libs.superres import Pairing, ResidualPatches, SRConfig, sr_cond_channels, sr_normalization
from libs.training import Trainer, cpu_has_native_bf16, memory_format
from libs.windows import window_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_flops import RESEARCH, CallCounter, Recipe, flop_table, parse_recipe, preset_recipe, subject_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "1_Trainings" / "configs"
PRESETS = {"demo": ("lowres_demo.yaml", "superres_demo.yaml"), "paper": ("lowres_paper.yaml", "superres_paper.yaml")}
# Stand-in normalization constants of an SR checkpoint (timing does not depend on them): per-channel mean / SD
# of the [0, 1] cohort (CT, PET) and the per-channel residual SD; net_sigma comes from the low-res preset.
CHANNEL_MEAN, CHANNEL_STD, SR_RESIDUAL_STD = [0.3, 0.1], [0.25, 0.1], [0.05, 0.12]
DEFAULT_STEPS = (100, 32, 12)
# One paper-preset UNet forward on one 56×56×96 window, fp32, one core of the machine this was written on.
PAPER_FORWARD_CPU_S = 24.0
WORKER_TAG = "CASCADE_BENCH_RESULT "
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# Models and inputs, built as inference builds them


def _configs(size: str) -> tuple[LowresConfig, SRConfig]:
    lr_name, sr_name = PRESETS[size]
    return load_config(CONFIGS / lr_name, LowresConfig), load_config(CONFIGS / sr_name, SRConfig)


def _inference_net(net: torch.nn.Module, device: torch.device, compile_: bool) -> torch.nn.Module:
    """As libs.generate.load_stage prepares a loaded network: eval, the device's layout, optionally compiled."""
    net = net.eval().to(device, memory_format=memory_format(device))
    return torch.compile(net) if compile_ else net


def _lowres_model(size: str, device: torch.device, seed: int, compile_: bool = False) -> Model:
    """A libs.generate.Model as load_lowres_model returns it, with random weights and stand-in constants."""
    cfg, _ = _configs(size)
    torch.manual_seed(seed)
    net = _inference_net(cfg.model.build(in_channels=2, cond_channels=4), device, compile_)
    std = Standardize(CHANNEL_MEAN, CHANNEL_STD, cfg.diffusion.sigma_data)
    return Model(Denoiser(net, cfg.diffusion.sigma_data), cfg, CONFIGS / PRESETS[size][0], "random-init", 0, std)


def _sr_normalization(size: str) -> tuple[SRConfig, Pairing, dict]:
    lr_cfg, sr_cfg = _configs(size)
    pairing = Pairing.of(lr_cfg)
    return sr_cfg, pairing, sr_normalization(sr_cfg, pairing, CHANNEL_MEAN, CHANNEL_STD, SR_RESIDUAL_STD)


def _sr_model(size: str, device: torch.device, seed: int, compile_: bool = False) -> SRModel:
    """A libs.cascade.SRModel as load_sr_model returns it, with random weights and stand-in constants."""
    cfg, _, norm = _sr_normalization(size)
    torch.manual_seed(seed + 1)
    cond_channels = sr_cond_channels(ChannelSet(), cfg.data.lr_anchors)
    net = _inference_net(cfg.model.build(in_channels=2, cond_channels=cond_channels), device, compile_)
    sigma = float(norm["sigma_data"])
    return SRModel(Denoiser(net, sigma), cfg, norm, Standardize.from_record(norm, float(norm["net_sigma"])), sigma,
                   CONFIGS / PRESETS[size][1], "random-init", 0)


def _subjects(n: int) -> list[Demographics]:
    """``n`` plausible adults inside the paper's demographic ranges."""
    return [Demographics(f"bench-{i:03d}", 1.60 + 0.05 * (i % 5), 60.0 + 5.0 * (i % 7), "MF"[i % 2],
                         30.0 + 7.0 * (i % 9)) for i in range(n)]


class _Volumes:
    """What ResidualPatches reads of libs.data.CohortVolumes (volumes, cond, region), holding random volumes."""

    def __init__(self, grid, records: list[Demographics], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.volumes = [torch.rand(2, *grid, generator=g) for _ in records]
        self.cond = torch.from_numpy(encode_many(records))

    def region(self, i: int, index: tuple[slice, ...]) -> torch.Tensor:
        return self.volumes[i][(slice(None), *index)].float()

    def __len__(self) -> int:
        return len(self.volumes)


def _body(grid) -> torch.Tensor:
    """(2, X, Y, Z) in [0, 1]: an elliptic soft-tissue body in air — a stand-in SR output for post-processing."""
    x, y = torch.meshgrid(torch.linspace(-1, 1, grid[0]), torch.linspace(-1, 1, grid[1]), indexing="ij")
    inside = ((x / 0.8) ** 2 + (y / 0.55) ** 2 <= 1.0).float()[:, :, None].expand(*grid)
    return torch.stack([0.55 * inside, 0.15 * inside])


def _evals(solver: str, steps: int) -> int:
    """Denoiser evaluations of one sampling run (Heun: 2N − 1, Euler and DPM-Solver++(2M): N)."""
    return network_calls(solver, steps)


def _windows(sr_cfg: SRConfig, pairing: Pairing) -> tuple[list[int], int]:
    size = list(sr_cfg.window.size or sr_cfg.data.patch)
    win, starts, _ = window_grid(pairing.grid, size, sr_cfg.window.overlap)
    return win, len(starts)


# ---------------------------------------------------------------------------------------------------
# One measurement (a "cell")


def _no_sync():
    pass


def _timed(fn, n: int, sync) -> list[float]:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _prime(device: torch.device) -> None:
    """Load the convolution libraries and start the thread pool before the memory baseline is read."""
    w = torch.randn(1, 1, 3, 3, 3, device=device, requires_grad=True)
    torch.nn.functional.conv3d(torch.randn(1, 1, 4, 4, 4, device=device), w).sum().backward()


def _lowres_cell(spec: dict, device: torch.device):
    """(warm-up fn, timed fn, subjects per call, evaluations per call) of low-res sampling."""
    model = _lowres_model(spec["size"], device, spec["seed"], spec.get("compile", False))
    records = _subjects(spec["batch"])
    seeds = [subject_seed(spec["seed"], d.subject_id) for d in records]
    sample = _sampler(model.config.sample, spec)
    one = dataclasses.replace(sample, steps=1)
    warm = functools.partial(sample_lowres, model, records, seeds, one, device)
    fn = functools.partial(sample_lowres, model, records, seeds, sample, device)
    return warm, fn, spec["batch"], _evals(sample.solver, sample.steps)


def _sr_cell(spec: dict, device: torch.device):
    """(warm-up fn, timed fn, subjects per call, evaluations per call) of whole-volume SR sampling."""
    model = _sr_model(spec["size"], device, spec["seed"], spec.get("compile", False))
    demo = _subjects(1)[0]
    lr_shape = [g // model.factor for g in model.grid]
    lr_u = torch.rand(2, *lr_shape, generator=torch.Generator().manual_seed(spec["seed"]))
    seed = subject_seed(spec["seed"], demo.subject_id, stage=1)
    sample = _sampler(model.config.sample, spec)
    one = dataclasses.replace(sample, steps=1)
    window = dataclasses.replace(model.config.window, batch=spec["window_batch"])
    if spec.get("window"):
        window = dataclasses.replace(window, size=list(spec["window"]), overlap=spec["overlap"])
    warm = functools.partial(sample_sr, model, lr_u, demo, seed, one, window, device)
    fn = functools.partial(sample_sr, model, lr_u, demo, seed, sample, window, device)
    return warm, fn, 1, _evals(sample.solver, sample.steps)


def _sampler(sample, spec: dict):
    """A stage's sampler settings with the cell's steps and, when given, its solver (churn 0 for the
    deterministic multistep solver)."""
    solver = spec.get("solver") or sample.solver
    churn = 0.0 if solver == "dpmpp_2m" else sample.churn
    return dataclasses.replace(sample, steps=spec["steps"], solver=solver, churn=churn)


def _post_cell(spec: dict, device: torch.device):
    """(warm-up fn, timed fn, 1, 0): to_physical_hr of one full-grid volume (runs on the CPU, as in inference)."""
    cfg, pairing, norm = _sr_normalization(spec["size"])
    model = SRModel(None, cfg, norm, Standardize.from_record(norm, float(norm["net_sigma"])), cfg.diffusion.sigma_data,
                    CONFIGS / PRESETS[spec["size"]][1], "random-init", 0)    # to_physical_hr reads normalization only
    u, demo = _body(pairing.grid), _subjects(1)[0]
    fn = functools.partial(to_physical_hr, u, demo, model)
    return fn, fn, 1, 0


def _train_cell(spec: dict, device: torch.device, tmp: str):
    """(warm-up fn, timed fn, images per call, 0): one SR Trainer.train_step on prepared residual patches."""
    cfg, pairing, norm = _sr_normalization(spec["size"])
    std = Standardize(CHANNEL_MEAN, CHANNEL_STD, pairing.net_sigma)
    patches = ResidualPatches(_Volumes(pairing.grid, _subjects(2), spec["seed"]), pairing, cfg.data.patch, std,
                              anchors=cfg.data.lr_anchors)
    x, cond = patches.batch(np.random.default_rng(spec["seed"]), spec["batch"])
    torch.manual_seed(spec["seed"] + 1)
    net = cfg.model.build(in_channels=2, cond_channels=sr_cond_channels(ChannelSet(), cfg.data.lr_anchors))
    optim = dataclasses.replace(cfg.optim, batch=spec["batch"])
    loss = EDM2Loss(cfg.diffusion.P_mean, cfg.diffusion.P_std, cfg.diffusion.sigma_data)
    loop = dataclasses.replace(cfg.loop, compile=spec.get("compile", False),
                               bf16_cpu=spec.get("bf16_cpu", cfg.loop.bf16_cpu))
    trainer = Trainer(net, loss, None, optim, loop, Path(tmp) / "run", to_dict(cfg), norm,
                      device=str(device), progress=False)
    x, cond = x.to(trainer.device), cond.to(trainer.device)
    fn = functools.partial(trainer.train_step, x, cond)
    return fn, fn, spec["batch"], 0


def measure(spec: dict) -> dict:
    """Run one cell (kind lowres / sr / post / train) in this process; returns ``spec`` plus the results."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = functools.partial(torch.cuda.synchronize, device) if cuda else _no_sync
    _prime(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _peak_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        kind = spec["kind"]
        if kind == "train":
            warm, fn, items, evals = _train_cell(spec, device, tmp)
        else:
            warm, fn, items, evals = {"lowres": _lowres_cell, "sr": _sr_cell, "post": _post_cell}[kind](spec, device)
        warmup = _timed(warm, spec["warmup"], sync)
        times = _timed(fn, spec["repeats"], sync)
    median = statistics.median(times)
    out = {**spec, "warmup_s": warmup, "times_s": times, "median_s": median, "items_per_call": items,
           "per_item_s": median / items, "evals": evals, "s_per_eval": median / evals if evals else None,
           "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes() - rss0,
           "mem_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS increase (fresh subprocess)"}
    if cuda:
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if kind == "train":
        out["images_per_s"] = items / median
    if kind == "sr":
        cfg, pairing, _ = _sr_normalization(spec["size"])
        out["windows"] = len(window_grid(pairing.grid, spec.get("window") or cfg.window.size or cfg.data.patch,
                                         spec["overlap"] if spec.get("window") else cfg.window.overlap)[1])
    return out


# ---------------------------------------------------------------------------------------------------
# Where a measurement runs


def _in_subprocess(spec: dict) -> dict:
    """Run :func:`measure` in a fresh interpreter so its peak RSS is its own (CPU)."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    lines = proc.stderr.strip().splitlines()
    return {**spec, "error": lines[-1] if lines else f"worker exited with code {proc.returncode}"}


def _in_process(spec: dict) -> dict:
    """Run :func:`measure` here (CUDA); an out-of-memory or other failure becomes an ``error`` entry."""
    try:
        result = measure(spec)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower()
        result = {**spec, "error": "OOM" if oom else f"{type(err).__name__}: {first[:160]}"}
    gc.collect()  # the exception's frames are gone here, so their tensors can be released
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------
# Report


def _secs(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _gib(r: dict | None) -> str:
    return "–" if r is None or "error" in r else f"{r['peak_mem_bytes'] / GIB:.2f}"


STAGE_KEYS = {"lowres": ("steps", "solver"), "sr": ("steps", "solver", "window", "overlap")}


def _cell_key(kind: str, spec: dict) -> str:
    """What makes two sampling cells the same measurement."""
    return json.dumps([kind] + [spec.get(k) for k in STAGE_KEYS.get(kind, ())])


def _rows(results: list[dict], plan: list[dict]) -> list[dict]:
    """One row per planned cascade (a step pair or a recipe): per-subject seconds of each part, cascade total,
    speedups against the first row."""
    ok = {_cell_key(r["kind"], r): r for r in results if "error" not in r}
    err = {_cell_key(r["kind"], r): r["error"] for r in results if "error" in r}
    post = ok.get(_cell_key("post", {}))
    rows = []
    for item in plan:
        lk, sk = _cell_key("lowres", item["lowres"]), _cell_key("sr", item["sr"])
        lr, sr = ok.get(lk), ok.get(sk)
        row = {"name": item["name"], "steps_lowres": item["lowres"]["steps"], "steps_sr": item["sr"]["steps"],
               "lowres": lr, "sr": sr, "error": err.get(lk) or err.get(sk)}
        if lr and sr:
            row["lowres_s"], row["sr_s"] = lr["per_item_s"], sr["per_item_s"]
            row["post_s"] = post["per_item_s"] if post else 0.0
            row["cascade_s"] = row["lowres_s"] + row["sr_s"] + row["post_s"]
        rows.append(row)
    ref = rows[0] if rows and "cascade_s" in rows[0] else None
    for row in rows:
        if ref and "cascade_s" in row:
            row["speedup_vs_first"] = {k: ref[f"{k}_s"] / row[f"{k}_s"] for k in ("lowres", "sr", "cascade")}
    return rows


def _row_table(rows: list[dict]) -> str:
    ref = rows[0]["name"] if rows else "first"
    head = ["cascade", "evals LR / SR", "low-res s/subj", "SR s/subj", "post s/subj", "cascade s/subj",
            f"speedup vs {ref} (LR / SR / cascade)", "SR s/eval (windows)", "peak GiB LR / SR", "repeats LR / SR"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lr, sr = row["lowres"], row["sr"]
        if "cascade_s" not in row:
            lines.append("| " + " | ".join([row["name"], row["error"] or "–"] + ["–"] * (len(head) - 2)) + " |")
            continue
        sp = row.get("speedup_vs_first")
        speed = " / ".join(f"{sp[k]:.2f}×" for k in ("lowres", "sr", "cascade")) if sp else "–"
        cells = [row["name"], f"{lr['evals']} / {sr['evals']}", _secs(row["lowres_s"]), _secs(row["sr_s"]),
                 _secs(row["post_s"]), _secs(row["cascade_s"]), speed, f"{_secs(sr['s_per_eval'])} ({sr['windows']})",
                 f"{_gib(lr)} / {_gib(sr)}", f"{lr['repeats']} / {sr['repeats']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _precision(r: dict, bf16_cuda: bool) -> str:
    if r["device"] == "cpu":
        return "bf16 autocast" if r.get("bf16_cpu") else "fp32"
    return "bf16 autocast" if bf16_cuda else "fp32"


def _train_table(results: list[dict], patch, bf16_cuda: bool) -> str:
    head = ["SR training", "precision", "patch", "batch", "step median s", "images/s", "peak GiB", "repeats"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shape = "×".join(map(str, patch))
    for r in results:
        start = f"| Trainer.train_step | {_precision(r, bf16_cuda)} | {shape} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{start} {r['error']} | – | – | {r['repeats']} |")
        else:
            lines.append(f"{start} {_secs(r['median_s'])} | {r['images_per_s']:.3g} | {_gib(r)} | {r['repeats']} |")
    return "\n".join(lines)


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _paper_cpu_note() -> str:
    lr_cfg, sr_cfg = _configs("paper")
    pairing = Pairing.of(lr_cfg)
    win, n = _windows(sr_cfg, pairing)
    per_eval = n * PAPER_FORWARD_CPU_S
    sample = sr_cfg.sample
    evals = _evals(sample.solver, sample.steps)
    grid, shape = "×".join(map(str, pairing.grid)), "×".join(map(str, win))
    return (f"paper size on CPU is impractical: one paper-preset UNet forward on one {shape} window takes "
            f"~{PAPER_FORWARD_CPU_S:.0f} s on one core of the machine this script was written on, and one {grid} SR "
            f"evaluation needs {n} windows (~{per_eval / 60:.0f} core-minutes), so the preset's {sample.steps} "
            f"{sample.solver} SR steps ({evals} evaluations) would take ~{evals * per_eval / 3600:.0f} core-hours per "
            "subject; measure paper size with --device cuda")


def _environment(size: str, device: str, threads: int, window_batch: int) -> dict:
    lr_cfg, sr_cfg = _configs(size)
    pairing = Pairing.of(lr_cfg)
    win, n_windows = _windows(sr_cfg, pairing)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env = {"command": shlex.join([sys.executable] + sys.argv), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": _cpu_name(), "cpu_affinity": affinity, "torch_threads": threads,
           "device": device, "size": size, "presets": list(PRESETS[size]),
           "lowres_parameters": count_parameters(lr_cfg.model.build(in_channels=2, cond_channels=4)),
           "sr_parameters": count_parameters(sr_cfg.model.build(
               in_channels=2, cond_channels=sr_cond_channels(ChannelSet(), sr_cfg.data.lr_anchors))),
           "grid": list(pairing.grid), "factor": pairing.factor, "lowres_shape": list(lr_cfg.sample_shape),
           "patch": list(sr_cfg.data.patch), "window": win, "overlap": sr_cfg.window.overlap,
           "windows_per_eval": n_windows, "window_batch": window_batch,
           "sample_lowres": dataclasses.asdict(lr_cfg.sample), "sample_sr": dataclasses.asdict(sr_cfg.sample),
           "stand_in_normalization": {"channel_mean": CHANNEL_MEAN, "channel_std": CHANNEL_STD,
                                      "net_sigma": pairing.net_sigma, "residual_std": SR_RESIDUAL_STD},
           "train_loop": {"bf16": sr_cfg.loop.bf16, "bf16_cpu": sr_cfg.loop.bf16_cpu,
                          "channels_last": sr_cfg.loop.channels_last, "compile": sr_cfg.loop.compile}}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def _header(env: dict, batch: int, warmup: int) -> str:
    gpu = f"{env['gpu']} (CUDA {env['cuda']})" if "gpu" in env else "none"
    mm = "×".join
    lr, sr = env["sample_lowres"], env["sample_sr"]
    cuda = env["device"] == "cuda"
    lines = [
        f"# Cascade benchmark ({env['size']} size, {env['device']})", "",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, Python {env['python']}; CPU: {env['cpu']}, {env['torch_threads']} torch threads, "
        f"affinity {env['cpu_affinity']}; GPU: {gpu}",
        f"- presets {' + '.join(env['presets'])}, random weights: low-res UNet {env['lowres_parameters'] / 1e6:.2f} M "
        f"parameters on {mm(map(str, env['lowres_shape']))}, SR UNet {env['sr_parameters'] / 1e6:.2f} M on the "
        f"{mm(map(str, env['grid']))} grid (×{env['factor']}); SR windows {mm(map(str, env['window']))}, overlap "
        f"{env['overlap']}: {env['windows_per_eval']} per denoiser evaluation, {env['window_batch']} per call",
        (f"- samplers: each row's recipe (solvers, steps, SR windows and σ_max as its name gives them), low-res "
         f"{batch} subjects per batch (reported per subject), SR one subject; " if env.get("recipes") else
         f"- samplers: low-res {lr['solver']} σ {lr['sigma_min']}–{lr['sigma_max']}, {batch} subjects per batch "
         f"(reported per subject); SR {sr['solver']} σ_max {sr['sigma_max_ratio']}·σ_data, one subject; ")
        + f"{'bf16 autocast (the library default on CUDA)' if cuda else 'fp32'}",
        "- post = to_physical_hr (length from height, HU/SUV, background) of one subject; NIfTI writing excluded",
        f"- median of the timed repeats after {warmup} warm-up (1-step sampling call / training step); "
        "speedup = time of the first step pair / time",
        "- peak GiB: CPU = rise of peak RSS in a fresh subprocess per cell; CUDA = torch.cuda.max_memory_allocated",
    ]
    if env["size"] == "demo" or env["device"] == "cpu":
        lines.append(f"- note: {_paper_cpu_note()}")
    return "\n".join(lines + [""])


# ---------------------------------------------------------------------------------------------------
# CLI


# The paper presets' sampler until 2026-12-05 (Heun 32 per stage, SR from 160·σ_data), kept as a row of the table.
PAPER_BEFORE = Recipe("paper presets before", "heun", 32, "heun", 32, (56, 56, 96), 0.25, "160·σ_data")


def standard_recipes() -> list[Recipe]:
    """The research code's recipe, the paper presets' earlier and current ones, and the bench presets' sampler on
    the paper windows when it differs from the paper presets'."""
    paper_low, paper_sr = _configs("paper")
    bench_low = load_config(CONFIGS / "lowres_bench.yaml", LowresConfig)
    bench_sr = load_config(CONFIGS / "superres_bench.yaml", SRConfig)
    paper = preset_recipe("paper presets", paper_low, paper_sr)
    bench = dataclasses.replace(preset_recipe("bench sampler", bench_low, bench_sr),
                                window=tuple(paper_sr.window.size or paper_sr.data.patch),
                                overlap=paper_sr.window.overlap)
    same = dataclasses.replace(bench, name=paper.name) == paper
    return [RESEARCH, PAPER_BEFORE, paper] + ([] if same else [bench])


def _flops(specs: tuple[str, ...], json_out: str | None) -> None:
    try:
        extra = [parse_recipe(s) for s in specs]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe") from None
    low, sr = _configs("paper")
    counter = CallCounter(low, sr)
    rows = [subject_flops(r, counter, low.data.grid) for r in standard_recipes() + extra]
    click.echo(f"Network FLOPs per subject on the paper grid {'×'.join(map(str, low.data.grid))} (networks of "
               f"lowres_paper.yaml + superres_paper.yaml; one 56×56×96 call: low-res "
               f"{counter.call('lowres', low.sample_shape) / 1e12:.2f} TFLOP, SR "
               f"{counter.call('superres', tuple(sr.data.patch)) / 1e12:.2f} TFLOP; FlopCounterMode, a multiply-add "
               "counts 2)\n")
    click.echo(flop_table(rows, rows[0]))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump([{**{k: v for k, v in r.items() if k != "recipe"}, "recipe": dataclasses.asdict(r["recipe"]),
                        "ratio_to_research": rows[0]["total_flops"] / r["total_flops"]} for r in rows], fh, indent=1)


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    click.echo(WORKER_TAG + json.dumps(measure(spec)))


def _step_pairs(lows: tuple[int, ...], srs: tuple[int, ...]) -> list[tuple[int, int]]:
    lows, srs = lows or DEFAULT_STEPS, srs or DEFAULT_STEPS
    if len(lows) != len(srs):
        if len(lows) == 1:
            lows = lows * len(srs)
        elif len(srs) == 1:
            srs = srs * len(lows)
        else:
            raise click.BadParameter(f"{len(lows)} --steps-lowres values but {len(srs)} --steps-sr values (pairs are "
                                     "formed in order; give both the same number of times, or one of them once)",
                                     param_hint="--steps-sr")
    return list(dict.fromkeys(zip(lows, srs)))


def _plan(pairs: list[tuple[int, int]], recipes: list[Recipe]) -> list[dict]:
    """The cascades to time: step pairs with the presets' solvers and windows, or recipes."""
    if recipes:
        return [{"name": r.name, "lowres": {"steps": r.lowres_steps, "solver": r.lowres_solver},
                 "sr": {"steps": r.sr_steps, "solver": r.sr_solver, "window": list(r.window), "overlap": r.overlap}}
                for r in recipes]
    return [{"name": f"{a}+{b}", "lowres": {"steps": a}, "sr": {"steps": b}} for a, b in pairs]


def _run_all(base: dict, plan: list[dict], batch: int, window_batch: int, train_batch: int | None,
             repeats_for) -> list[dict]:
    cells = {}
    for kind, extra in (("lowres", {"batch": batch}), ("sr", {"window_batch": window_batch})):
        for item in plan:
            cell = {**base, "kind": kind, **item[kind], **extra, "repeats": repeats_for(item[kind]["steps"])}
            cells.setdefault(_cell_key(kind, cell), cell)
    specs = list(cells.values())
    specs.append({**base, "kind": "post", "repeats": base["repeats"]})
    if train_batch:       # on a CPU with native bf16: fp32 and bf16 autocast (loop.bf16_cpu) side by side
        cpu = base["device"] == "cpu"
        for bf16_cpu in ([False, True] if cpu_has_native_bf16() else [False]) if cpu else [None]:
            extra = {} if bf16_cpu is None else {"bf16_cpu": bf16_cpu}
            specs.append({**base, "kind": "train", "batch": train_batch, "repeats": base["repeats"], **extra})
    results = []
    for spec in specs:
        t0 = time.perf_counter()
        result = (_in_subprocess if spec["device"] == "cpu" else _in_process)(spec)
        status = result.get("error") or f"median {result['median_s']:.3f} s over {spec['repeats']}"
        steps = f" {spec.get('solver') or ''} {spec['steps']} steps" if "steps" in spec else ""
        click.echo(f"  {spec['kind']}{steps}: {status} ({time.perf_counter() - t0:.0f} s wall)", err=True)
        results.append(result)
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size", type=click.Choice(["demo", "paper"]), help="Presets: demo (lowres_demo + superres_demo, "
              "56×56×96) or paper (lowres_paper + superres_paper, 224×224×384). [default: demo on CPU, paper on CUDA]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run; auto = cuda when available.")
@click.option("--steps-lowres", "steps_lowres", type=click.IntRange(1, 1000), multiple=True, metavar="N",
              help="Low-res sampler steps (repeatable; paired in order with --steps-sr). [default: 100, 32, 12]")
@click.option("--steps-sr", "steps_sr", type=click.IntRange(1, 1000), multiple=True, metavar="N",
              help="SR sampler steps (repeatable; paired in order with --steps-lowres). [default: 100, 32, 12]")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, metavar="N",
              help="Subjects per low-res sampling batch (inference's default); seconds are per subject.")
@click.option("--window-batch", type=click.IntRange(min=1), metavar="N",
              help="SR windows per network call. [default: the SR preset's window.batch]")
@click.option("--train-batch", type=click.IntRange(min=1), metavar="N",
              help="Patches per SR training step. [default: the SR preset's optim.batch]")
@click.option("--skip-train", is_flag=True, help="Do not measure SR training.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
              help="Untimed calls first (a 1-step sampling call, or a training step).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
              help="Timed repeats per cell; the median is reported.")
@click.option("--long-repeats", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Timed repeats for sampling cells of at least --long-steps steps.")
@click.option("--long-steps", type=click.IntRange(min=1), default=64, show_default=True, metavar="N",
              help="Sampling cells with this many steps or more count as long.")
@click.option("--threads", type=click.IntRange(min=1), default=_available_cpus(),
              show_default="the CPUs this process may run on", metavar="N", help="torch.set_num_threads.")
@click.option("--allow-paper-cpu", is_flag=True, help="Run --size paper on the CPU anyway (days per subject).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N", help="Seed of weights and inputs.")
@click.option("--json-out", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write every measurement (all iteration times) as JSON.")
@click.option("--flops", is_flag=True, help="Only count the network FLOPs per subject of sampling recipes (paper "
              "networks, meta tensors: seconds, nothing timed) and print their table; see --recipe.")
@click.option("--recipe", "recipes", multiple=True, metavar="SPEC", help="A sampling recipe (repeatable): "
              "'NAME: lowres=heun:32, sr=euler:10, window=56x56x96, overlap=0.25[, sigma_max=2]'; timed instead of "
              "the step pairs, or with --flops counted beside the standard recipes.")
@click.option("--compile", "compile_", is_flag=True, help="Time the networks under torch.compile (sampling and "
              "training).")
@click.option("--worker", hidden=True, metavar="SPEC", help="Internal: run one measurement, print it as JSON.")
def main(size, device, steps_lowres, steps_sr, batch, window_batch, train_batch, skip_train, warmup, repeats,
         long_repeats, long_steps, threads, allow_paper_cpu, seed, json_out, flops, recipes, compile_, worker):
    """Time the full cascade per subject (low-res + SR + post) for several step counts, its peak memory, and
    SR training images/s, with randomly initialised networks from the YAML presets; or (--flops) count the
    network FLOPs per subject of sampling recipes."""
    if worker:
        _worker(worker)
        return
    if flops:
        _flops(recipes, json_out)
        return
    try:
        timed_recipes = [parse_recipe(r) for r in recipes]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--recipe") from None
    if timed_recipes and (steps_lowres or steps_sr):
        raise click.UsageError("give --recipe or --steps-lowres/--steps-sr, not both")
    cuda_ok = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_ok else "cpu"
    if device == "cuda" and not cuda_ok:
        raise click.BadParameter("cuda requested but torch.cuda.is_available() is False", param_hint="--device")
    size = size or ("paper" if device == "cuda" else "demo")
    if size == "paper" and device == "cpu" and not allow_paper_cpu:
        raise click.UsageError(_paper_cpu_note() + " (or pass --allow-paper-cpu)")
    pairs = _step_pairs(steps_lowres, steps_sr)
    _, sr_cfg = _configs(size)
    window_batch = window_batch or sr_cfg.window.batch
    train_batch = None if skip_train else train_batch or sr_cfg.optim.batch
    torch.set_num_threads(threads)
    env = _environment(size, device, threads, window_batch)
    env["recipes"] = list(recipes)
    click.echo(_header(env, batch, warmup))
    base = {"size": size, "device": device, "warmup": warmup, "repeats": repeats, "seed": seed, "threads": threads,
            "compile": compile_}
    start = time.perf_counter()
    plan = _plan(pairs, timed_recipes)
    results = _run_all(base, plan, batch, window_batch, train_batch,
                       lambda n: long_repeats if n >= long_steps else repeats)
    rows = _rows(results, plan)
    click.echo(_row_table(rows))
    train = [r for r in results if r["kind"] == "train"]
    if train:
        click.echo("")
        click.echo(_train_table(train, env["patch"], sr_cfg.loop.bf16))
    wall = time.perf_counter() - start
    click.echo(f"\nwall time of all cells (subprocess start-up, model builds and warm-up included): {wall:.0f} s")
    if json_out:
        summary = [{k: v for k, v in row.items() if k not in ("lowres", "sr")} for row in rows]
        with open(json_out, "w") as fh:
            json.dump({"environment": env, "results": results, "pairs": summary, "wall_s": wall}, fh, indent=1)


if __name__ == "__main__":
    main()
