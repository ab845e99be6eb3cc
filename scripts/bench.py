"""Benchmark training and sampling throughput: images/s, peak memory, achieved TFLOP/s.

    python scripts/bench.py                                   # CUDA: DDPM++ CIFAR-10, batch 512, bf16, compile
    python scripts/bench.py --device cpu                      # CPU: tiny network, small batch (what CI runs)
    python scripts/bench.py --precision fp32 --no-compile --no-tf32   # the reference's default setting
    python scripts/bench.py --mode sample --sample-steps 18   # Heun, 18 steps = 35 network evaluations
    python scripts/bench.py --augment 0.12                    # training steps with EDM's augmentation

Training is timed as edm-train steps: `edm.training.step.train_step` then the EMA update,
on synthetic batches already on the device; `--mode data` times the data loader separately, so
one can see whether loading keeps up. `--profile FILE` adds where a training step's time goes:
forward + backward, optimizer and EMA timed apart, and torch.profiler's kernel table. Timings use warm-up steps and synchronise the device
around the timed region. The result is printed as JSON (and written with --out), with what made it: the device,
the versions of Python, torch, accelerate and edm, the commit of the edm checkout it ran (and whether that had
uncommitted changes), and every setting.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

import edm
from edm.data.augment import AUGMENT_DIM, AugmentConfig, augment
from edm.data import DATASETS
from edm.core.denoisers import fast_denoiser
from edm.cli import user_errors
from edm.files import atomic_write
from edm.training.ema import update_ema
from edm.networks.edm2 import MPConv, force_weight_normalization_
from edm.hardware import set_precision_flags
from edm.training.step import make_optimizer, train_step

DEFAULTS = {  # device type -> (network, resolution, channels, batch, precision, compile)
    "cuda": ("ddpmpp", 32, 3, 512, "bf16", True),
    "cpu": ("tiny", 16, 1, 32, "fp32", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--mode", default="train,sample", help="comma list of: train, sample, data")
    p.add_argument("--network", help="network preset (default: ddpmpp on CUDA, tiny on CPU)")
    p.add_argument("--resolution", type=int,
                   help="image size (default 32 on CUDA, 16 on CPU; --mode data: the data set's own unless given)")
    p.add_argument("--channels", type=int, help="image channels (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--label-dim", type=int, default=0, help="number of classes (0: unconditional)")
    p.add_argument("--batch", type=int, help="batch size (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--schedule", default="edm", choices=sorted(edm.schedules.SCHEDULES))
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default bf16 on CUDA)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the network")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", default=True, help="IEEE fp32 matmuls/convs")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--augment", type=float, default=0.0, metavar="P",
                   help="train mode: EDM's augmentation with probability P inside each step (0: off; EDM CIFAR-10: 0.12)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default 20 on CUDA, 3 on CPU; --mode data: timed batches, default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--sample-steps", type=int, default=18, help="Heun steps for sampling (2N − 1 evaluations)")
    p.add_argument("--sample-batch", type=int, help="sampling batch (default: --batch)")
    p.add_argument("--dataset", default="digits", choices=DATASETS, help="data set for --mode data (see configs/dataset)")
    p.add_argument("--dataset-root", default=None, help="dataset root for --mode data")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for --mode data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    p.add_argument("--share-gpu", nargs=2, metavar=("DIR", "N"),
                   help="N bench processes share one GPU: each compiles and warms up at once, then all wait "
                        "until N are warm and take turns timing (a lock in DIR); one --mode each")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="train mode: also time forward+backward, optimizer and EMA apart and write torch.profiler's table here")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False: install a CUDA build of torch or use --device cpu")
    args.device = device
    args.data_resolution = args.resolution  # --mode data resizes only when asked
    args.data_batches = args.steps if args.steps is not None else 50
    net, res, ch, batch, prec, comp = DEFAULTS["cuda" if device == "cuda" else "cpu"]
    for key, value in (("network", net), ("resolution", res), ("channels", ch), ("batch", batch),
                       ("precision", prec), ("compile", comp)):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = args.steps if args.steps is not None else (20 if device == "cuda" else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 1)
    for key, least in (("steps", 1), ("warmup", 0), ("batch", 1), ("sample_steps", 1), ("sample_batch", 1),
                       ("resolution", 1), ("channels", 1), ("label_dim", 0), ("workers", 0)):
        if getattr(args, key) is not None and getattr(args, key) < least:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)}: give {least} or more")
    if not 0 <= args.augment <= 1:
        p.error(f"--augment {args.augment}: a probability, from 0 (off) to 1")
    args.sample_batch = args.sample_batch if args.sample_batch is not None else args.batch
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = sorted(set(args.modes) - {"train", "sample", "data"})
    if bad or not args.modes:
        p.error(f"unknown --mode {bad or repr(args.mode)}; choose from train, sample, data")
    if args.profile and "train" not in args.modes:
        p.error("--profile times the parts of a training step: add train to --mode")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out {args.out} is a folder: give the file to write the JSON result to, e.g. {args.out / 'bench.json'}")
    if args.share_gpu and not (args.share_gpu[1].isdigit() and int(args.share_gpu[1]) >= 1):
        p.error(f"--share-gpu DIR N: N is the number of sharing processes (1 or more), got {args.share_gpu[1]!r}")
    if args.share_gpu and len(args.modes) != 1:
        p.error("--share-gpu times one --mode per process (each process warms up once before the others time)")
    return args


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class GpuTurns:
    """Bench processes sharing one GPU: warm up together, then time one at a time.

    turn() marks this process warm, waits until `expected` processes in `folder` are (so no one
    compiles or autotunes on the GPU any more), then holds an exclusive lock on folder/lock.
    Marks of processes that have ended (an earlier session in the same folder) are removed first;
    `warm_seen` is how many were warm when this one's turn came (fewer than `expected` only on timeout).
    Without a folder it does nothing.
    """

    def __init__(self, share: list[str] | None, device: torch.device, timeout_s: float = 900.0):
        self.folder = Path(share[0]) if share else None
        self.expected = int(share[1]) if share else 0
        self.device, self.timeout_s = device, timeout_s
        self.mark = f"warm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.warm_seen: int | None = None
        for stale in self.folder.glob("warm-*") if self.folder is not None else ():
            pid = stale.name.split("-")[1]  # warm-PID-ID; other marks (gpu_report.sh's warm-tests) stay
            if pid.isdigit() and not _alive(int(pid)):
                stale.unlink(missing_ok=True)

    def mark_warm(self) -> None:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / self.mark).touch()

    @contextlib.contextmanager
    def turn(self):
        if self.folder is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # idle processes leave the memory to the one timing
        self.mark_warm()
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.folder.glob("warm-*"))) < self.expected and time.monotonic() < deadline:
            time.sleep(0.2)
        self.warm_seen = len(list(self.folder.glob("warm-*")))
        if self.warm_seen < self.expected:
            print(f"bench.py: warning: timing with {self.warm_seen} of {self.expected} sharers warm after "
                  f"{self.timeout_s:.0f} s: the others may still compile on the GPU", file=sys.stderr, flush=True)
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


class Timer:
    """Wall time of a region, synchronising the device at both ends."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.start


