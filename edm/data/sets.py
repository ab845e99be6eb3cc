"""The data sets: an embedded default set, MNIST / Fashion-MNIST / CIFAR-10 from a local root, and
image folders or zips. Each yields (image, label, index): image uint8 [C, H, W] (0..255), label a
float one-hot vector [label_dim] (empty when unconditional), index the item's position. Nothing is
ever downloaded: a missing root raises DatasetNotFoundError saying where the files must be and how
to get them. edm.data.registry names them for configs.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..choices import check_choice
from ..hardware import RunWideLog
from ..latent import LATENTS_NAME
from .pixels import eight_bit

__all__ = [
    "DatasetNotFoundError", "BadImagesError", "NoLabelsError", "ImageDataset", "TensorImageDataset", "ImageFolderDataset", "ImageSource",
    "XFlip", "Subset", "load_digits", "load_mnist", "load_cifar10", "read_idx", "resize_image", "resize_images",
    "RESAMPLE_FILTERS", "DEFAULT_RESAMPLE",
    "FASHION_MNIST_DEBIAN_ROOT", "IMAGE_EXTENSIONS", "LABELS_NAME", "image_files", "json_labels", "contents_key",
    "root_contents_key", "resolved_root", "is_hidden",
]

logger = logging.getLogger(__name__)
run_logger = RunWideLog(logger)  # what every process would say alike: once per run

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_hidden(name: str) -> bool:
    """Whether a relative POSIX name is hidden: a part starting with "." (.ipynb_checkpoints/, macOS's ._x.png
    resource forks) or macOS's __MACOSX/ folder of a zip. Copies and metadata, never images of the data set."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _files(folder: Path) -> list[Path]:
    """The files under `folder`, recursively, through linked folders too (as NVlabs' dataset_tool.py's glob goes;
    each real folder once, so a link to a folder above it is no loop), dangling symbolic links included (so that
    reading one names it). Paths are below `folder`, as the links make them."""
    found, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        for name in names:
            path = Path(top) / name
            if path.is_file() or path.is_symlink() and not path.exists():
                found.append(path)
    return found


def image_files(folder: str | Path) -> list[Path]:
    """The image files (by IMAGE_EXTENSIONS, any case) under `folder`, recursively, in sorted order; hidden ones
    (is_hidden) left out."""
    folder = Path(folder)
    return sorted(p for p in _files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS
                  and not is_hidden(p.relative_to(folder).as_posix()))


def contents_key(path: str | Path, files: list[Path] | None = None) -> str:
    """A file's or folder's contents as a key, without reading them: a file's size and modification time; a
    folder's number of files and a hash of each one's relative name, size and modification time (`files`, or every
    file under it), so that a file added, removed or replaced is another key."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    files = sorted(_files(path)) if files is None and path.is_dir() else files or []
    listing = hashlib.sha256()
    for file in files:
        stat = file.stat() if file.exists() else file.lstat()  # a dangling link: the link itself
        listing.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{len(files)}:{listing.hexdigest()[:12]}"


def resolved_root(root: str | Path | None) -> str | None:
    """A data set's root as the absolute path it names from here (~ expanded), None for none: what records hold, so
    that the same folder compares equal from any directory and a relative path naming another folder does not."""
    return str(Path(root).expanduser().resolve()) if root else None


def root_contents_key(root: str | Path) -> str:
    """contents_key of a data set's root as its loaders read it: a file (a zip) itself; a folder's image files and
    its dataset.json, or, for a folder without image files (MNIST's or CIFAR-10's archives), every file in it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return contents_key(root)
    files = image_files(root)
    labels = root / LABELS_NAME
    return contents_key(root, (files + [labels] if labels.is_file() else files) if files else None)


