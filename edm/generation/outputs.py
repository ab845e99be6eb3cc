"""Output writers: where generated images go, atomically, and how a run's outputs are merged.

- PngWriter: one PNG per image, named by its seed (a run resumes by file).
- PartWriter: one .npz part per batch in out/parts/; `finalize` merges the parts into
  out/samples.npz or out/grid.png once every image exists.
- make_grid / save_grid: the one grid writer (training's sample grids and edm-sample's grid):
  tiles row by row, each pixel a scale x scale block, `padding` pixels of `pad_value` around tiles.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from ..files import atomic_write, png_is_whole
from ..choices import check_choice
from ..data import read_image, to_uint8 as pixels_to_uint8
from .sampling import ImageSpec, format_seeds

__all__ = [
    "FORMATS",
    "to_uint8",
    "save_png",
    "make_grid",
    "save_grid",
    "grid_image",
    "grid_scale",
    "PngWriter",
    "PartWriter",
    "make_writer",
    "read_part",
    "read_parts",
    "finalize",
]

FORMATS = ("png", "npz", "grid")
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
PARTS_DIR = "parts"


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C] numpy, pixels by edm.data.to_uint8."""
    return pixels_to_uint8(images.detach()).permute(0, 2, 3, 1).cpu().numpy()


def save_png(path: Path, image: np.ndarray, durable: bool = False) -> None:
    """Save a uint8 [H, W, C] array (C = 1 or 3) as PNG, atomically."""
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    atomic_write(path, lambda f: pil.save(f, format="PNG"), durable)


