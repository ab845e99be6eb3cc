"""Train a small AutoencoderKL (diffusers) on a data set we read, for trying latent diffusion where Stability's VAE
cannot be downloaded: `edm-encode latent.vae=OUT` then takes it like any VAE folder.

    python scripts/small_vae.py --dataset fashion_mnist --resolution 16 --out runs/vae-fmnist16 --steps 3000

As Stable Diffusion's VAE in EDM2's use: RGB in [0, 1] in and out (a gray data set goes in as gray RGB), a
4-channel latent at 1/2^(levels − 1) of the resolution; the loss is the mean squared reconstruction error of a
posterior draw (a mean over the image's values) plus kl_weight times the KL divergence to N(0, I) over the same
number of values (an image's KL / (3·H·W)). Prints the reconstruction PSNR of held-out images.
OUT/provenance.json records the settings and the data set: a rerun into OUT with other settings is refused, naming
them, before any training; --overwrite replaces the VAE once the new one is trained. A training run's folder, a
model folder or another command's results folder is refused whatever --overwrite says (it would delete their files).
Each file of the VAE is written whole (into a hidden folder of OUT, then moved in).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from edm.cli import USER_ERRORS, user_errors
from edm.data import DATASETS, DatasetConfig, build_dataset, dataset_images, dataset_record
from edm.data.sets import DEFAULT_RESAMPLE, RESAMPLE_FILTERS
from edm.files import FolderInUseError, FolderLock
from edm.progress import progress_bar
from edm.provenance import PROVENANCE_NAME, ProvenanceError, claim, refuse_foreign_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=[name for name in DATASETS if name != "latent"])
    p.add_argument("--dataset-root", default=None)
    p.add_argument("--resolution", type=int, default=None, help="resize the images to this (default: native)")
    p.add_argument("--resample", default=DEFAULT_RESAMPLE, choices=RESAMPLE_FILTERS,
                   help=f"the resize filter (default {DEFAULT_RESAMPLE}, as edm-train's dataset.resample)")
    p.add_argument("--out", required=True, help="the VAE folder to write (diffusers' save_pretrained layout)")
    p.add_argument("--channels", default="32,64", help="block_out_channels, one per level (levels − 1 halvings)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--held-out", type=int, default=1000, help="images kept out of training for the PSNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a VAE that OUT holds, of any settings")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar of the training steps on stderr (default on)")
    return p.parse_args(argv)


def block_channels(args: argparse.Namespace) -> tuple[int, ...]:
    """--channels as block_out_channels, refused unless each is a positive multiple of the GroupNorm groups
    (min(32, the first))."""
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1 or any(c % min(32, channels[0]) for c in channels):
        raise SystemExit(f"small_vae.py: error: --channels {args.channels!r}: expected positive whole numbers, one per "
                         "level, each a multiple of min(32, the first) (GroupNorm's groups), e.g. 32,64")
    return channels


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with user_errors("small_vae.py"):  # a foreign --out, a folder that cannot be written: one line; Ctrl-C: exit 130
        return train_into_out(args)


def train_into_out(args: argparse.Namespace) -> dict:
    """main's work: OUT refused if it is another's, before the data set is read; the VAE trained, then saved."""
    channels = block_channels(args)
    try:  # the optional extra, checked before OUT is made
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("small_vae.py: error: it trains diffusers' AutoencoderKL: pip install 'edm-diffusion[latent]' "
                         "(or pip install diffusers)") from None
    for key in ("steps", "batch", "held_out", "latent_channels", "resolution"):  # (an unset --resolution: native)
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"small_vae.py: error: --{key.replace('_', '-')} {getattr(args, key)}: give 1 or more")
    if not (args.lr > 0 and args.kl_weight >= 0):  # a negative weight would reward latents far from N(0, I)
        raise SystemExit(f"small_vae.py: error: --lr {args.lr} --kl-weight {args.kl_weight}: the learning rate is "
                         "positive, the KL weight 0 or more")
    # a training run's folder, a model folder or another command's results: --overwrite would delete them
    refuse_foreign_folder(args.out, out_key="--out", command="small_vae.py")
    data = DatasetConfig(args.dataset, root=args.dataset_root, resolution=args.resolution, resample=args.resample)
    try:
        images, _ = dataset_images(build_dataset(data))
    except USER_ERRORS as err:  # its message names edm's key of the root: name this script's flag
        message = str(err).replace("dataset.root=", "--dataset-root ").replace("dataset.root", "--dataset-root")
        raise SystemExit(f"small_vae.py: error: {message}") from None
    if args.held_out >= len(images):
        raise SystemExit(f"small_vae.py: error: --held-out {args.held_out} leaves no image of {args.dataset}'s "
                         f"{len(images)} to train on: give fewer")
    data_keys = ("dataset", "dataset_root", "resolution", "resample")  # recorded as the data set's record
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "progress", *data_keys)}
    settings |= {"dataset": dataset_record(data)}
    try:
        with FolderLock(args.out, key="--out", owner="small_vae.py") as lock:  # one process writes OUT
            out = lock.path.parent
            kept = (lock.path, out / PROVENANCE_NAME)  # OUT's files that are not the VAE
            vae_files = lambda: [path for path in out.iterdir() if path not in kept]  # noqa: E731
            if not args.overwrite:  # refused before training; with --overwrite the old VAE stays until the new is made
                claim(out, settings, vae_files(), command="small_vae.py", out_key="--out", overwrite_key="--overwrite")
            vae, result = train_vae(args, images, channels)
            if args.overwrite:
                claim(out, settings, vae_files(), command="small_vae.py", overwrite=True, out_key="--out", overwrite_key="--overwrite")
            save_vae(vae, out)
    except (ProvenanceError, FolderInUseError) as err:
        raise SystemExit(f"small_vae.py: error: {err}") from None
    print(result)
    return result


def save_vae(vae, out: Path) -> None:
    """vae.save_pretrained into OUT, each file whole: written into a hidden folder of OUT, then moved in."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".saving-"))
    try:
        vae.save_pretrained(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_vae(args: argparse.Namespace, images: torch.Tensor, channels: tuple[int, ...]):
    """(the VAE trained on uint8 `images` [N, C, H, W] but the first args.held_out, its report with the held-out
    reconstruction PSNR)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    x = images.float().div(255).expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().div(255)
    held, train = x[: args.held_out], x[args.held_out :]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                        layers_per_block=1, latent_channels=args.latent_channels, norm_num_groups=min(32, channels[0]),
                        sample_size=x.shape[-1])
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    bar = progress_bar(args.steps, "training the VAE", "step") if args.progress else None
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = (recon - batch).pow(2).mean()
        loss = mse + args.kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(mse=f"{mse.item():.5f}", refresh=False)
        if step % 500 == 0 or step == args.steps:
            print(f"step {step}: mse {mse.item():.5f}", flush=True)
    if bar is not None:
        bar.close()
    vae.eval()
    with torch.no_grad():
        mse = sum(float((vae.decode(vae.encode(part).latent_dist.mean).sample.clamp(0, 1) - part).pow(2).sum())
                  for part in held.split(250)) / held.numel()
    return vae, {"out": args.out, "psnr_db": 10 * math.log10(1 / mse), "held_out": len(held),
                 "parameters": sum(p.numel() for p in vae.parameters())}


if __name__ == "__main__":
    main()
