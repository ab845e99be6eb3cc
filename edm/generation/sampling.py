"""Image generation from a trained denoiser: per-image seeds, batches, class labels, guidance, outputs.

Image j of a run has its own torch.Generator seeded with seeds[j] (mod 2³²). From it come, in
this order, the latent n_j ~ N(0, I) of the image's shape, its class label when labels are
random (randint over label_dim), and the solver's per-step noise (edm.samplers.randn_like
takes the list of generators). Neither the batch size nor the number of processes changes an
image; with the EDM schedule and a Heun/stochastic solver this is also how NVlabs' generate.py
draws its latents and labels (StackedRandomGenerator).

`generate` hands each batch to a writer of edm.generation.outputs (PNG files, or .npz parts merged
by `edm.outputs.finalize`), which also tells which images of a run already exist.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from ..progress import progress_bar
from ..core.samplers import SamplerConfig, sample
from ..core.schedules import Schedule

__all__ = [
    "ImageSpec",
    "Writer",
    "parse_seeds",
    "format_seeds",
    "plan_images",
    "shard",
    "chunks",
    "make_generators",
    "initial_noise",
    "draw_labels",
    "generate_batch",
    "generate",
]

logger = logging.getLogger(__name__)

SEED_MODULUS = 1 << 32


@dataclass(frozen=True)
class ImageSpec:
    """One image of a run: its position in the run, its seed and its class (None = random or unconditional)."""

    index: int
    seed: int
    label: int | None = None


# ----------------------------------------------------------------------------- seeds and plans


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """Seeds from '0-49999', '1,5,10-19', an int n (seeds 0..n−1 is *not* implied: n is one seed) or a list."""
    if isinstance(spec, bool):
        raise ValueError(f"seeds must be a range like '0-49999', a list or an integer, got {spec!r}")
    if isinstance(spec, int):
        parts: list[Any] = [spec]
    elif isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip()]
    else:
        parts = list(spec)
    seeds: list[int] = []
    for part in parts:
        if isinstance(part, str) and (m := _RANGE.match(part)):
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r} is empty: write it low-high, e.g. '0-49999'")
            seeds.extend(range(lo, hi + 1))
            continue
        try:
            seeds.append(int(part))
        except (TypeError, ValueError):
            raise ValueError(f"cannot read seed {part!r}: use integers and ranges like '0-9,20,30-39'") from None
    if not seeds:
        raise ValueError(f"no seeds in {spec!r}")
    if min(seeds) < 0:
        raise ValueError(f"seeds must be non-negative, got {min(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds contain duplicates; every image needs its own seed")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """Compact text of a seed list: [0, 1, 2, 5] -> '0-2,5' (the inverse of parse_seeds)."""
    out: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        out.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(out)


def plan_images(seeds: Sequence[int], labels: int | Sequence[int] | None, label_dim: int) -> list[ImageSpec]:
    """One ImageSpec per seed; image j gets labels[j mod len(labels)] (an int: all images that class;
    None: random classes for a conditional model, none for an unconditional one)."""
    if labels is not None and label_dim == 0:
        raise ValueError("labels were given, but the model is unconditional (label_dim = 0); drop the labels option")
    if labels is None:
        fixed: list[int | None] = [None]
    else:
        fixed = [labels] if isinstance(labels, int) else [int(c) for c in labels]
        if not fixed:
            raise ValueError("labels is an empty list; give class indices or leave labels unset for random classes")
        bad = [c for c in fixed if not 0 <= c < label_dim]
        if bad:
            raise ValueError(f"class labels {bad} are outside [0, {label_dim}) for this model")
    return [ImageSpec(j, int(s), fixed[j % len(fixed)]) for j, s in enumerate(seeds)]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items of process `rank` of `world_size`: items[rank], items[rank + W], ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return list(items[rank::world_size])


def chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive chunks of at most `size` items."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ----------------------------------------------------------------------------- noise, labels, guidance


def make_generators(seeds: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch.Generator per image, seeded with seed mod 2³²."""
    return [torch.Generator(device=device).manual_seed(int(s) % SEED_MODULUS) for s in seeds]


def initial_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """Latents [B, *shape]: image j's n_j ~ N(0, I) from its own generator."""
    return torch.stack([torch.randn(list(shape), generator=g, device=device).to(dtype) for g in generators])


def draw_labels(
    specs: Sequence[ImageSpec], generators: Sequence[torch.Generator], label_dim: int, device: torch.device | str
) -> Tensor:
    """Class index per image: the spec's, or (None) one randint(label_dim) from the image's generator."""
    out = []
    for spec, g in zip(specs, generators):
        if spec.label is None:
            out.append(torch.randint(label_dim, size=[1], generator=g, device=device))
        else:
            out.append(torch.tensor([spec.label], device=device))
    return torch.cat(out).long()


def generate_batch(
    denoiser: Callable[..., Tensor],
    specs: Sequence[ImageSpec],
    schedule: Schedule | str,
    settings: SamplerConfig,
    img_shape: Sequence[int],
    *,
    label_dim: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Images x(0) [B, C, H, W] for `specs` (one generator each) and their class indices (None if unconditional);
    `decode` turns a latent model's samples into uint8 pixels (edm.latent.VAE.decode)."""
    generators = make_generators([s.seed for s in specs], device)
    noise = initial_noise(generators, img_shape, dtype, device)
    labels = draw_labels(specs, generators, label_dim, device) if label_dim else None
    one_hot = None if labels is None else torch.nn.functional.one_hot(labels, label_dim).to(dtype)
    images = sample(denoiser, noise, schedule, class_labels=one_hot, generator=generators, progress=progress,
                    **settings.kwargs())
    bad = (~torch.isfinite(images.flatten(1)).all(1)).nonzero().flatten().tolist()  # one host read per batch
    if bad:
        seeds = ", ".join(str(specs[i].seed) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise ValueError(f"the model's samples hold NaN or Inf for {len(bad)} of {len(specs)} seeds ({seeds}), which "
                         "would be written as black pixels: its weights may be damaged (sample an earlier checkpoint, "
                         "or check this one) or the sampler unstable for it (another solver, more steps)")
    return (images if decode is None else decode(images)), labels


# ----------------------------------------------------------------------------- the loop


class Writer(Protocol):
    """Where generated images go (edm.outputs.PngWriter, PartWriter)."""

    def pending(self, specs: Sequence[ImageSpec]) -> list[ImageSpec]:
        """The specs whose images are not written yet."""

    def write(self, specs: Sequence[ImageSpec], images: Tensor, labels: Tensor | None) -> None:
        """Store images [B, C, H, W] in [−1, 1] (or uint8 pixels) of `specs` with their class indices."""


def generate(
    denoiser: Callable[..., Tensor],
    specs: Sequence[ImageSpec],
    schedule: Schedule | str,
    settings: SamplerConfig,
    writer: Writer,
    img_shape: Sequence[int],
    *,
    batch_size: int = 64,
    label_dim: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """Generate and write the images of `specs` that the writer does not have yet; returns how many were made."""
    todo = writer.pending(specs)
    if len(todo) < len(specs):
        logger.info("resuming: %d of %d images already written", len(specs) - len(todo), len(specs))
    bar = progress_bar(len(todo), "generating", "img") if progress else None
    try:
        for batch in chunks(todo, batch_size):
            with torch.no_grad():
                images, labels = generate_batch(
                    denoiser, batch, schedule, settings, img_shape, label_dim=label_dim, device=device, dtype=dtype,
                    decode=decode,
                )
            writer.write(batch, images, labels)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return len(todo)
