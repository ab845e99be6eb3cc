"""Score images and models from the command line: FID (+ precision/recall), reference statistics, bits/dim.

    python scripts/evaluate.py fid --images OUT --ref cifar10-32x32.npz --inception pt_inception-2015-12-05-6726825d.pth
    python scripts/evaluate.py fid --images OUT/samples.npz --dataset cifar10 --dataset-root DATA --inception ... --pr
    python scripts/evaluate.py ref --dataset cifar10 --dataset-root DATA --inception ... --dest refs/cifar10.npz
    python scripts/evaluate.py bpd --checkpoint RUN/checkpoint-00100000.pt --dataset cifar10 --dataset-root DATA --num 1000

--report FILE merges the numbers into a JSON file (e.g. the report.json that sample.py wrote next
to the images) under "metrics". Nothing is downloaded: see `python scripts/evaluate.py fid --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

import edm
from edm import likelihood, metrics, outputs
from edm.data import DATASETS, DatasetConfig
from edm.loading import load_model


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")


def dataset_config(args: argparse.Namespace, cond: bool = False):
    """edm.data.DatasetConfig of --dataset/--dataset-root/--dataset-resolution (the training data sets)."""

    return DatasetConfig(name=args.dataset, root=args.dataset_root, resolution=args.dataset_resolution, cond=cond,
                         max_size=getattr(args, "num", None))


def merge_report(path: str | None, numbers: dict) -> None:
    """Add `numbers` under "metrics" of the JSON file at `path` (created if absent)."""
    if path is None:
        return
    report = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    report.setdefault("metrics", {}).update(numbers)
    outputs.write_json(path, report)


# ----------------------------------------------------------------------------- commands


def cmd_fid(args: argparse.Namespace) -> dict:
    if (args.ref is None) == (args.dataset is None):
        raise ValueError("give the reference as --ref (statistics .npz, image folder or .npz) or --dataset NAME")
    device = device_of(args)
    extractor = metrics.load_inception(args.inception, device, allow_pickle=args.allow_pickle)
    common = dict(
        extractor_key=Path(args.inception).stem, cache_dir=args.cache_dir, batch_size=args.batch, device=device,
        with_precision_recall=args.pr, k=args.k, max_images=args.max_images,
    )
    if args.ref is not None:
        return metrics.evaluate_images(args.images, extractor, ref=args.ref, **common)
    batches, key = metrics.dataset_reference(dataset_config(args), args.batch)
    return metrics.evaluate_images(args.images, extractor, ref_batches=batches, ref_key=key, **common)


def cmd_ref(args: argparse.Namespace) -> dict:
    if (args.data is None) == (args.dataset is None):
        raise ValueError("give the images as --data (folder or .npz) or --dataset NAME")
    device = device_of(args)
    extractor = metrics.load_inception(args.inception, device, allow_pickle=args.allow_pickle)
    if args.data is not None:
        batches = metrics.image_batches(args.data, args.batch, args.max_images)
    else:
        batches = metrics.dataset_reference(dataset_config(args), args.batch)[0]()
    mu, sigma, n = metrics.feature_statistics(extractor, batches, device=device, max_images=args.max_images)
    metrics.save_statistics(args.dest, mu, sigma, n)
    return {"statistics": str(args.dest), "num_images": n, "feature_extractor": Path(args.inception).stem}


def bpd_batches(args: argparse.Namespace, label_dim: int):
    """(uint8 images [B, C, H, W], one-hot labels or None) batches of the data, at most --num images."""
    if args.dataset is not None:
        from torch.utils.data import DataLoader

        from edm.data import build_dataset

        data = build_dataset(dataset_config(args, cond=label_dim > 0))
        if label_dim and data.label_dim != label_dim:
            raise ValueError(f"the model has label_dim {label_dim}, the data set {data.label_dim}")
        for images, labels, _ in DataLoader(data, batch_size=args.batch):
            yield images, (labels if label_dim else None)
        return
    if label_dim:
        raise ValueError("bits/dim of a class-conditional model needs labels: use --dataset NAME (its class labels)")
    for x in metrics.image_batches(args.data, args.batch, args.num):
        yield ((x + 1) * 127.5).round().to(torch.uint8), None


def cmd_bpd(args: argparse.Namespace) -> dict:
    if (args.data is None) == (args.dataset is None):
        raise ValueError("give the test images as --data (folder or .npz) or --dataset NAME")
    device = device_of(args)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    denoiser, info = load_model(args.checkpoint, ema=not args.raw, device=device)
    schedule = edm.schedules.get(args.schedule) if args.schedule else info.schedule
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(
        num_steps=args.steps, discretization=args.discretization, integrator=args.integrator,
        divergence_method=args.divergence, hutchinson_noise=args.noise, dtype=dtype,
    )
    values = []
    for images, labels in bpd_batches(args, info.label_dim):
        images = images.to(device)
        labels = None if labels is None else labels.to(device=device, dtype=dtype)
        bpd = likelihood.bits_per_dim(
            denoiser, images, schedule, dequantization=args.dequantization, generator=generator,
            class_labels=labels, **options,
        )
        values.append(bpd.cpu())
        print(f"{sum(len(v) for v in values)} images: {float(torch.cat(values).mean()):.4f} bits/dim", file=sys.stderr)
    if not values:
        raise ValueError("no test images")
    bpd = torch.cat(values).double()
    return {
        "bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else None,
        "bpd_num_images": len(bpd),
        "bpd_settings": {
            "checkpoint": str(Path(args.checkpoint).resolve()), "schedule": {"name": schedule.name, **dataclasses.asdict(schedule)},
            "sigma_min": float(schedule.sigma(likelihood.likelihood_grid(schedule, args.steps, args.discretization)[0])),
            "dequantization": args.dequantization, "seed": args.seed, "batch": args.batch,
            **{k: (str(v) if k == "dtype" else v) for k, v in options.items()},
        },
    }


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--allow-pickle", action="store_true", help="allow a .pkl or TorchScript Inception detector (both run code stored in the file)")
        q.add_argument("--batch", type=int, default=64, help="images per forward pass (default 64)")
        q.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
        q.add_argument("--report", help="merge the numbers into this JSON file (under 'metrics')")
        q.add_argument("--dataset", choices=list(DATASETS), help="a training data set (see configs/dataset/)")
        q.add_argument("--dataset-root", help="where the data set's files are (see configs/dataset/)")
        q.add_argument("--dataset-resolution", type=int, help="resize the data set to this resolution")

    inception_help = "local Inception weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or NVlabs inception-2015-12-05.pkl/.pt"
    fid = sub.add_parser("fid", help="FID (and precision/recall) of generated images",
                         epilog=metrics.INCEPTION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    fid.add_argument("--images", required=True, help="generated images: a folder of PNGs or an .npz")
    fid.add_argument("--ref", help="reference: statistics .npz (mu, sigma) or images (folder / .npz)")
    fid.add_argument("--inception", required=True, help=inception_help)
    fid.add_argument("--cache-dir", help="cache of reference statistics computed from images")
    fid.add_argument("--pr", action="store_true", help="also precision/recall (needs reference images)")
    fid.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    fid.add_argument("--max-images", type=int, help="use at most this many images of each set")
    common(fid)
    fid.set_defaults(run=cmd_fid)

    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of a data set",
                         epilog=metrics.INCEPTION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ref.add_argument("--data", help="images: a folder or an .npz")
    ref.add_argument("--inception", required=True, help=inception_help)
    ref.add_argument("--dest", required=True, help="output .npz (mu, sigma, num_images)")
    ref.add_argument("--max-images", type=int, help="use at most this many images")
    common(ref)
    ref.set_defaults(run=cmd_ref)

    bpd = sub.add_parser("bpd", help="negative log-likelihood in bits/dim by the probability-flow ODE")
    bpd.add_argument("--checkpoint", required=True, help="edm checkpoint (.pt or run folder) or NVlabs .pkl")
    bpd.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    bpd.add_argument("--data", help="8-bit test images: a folder or an .npz")
    bpd.add_argument("--num", type=int, default=None, help="use the first NUM images")
    bpd.add_argument("--schedule", choices=sorted(edm.schedules.SCHEDULES), help="default: the checkpoint's")
    bpd.add_argument("--steps", type=int, default=128, help="ODE steps (default 128)")
    bpd.add_argument("--discretization", default="karras", choices=sorted(edm.schedules.DISCRETIZATIONS))
    bpd.add_argument("--integrator", default="rk4", choices=likelihood.INTEGRATORS)
    bpd.add_argument("--divergence", default="hutchinson", choices=likelihood.DIVERGENCES)
    bpd.add_argument("--noise", default="rademacher", choices=likelihood.HUTCHINSON_NOISES, help="Hutchinson probes")
    bpd.add_argument("--dequantization", default="uniform", choices=likelihood.DEQUANTIZATIONS)
    bpd.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    bpd.add_argument("--seed", type=int, default=0, help="seed of the dequantization and Hutchinson noise")
    common(bpd)
    bpd.set_defaults(run=cmd_bpd)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        numbers = args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        sys.exit(f"error: {err}")
    merge_report(args.report, numbers)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