# PIL's resampling filters, by their dataset.resample names; lanczos (Lanczos-3, antialiased when shrinking) is the
# one NVlabs dataset_tool.py resizes with, so a resized data set holds the reference's pixels.
RESAMPLE_FILTERS = ("lanczos", "bicubic", "bilinear", "box", "nearest")
DEFAULT_RESAMPLE = "lanczos"


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where the config says; the message says how to get them."""


# ----------------------------------------------------------------------------- data sets


class ImageDataset(Dataset):
    """Base: uint8 images [C, H, W], `num_classes` classes, one-hot labels when `cond`."""

    resolution: int
    channels: int
    num_classes: int
    cond: bool = False
    latent: dict | None = None  # a latent data set: what it was encoded from (edm.data.latents); None for pixels

    @property
    def label_dim(self) -> int:
        """Length of the one-hot label vector: num_classes when class-conditional, else 0."""
        return self.num_classes if self.cond else 0

    def label_of(self, index: int) -> int:
        """The class of item `index` (0 without classes), without reading its pixels."""
        return int(self.labels[index]) if self.num_classes else 0

    def one_hot(self, label: int) -> Tensor:
        """One-hot float label [label_dim] (empty when unconditional)."""
        out = torch.zeros(self.label_dim)
        if self.cond:
            out[label] = 1
        return out


class TensorImageDataset(ImageDataset):
    """An in-memory data set: images uint8 [N, C, H, W], labels int64 [N]."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, cond: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be uint8 [N, C, H, H], got {images.dtype} {list(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
        if cond and num_classes < 1:
            raise NoLabelsError("dataset.cond=true needs a data set with class labels")
        self.images, self.labels = images, labels.long()
        self.num_classes, self.cond = int(num_classes), bool(cond)
        self.channels, self.resolution = int(images.shape[1]), int(images.shape[2])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.images[index], self.one_hot(int(self.labels[index])), index


class BadImagesError(ValueError):
    """Image files of a folder data set that cannot be read or do not fit; the message lists them by path."""


class NoLabelsError(ValueError):
    """dataset.cond=true on a data set without class labels."""


_GRAY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N")
# 32-bit pixels (PIL modes I and F) have no fixed scale to 8 bits (0..65535? 0..1?): PIL's convert clips them to
# 0..255, which turns a 16-bit ramp white and a 0..1 float image black, so a folder refuses them.
_UNSCALED_MODES = ("I", "F")


LABELS_NAME = "dataset.json"  # NVlabs dataset_tool.py: {"labels": [[relative path, class], ...]} (or null)


class ImageSource:
    """The image files (by `extensions`) of a folder or of a zip archive (NVlabs dataset_tool.py's output), by
    their relative POSIX names in sorted order; hidden ones (is_hidden) are left out, in `hidden`, and a dangling
    symbolic link is listed (so that reading it names it). A zip is read member by member (never extracted, never
    held in memory); each process opens it on first use, so DataLoader workers get their own handle."""

    def __init__(self, root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        self.is_zip = self.root.is_file()
        self._zip: tuple[int, Any] | None = None
        if self.is_zip:
            import zipfile

            try:
                with zipfile.ZipFile(self.root) as z:
                    members = z.namelist()
            except (OSError, zipfile.BadZipFile) as err:
                raise DatasetNotFoundError(f"{self.root} is not a readable zip archive ({err})") from None
        else:
            members = [p.relative_to(self.root).as_posix() for p in _files(self.root)]
        self.all_names = sorted(members)
        images = [n for n in self.all_names if Path(n).suffix.lower() in extensions]
        self.names = [n for n in images if not is_hidden(n)]
        self.hidden = [n for n in images if is_hidden(n)]

    def where(self, name: str) -> str:
        """The file's path for messages: FOLDER/NAME or ARCHIVE.zip:NAME."""
        return f"{self.root}:{name}" if self.is_zip else str(self.root / name)

    def open(self, name: str) -> BinaryIO:
        if not self.is_zip:
            return open(self.root / name, "rb")
        if self._zip is None or self._zip[0] != os.getpid():
            import zipfile

            self._zip = (os.getpid(), zipfile.ZipFile(self.root))
        return self._zip[1].open(name)

    def __getstate__(self) -> dict:  # a worker process opens the archive itself
        return {**self.__dict__, "_zip": None}


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _header(source: ImageSource, name: str) -> tuple[str, tuple[int, int], int]:
    """(mode, (width, height), least alpha) of an image file: the header's, decoding the pixels only of an image
    with transparency (an alpha band, or a transparent colour in its info), whose least alpha it reads; 255 for
    the others."""
    from PIL import Image

    with source.open(name) as f, Image.open(f) as im:
        if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
            return im.mode, im.size, 255
        if im.mode.startswith("I;16"):  # one transparent 16-bit value: PIL's convert clips it and the pixels to 8 bits
            return im.mode, im.size, 0 if (np.asarray(im) == im.info["transparency"]).any() else 255
        alpha = (im if im.mode in ("RGBA", "LA") else im.convert("RGBA")).getchannel("A")
        return im.mode, im.size, int(alpha.getextrema()[0])


def json_labels(source: ImageSource, files: list[str]) -> dict[str, int] | None:
    """{name: class} from the source's dataset.json ({"labels": [[name, class], ...]}, as NVlabs' dataset_tool.py
    writes it); None without one (or with "labels": null). Every file of `files` must have a label."""
    if LABELS_NAME not in source.all_names:
        return None
    where = source.where(LABELS_NAME)
    try:
        with source.open(LABELS_NAME) as f:
            content = json.load(f)
        entries = content["labels"]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{where} is not a readable {{\"labels\": [[name, class], ...]}} file ({type(err).__name__}: "
                         f"{str(err)[:200]}); \"labels\": null says there are none") from None
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: \"labels\" must be a list of [name, class] pairs, not a {type(entries).__name__}")
    labels = {}
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)):
            raise ValueError(f"{where}: the entry {str(entry)[:100]} is not [name, class] with a whole-number class")
        if labels.setdefault(str(entry[0]), entry[1]) != entry[1]:
            raise ValueError(f"{where} labels {source.where(str(entry[0]))} twice, as class {labels[str(entry[0])]} and "
                             f"class {entry[1]}: which one is meant?")
    missing = [name for name in files if name not in labels]
    if missing:
        raise ValueError(f"{where} has no label for {len(missing)} image(s), e.g. {source.where(missing[0])}")
    if min(labels.values()) < 0:
        raise ValueError(f"{where} has negative class labels")
    strays = sorted(set(labels) - set(source.all_names))
    if strays:
        run_logger.warning("%s labels %d name(s) that are no file there, e.g. %s: are the labels of these images?",
                           where, len(strays), strays[0])
    return labels


