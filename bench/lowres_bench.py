#!/usr/bin/env python
"""Low-resolution stage denoiser benchmark: forward and training-step time, peak memory, largest batch.

    taskset -c 1 .venv/bin/python bench/lowres_bench.py --device cpu --warmup 1 --repeats 3 --json-out cpu.json
    .venv/bin/python bench/lowres_bench.py --device cuda --batch 1 --batch 8 --compile --find-max-batch
    .venv/bin/python bench/lowres_bench.py --tiny --repeats 2          # seconds: checks the script itself

Network: the paper preset UNet (base 64 channels, multipliers 1-2-3-4, 3 blocks per level, attention at
level 3 = the coarsest, 7×7×12) on 2-channel 56×56×96 volumes plus 4 constant demographic channels, in the
EDM Denoiser (σ_data 0.5), trained with EDM2Loss (P_mean −0.4, P_std 1.0) and Adam (β 0.9, 0.99).
"forward" = one no-grad eval call of the denoiser; "train" = zero_grad + loss forward + backward + Adam step,
the network built as libs.training.Trainer builds it (channels-last, then torch.compile of the UNet).
Times are medians over --repeats timed iterations after --warmup untimed ones (CUDA synchronized); speedups
and memory ratios are against fp32 eager on the same device and batch.  Peak memory: CUDA
torch.cuda.max_memory_allocated (parameters, Adam state and activations); CPU the rise of the process's
peak RSS (ru_maxrss) over its value after imports, each (variant, batch, phase) in a fresh subprocess.
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
import time

import click
import torch

from libs.diffusion import Denoiser, EDM2Loss, sample_training_sigma
from libs.nn import UNet, count_parameters

# Level 0 is the full-resolution level; attn_levels=[3] is the coarsest of four, the same as UNet's None.
PRESETS = {
    "paper": {"net": {"in_channels": 2, "cond_channels": 4, "model_channels": 64, "channel_mult": (1, 2, 3, 4),
                      "num_blocks": 3, "attn_levels": [3]}, "shape": (56, 56, 96)},
    "tiny": {"net": {"in_channels": 2, "cond_channels": 4, "model_channels": 16, "channel_mult": (1, 2),
                     "num_blocks": 1, "attn_levels": [1]}, "shape": (16, 16, 32)},
}
SIGMA_DATA, P_MEAN, P_STD = 0.5, -0.4, 1.0
ADAM = {"lr": 1e-4, "betas": (0.9, 0.99)}  # the learning rate does not change the cost of a step
PHASES = ("forward", "train")
WORKER_TAG = "LOWRES_BENCH_RESULT "
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


BASELINE = Variant("fp32 eager")
VARIANTS = {v.name: v for v in (BASELINE, Variant("bf16+cl3d", True, True),
                                Variant("bf16+cl3d+compile", True, True, True))}


# ---------------------------------------------------------------------------------------------------
# One measurement


def _build(preset: str, variant: Variant, device: torch.device, train: bool):
    """Fresh denoiser on ``device`` in train or eval mode, and Adam over its parameters when training."""
    net = UNet(**PRESETS[preset]["net"]).to(device)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    net.train(train)
    opt = torch.optim.Adam(net.parameters(), **ADAM) if train else None
    if variant.compile:
        torch._dynamo.reset()
        net = torch.compile(net)
    return Denoiser(net, sigma_data=SIGMA_DATA), opt


def _inputs(preset: str, batch: int, device: torch.device, channels_last: bool, seed: int):
    """x (B, 2, X, Y, Z) in [0, 1], constant demographic channels cond (B, 4, X, Y, Z), the noisy volume
    x + σ n for the forward timing, and σ (B,) drawn like the training loss draws it."""
    net, shape = PRESETS[preset]["net"], PRESETS[preset]["shape"]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, net["in_channels"], *shape, generator=g)
    demo = torch.rand(batch, net["cond_channels"], generator=g)  # stand-in for the 4 normalized demographics
    cond = demo[:, :, None, None, None].expand(-1, -1, *shape)
    sigma = sample_training_sigma(batch, P_MEAN, P_STD, generator=g)
    noisy = x + sigma[:, None, None, None, None] * torch.randn(x.shape, generator=g)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x, cond, noisy = (t.to(device).contiguous(memory_format=fmt) for t in (x, cond, noisy))
    return x, cond, noisy, sigma.to(device)


def _step_fn(phase: str, denoiser, opt, tensors, variant: Variant, device: torch.device):
    """The callable that is timed: one denoiser forward or one full training step."""
    x, cond, noisy, sigma = tensors
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=variant.bf16)
    loss_fn = EDM2Loss(P_mean=P_MEAN, P_std=P_STD, sigma_data=SIGMA_DATA)

    def forward():
        with torch.no_grad(), autocast():
            denoiser(noisy, sigma, cond)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(denoiser, x, cond).mean()
        loss.backward()
        opt.step()

    return forward if phase == "forward" else train_step


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


def measure(spec: dict) -> dict:
    """Time one (preset, device, variant, batch, phase) in this process; returns ``spec`` plus the results."""
    device, variant = torch.device(spec["device"]), VARIANTS[spec["variant"]]
    cuda = device.type == "cuda"
    sync = functools.partial(torch.cuda.synchronize, device) if cuda else _no_sync
    _prime(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _peak_rss_bytes()
    torch.manual_seed(spec["seed"])
    denoiser, opt = _build(spec["preset"], variant, device, train=spec["phase"] == "train")
    tensors = _inputs(spec["preset"], spec["batch"], device, variant.channels_last, spec["seed"])
    fn = _step_fn(spec["phase"], denoiser, opt, tensors, variant, device)
    warmup = _timed(fn, spec["warmup"], sync)
    times = _timed(fn, spec["repeats"], sync)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes() - rss0
    median = statistics.median(times)
    return {**spec, "warmup_s": warmup, "times_s": times, "median_s": median,
            "images_per_s": spec["batch"] / median, "peak_mem_bytes": peak,
            "mem_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS increase (fresh subprocess)"}


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


def _is_oom(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _in_process(spec: dict) -> dict:
    """Run :func:`measure` here (CUDA); an out-of-memory or other failure becomes an ``error`` entry."""
    try:
        result = measure(spec)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        result = {**spec, "error": "OOM" if _is_oom(err) else f"{type(err).__name__}: {first[:160]}"}
    gc.collect()  # the exception's frames are gone here, so their tensors can be released
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _find_max_batch(base: dict, variant: str, cap: int) -> dict:
    """Largest power-of-two batch ≤ ``cap`` for which two training steps fit on the GPU."""
    fits, failed = None, None
    batch = 1
    while batch <= cap:
        click.echo(f"  max-batch probe: {variant} batch {batch}", err=True)
        result = _in_process({**base, "variant": variant, "batch": batch, "phase": "train",
                              "warmup": 1, "repeats": 1})
        if "error" in result:
            failed = {"batch": batch, "error": result["error"]}
            break
        fits = result
        batch *= 2
    return {"variant": variant, "cap": cap, "max_batch": fits["batch"] if fits else None,
            "peak_mem_bytes": fits["peak_mem_bytes"] if fits else None,
            "step_s": fits["median_s"] if fits else None, "first_failure": failed}


# ---------------------------------------------------------------------------------------------------
# Report


def _add_ratios(results: list[dict]) -> None:
    """Speedup (baseline time / time) and memory ratio against fp32 eager of the same device, batch, phase."""
    base = {(r["device"], r["batch"], r["phase"]): r for r in results
            if r["variant"] == BASELINE.name and "error" not in r}
    for r in results:
        b = base.get((r["device"], r["batch"], r["phase"]))
        if b is not None and "error" not in r:
            r["speedup_vs_fp32"] = b["median_s"] / r["median_s"]
            r["mem_ratio_vs_fp32"] = r["peak_mem_bytes"] / b["peak_mem_bytes"] if b["peak_mem_bytes"] > 0 else None


def _cells(r: dict | None) -> list[str]:
    if r is None:
        return ["–"] * 5
    if "error" in r:
        return [r["error"]] + ["–"] * 4
    speed, mem = r.get("speedup_vs_fp32"), r.get("mem_ratio_vs_fp32")
    return [f"{r['median_s']:.3f}", f"{r['images_per_s']:.3g}", f"{speed:.2f}×" if speed else "–",
            f"{r['peak_mem_bytes'] / GIB:.2f}", f"{mem:.2f}×" if mem else "–"]


def _table(results: list[dict]) -> str:
    head = ["device", "variant", "batch"] + [f"{p} {c}" for p in PHASES for c in
                                             ("median s", "img/s", "speedup", "peak GiB", "mem ratio")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["device"], r["variant"], r["batch"]) for r in results))
    for device, variant, batch in keys:
        by_phase = {r["phase"]: r for r in results if (r["device"], r["variant"], r["batch"]) == (device, variant,
                                                                                                      batch)}
        cells = [c for p in PHASES for c in _cells(by_phase.get(p))]
        lines.append("| " + " | ".join([device, variant, str(batch)] + cells) + " |")
    return "\n".join(lines)


def _max_table(rows: list[dict]) -> str:
    lines = ["| variant | largest power-of-two training batch | peak GiB there | first failure |", "|---|---|---|---|"]
    for m in rows:
        peak = f"{m['peak_mem_bytes'] / GIB:.2f}" if m["peak_mem_bytes"] else "–"
        fail = f"batch {m['first_failure']['batch']}: {m['first_failure']['error']}" if m["first_failure"] else \
            f"none up to the cap {m['cap']}"
        lines.append(f"| {m['variant']} | {m['max_batch'] or 'none'} | {peak} | {fail} |")
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


def _environment(preset: str, threads: int) -> dict:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env = {"command": shlex.join([sys.executable] + sys.argv), "torch": torch.__version__, "python":
           platform.python_version(), "cpu": _cpu_name(), "cpu_affinity": affinity, "torch_threads": threads,
           "preset": preset, "net": PRESETS[preset]["net"], "shape": PRESETS[preset]["shape"],
           "parameters": count_parameters(UNet(**PRESETS[preset]["net"])), "adam": ADAM,
           "sigma_data": SIGMA_DATA, "P_mean": P_MEAN, "P_std": P_STD}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def _header(env: dict, warmup: int, repeats: int) -> str:
    gpu = (f"{env['gpu']} (CUDA {env['cuda']}; cudnn.benchmark {env['cudnn_benchmark']}, TF32 conv "
           f"{env['cudnn_tf32']} / matmul {env['matmul_tf32']})") if "gpu" in env else "none"
    shape = "×".join(map(str, env["shape"]))
    return "\n".join([
        f"# Low-resolution denoiser benchmark ({env['preset']} preset)", "",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, Python {env['python']}; CPU: {env['cpu']}, {env['torch_threads']} torch "
        f"threads, affinity {env['cpu_affinity']}; GPU: {gpu}",
        f"- UNet({', '.join(f'{k}={v}' for k, v in env['net'].items())}): {env['parameters'] / 1e6:.2f} M "
        f"parameters, volumes {shape}",
        f"- median of {repeats} timed iterations after {warmup} warm-up; speedup = fp32-eager time / time, "
        "mem ratio = peak / fp32-eager peak (same device and batch)",
        "- peak GiB: CPU = rise of peak RSS in a fresh subprocess per cell; CUDA = torch.cuda.max_memory_allocated",
        ""])


# ---------------------------------------------------------------------------------------------------
# CLI


def _worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    click.echo(WORKER_TAG + json.dumps(measure(spec)))


def _run_all(base: dict, devices, batches, with_compile: bool) -> list[dict]:
    results = []
    for device in devices:
        names = [BASELINE.name] if device == "cpu" else [n for n, v in VARIANTS.items()
                                                        if with_compile or not v.compile]
        for name in names:
            for batch in batches:
                for phase in PHASES:
                    spec = {**base, "device": device, "variant": name, "batch": batch, "phase": phase}
                    t0 = time.perf_counter()
                    result = (_in_subprocess if device == "cpu" else _in_process)(spec)
                    status = result.get("error") or f"median {result['median_s']:.3f} s"
                    click.echo(f"  {device} {name} batch {batch} {phase}: {status} "
                               f"({time.perf_counter() - t0:.0f} s wall)", err=True)
                    results.append(result)
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", "devices", type=click.Choice(["cpu", "cuda"]), multiple=True,
              help="Device to measure (repeatable). [default: cpu, plus cuda when available]")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=[1], show_default=True,
              metavar="N", help="Batch size (repeatable).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, metavar="N",
              help="Untimed iterations first (torch.compile compiles in the first one).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, metavar="N",
              help="Timed iterations; the median is reported.")
@click.option("--threads", type=click.IntRange(min=1), default=_available_cpus(),
              show_default="the CPUs this process may run on", metavar="N", help="torch.set_num_threads.")
@click.option("--compile", "with_compile", is_flag=True, help="Also measure bf16 + channels-last + torch.compile "
              "on CUDA.")
@click.option("--find-max-batch", is_flag=True, help="On CUDA, find the largest power-of-two training batch that "
              "fits, per variant.")
@click.option("--max-batch-cap", type=click.IntRange(min=1), default=1024, show_default=True, metavar="N",
              help="Stop the --find-max-batch search here.")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=False, show_default=True,
              help="torch.backends.cudnn.benchmark (libs.training turns it on for CUDA runs; gpu_suite.sh "
              "passes --cudnn-benchmark).")
@click.option("--tiny", is_flag=True, help="Smoke-test preset: base 16 channels, mult (1, 2), 1 block, 16×16×32.")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N", help="Seed of weights and inputs.")
@click.option("--json-out", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Also write every measurement (all iteration times) as JSON.")
@click.option("--worker", hidden=True, metavar="SPEC", help="Internal: run one measurement, print it as JSON.")
def main(devices, batches, warmup, repeats, threads, with_compile, find_max_batch, max_batch_cap, cudnn_benchmark,
         tiny, seed, json_out, worker):
    """Time the low-resolution denoiser (forward and training step) and measure its peak memory."""
    if worker:
        _worker(worker)
        return
    cuda_ok = torch.cuda.is_available()
    devices = tuple(dict.fromkeys(devices)) or (("cpu", "cuda") if cuda_ok else ("cpu",))
    if "cuda" in devices and not cuda_ok:
        raise click.BadParameter("cuda requested but torch.cuda.is_available() is False", param_hint="--device")
    if find_max_batch and "cuda" not in devices:
        raise click.UsageError("--find-max-batch needs --device cuda (and a CUDA device)")
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    preset = "tiny" if tiny else "paper"
    env = _environment(preset, threads)
    click.echo(_header(env, warmup, repeats))
    base = {"preset": preset, "warmup": warmup, "repeats": repeats, "seed": seed, "threads": threads}
    results = _run_all(base, devices, tuple(dict.fromkeys(batches)), with_compile)
    _add_ratios(results)
    click.echo(_table(results))
    max_batch = []
    if find_max_batch:
        names = [n for n, v in VARIANTS.items() if with_compile or not v.compile]
        max_batch = [_find_max_batch({**base, "device": "cuda"}, n, max_batch_cap) for n in names]
        click.echo("\nLargest training batch on CUDA (2 Adam steps, powers of two):\n")
        click.echo(_max_table(max_batch))
    if json_out:
        with open(json_out, "w") as fh:
            json.dump({"environment": env, "results": results, "max_batch": max_batch}, fh, indent=1)


if __name__ == "__main__":
    main()
