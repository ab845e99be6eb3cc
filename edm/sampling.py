"""Image generation from a trained denoiser: per-image seeds, batches, class labels, guidance, outputs.

Image j of a run has its own torch.Generator seeded with seeds[j] (mod 2³²). From it come, in
this order, the latent n_j ~ N(0, I) of the image's shape, its class label when labels are
random (randint over label_dim), and the solver's per-step noise (edm.samplers.randn_like
takes the list of generators). Neither the batch size nor the number of processes changes an
image; with the EDM schedule and a Heun/stochastic solver this is also how NVlabs' generate.py
draws its latents and labels (StackedRandomGenerator).

Outputs: one PNG per image (resumable by file), or npz/grid, whose images are stored as
part files (one per batch, parts/) and merged by `finalize` once every image exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_write
from .data import to_uint8 as pixels_to_uint8
from .samplers import SOLVERS, check_options, sample
from .schedules import Schedule, get as get_schedule

__all__ = [
    "SamplerSettings",
    "ModelInfo",
    "ImageSpec",
    "GuidedDenoiser",
    "AutocastDenoiser",
    "MIXED_PRECISION",
    "fast_denoiser",
    "parse_seeds",
    "format_seeds",
    "plan_images",
    "shard",
    "make_generators",
    "initial_noise",
    "generate_batch",
    "to_uint8",
    "PngWriter",
    "PartWriter",
    "make_writer",
    "write_json",
    "FORMATS",
    "generate",
    "finalize",
    "make_grid",
    "load_model",
]

logger = logging.getLogger(__name__)

SEED_MODULUS = 1 << 32
FORMATS = ("png", "npz", "grid")
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
PARTS_DIR = "parts"


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SamplerSettings:
    """Everything edm.sample needs besides the denoiser, noise and schedule."""

    solver: str = "heun"
    num_steps: int = 18
    discretization: str | None = None
    final_denoise: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid solvers are {sorted(SOLVERS)}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        check_options(self.solver, SOLVERS[self.solver], dict(self.options))  # unknown options fail before sampling


@dataclass(frozen=True)
class ModelInfo:
    """What generation needs to know about a loaded denoiser besides its weights."""

    img_shape: tuple[int, int, int] | None  # (C, H, W)
    label_dim: int = 0
    label_dropout: float = 0.0
    schedule: Schedule | None = None
    source: str = ""


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


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: D_w = D(x̂; σ, ∅) + w (D(x̂; σ, c) − D(x̂; σ, ∅)), ∅ = zero labels.

    w = 1 is the plain conditional denoiser; w = 0 the unconditional one. Both calls share one
    forward pass on a batch of twice the size.
    """

    def __init__(self, denoiser: Callable[..., Tensor], weight: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.weight = float(weight)

    def forward(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        if self.weight == 1.0:
            return self.denoiser(x_hat, sigma, class_labels)
        both = self.denoiser(
            torch.cat([x_hat, x_hat]), torch.cat([sigma, sigma]), torch.cat([torch.zeros_like(class_labels), class_labels])
        )
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + self.weight * (d_cond - d_uncond)


MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastDenoiser(nn.Module):
    """D(x̂; σ) with the network under torch.autocast(`dtype`); the result comes back in x̂'s dtype.

    The sampler state, σ and the preconditioning stay in x̂'s dtype; only autocast-eligible
    network ops (convolutions, matmuls, attention) run in bf16/fp16.
    """

    def __init__(self, denoiser: Callable[..., Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.dtype = dtype

    def forward(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        with torch.autocast(x_hat.device.type, dtype=self.dtype):
            out = self.denoiser(x_hat, sigma, class_labels)
        return out.to(x_hat.dtype)


def fast_denoiser(
    denoiser: nn.Module, mixed_precision: str = "no", compile: bool = False, channels_last: bool = False
) -> Callable[..., Tensor]:
    """The sampling fast path: `denoiser` under bf16/fp16 autocast (`mixed_precision`) and/or torch.compile.

    compile wraps the whole denoiser (network and preconditioning in one graph; the solver's
    arithmetic stays eager). A batch of another size compiles once more. channels_last
    converts the denoiser's weights to NHWC in place (convolutions then return NHWC).
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; valid values are {list(MIXED_PRECISION)}")
    if channels_last:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    dtype = MIXED_PRECISION[mixed_precision]
    fast: Callable[..., Tensor] = denoiser if dtype is None else AutocastDenoiser(denoiser, dtype)
    return torch.compile(fast) if compile else fast


def generate_batch(
    denoiser: Callable[..., Tensor],
    specs: Sequence[ImageSpec],
    schedule: Schedule | str,
    settings: SamplerSettings,
    img_shape: Sequence[int],
    *,
    label_dim: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Images x(0) [B, C, H, W] for `specs` (one generator each) and their class indices (None if unconditional)."""
    generators = make_generators([s.seed for s in specs], device)
    noise = initial_noise(generators, img_shape, dtype, device)
    labels = draw_labels(specs, generators, label_dim, device) if label_dim else None
    one_hot = None if labels is None else torch.nn.functional.one_hot(labels, label_dim).to(dtype)
    images = sample(
        denoiser, noise, schedule, num_steps=settings.num_steps, solver=settings.solver,
        class_labels=one_hot, generator=generators, discretization=settings.discretization,
        final_denoise=settings.final_denoise, progress=progress, **settings.options,
    )
    return images, labels


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C] numpy, pixels by edm.data.to_uint8."""
    return pixels_to_uint8(images.detach()).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- writers


def save_png(path: Path, image: np.ndarray, durable: bool = False) -> None:
    """Save a uint8 [H, W, C] array (C = 1 or 3) as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    atomic_write(path, lambda f: pil.save(f, format="PNG"), durable)


class PngWriter:
    """One PNG per image: out/<seed>.png, or out/<seed rounded down to 1000>/<seed>.png with subdirs."""

    def __init__(self, out_dir: str | Path, subdirs: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.subdirs = subdirs

    def path(self, seed: int) -> Path:
        folder = self.out_dir / f"{seed - seed % 1000:06d}" if self.subdirs else self.out_dir
        return folder / f"{seed:06d}.png"

    def pending(self, specs: Sequence[ImageSpec]) -> list[ImageSpec]:
        return [s for s in specs if not self.path(s.seed).exists()]

    def write(self, specs: Sequence[ImageSpec], images: np.ndarray, labels: Tensor | None) -> None:
        for spec, image in zip(specs, images):
            save_png(self.path(spec.seed), image)


class PartWriter:
    """One .npz part per batch in out/parts/ (keys images [B, H, W, C] uint8, seeds, labels; −1 = no label)."""

    def __init__(self, out_dir: str | Path, rank: int = 0) -> None:
        self.parts_dir = Path(out_dir) / PARTS_DIR
        self.rank = rank

    def done_seeds(self) -> set[int]:
        done: set[int] = set()
        for part in sorted(self.parts_dir.glob("*.npz")):
            with np.load(part) as data:
                done.update(int(s) for s in data["seeds"])
        return done

    def pending(self, specs: Sequence[ImageSpec]) -> list[ImageSpec]:
        done = self.done_seeds()
        return [s for s in specs if s.seed not in done]

    def write(self, specs: Sequence[ImageSpec], images: np.ndarray, labels: Tensor | None) -> None:
        seeds = np.array([s.seed for s in specs], dtype=np.int64)
        lab = np.full(len(specs), -1, dtype=np.int64) if labels is None else labels.cpu().numpy().astype(np.int64)
        path = self.parts_dir / f"part-{seeds[0]:06d}-{seeds[-1]:06d}-r{self.rank}.npz"
        atomic_write(path, lambda f: np.savez(f, images=images, seeds=seeds, labels=lab))


def make_writer(fmt: str, out_dir: str | Path, *, rank: int = 0, subdirs: bool = False) -> PngWriter | PartWriter:
    """The writer of output format 'png', 'npz' or 'grid'."""
    if fmt == "png":
        return PngWriter(out_dir, subdirs)
    if fmt in ("npz", "grid"):
        return PartWriter(out_dir, rank)
    raise ValueError(f"unknown output format {fmt!r}; valid formats are {list(FORMATS)}")


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


# ----------------------------------------------------------------------------- the loop


def generate(
    denoiser: Callable[..., Tensor],
    specs: Sequence[ImageSpec],
    schedule: Schedule | str,
    settings: SamplerSettings,
    writer: PngWriter | PartWriter,
    img_shape: Sequence[int],
    *,
    batch_size: int = 64,
    label_dim: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> int:
    """Generate and write the images of `specs` that the writer does not have yet; returns how many were made."""
    todo = writer.pending(specs)
    if len(todo) < len(specs):
        logger.info("resuming: %d of %d images already written", len(specs) - len(todo), len(specs))
    bar = _progress_bar(len(todo)) if progress else None
    try:
        for batch in chunks(todo, batch_size):
            with torch.no_grad():
                images, labels = generate_batch(
                    denoiser, batch, schedule, settings, img_shape, label_dim=label_dim, device=device, dtype=dtype
                )
            writer.write(batch, to_uint8(images), labels)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return len(todo)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="img")


def read_parts(out_dir: str | Path, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, C] uint8, labels [N]) of `seeds`, in that order, from out/parts/."""
    wanted = {s: j for j, s in enumerate(seeds)}
    images: list[np.ndarray | None] = [None] * len(seeds)
    labels = np.full(len(seeds), -1, dtype=np.int64)
    for part in sorted((Path(out_dir) / PARTS_DIR).glob("*.npz")):
        with np.load(part) as data:
            for seed, image, label in zip(data["seeds"], data["images"], data["labels"]):
                j = wanted.get(int(seed))
                if j is not None:
                    images[j], labels[j] = image, label
    missing = [s for s, img in zip(seeds, images) if img is None]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images (seeds {format_seeds(missing[:20])}...) have no part in {Path(out_dir) / PARTS_DIR}; "
            "run the sampler again to generate them"
        )
    return np.stack(images), labels  # type: ignore[arg-type]


def make_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] row by row into one [rows·H, cols·W, C] image (cols = ceil(√N) by default)."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), dtype=images.dtype)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def finalize(fmt: str, out_dir: str | Path, seeds: Sequence[int], *, grid_cols: int | None = None) -> Path:
    """Merge the parts into out/samples.npz (images, seeds, labels) or out/grid.png; png needs nothing."""
    out_dir = Path(out_dir)
    if fmt == "png":
        return out_dir
    images, labels = read_parts(out_dir, seeds)
    if fmt == "npz":
        path = out_dir / NPZ_NAME
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        atomic_write(path, lambda f: np.savez(f, images=images, seeds=seeds_arr, labels=labels))
        return path
    if fmt == "grid":
        path = out_dir / GRID_NAME
        save_png(path, make_grid(images, grid_cols), durable=True)
        return path
    raise ValueError(f"unknown output format {fmt!r}; valid formats are {list(FORMATS)}")


# ----------------------------------------------------------------------------- loading models


def load_model(
    path: str | Path,
    *,
    ema: bool = True,
    device: torch.device | str = "cpu",
    image_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """The denoiser (eval mode, on `device`) and its ModelInfo from an edm checkpoint (a .pt file, or a
    run folder: its latest checkpoint) or an NVlabs .pkl (through edm.nvlabs.load_nvlabs).

    The schedule is the checkpoint's state["schedule"]; an NVlabs model gets the schedule of its
    precond kind for vp/ve and the EDM schedule otherwise. `image_shape` (C, H, W) overrides the
    shape read from the model.
    """
    path = Path(path)
    if path.is_dir():
        from .checkpoint import find_latest

        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"run folder {str(path)!r} has no checkpoint-*.pt: pass checkpoint=RUN_DIR/<file>.pt")
        path = latest
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: pass checkpoint=RUN_DIR/<file>.pt (or an NVlabs .pkl)")
    denoiser, info = _load_nvlabs(path) if path.suffix == ".pkl" else _load_edm(path, ema)
    if image_shape is not None:
        info = replace(info, img_shape=_check_shape(image_shape))
    elif info.img_shape is None:
        raise ValueError(f"cannot tell the image shape of {str(path)!r}: set image_shape=[C,H,W] in the config")
    return denoiser.to(device).eval(), info


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or min(int(v) for v in shape) < 1:
        raise ValueError(f"image_shape must be [C, H, W] with positive sizes, got {list(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _load_edm(path: Path, ema: bool) -> tuple[nn.Module, ModelInfo]:
    """An edm checkpoint through edm.checkpoint.load_denoiser; shape and labels from its network spec."""
    from .checkpoint import load_denoiser

    denoiser, state = load_denoiser(path, ema=ema, map_location="cpu")
    spec = state["denoiser"]["network"]
    channels, resolution = spec.get("in_channels"), spec.get("img_resolution")
    shape = (int(channels), int(resolution), int(resolution)) if channels and resolution else _attr_shape(denoiser)
    sched_spec = {k: v for k, v in (state.get("schedule") or {"name": denoiser.kind}).items() if v is not None}
    schedule = get_schedule(sched_spec.pop("name"), **sched_spec)
    label_dim = spec.get("label_dim")
    info = ModelInfo(
        img_shape=shape, label_dim=int(label_dim if label_dim is not None else _find_attr(denoiser, "label_dim", 0)),
        label_dropout=float(spec.get("label_dropout") or _find_attr(denoiser, "label_dropout", 0.0)),
        schedule=schedule, source=str(path),
    )
    return denoiser, info


def _load_nvlabs(path: Path) -> tuple[nn.Module, ModelInfo]:
    """An NVlabs pickle through edm.nvlabs.load_nvlabs; schedule VP/VE for those precond kinds, else EDM."""
    try:
        from .nvlabs import load_nvlabs
    except ImportError as err:
        raise ImportError(f"loading NVlabs pickle {str(path)!r} needs edm.nvlabs.load_nvlabs, which is unavailable: {err}") from err
    denoiser = load_nvlabs(str(path))
    kind = getattr(denoiser, "kind", "edm")
    if kind == "vp":
        schedule = get_schedule("vp", beta_d=denoiser.beta_d, beta_min=denoiser.beta_min)
    else:
        schedule = get_schedule("ve" if kind == "ve" else "edm")
    info = ModelInfo(
        img_shape=_attr_shape(denoiser), label_dim=int(_find_attr(denoiser, "label_dim", 0)),
        label_dropout=float(_find_attr(denoiser, "label_dropout", 0.0)), schedule=schedule, source=str(path),
    )
    return denoiser, info


def _find_attr(module: nn.Module, name: str, default: Any) -> Any:
    """module.name, else module.net.name, else default."""
    for obj in (module, getattr(module, "net", None)):
        if obj is not None and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    return default


def _attr_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from img_resolution and img_channels/in_channels (else the first layer with in_channels)."""
    resolution = _find_attr(module, "img_resolution", None)
    channels = _find_attr(module, "img_channels", None) or _find_attr(module, "in_channels", None)
    if channels is None:
        channels = next((m.in_channels for m in module.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
    if resolution is None or channels is None:
        return None
    return int(channels), int(resolution), int(resolution)