class ImageFolderDataset(ImageDataset):
    """Image files under `root`, a folder or a zip archive (NVlabs dataset_tool.py's output).

    Labels: a dataset.json at the top ({"labels": [[name, class], ...]}, as dataset_tool.py
    writes it) gives them, and wins over folders; otherwise class subfolders (root/<class>/...)
    become labels 0..K−1 by sorted name; otherwise there are none. Images are RGB if any has colour, else grayscale;
    with `resolution` they are center-cropped and resized.

    Every file's header is read when the data set is made: files that cannot be opened and,
    without `resolution`, files of another size than most of them have are listed by path in a
    BadImagesError, or left out with a warning when `skip_bad` is set.
    """

    def __init__(
        self, root: str | Path, resolution: int | None = None, cond: bool = False, skip_bad: bool = False,
        resample: str = DEFAULT_RESAMPLE,
    ) -> None:
        check_choice(RESAMPLE_FILTERS, resample, "dataset.resample")
        self.root = Path(root)
        self.source = ImageSource(self.root)
        if not self.source.names:
            if LATENTS_NAME in self.source.all_names:  # edm-encode's output
                raise DatasetNotFoundError(f"{self.root} holds VAE latents (edm-encode's {LATENTS_NAME}), not image files: "
                                           f"read it with dataset=latent dataset.root={self.root}")
            if self.source.hidden:  # images there, but all of them named as copies or metadata
                raise DatasetNotFoundError(
                    f"{self.root}: its {len(self.source.hidden)} image file(s) are all hidden (a name or folder starting "
                    f"with '.', or __MACOSX), e.g. {self.source.where(self.source.hidden[0])}, and a data set leaves "
                    "hidden files out: rename them (or the folder) without the leading '.'")
            raise DatasetNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}; point dataset.root at a folder "
                "or zip of images, optionally one subfolder per class or a dataset.json with labels"
            )
        if self.source.hidden:
            run_logger.warning("%s: leaving out %d hidden image file(s) (a name or folder starting with '.', or "
                               "__MACOSX), e.g. %s", self.root, len(self.source.hidden), self.source.where(self.source.hidden[0]))
        self.files = self._scan(self.source.names, resolution, skip_bad)
        labelled = json_labels(self.source, self.files)
        if labelled is not None:
            self.labels, self.num_classes = [labelled[name] for name in self.files], max(labelled.values()) + 1
            self.classes = [str(c) for c in range(self.num_classes)]
            unused = self.num_classes - len(set(self.labels))
            if cond and unused:
                run_logger.warning("%s: classes 0..%d make %d label inputs, of which %d no image has",
                                   self.source.where(LABELS_NAME), self.num_classes - 1, self.num_classes, unused)
        else:
            self._folder_labels()
        self.cond = bool(cond)
        if cond and not self.num_classes:
            raise NoLabelsError(f"dataset.cond=true needs class labels: a {LABELS_NAME} or class subfolders in {self.root}")
        self.channels = 1 if self.mode == "L" else 3
        self._resize = resolution is not None
        self.resample = resample

    def _folder_labels(self) -> None:
        top = [tuple(name.split("/")) for name in self.files]
        classes = sorted({parts[0] for parts in top if len(parts) > 1})
        if classes and any(len(parts) == 1 for parts in top):
            raise ValueError(f"{self.root} mixes images and class subfolders; put every image in a class subfolder")
        self.classes = classes
        self.labels = [classes.index(parts[0]) if classes else 0 for parts in top]
        self.num_classes = len(classes)

    def _scan(self, files: list[str], resolution: int | None, skip_bad: bool) -> list[str]:
        """The usable files; without `resolution`, sets it from the size most of the readable images have (the
        others are bad), and the mode: RGB if any usable image has colour (gray ones are then repeated over three
        channels, losing nothing), else L."""
        bad: list[str] = []
        headers: dict[str, tuple[str, tuple[int, int]]] = {}
        for name in files:
            try:
                mode, size, alpha = _header(self.source, name)
            except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
                bad.append(f"{self.source.where(name)}: unreadable ({type(err).__name__}: {err})")
                continue
            if mode in _UNSCALED_MODES:
                bad.append(f"{self.source.where(name)}: 32-bit {'float' if mode == 'F' else 'integer'} pixels, whose "
                           "scale to 8 bits is unknown (save it with 8 or 16 bits)")
            elif alpha < 255:
                bad.append(f"{self.source.where(name)}: transparent pixels (alpha down to {alpha} of 255), whose colour "
                           "is not part of the picture (composite it onto a background, or drop the alpha)")
            else:
                headers[name] = mode, size
        sizes = collections.Counter(size for _, size in headers.values())
        common, count = sizes.most_common(1)[0] if sizes else ((0, 0), 0)  # the first of equally common sizes
        if resolution is None and headers and common[0] != common[1]:
            raise ValueError(f"{count} of the {len(headers)} readable images under {self.root} are {common[0]}x{common[1]}, "
                             "not square; set dataset.resolution to crop and resize")
        good: list[str] = []
        for name, (_, size) in headers.items():
            if resolution is None and size != common:
                bad.append(f"{self.source.where(name)}: {size[0]}x{size[1]}, but {count} of the {len(headers)} readable "
                           f"images are {common[0]}x{common[1]} (set dataset.resolution to resize all images)")
            else:
                good.append(name)
        colour = any(headers[name][0] not in _GRAY_MODES for name in good)
        if bad:
            listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            if not skip_bad or not good:
                raise BadImagesError(
                    f"{len(bad)} of {len(files)} image files under {self.root} cannot be used:\n  {listing}\n"
                    "Fix or remove them, or set dataset.skip_bad=true to train without them."
                )
            run_logger.warning("dataset.skip_bad: leaving out %d of %d image files under %s:\n  %s",
                               len(bad), len(files), self.root, listing)
        self.mode = "RGB" if colour else "L"
        self.resolution = int(resolution or common[0])
        return good

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, name: str):
        from PIL import Image

        path = self.source.where(name)
        try:
            with self.source.open(name) as f, Image.open(f) as im:
                return self._pixels(path, im)
        except BadImagesError:
            raise
        except Exception as err:  # a file whose header read but whose pixels do not (truncated, corrupt)
            raise BadImagesError(
                f"{path}: cannot read its pixels ({type(err).__name__}: {err}); its header reads, so the scan before "
                "training (and dataset.skip_bad) could not see it: fix or remove the file, then rerun (with resume=true "
                "where the run has a checkpoint)"
            ) from None

    def _pixels(self, path: str, im) -> np.ndarray:
        """uint8 [H, W] or [H, W, 3] of an open image: converted to the data set's mode, cropped and resized."""
        im = eight_bit(im).convert(self.mode)
        if self._resize:
            im = resize_image(im, self.resolution, self.resample)
        elif im.size != (self.resolution, self.resolution):
            raise BadImagesError(
                f"{path} is {im.size[0]}x{im.size[1]} but the data set's images are {self.resolution}x{self.resolution}; "
                "set dataset.resolution to resize all images"
            )
        return np.asarray(im, dtype=np.uint8).copy()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        array = self._load(self.files[index])
        image = torch.from_numpy(array).reshape(self.resolution, self.resolution, self.channels).permute(2, 0, 1)
        return image.contiguous(), self.one_hot(self.labels[index]), index


