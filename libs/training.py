"""The training loop shared by both cascade stages: step / checkpoint / report, resume, EMA, DDP.

A stage supplies a network, a loss callable ``loss(model, x, cond, generator) -> (B,)`` (whose
``loss.wrap(net)`` builds that model: a preconditioned denoiser or a velocity model) and a batch
function ``batch(step, rank, world) -> (x, cond)``; everything else lives here.  Every random draw of a
step is seeded from (seed, step, rank), and the batch is a pure function of the step, so a run that is
stopped and resumed ends with exactly the weights of an uninterrupted run (on the same device).

Multi-GPU: launch with ``torchrun --nproc_per_node N``; each rank gets ``batch / N`` samples, disjoint
from the others', gradients are averaged by DDP, and only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, check_range, same_value
from .ema import PowerFunctionEMA
from .files import atomic_write_text

MEASURED_CONSTANTS = ("channel_mean", "channel_std", "residual_std")     # normalization measured on the data


@dataclass
class OptimConfig:
    """Adam with the EDM2 learning-rate law: lr = lr_ref / √max(step / ref_steps, 1), linear warm-up."""

    batch: int = 8                 # global batch (all ranks together)
    lr_ref: float = 0.01
    ref_steps: int = 2000          # inverse-square-root decay starts here (EDM2's t_ref, in steps)
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8

    def __post_init__(self):
        check_range("batch", self.batch, low=1)
        check_range("lr_ref", self.lr_ref, low=0.0, low_inclusive=False)
        check_range("ref_steps", self.ref_steps, low=1)
        check_range("warmup_steps", self.warmup_steps, low=0)

    def lr(self, step: int) -> float:
        lr = self.lr_ref / math.sqrt(max(step / self.ref_steps, 1.0))
        return lr * min(step / self.warmup_steps, 1.0) if self.warmup_steps else lr


@dataclass
class LoopConfig:
    """Length, bookkeeping and speed switches of a training run."""

    steps: int = 1000
    seed: int = 0
    report_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    ema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    bf16: bool = True              # autocast on CUDA (ignored on CPU)
    bf16_cpu: bool = False         # bf16 autocast on a CPU too: ~2x faster training steps where the CPU has
                                   # native bf16 (AMX or AVX512-BF16); fp32, with a notice, on any other CPU
    channels_last: bool = True     # channels-last 3-D memory format on CUDA
    compile: bool = False          # torch.compile the network
    loader_workers: int = 2        # background processes assembling batches (0 = in the loop)
    init_from: str | None = None   # a stage's exported .safetensors: start weights (and its normalization
                                   # constants) for a fine-tune, used only while the run folder is empty
    max_minutes: float | None = None   # wall-clock budget of this launch: at the first report after it, save a
                                       # checkpoint and stop (rerun to continue towards `steps`); None = none

    def __post_init__(self):
        for name in ("steps", "report_every", "checkpoint_every", "keep_checkpoints"):
            check_range(name, getattr(self, name), low=1)
        if self.max_minutes is not None:
            check_range("max_minutes", self.max_minutes, low=0.0, low_inclusive=False)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, d: Dist | None = None) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` → a torch.device (``cuda``: this rank's local GPU);
    ConfigError with one line for any other name or a CUDA request on a machine without CUDA."""
    d = d or Dist()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise ConfigError(f"--device {requested!r}: use auto, cpu, cuda or cuda:N")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA device is available on this machine")
        if requested != "cuda" and torch.device(requested).index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.backends.cudnn.benchmark = True     # fixed shapes throughout: let cuDNN pick its fastest kernels
        return torch.device("cuda", d.local_rank if requested == "cuda" else torch.device(requested).index)
    return torch.device(requested)


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout of 5-D network tensors on ``device``: channels-last 3-D on CUDA (cuDNN's fast layout for 3-D
    convolutions in bf16), the default elsewhere."""
    return torch.channels_last_3d if torch.device(device).type == "cuda" else torch.contiguous_format


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 natively (the ``amx_bf16`` or ``avx512_bf16`` flag of Linux's
    cpuinfo): there oneDNN's bf16 convolutions are about twice as fast as fp32; elsewhere they are emulated
    and slower. False where cpuinfo cannot be read (other operating systems)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds a valid checkpoint a run would resume from."""
    return Path(run_dir).is_dir() and latest_checkpoint(run_dir) is not None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files (``.<name>.*.tmp*``, see :func:`libs.files.atomic_path`) that a killed run
    left in its run folder; one run folder has one writer, so none of them is still being written."""
    stale = [p for p in run_dir.glob(".*.tmp*") if p.is_file()] if run_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The random stream of one (step, rank): noise levels and noise of the loss."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


class Trainer:
    """Runs ``steps`` optimizer steps of ``loss`` on batches from ``batch_fn``, resuming from ``run_dir``."""

    def __init__(self, net: nn.Module, loss: Callable, batch_fn: Callable, optim: OptimConfig, loop: LoopConfig,
                 run_dir: str | os.PathLike, config: dict, normalization: dict,
                 device: str = "auto", progress: bool = True):
        self.dist = init_distributed(device)
        self.device = pick_device(device, self.dist)
        self.optim_cfg, self.loop, self.loss, self.batch_fn = optim, loop, loss, batch_fn
        self.run_dir, self.config, self.normalization = Path(run_dir), config, normalization
        self.progress = progress and self.dist.main
        on_cpu = self.device.type == "cpu"
        # the training step's autocast: bf16 on CUDA (loop.bf16), and on a CPU with native bf16 (loop.bf16_cpu)
        self.bf16 = loop.bf16_cpu and cpu_has_native_bf16() if on_cpu else self.device.type == "cuda" and loop.bf16
        if on_cpu and loop.bf16_cpu and not self.bf16 and self.progress:
            print("loop.bf16_cpu: this CPU has no native bf16 (AMX / AVX512-BF16), so this run trains in fp32")
        if optim.batch % self.dist.world:
            raise ValueError(f"optim.batch {optim.batch} is not divisible by the {self.dist.world} ranks")
        self.net = net.to(self.device)
        if self.device.type == "cuda" and loop.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.ema = PowerFunctionEMA(self.net, loop.ema_sigma_rels)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=optim.lr_ref, betas=optim.betas, eps=optim.eps,
                                    fused=self.device.type == "cuda")     # one kernel for all parameters
        if self.dist.main:
            remove_stale_temp_files(self.run_dir)
        self.step = self._resume()
        model = torch.compile(self.net) if loop.compile else self.net
        if self.dist.world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = loss.wrap(model)

    # -- checkpoint ---------------------------------------------------------------------------------
    def _resume(self) -> int:
        path = latest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
        if path is None:
            return 0
        ckpt = load_checkpoint(path, map_location=self.device)
        self._check_same_data(ckpt.get("normalization") or {}, path)
        try:
            step = restore_checkpoint(ckpt, model=self.net, ema=self.ema, optimizer=self.opt)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
            raise CheckpointError(f"{path}: does not fit this run's network ({first}); use a new run_dir") from None
        if self.progress:
            tqdm.write(f"resuming from {path} (step {step})")
        if self.dist.main:
            self._trim_log(step)
        return step

    def _trim_log(self, step: int) -> None:
        """Drop log rows of steps after the checkpoint resumed from (they will be logged again)."""
        log = self.run_dir / "log.jsonl"
        if not log.is_file():
            return
        lines = log.read_text(encoding="utf-8").splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue                                 # a row cut short by a kill
        if len(keep) != len(lines):
            atomic_write_text(log, "".join(f"{line}\n" for line in keep))

    def _check_same_data(self, recorded: dict, path: Path) -> None:
        """A resumed run must see the data it started on: the constants measured on it now (channel
        statistics, residual scales) must equal the checkpoint's, else the cohort changed under it."""
        had, has = recorded.get("objective", "edm"), self.normalization.get("objective", "edm")
        if had != has:
            raise ConfigError(f"{path}: this run was trained with the {had} objective, the config now says {has}; "
                              f"set diffusion.objective: {had} to resume it, or use a new run_dir")
        changed = [k for k in MEASURED_CONSTANTS if k in recorded and k in self.normalization
                   and not same_value(recorded[k], self.normalization[k])]
        if changed:
            k = changed[0]
            raise ConfigError(f"{path}: the run started on other data ({k} was {recorded[k]}, the cohort now gives "
                              f"{self.normalization[k]}); resume with the original cohort or use a new run_dir")

    def save(self) -> Path | None:
        """Rank 0 writes ``ckpt-<step>.pt`` atomically and prunes old ones."""
        if not self.dist.main:
            return None
        path = save_checkpoint(checkpoint_path(self.run_dir, self.step), model=self.net, ema=self.ema,
                               optimizer=self.opt, step=self.step, config=self.config,
                               normalization=self.normalization)
        prune_checkpoints(self.run_dir, keep=self.loop.keep_checkpoints)
        return path

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the mean loss (averaged over ranks) as a 0-d tensor
        on the device: reading it (``float``) waits for the device, so the loop reads losses only to report."""
        self.net.train()
        torch.manual_seed(self.loop.seed * 7919 + self.step * 31 + self.dist.rank)     # dropout
        gen = step_generator(self.loop.seed, self.step, self.dist.rank, self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.optim_cfg.lr(self.step)
        x, cond = self._to_device(x), self._to_device(cond)
        with self._autocast():
            loss = self.loss(self.model, x, cond, generator=gen).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.net.parameters():                 # keep Adam away from rare non-finite gradients
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.opt.step()
        self.ema.update(self.net)
        self.step += 1
        value = loss.detach().float()
        if self.dist.world > 1:
            dist.all_reduce(value)
            value /= self.dist.world
        return value

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if t.ndim == 5 and self.device.type == "cuda" and self.loop.channels_last:
            t = t.contiguous(memory_format=torch.channels_last_3d)
        return t

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Train until ``loop.steps`` (or, with ``loop.max_minutes``, until the first report past that budget:
        ``stopped_early`` is then True); checkpoint on schedule and at the end; returns the last checkpoint."""
        loop, per_rank = self.loop, self.optim_cfg.batch // self.dist.world
        last, started = None, time.perf_counter()
        self.stopped_early = False
        bar = tqdm(total=loop.steps, initial=self.step, desc="training", unit="step", disable=not self.progress)
        window, t0, seen = [], time.perf_counter(), 0
        for x, cond in self._batches(self.step, loop.steps, per_rank):
            window.append(self.train_step(x, cond))
            seen += self.optim_cfg.batch
            bar.update()
            if self.step % loop.report_every == 0 or self.step == loop.steps:
                mean = float(torch.stack(window).mean())       # the only host sync of the loop
                rate = seen / (time.perf_counter() - t0)
                self._report(mean, rate)
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.1f}")
                window, t0, seen = [], time.perf_counter(), 0
                self.stopped_early = self.step < loop.steps and self._out_of_time(started)
            if self.step % loop.checkpoint_every == 0 or self.step == loop.steps or self.stopped_early:
                last = self.save() or last
            if self.stopped_early:
                if self.progress:
                    tqdm.write(f"loop.max_minutes: stopped at step {self.step} of {loop.steps} after "
                               f"{(time.perf_counter() - started) / 60:.1f} min; run again to continue")
                break
        bar.close()
        if self.dist.world > 1:
            dist.barrier()
        return last if last is not None else latest_checkpoint(self.run_dir)

    def _out_of_time(self, started: float) -> bool:
        """Whether this launch has used ``loop.max_minutes``; every rank follows rank 0's clock."""
        if self.loop.max_minutes is None:
            return False
        late = torch.tensor(float(time.perf_counter() - started > 60.0 * self.loop.max_minutes), device=self.device)
        if self.dist.world > 1:
            dist.broadcast(late, src=0)
        return bool(late)

    def _batches(self, start: int, stop: int, per_rank: int):
        fn, rank, world = self.batch_fn, self.dist.rank, self.dist.world
        if self.loop.loader_workers <= 0:
            for step in range(start, stop):
                yield fn(step, rank, world)
            return
        stream = _StepStream(fn, start, stop, rank, world, self.loop.loader_workers)
        yield from torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.loop.loader_workers,
                                               pin_memory=self.device.type == "cuda", prefetch_factor=4,
                                               persistent_workers=False)

    def _report(self, loss: float, img_per_s: float) -> None:
        if not self.dist.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rec = {"step": self.step, "loss": round(loss, 6), "lr": self.optim_cfg.lr(self.step),
               "img_per_s": round(img_per_s, 3), "bf16": self.bf16, "time": time.time()}
        with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


class _StepStream(torch.utils.data.IterableDataset):
    """Batches of steps start..stop-1, worker w producing steps w, w + W, … (the loader keeps the order)."""

    def __init__(self, fn, start, stop, rank, world, workers):
        super().__init__()
        self.fn, self.start, self.stop, self.rank, self.world, self.workers = fn, start, stop, rank, world, workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.stop, n):
            yield self.fn(step, self.rank, self.world)