def make_grid(
    images: np.ndarray, cols: int | None = None, *, scale: int = 1, padding: int = 0, pad_value: int = 0
) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] row by row into one image (cols = ceil(√N) by default, at most N):
    each pixel becomes a scale x scale block and `padding` pixels of `pad_value` surround every tile."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=images.dtype)
    for k, image in enumerate(images):
        row, col = divmod(k, cols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


GRID_TILE_PX = 64  # a grid's tiles are upscaled to at least this many pixels, so 8x8 images stay readable
GRID_PADDING, GRID_PAD_VALUE = 2, 128  # gray borders between the tiles


def grid_scale(resolution: int, scale: int | None = None) -> int:
    """Pixel upscaling of a grid: `scale`, or ceil(GRID_TILE_PX / resolution)."""
    return scale or max(1, math.ceil(GRID_TILE_PX / resolution))


def grid_image(images: np.ndarray, cols: int | None = None, scale: int | None = None) -> np.ndarray:
    """The project's one sample grid (training's and edm-sample's): uint8 [N, H, W, C] tiles upscaled
    by grid_scale, GRID_PADDING pixels of gray between them."""
    return make_grid(images, cols, scale=grid_scale(images.shape[1], scale), padding=GRID_PADDING,
                     pad_value=GRID_PAD_VALUE)


def save_grid(path: str | Path, images: Tensor, cols: int | None = None, scale: int | None = None) -> Path:
    """Save images [N, C, H, W] in [−1, 1] as one PNG grid (grid_image), atomically and durably."""
    path = Path(path)
    save_png(path, grid_image(to_uint8(images), cols, scale), durable=True)
    return path


class PngWriter:
    """One PNG per image: out/<seed>.png, or out/<seed rounded down to 1000>/<seed>.png with subdirs."""

    def __init__(self, out_dir: str | Path, subdirs: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.subdirs = subdirs

    def path(self, seed: int) -> Path:
        folder = self.out_dir / f"{seed - seed % 1000:06d}" if self.subdirs else self.out_dir
        return folder / f"{seed:06d}.png"

    def pending(self, specs: Sequence[ImageSpec]) -> list[ImageSpec]:
        """The specs whose PNG is missing, empty or cut short (our writes are atomic: such a file is no image we
        made)."""
        return [s for s in specs if not png_is_whole(self.path(s.seed))]

    def write(self, specs: Sequence[ImageSpec], images: Tensor, labels: Tensor | None) -> None:
        """Images [B, C, H, W] in [−1, 1] of `specs`, one file each."""
        for spec, image in zip(specs, to_uint8(images)):
            save_png(self.path(spec.seed), image)

    def read(self, seeds: Sequence[int]) -> tuple[np.ndarray, None]:
        """(uint8 images [N, H, W, C] of `seeds`, in that order; None: PNGs hold no labels), other files of the
        folder left out."""
        return np.stack([read_image(self.path(seed)) for seed in seeds]), None

    def held(self) -> list[int]:
        """The seeds of every image in the folder (this run's and earlier runs' of the same settings), sorted."""
        pattern = "[0-9][0-9][0-9][0-9][0-9][0-9]*/*.png" if self.subdirs else "*.png"
        return sorted(int(p.stem) for p in self.out_dir.glob(pattern) if p.stem.isdigit() and self.path(int(p.stem)) == p)


class PartWriter:
    """One .npz part per batch in out/parts/: images [B, H, W, C] uint8, seeds, and labels (class indices)
    only for a class-conditional model; unconditional parts have no labels key."""

    def __init__(self, out_dir: str | Path, rank: int = 0) -> None:
        self.parts_dir = Path(out_dir) / PARTS_DIR
        self.rank = rank

    def read(self, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """read_parts of `seeds` (the parts of other seeds left out)."""
        return read_parts(self.parts_dir.parent, seeds)

    def done_seeds(self) -> set[int]:
        return {int(s) for part in sorted(self.parts_dir.glob("*.npz")) for s in read_part(part, ("seeds",))["seeds"]}

    def pending(self, specs: Sequence[ImageSpec]) -> list[ImageSpec]:
        done = self.done_seeds()
        return [s for s in specs if s.seed not in done]

    def write(self, specs: Sequence[ImageSpec], images: Tensor, labels: Tensor | None) -> None:
        """Images [B, C, H, W] in [−1, 1] of `specs` and their class indices (None: unconditional) as one part."""
        pixels = to_uint8(images)
        seeds = np.array([s.seed for s in specs], dtype=np.int64)
        arrays = {"images": pixels, "seeds": seeds}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy().astype(np.int64)
        path = self.parts_dir / f"part-{seeds[0]:06d}-{seeds[-1]:06d}-r{self.rank}.npz"
        atomic_write(path, lambda f: np.savez(f, **arrays))


def make_writer(fmt: str, out_dir: str | Path, *, rank: int = 0, subdirs: bool = False) -> PngWriter | PartWriter:
    """The writer of output format 'png', 'npz' or 'grid' (FORMATS)."""
    check_choice(FORMATS, fmt, "format")
    return PngWriter(out_dir, subdirs) if fmt == "png" else PartWriter(out_dir, rank)


def read_part(path: Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays `keys` (None: all; images, seeds, labels when conditional) of one part file, each read whole; a part
    that is not a readable .npz (cut short, damaged: our writes are atomic, so something else changed it) or holds
    no images and seeds is a ValueError naming it."""
    import zipfile

    fix = "delete it and rerun the same command, which makes its images again"
    try:
        with np.load(path) as data:
            names = data.files
            arrays = {key: data[key] for key in (names if keys is None else keys) if key in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable part ({type(err).__name__}: {err}): {fix}") from None
    if not {"images", "seeds"} <= set(names):
        raise ValueError(f"{path} is not a part (it holds {', '.join(sorted(names)) or 'no arrays'}, not images and "
                         f"seeds): {fix}")
    return arrays


def read_parts(out_dir: str | Path, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(images [N, H, W, C] uint8, class labels [N] or None for unconditional images) of `seeds`,
    in that order, from out/parts/."""
    wanted = {s: j for j, s in enumerate(seeds)}
    images: list[np.ndarray | None] = [None] * len(seeds)
    labels: list[int | None] = [None] * len(seeds)
    for part in sorted((Path(out_dir) / PARTS_DIR).glob("*.npz")):
        data = read_part(part)
        part_labels = data["labels"].tolist() if "labels" in data else [None] * len(data["seeds"])
        for seed, image, label in zip(data["seeds"], data["images"], part_labels):
            j = wanted.get(int(seed))
            if j is not None:
                images[j], labels[j] = image, label
    missing = [s for s, img in zip(seeds, images) if img is None]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images (seeds {format_seeds(missing[:20])}...) have no part in {Path(out_dir) / PARTS_DIR}; "
            "run the sampler again to generate them"
        )
    unlabelled = sum(label is None for label in labels)
    if 0 < unlabelled < len(labels):
        raise ValueError(
            f"{Path(out_dir) / PARTS_DIR} mixes parts with and without class labels ({unlabelled} of {len(labels)} "
            "images have none): they come from different models; sample into an empty out folder"
        )
    return np.stack(images), (None if unlabelled else np.asarray(labels, dtype=np.int64))  # type: ignore[arg-type]


def finalize(fmt: str, out_dir: str | Path, seeds: Sequence[int], *, grid_cols: int | None = None,
             grid_scale: int | None = None) -> Path:
    """Merge the parts into out/samples.npz (images, seeds, and labels for a class-conditional model)
    or out/grid.png; png needs nothing."""
    out_dir = Path(out_dir)
    if fmt == "png":
        return out_dir
    images, labels = read_parts(out_dir, seeds)
    if fmt == "npz":
        path = out_dir / NPZ_NAME
        seeds_arr = np.asarray(seeds, dtype=np.int64)
        arrays = {"images": images, "seeds": seeds_arr} | ({} if labels is None else {"labels": labels})
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path
    check_choice(FORMATS, fmt, "format")
    path = out_dir / GRID_NAME
    save_png(path, grid_image(images, grid_cols, grid_scale), durable=True)
    return path