class XFlip(ImageDataset):
    """Doubles a data set with mirrored copies: item i + N is item i flipped left-right (EDM's xflip).
    Deterministic, so data order stays a function of (seed, epoch)."""

    def __init__(self, base: ImageDataset) -> None:
        self.base = base
        self.resolution, self.channels, self.latent = base.resolution, base.channels, base.latent
        self.num_classes, self.cond = base.num_classes, base.cond

    def __len__(self) -> int:
        return 2 * len(self.base)

    def label_of(self, index: int) -> int:
        return self.base.label_of(index % len(self.base))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        n = len(self.base)
        image, label, _ = self.base[index % n]
        return (image.flip(-1) if index >= n else image), label, index


class Subset(ImageDataset):
    """The first `size` items of a data set (dataset.max_size)."""

    def __init__(self, base: ImageDataset, size: int) -> None:
        self.base, self.size = base, min(int(size), len(base))
        self.resolution, self.channels, self.latent = base.resolution, base.channels, base.latent
        self.num_classes, self.cond = base.num_classes, base.cond

    def __len__(self) -> int:
        return self.size

    def label_of(self, index: int) -> int:
        return self.base.label_of(index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.base[index]


# ----------------------------------------------------------------------------- loaders


def resize_image(image, resolution: int, resample: str = DEFAULT_RESAMPLE):
    """A PIL image center-cropped to a square (side min(W, H)) and resized to resolution² with PIL's `resample`
    filter, as dataset_tool.py's center-crop (and, for square images, its scale) does."""
    from PIL import Image

    check_choice(RESAMPLE_FILTERS, resample, "dataset.resample")
    side = min(image.size)
    if image.size != (side, side):
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), getattr(Image.Resampling, resample.upper()))