def mixed_precision(args: argparse.Namespace) -> str:
    """--precision in accelerate's / edm.core.denoisers' words: no | bf16 | fp16."""
    return "no" if args.precision == "fp32" else args.precision


def build_denoiser(args: argparse.Namespace, device: torch.device) -> edm.Precond:
    net = edm.networks.build(  # (augment_dim only with augmentation: EDM2's network takes none)
        args.network, img_resolution=args.resolution, in_channels=args.channels, label_dim=args.label_dim,
        **({"augment_dim": AUGMENT_DIM} if args.augment > 0 else {}),
    )
    return edm.Precond(net, kind=args.schedule).to(device)


def train_flops(den: edm.Precond, loss_fn: edm.Loss, y: torch.Tensor, labels) -> int:
    """FLOPs of one forward + backward of the loss on the batch y, counted by torch's FlopCounterMode
    (uncompiled). Callers pass a few images and scale: the count is linear in the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(den, y, labels).mean().backward()
    den.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def forward_flops(den: edm.Precond, x: torch.Tensor) -> int:
    """FLOPs of one denoiser evaluation on the batch x, counted by FlopCounterMode (uncompiled; linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        den(x, torch.ones(x.shape[0], device=x.device))
    return counter.get_total_flops()


def bench_train(args: argparse.Namespace, turns: GpuTurns) -> dict:
    from accelerate import Accelerator

    device = torch.device(args.device)
    accelerator = Accelerator(
        mixed_precision=mixed_precision(args),
        cpu=device.type == "cpu",
        dynamo_backend="inductor" if args.compile else "no",
    )
    den = build_denoiser(args, device).train()
    loss_fn = edm.Loss(edm.schedules.get(args.schedule))
    g = torch.Generator(device).manual_seed(args.seed)
    y = torch.rand(args.batch, args.channels, args.resolution, args.resolution, generator=g, device=device) * 2 - 1
    labels = None
    if args.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(args.batch, device=device) % args.label_dim, args.label_dim).float()
    if args.channels_last:  # (sampling converts through fast_denoiser, as sample.py does)
        den = den.to(memory_format=torch.channels_last)
        y = y.contiguous(memory_format=torch.channels_last)
    n = min(2, args.batch)  # counted on n images, scaled to the batch
    flops = train_flops(den, loss_fn, y[:n], None if labels is None else labels[:n]) * args.batch / n
    optimizer = make_optimizer(den.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, device=device)
    ema = copy.deepcopy(den).eval().requires_grad_(False)
    model, optimizer = accelerator.prepare(den, optimizer)
    augment_cfg = AugmentConfig(p=args.augment)

    def batch() -> list[tuple]:
        # Augmentation as edm-train does it: on the device, from the run's generator, inside the step.
        y_step, augment_labels = augment(y, augment_cfg, g) if augment_cfg.p > 0 else (y, None)
        return [(y_step, labels, augment_labels)]

    def step() -> torch.Tensor:
        loss = train_step(model, loss_fn, optimizer, batch(), accelerator, g, lr=1e-4)
        update_ema(ema, den, 0.999)
        return loss

    # Compilation runs at once, beside other sharers of the GPU; eager runs warm up in their turn.
    with Timer(device) as t_first:
        if args.compile:
            step()
    with turns.turn():
        with Timer(device) as t_warm:
            for _ in range(args.warmup - args.compile):
                step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Timer(device) as t:
            for _ in range(args.steps):
                loss = step()
        result = {
            "images_per_s": args.batch * args.steps / t.seconds,
            "step_ms": 1000 * t.seconds / args.steps,
            "compile_s": t_first.seconds,
            "warmup_s": t_warm.seconds,
            "final_loss": float(loss),
            "flops_per_image": flops / args.batch,
            "achieved_tflops": flops * args.steps / t.seconds / 1e12,
            "parameters": sum(p.numel() for p in den.parameters()),
        }
        if device.type == "cuda":
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.profile:
            result["breakdown_ms"] = step_breakdown(model, loss_fn, optimizer, accelerator, batch, ema, den, g, args.steps)
            write_profile(args.profile, step, device, result["breakdown_ms"])
    return result