def resize_images(images: Tensor, resolution: int | None, resample: str = DEFAULT_RESAMPLE) -> Tensor:
    """uint8 [N, C, H, H] -> uint8 [N, C, R, R], each image through resize_image; None (or R = H) keeps them."""
    check_choice(RESAMPLE_FILTERS, resample, "dataset.resample")
    if resolution is None or resolution == images.shape[-1]:
        return images
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).numpy()
    channels = images.shape[1]
    out = np.stack([
        np.asarray(resize_image(Image.fromarray(a[..., 0] if channels == 1 else a), resolution, resample), dtype=np.uint8)
        for a in arrays
    ])
    return torch.from_numpy(out.reshape(len(arrays), resolution, resolution, channels)).permute(0, 3, 1, 2).contiguous()


def load_digits(resolution: int | None = None, cond: bool = False, resample: str = DEFAULT_RESAMPLE) -> TensorImageDataset:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, values 0..16, 10 classes); no download. Read from
    the wheel's digits.csv.gz (one image a row: 64 pixels, then its label) without importing scikit-learn (1.4 s)."""
    rows = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float64)
    images = torch.from_numpy(np.rint(rows[:, :64].reshape(-1, 1, 8, 8) * (255.0 / 16.0))).to(torch.uint8)
    labels = torch.from_numpy(rows[:, 64].astype(np.int64))
    return TensorImageDataset(resize_images(images, resolution, resample), labels, 10, cond)