def step_breakdown(model, loss_fn, optimizer, accelerator, batch, ema, den, g, reps: int) -> dict:
    """Milliseconds per step of each part of a training step, each timed alone over `reps` repetitions."""
    device = next(den.parameters()).device

    def forward_backward() -> None:
        y, labels, augment_labels = batch()[0]
        kwargs = {"augment_labels": augment_labels} if augment_labels is not None else {}
        accelerator.backward(loss_fn(model, y, labels, generator=g, **kwargs).mean())

    normalizes = any(isinstance(m, MPConv) for m in den.modules())  # EDM2's forced weight normalization, a part
    parts = {"batch (augmentation)": batch,
             **({"weight normalization": lambda: force_weight_normalization_(den)} if normalizes else {}),
             "forward+backward": forward_backward, "optimizer": optimizer.step, "ema": lambda: update_ema(ema, den, 0.999)}
    times = {}
    for name, fn in parts.items():
        fn()  # warm (the optimizer step needs gradients: forward_backward left them)
        with Timer(device) as t:
            for _ in range(reps):
                fn()
        times[name] = 1000 * t.seconds / reps
    optimizer.zero_grad(set_to_none=True)
    return times


def write_profile(path: Path, step, device: torch.device, breakdown: dict, steps: int = 3) -> None:
    """torch.profiler's table (self device time first) over `steps` training steps, after the breakdown."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        Timer(device).sync()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"{name}: {ms:.2f} ms per step" for name, ms in breakdown.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + f"\n\n{steps} steps, sorted by {sort}:\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")


@torch.no_grad()
def bench_sample(args: argparse.Namespace, turns: GpuTurns) -> dict:
    device = torch.device(args.device)
    den = build_denoiser(args, device).eval()
    fast = fast_denoiser(den, mixed_precision(args), args.compile, args.channels_last)  # what edm-sample runs
    sched = edm.schedules.get(args.schedule)
    shape = (args.sample_batch, args.channels, args.resolution, args.resolution)
    noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
    n = min(2, args.sample_batch)  # counted on n images, scaled to the batch
    flops = forward_flops(den, noise[:n]) * args.sample_batch / n
    evaluations = 0

    def counting(x, sigma, class_labels=None):
        nonlocal evaluations
        evaluations += 1
        return fast(x, sigma, class_labels)

    def run() -> torch.Tensor:
        return edm.sample(counting, noise, sched, num_steps=args.sample_steps, solver="heun")

    with Timer(device) as t_first:
        if args.compile:  # as the sampler calls it: σ an expanded [B] tensor (another stride would be another graph)
            edm.sample(fast, noise, sched, num_steps=2, solver="euler")
    with turns.turn():
        with Timer(device) as t_warm:
            run()
        evaluations = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Timer(device) as t:
            x = run()
        result = {
            "images_per_s": args.sample_batch / t.seconds,
            "network_evaluations": evaluations,
            "seconds": t.seconds,
            "flops_per_image_forward": flops / args.sample_batch,
            "achieved_tflops": flops * evaluations / t.seconds / 1e12,
            "compile_s": t_first.seconds,
            "warmup_s": t_warm.seconds,
            "finite": bool(torch.isfinite(x).all()),
        }
        if device.type == "cuda":
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench_data(args: argparse.Namespace, turns: GpuTurns) -> dict:
    """Images/s the training DataLoader delivers over --steps batches (decoded, resized to --resolution when given,
    batched, moved to the device; for a latent data set, each latent drawn from its posterior as training draws it,
    with EDM2's latent map)."""
    from edm.data import DatasetConfig
    from edm.data import StreamBatchSampler, build_dataset, make_loader, to_model_space
    from edm.latent import LatentConfig, final_latents, latent_affine

    dataset = build_dataset(DatasetConfig(name=args.dataset, root=args.dataset_root, resolution=args.data_resolution))
    latent = LatentConfig()
    scale, bias = latent_affine(latent.raw_mean, latent.raw_std, latent.final_mean, latent.final_std)

    def model_space(images: torch.Tensor) -> torch.Tensor:
        if dataset.latent is None:
            return to_model_space(images)
        return final_latents(images, torch.randn_like(images[:, : dataset.channels]), scale, bias)

    batches = args.data_batches
    sampler = StreamBatchSampler(len(dataset), args.seed, args.batch, args.batch, 0, 1, start_nimg=0)
    loader = make_loader(dataset, sampler, args.workers, pin_memory=args.device == "cuda")
    device = torch.device(args.device)
    it = iter(loader)
    next(it)  # start the workers
    with turns.turn(), Timer(device) as t:
        for _ in range(batches):
            images = next(it)[0]
            model_space(images.to(device, non_blocking=True))
    return {"images_per_s": batches * args.batch / t.seconds, "dataset": args.dataset, "workers": args.workers,
            "batches": batches, "shape": [dataset.channels, dataset.resolution, dataset.resolution]}


def device_name(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def source_commit(package: Path = Path(edm.__file__).resolve().parents[1]) -> dict:
    """{"commit": the HEAD of the git checkout that holds the imported edm package, "uncommitted_changes": whether its
    tracked files differ from it}; both None where edm is not run from a git checkout (an installed wheel)."""
    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *command], capture_output=True, text=True)

    try:
        top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "--verify", "HEAD")
        # the checkout's own top (a wheel in site-packages of a venv inside some repository is not that repository's)
        if head.returncode != 0 or top.returncode != 0 or Path(top.stdout.strip()).resolve() != package.resolve():
            return {"commit": None, "uncommitted_changes": None}
        return {"commit": head.stdout.strip(),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())}
    except OSError:  # no git program
        return {"commit": None, "uncommitted_changes": None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with user_errors("bench.py"):  # a network or data set that cannot be built, an --out that cannot be written; Ctrl-C
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """main's work: every --mode timed, the result printed and written."""
    import accelerate

    set_precision_flags(tf32=args.tf32, cudnn_benchmark=True)
    torch.manual_seed(args.seed)
    result = {
        "device": device_name(args),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "edm": edm.__version__,
        **source_commit(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "modes")},
    }
    benches = {"train": bench_train, "sample": bench_sample, "data": bench_data}
    turns = GpuTurns(args.share_gpu, torch.device(args.device))
    try:
        for mode in args.modes:
            result[mode] = benches[mode](args, turns)
    finally:
        turns.mark_warm()  # a process that fails before its turn does not hold the others back
    if args.share_gpu:
        result["share_gpu"] = {"warm_at_turn": turns.warm_seen, "expected": turns.expected}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        atomic_write(args.out, lambda f: f.write((text + "\n").encode()))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