def _digits_csv() -> Path:
    """sklearn/datasets/data/digits.csv.gz of the installed scikit-learn (find_spec does not import the package)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DatasetNotFoundError(f"dataset=digits reads scikit-learn's bundled digits.csv.gz, not found "
                                   f"({path or 'scikit-learn is not installed'}): pip install scikit-learn")
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed if the name ends with .gz) as a uint8 array."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a .gz cut short, or not gzip at all
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): get the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (or its header is cut short)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist_help(root: str | None, fashion: bool) -> str:
    name, cls = ("Fashion-MNIST", "FashionMNIST") if fashion else ("MNIST", "MNIST")
    where = (
        f"{name} needs train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] either directly in "
        f"dataset.root or in dataset.root/{cls}/raw (torchvision's layout); dataset.root is {'not set' if root is None else repr(root)}. "
    )
    get = f"Get them with torchvision on a machine with internet: torchvision.datasets.{cls}('<root>', download=True)"
    if fashion:
        get = (
            f"On Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in {FASHION_MNIST_DEBIAN_ROOT} "
            f"(dataset.root={FASHION_MNIST_DEBIAN_ROOT}). " + get
        )
    return where + get + "."


def load_mnist(
    root: str | Path | None, fashion: bool = False, resolution: int | None = None, cond: bool = False,
    resample: str = DEFAULT_RESAMPLE,
) -> TensorImageDataset:
    """MNIST or Fashion-MNIST training set (60000 images, 28x28, 10 classes) from local files.

    Reads the raw IDX files (.gz or not) from root itself (e.g. the Debian package
    dataset-fashion-mnist, or the files as published) or from torchvision's root/{MNIST,FashionMNIST}/raw.
    """
    if root is None or not Path(root).is_dir():
        raise DatasetNotFoundError(_mnist_help(None if root is None else str(root), fashion))
    root = Path(root)
    for folder in (root, root / ("FashionMNIST" if fashion else "MNIST") / "raw"):
        image_file = _find_idx(folder, "train-images-idx3-ubyte")
        label_file = _find_idx(folder, "train-labels-idx1-ubyte")
        if image_file is not None and label_file is not None:
            break
    else:
        raise DatasetNotFoundError(_mnist_help(str(root), fashion))
    images, labels = torch.from_numpy(read_idx(image_file).copy()), torch.from_numpy(read_idx(label_file).copy())
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{image_file} holds an array of shape {list(images.shape)}, not square images [N, H, H]")
    if labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{label_file} holds labels of shape {list(labels.shape)} for {images.shape[0]} images in "
                         f"{image_file}")
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"{label_file} holds class {int(labels.max())}; MNIST's classes are 0 to 9")
    return TensorImageDataset(resize_images(images[:, None].to(torch.uint8), resolution, resample), labels.long(), 10, cond)


def load_cifar10(
    root: str | Path | None, resolution: int | None = None, cond: bool = False, resample: str = DEFAULT_RESAMPLE
) -> TensorImageDataset:
    """CIFAR-10 training set (50000 images, 32x32x3, 10 classes) via torchvision, download=False.
    root is the folder holding cifar-10-batches-py (or that folder itself). Its batches are pickles: torchvision
    unpickles them only after every file of the archive matches the official MD5 sum, so no other file's code runs."""
    help_text = (
        "CIFAR-10 needs the whole extracted python version: <root>/cifar-10-batches-py/data_batch_1..5, test_batch and "
        "batches.meta, as the official archive holds them; "
        f"dataset.root is {'not set' if root is None else repr(str(root))}. Get cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract it in <root>, or run "
        "torchvision.datasets.CIFAR10('<root>', download=True) on a machine with internet."
    )
    if root is None or not Path(root).is_dir():
        raise DatasetNotFoundError(help_text)
    root = Path(root)
    if root.name == "cifar-10-batches-py":
        root = root.parent
    if not (root / "cifar-10-batches-py").is_dir():
        raise DatasetNotFoundError(help_text)
    import torchvision

    try:
        tv = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    except RuntimeError as err:
        raise DatasetNotFoundError(f"torchvision could not read {root / 'cifar-10-batches-py'} ({err}). " + help_text) from None
    images = torch.from_numpy(np.ascontiguousarray(tv.data)).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(resize_images(images, resolution, resample), torch.as_tensor(tv.targets), 10, cond)
