"""Sample-quality metrics: Fréchet distance (FID with Inception-v3 pool features), precision/recall.

FID = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)  (Heusel et al. 2017) between Gaussians fitted to
features of two image sets. Any feature extractor works (a callable: images in [−1, 1]
[N, C, H, W] -> features [N, d]); the standard one is the TensorFlow Inception-v3
(inception-2015-12-05) as ported by pytorch-fid (edm.networks.inception.FIDInceptionV3), so that
`pt_inception-2015-12-05-6726825d.pth` loads strictly.
Precision/recall: Kynkäänniemi et al. 2019, k-NN balls around each feature (k = 3), in NVlabs'
VGG-16 features when that file is given (`load_vgg16`), else in the FID extractor's.

Nothing is downloaded: the weights are local files (see `load_inception`, `load_vgg16`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..files import atomic_write, file_sha256, png_cut_short
from ..data import IMAGE_EXTENSIONS, as_model_space, build_dataset, contents_key, image_files, root_contents_key, read_image, to_model_space, to_uint8
from ..networks.inception import FIDInceptionV3
from ..progress import counted_batches

__all__ = [
    "frechet_distance",
    "FeatureStats",
    "feature_statistics",
    "precision_recall",
    "NVlabsDetector",
    "load_inception",
    "load_vgg16",
    "VGG16_HELP",
    "INCEPTION_HELP",
    "image_batches",
    "count_images",
    "save_statistics",
    "detector_key",
    "load_statistics",
    "reference_statistics",
    "statistics_cache_path",
    "extract_features",
    "is_statistics_file",
    "evaluate_images",
    "read_images",
    "RefConfig",
    "write_reference",
    "dataset_batches",
    "dataset_reference",
]

logger = logging.getLogger(__name__)

Extractor = Callable[[Tensor], Tensor]

INCEPTION_HELP = """\
FID needs the Inception-v3 weights as a local file (nothing is downloaded). Either of:
  * pytorch-fid's state dict pt_inception-2015-12-05-6726825d.pth (recommended), from
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  * NVlabs' detector inception-2015-12-05.pkl (as used by NVlabs/edm fid.py; loading it needs
    NVlabs' dnnlib/torch_utils on PYTHONPATH), from
    https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl
    or the TorchScript inception-2015-12-05.pt of stylegan2-ada-pytorch.
On a machine with internet: `curl -LO <url>` (or `wget <url>`), copy the file here and pass its path: edm-eval
metric=fid metric.inception=PATH, edm-sample or edm-study eval.fid.inception=PATH."""

VGG16_HELP = """\
Precision/recall with NVlabs' features (as published for StyleGAN2-ADA, StyleGAN3 and EDM-era papers)
needs NVlabs' VGG-16 detector as a local file (nothing is downloaded), either of:
  * https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt (TorchScript)
  * https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl
    (a pickle; loading it needs NVlabs' dnnlib/torch_utils on PYTHONPATH)
Both carry code, so they load only with the opt-in allow_pickle. Without a VGG-16 file,
precision/recall uses the FID extractor's Inception features, which do not compare with
published figures."""


# ----------------------------------------------------------------------------- Fréchet distance


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½, the Fréchet distance of two Gaussians.

    tr(Σ₁Σ₂)^½ is computed as tr(Σ₁^½ Σ₂ Σ₁^½)^½ (same eigenvalues, symmetric PSD), in float64.
    """
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics do not match: mu {list(mu1.shape)} vs {list(mu2.shape)}, sigma {list(s1.shape)} vs {list(s2.shape)}")
    bad = [name for name, t in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)) if not bool(t.isfinite().all())]
    if bad:
        raise ValueError(f"the statistics {', '.join(bad)} hold NaN or Inf: features of images with NaN or Inf pixels, "
                         "or a damaged statistics file; score finite images against finite statistics")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    root1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def warn_few_images(metric: str, num_images: int, dim: int) -> None:
    """Warn when N images give a covariance of rank ≤ N − 1 < d, the features' dimension: the Fréchet distance is
    then mostly its sample-size bias, which falls as images are added (scores compare only at equal N)."""
    if num_images <= dim:
        logger.warning("%s of %d images: their feature covariance has rank at most %d, below the %d features, so the "
                       "score mostly measures how few images there are; compare scores of equal num_images, and use "
                       "many more than %d images", metric, num_images, num_images - 1, dim, dim)


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums, unbiased covariance)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, features: Tensor) -> None:
        f = features.detach().to(torch.float64).flatten(1).cpu()
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) with Σ = (Σ fᵢfᵢᵀ − N μμᵀ)/(N − 1)."""
        if self.count < 2 or self.total is None or self.outer is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


def feature_statistics(
    extractor: Extractor, batches: Iterable[Tensor], *, device: torch.device | str = "cpu", max_images: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(μ, Σ, N) of extractor(images) over image batches in [−1, 1] (at most max_images images), counted on a
    progress bar when `progress`."""
    stats = FeatureStats()
    with torch.no_grad():
        for images in counted_batches(batches, "features", total=max_images, enabled=progress):
            if max_images is not None:
                images = images[: max_images - stats.count]
            if images.shape[0] == 0:
                break
            stats.update(extractor(images.to(device)))
            if max_images is not None and stats.count >= max_images:
                break
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.count


# ----------------------------------------------------------------------------- precision / recall


def _kth_radii(features: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {features.shape[0]}")
    radii = [torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(batch_size)]
    return torch.cat(radii)


def _coverage(manifold: Tensor, radii: Tensor, probes: Tensor, batch_size: int) -> float:
    """Fraction of probes inside at least one ball B(manifold_j, radii_j)."""
    inside = [(torch.cdist(part, manifold) <= radii[None, :]).any(dim=1) for part in probes.split(batch_size)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = share of fake features inside the
    real k-NN manifold, recall = share of real features inside the fake k-NN manifold."""
    real, fake = real.to(torch.float64).flatten(1), fake.to(torch.float64).flatten(1)
    precision = _coverage(real, _kth_radii(real, k, batch_size), fake, batch_size)
    recall = _coverage(fake, _kth_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------- feature extractors from local files


class NVlabsDetector(nn.Module):
    """NVlabs' detectors (TorchScript .pt or .pkl; Inception: 2048 features, VGG-16: 4096): take uint8 RGB images,
    edm.data.to_uint8 of images in [−1, 1] (exact for x = k/127.5 − 1)."""

    def __init__(self, detector: Callable[..., Tensor]) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tensor:
        k = to_uint8(images)
        if k.shape[1] == 1:
            k = k.repeat(1, 3, 1, 1)
        return self.detector(k, return_features=True)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a constants.pkl entry (torch.save files have data.pkl only)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _load_nvlabs_detector(path: Path, device: torch.device | str, allow_pickle: bool, alternative: str,
                          torchscript: bool) -> nn.Module:
    """An NVlabs detector file (a pickle, or TorchScript when `torchscript`), only with allow_pickle: both run code
    stored in the file."""
    if not allow_pickle:
        kind = "a TorchScript archive (its forward is code stored in the file)" if torchscript else \
            "a pickle: loading it runs code stored in the file"
        raise ValueError(
            f"{path} is {kind}. If you trust it, allow code-carrying detectors (allow_pickle=True; edm-sample "
            f"eval.fid.allow_pickle=true; edm-eval metric.allow_pickle=true){alternative}"
        )
    if torchscript:
        return NVlabsDetector(torch.jit.load(str(path), map_location=device)).eval()
    try:
        with open(path, "rb") as f:
            detector = pickle.load(f)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{path} is an NVlabs pickle that needs NVlabs' code ({err.name}) importable: add a clone of "
            f"https://github.com/NVlabs/edm to PYTHONPATH{alternative}"
        ) from err
    return NVlabsDetector(detector).to(device).eval()


def load_inception(path: str | Path | None, device: torch.device | str = "cpu", *, allow_pickle: bool = False) -> nn.Module:
    """The FID feature extractor from a local weights file: pytorch-fid .pth, NVlabs .pkl or TorchScript .pt.

    A missing file raises FileNotFoundError with instructions (INCEPTION_HELP). A .pkl or a
    TorchScript archive is loaded only with allow_pickle=True: both carry code that runs when the
    file is loaded or called. pytorch-fid's .pth is a plain state dict and needs no opt-in.
    """
    if path is None:
        raise FileNotFoundError(f"no Inception weights file given (the fid metric's `inception` option).\n{INCEPTION_HELP}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights not found at {str(path)!r}.\n{INCEPTION_HELP}")
    path = Path(path)
    torchscript = _is_torchscript(path)
    if path.suffix == ".pkl" or torchscript:
        return _load_nvlabs_detector(path, device, allow_pickle, ", or use pytorch-fid's pt_inception-2015-12-05-6726825d.pth",
                                     torchscript)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own advice (weights_only=False) would run the file's code: not given here
        raise ValueError(f"cannot read {path} as a weights file ({type(err).__name__}); it is not pytorch-fid's "
                         f"Inception state dict.\n{INCEPTION_HELP}") from None
    with torch.device("meta"):
        model = FIDInceptionV3()
    try:
        model.load_weights(state_dict)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not pytorch-fid's Inception state dict ({_key_mismatch(model.net, state_dict)})."
                         f"\n{INCEPTION_HELP}") from None
    return model.to(device).eval()


def _key_mismatch(net: nn.Module, state_dict: Any) -> str:
    """A short account of how `state_dict` differs from net's: counts and a few names, not every key."""
    if not isinstance(state_dict, dict):
        return f"it holds a {type(state_dict).__name__}, not a state dict"
    wanted, given = set(net.state_dict()), set(state_dict)
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if not missing and not unexpected:
        return "the keys match, but tensor shapes differ"
    return (f"{len(missing)} of its {len(wanted)} keys missing, e.g. {', '.join(missing[:3]) or '-'}; "
            f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3]) or '-'}")


def load_vgg16(path: str | Path | None, device: torch.device | str = "cpu", *, allow_pickle: bool = False) -> nn.Module:
    """The precision/recall features of NVlabs' metrics (VGG-16 fc2, 4096-d) from NVlabs' local file.

    The file is code (TorchScript vgg16.pt or pickle vgg16.pkl, VGG16_HELP), so it loads only with
    allow_pickle=True. Images in [−1, 1] are passed to it as uint8 RGB, as NVlabs' metrics do.
    """
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"VGG-16 detector not found at {str(path)!r}.\n{VGG16_HELP}")
    path = Path(path)
    torchscript = _is_torchscript(path)
    if path.suffix != ".pkl" and not torchscript:
        raise ValueError(f"{path} is neither NVlabs' TorchScript vgg16.pt nor its vgg16.pkl.\n{VGG16_HELP}")
    return _load_nvlabs_detector(path, device, allow_pickle, "", torchscript)


# ----------------------------------------------------------------------------- image sources


def _npz_key(path: Path, data: Any) -> str:
    """The images' key of an open .npz: 'images' (edm) or 'arr_0' (guided-diffusion)."""
    key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
    if key is None:
        raise ValueError(f"{path} has no 'images' or 'arr_0' array (keys: {list(data.keys())})")
    return key


def _open_npz(path: Path) -> Any:
    """np.load of an .npz (arrays read lazily, no pickles); a file that is not one is a ValueError naming it."""
    if path.is_file() and not zipfile.is_zipfile(path):  # (np.load would try it as a pickle)
        raise ValueError(f"{path} is not a readable .npz (not a zip archive: cut short, or another format): write it "
                         "again (edm-sample format=npz)")
    try:
        return np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz ({type(err).__name__}: {err}): write it again "
                         "(edm-sample format=npz)") from None


def _npz_images(path: Path) -> np.ndarray:
    """uint8 images [N, H, W, C] from an .npz with key 'images' (edm) or 'arr_0' (guided-diffusion)."""
    with _open_npz(path) as data:
        key = _npz_key(path, data)
        try:
            images = data[key]
        except (OSError, zipfile.BadZipFile, EOFError) as err:  # a member cut short
            raise ValueError(f"{path} is not a readable .npz ({type(err).__name__}: {err}): write it again") from None
    if images.dtype != np.uint8:
        raise ValueError(f"{path}:{key} holds {images.dtype} values; the images to score must be uint8 pixels 0..255 "
                         "(edm-sample format=npz writes them; for floats in [0, 1]: "
                         "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))")
    return images if _channels_last(path, key, images.shape) else images.transpose(0, 2, 3, 1)


def _channels_last(path: Path, key: str, shape: Sequence[int]) -> bool:
    """Whether an .npz's images of `shape` are [N, H, W, C] (C = 1 or 3), else [N, C, H, W]; another rank is refused."""
    if len(shape) != 4:
        raise ValueError(f"{path}:{key} must be [N, H, W, C] (or [N, C, H, W]), got shape {list(shape)}")
    return shape[-1] in (1, 3)


def _source_files(path: Path) -> list[Path] | None:
    """The image files of a folder source, None for an .npz; a missing path or a folder without images is refused."""
    if not path.exists():
        raise FileNotFoundError(f"no images at {str(path)!r}: give a folder of PNG/JPG files or an .npz")
    if path.suffix == ".npz":
        return None
    files = image_files(path)
    if not files:
        arrays = sorted(path.glob("*.npz")) if path.is_dir() else []
        hint = f": it holds {arrays[0].name}, so give images={arrays[0]}" if len(arrays) == 1 else ""
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}{hint}")
    return files


def check_image_source(source: str | Path) -> None:
    """Refuse, before any work, an image source that does not exist, a folder without image files or with a PNG cut
    short (each file's last bytes), or an .npz that is unreadable or holds no images' array (nothing large is read)."""
    path = Path(source)
    files = _source_files(path)
    if files is None:
        with _open_npz(path) as data:
            _npz_key(path, data)
        return
    cut = [file for file in files if file.suffix.lower() == ".png" and png_cut_short(file)]
    if cut:
        more = f" (and {len(cut) - 1} more in {path})" if len(cut) > 1 else ""
        raise ValueError(f"{cut[0]} is a PNG cut short (it does not end as a complete PNG does){more}: replace or delete "
                         "it (edm-sample makes a deleted image of its out folder again)")


def source_image_shape(source: str | Path) -> tuple[int, int, int]:
    """(C, H, W) of a folder's first image, or of an .npz's images from their array's header (none decompressed)."""
    path = Path(source)
    if _source_files(path) is not None:
        _, h, w, c = next(_pixel_batches(path, 1, 1)).shape
        return c, h, w
    key, shape = _npz_shape(path)
    _, a, b, c = shape if _channels_last(path, key, shape) else (shape[0], shape[2], shape[3], shape[1])
    return c, a, b


def _npz_shape(path: Path) -> tuple[str, tuple[int, ...]]:
    """(key, shape) of an .npz's images' array, read from the array's header (nothing decompressed)."""
    with _open_npz(path) as data:
        key = _npz_key(path, data)
        with data.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return key, tuple(read_header(member)[0])


def count_images(source: str | Path) -> int:
    """Number of images in a folder (png/jpg/... recursively) or an .npz (from its array's header)."""
    path = Path(source)
    if path.suffix == ".npz":
        key, shape = _npz_shape(path)
        _channels_last(path, key, shape)  # an array that is no images is named
        return shape[0]
    return len(image_files(path))


def _uint8_to_unit(batch: np.ndarray) -> Tensor:
    """uint8 [B, H, W, C] -> float [B, C, H, W] in [−1, 1] (edm.data.to_model_space)."""
    return to_model_space(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))


def _pixel_batches(source: str | Path, batch_size: int, max_images: int | None) -> Iterator[np.ndarray]:
    """uint8 batches [B, H, W, C] of the images in a folder (sorted paths, recursive) or an .npz file."""
    path = Path(source)
    files = _source_files(path)
    if files is None:
        images = _npz_images(path)[:max_images]
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
        return
    files = files[:max_images]
    shape = None
    for start in range(0, len(files), batch_size):
        batch = [read_image(file) for file in files[start : start + batch_size]]
        shape = shape or (files[0], batch[0].shape)
        for file, image in zip(files[start : start + batch_size], batch):
            if image.shape != shape[1]:
                raise ValueError(f"{file} is {_size(image.shape)} but {shape[0]} is {_size(shape[1])}: the images "
                                 f"of {path} to score must share one size and channel count")
        yield np.stack(batch)


def _size(shape: Sequence[int]) -> str:
    """An image's [H, W, C] as "W×H, C channel(s)"."""
    return f"{shape[1]}×{shape[0]}, {shape[2]} channel{'s' if shape[2] != 1 else ''}"


def image_batches(source: str | Path, batch_size: int = 64, max_images: int | None = None) -> Iterator[Tensor]:
    """Batches [B, C, H, W] in [−1, 1] of the images in a folder (sorted paths, recursive) or an .npz file."""
    return (_uint8_to_unit(batch) for batch in _pixel_batches(source, batch_size, max_images))


# ----------------------------------------------------------------------------- cached statistics


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num_images: int, made_of: str | None = None,
                    feature_extractor: str | None = None) -> None:
    """Write (μ, Σ, N) as .npz (keys mu, sigma, num_images: the NVlabs/pytorch-fid layout plus the count), with
    `feature_extractor`, the key of the extractor that made the features (detector_key), when given; a cache entry
    also holds `made_of`, the data set and extractor it was computed from."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")  # as np.savez names it
    named = {} if made_of is None else {"made_of": np.array(made_of)}
    named |= {} if feature_extractor is None else {"feature_extractor": np.array(feature_extractor)}
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, num_images=np.int64(num_images), **named))


def load_statistics(path: str | Path, made_of: str | None = None, feature_extractor: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from an .npz with keys mu and sigma (NVlabs' fid-refs and pytorch-fid's --save-stats files); with
    `made_of`, a cache entry that does not record exactly that origin is refused; with `feature_extractor`, a file
    that records another extractor (other weights: another SHA-256 in its key) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
    with _open_npz(path) as data:
        if made_of is not None and (stored := str(data["made_of"]) if "made_of" in data else None) != made_of:
            raise ValueError(f"the cached reference statistics {path} were made of {stored!r}, not {made_of!r}: "
                             "delete the file to compute them again")
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma', has {list(data.keys())}")
        stored = str(data["feature_extractor"]) if "feature_extractor" in data else None
        if feature_extractor is not None and stored is not None and _weights(stored) != _weights(feature_extractor):
            raise ValueError(f"the reference statistics {path} were made by feature extractor {stored}, the images' "
                             f"features are {feature_extractor}'s: a Fréchet distance needs one extractor for both. Give "
                             "the extractor that made them, or ref= statistics of this one (edm-eval metric=ref "
                             "metric.inception=... metric.dest=FILE.npz) or the reference images themselves")
        return data["mu"], data["sigma"]


def detector_key(path: str | Path) -> str:
    """A detector file as keys and records name it: `<file stem>:<first 12 hex digits of its SHA-256>`."""
    return f"{Path(path).stem}:{file_sha256(path)[:12]}"


def _weights(key: str) -> str:
    """The part of an extractor key that names its weights: the hash of detector_key, else the whole key."""
    return key.rpartition(":")[2]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "data"


def statistics_cache_path(cache_dir: str | Path, dataset_key: str, extractor_key: str) -> Path:
    """cache_dir/<dataset>--<extractor>-<hash>.npz: one file per (data set, feature extractor) pair; the hash of the
    two whole keys keeps keys apart that the readable part folds together (a/b and a_b)."""
    digest = hashlib.sha256(f"{dataset_key}\0{extractor_key}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{_slug(dataset_key)[-80:]}--{_slug(extractor_key)[-40:]}-{digest}.npz"


def reference_statistics(
    batches: Callable[[], Iterable[Tensor]],
    extractor: Extractor,
    *,
    cache_dir: str | Path | None,
    dataset_key: str,
    extractor_key: str,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a data set's features, read from the cache when present, else computed (on a progress bar when
    `progress`) and cached.

    `batches()` yields the data set's images in [−1, 1]; it is only called on a cache miss.
    """
    key = dataset_key if max_images is None else f"{dataset_key}-n{max_images}"
    path = statistics_cache_path(cache_dir, key, extractor_key) if cache_dir is not None else None
    made_of = f"{key} -- {extractor_key}"
    if path is not None and path.is_file():
        logger.info("reference statistics from cache %s", path)
        return load_statistics(path, made_of)
    mu, sigma, n = feature_statistics(extractor, batches(), device=device, max_images=max_images, progress=progress)
    if path is not None:
        save_statistics(path, mu, sigma, n, made_of, extractor_key)
        logger.info("cached reference statistics of %d images at %s", n, path)
    return mu, sigma


# ----------------------------------------------------------------------------- one call for a report


def extract_features(extractor: Extractor, batches: Iterable[Tensor], *, device: torch.device | str = "cpu",
                     total: int | None = None, progress: bool = False) -> Tensor:
    """All features [N, d] (float64, CPU) of the image batches (`total` images, if known, counted on a progress bar
    when `progress`)."""
    with torch.no_grad():
        return torch.cat([extractor(images.to(device)).to(torch.float64).cpu().flatten(1)
                          for images in counted_batches(batches, "features", total=total, enabled=progress)])


def is_statistics_file(path: str | Path) -> bool:
    """True for an .npz holding 'mu' and 'sigma' (precomputed reference statistics)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data and "sigma" in data


def dataset_batches(dataset: Dataset, batch_size: int = 64, num_workers: int = 0) -> Iterator[Tensor]:
    """Batches [B, C, H, W] in [−1, 1] of a data set whose items are (uint8 image [C, H, W], ...), as edm.data's."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield to_model_space(images)


def dataset_reference(config: Any, batch_size: int = 64) -> tuple[Callable[[], Iterator[Tensor]], str]:
    """(batches, cache key) of the edm.data set of `config` (an edm.data.DatasetConfig), without x-flips; the key
    names the data (its resolved root, its size, the resize filter of a resized set) and ends in a hash of every
    setting of its record (edm.data.dataset_record) and of its root's files (root_contents_key: names, sizes and
    modification times), so that no two data sets, and no data set before and after a file of it changed, share it."""
    from ..data import dataset_record

    config = dataclasses.replace(config, xflip=False, cond=False)
    dataset = build_dataset(config)
    root = str(Path(config.root).resolve()) if config.root else None
    where = f"-{Path(root).name}" if root else ""
    resized = f"-{config.resample}" if config.resolution is not None else ""
    contents = root_contents_key(root) if root else None
    record = json.dumps(dataset_record(config) | {"root": root, "images": len(dataset), "contents": contents}, sort_keys=True)
    digest = hashlib.sha256(record.encode()).hexdigest()[:12]
    key = f"{config.name}{where}-{dataset.resolution}px{resized}-{len(dataset)}-{digest}"
    return (lambda: dataset_batches(dataset, batch_size, config.num_workers)), key


def _source_key(source: str | Path) -> str:
    """An image folder or .npz as a cache key: its resolved path with, for a file, its size and modification time,
    for a folder, its number of image files and a hash of their names, sizes and modification times (an image
    added, removed or replaced there is another key)."""
    path = Path(source).resolve()
    return f"{path}:{contents_key(path, image_files(path) if path.is_dir() else [])}"


def evaluate_images(
    images: str | Path | Tensor,
    extractor: Extractor,
    *,
    extractor_key: str,
    ref: str | Path | None = None,
    ref_batches: Callable[[], Iterable[Tensor]] | None = None,
    ref_key: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    with_precision_recall: bool = False,
    k: int = 3,
    max_images: int | None = None,
    pr_extractor: Extractor | None = None,
    pr_extractor_key: str | None = None,
    progress: bool = False,
) -> dict[str, float | int | str]:
    """FID (and optionally precision/recall) of `images` (a folder / .npz of them, or a tensor [N, C, H, W] of
    uint8 pixels or floats in [−1, 1]) against a reference.

    The reference is `ref` — a statistics .npz (mu, sigma; NVlabs fid-refs or pytorch-fid
    --save-stats) or image data (folder / .npz) — or `ref_batches()` (e.g. `dataset_batches` of an
    edm.data set) named `ref_key`. Statistics of image data are cached in cache_dir keyed by
    (ref, extractor). Precision/recall needs image data, not statistics; its features are
    pr_extractor's (NVlabs' VGG-16, `load_vgg16`) when given, else the FID extractor's, and the
    result names them ("precision_recall_features"). `progress` counts the images on a bar as features are taken.
    """
    if (ref is None) == (ref_batches is None):
        raise ValueError("give exactly one reference: ref (a statistics .npz, an image folder or .npz) or ref_batches")
    if ref is not None:
        ref_key = _source_key(ref)
        ref_batches = lambda: image_batches(ref, batch_size)  # noqa: E731
    ref_is_stats = ref is not None and is_statistics_file(ref)
    if with_precision_recall and ref_is_stats:
        raise ValueError(f"precision/recall needs reference images, but {ref} holds only statistics (mu, sigma)")
    fake_batches = lambda: _source_batches(images, batch_size, max_images)  # noqa: E731
    fake_total = None  # the bar's end: the images are counted (a folder listed) only for a bar
    if progress:
        count = len(images) if isinstance(images, Tensor) else count_images(images)
        fake_total = count if max_images is None else min(count, max_images)
    if ref_is_stats:  # statistics of other weights are refused before the images' features are taken
        mu_ref, sigma_ref = load_statistics(ref, feature_extractor=extractor_key)  # type: ignore[arg-type]
    fake = extract_features(extractor, fake_batches(), device=device, total=fake_total, progress=progress)
    mu, sigma = _mean_cov(fake)
    real = None
    if ref_is_stats:
        _check_reference_features(ref, mu_ref.size, len(mu), extractor_key)  # type: ignore[arg-type]
    elif with_precision_recall:
        real = extract_features(extractor, _take(ref_batches(), max_images), device=device, total=max_images,
                                progress=progress)
        mu_ref, sigma_ref = _mean_cov(real)
    else:
        mu_ref, sigma_ref = reference_statistics(
            ref_batches, extractor, cache_dir=cache_dir, dataset_key=str(ref_key), extractor_key=extractor_key,
            device=device, max_images=max_images, progress=progress,
        )
    warn_few_images("FID", int(fake.shape[0]), len(mu))
    result: dict[str, float | int | str] = {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "num_images": int(fake.shape[0]),
        "ref": str(ref if ref is not None else ref_key), "feature_extractor": extractor_key,
    }
    if real is not None:
        if pr_extractor is not None:
            fake = extract_features(pr_extractor, fake_batches(), device=device, total=fake_total, progress=progress)
            real = extract_features(pr_extractor, _take(ref_batches(), max_images), device=device, total=max_images,
                                    progress=progress)
        result["precision"], result["recall"] = precision_recall(real, fake, k=k)
        result["k"] = k
        result["precision_recall_features"] = extractor_key if pr_extractor is None else str(pr_extractor_key)
    return result


def _check_reference_features(path: str | Path, ref_dim: int, dim: int, extractor_key: str) -> None:
    """Refuse reference statistics of features of another dimension than the extractor's, naming the file."""
    if ref_dim != dim:
        raise ValueError(f"the reference statistics {path} are of {ref_dim} features, but {extractor_key} gives {dim}: "
                         "they were made by another feature extractor. Give ref= statistics of this one (edm-eval "
                         "metric=ref metric.inception=... metric.dest=FILE.npz) or the reference images themselves")


def _source_batches(images: str | Path | Tensor, batch_size: int, max_images: int | None) -> Iterator[Tensor]:
    """Batches in [−1, 1] of a folder / .npz of images or of an image tensor (uint8 or already in [−1, 1])."""
    if not isinstance(images, Tensor):
        return image_batches(images, batch_size, max_images)
    return (as_model_space(chunk) for chunk in images[:max_images].split(batch_size))


def read_images(source: str | Path, max_images: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(uint8 images [N, C, H, W], class indices [N] or None) of a folder of image files or an .npz (an
    edm-sample npz carries its labels), at most max_images of them."""
    path = Path(source)
    labels = None
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as data:
            if "labels" in data.files:
                labels = torch.from_numpy(data["labels"][:max_images]).long()
    pixels = np.concatenate(list(_pixel_batches(path, 4096, max_images)))
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels


def _mean_cov(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    stats = FeatureStats()
    stats.update(features)
    return stats.mean_cov()


def _take(batches: Iterable[Tensor], max_images: int | None) -> Iterator[Tensor]:
    """The batches, cut after max_images images."""
    seen = 0
    for batch in batches:
        if max_images is not None:
            batch = batch[: max_images - seen]
        if batch.shape[0] == 0:
            return
        seen += batch.shape[0]
        yield batch


@dataclass
class RefConfig:
    """FID reference statistics (mu, sigma, num_images) of images, written to `dest` (edm-eval metric=ref)."""

    inception: Optional[str] = None  # as FID's: pytorch-fid's .pth, or NVlabs' .pkl / .pt (with allow_pickle)
    allow_pickle: bool = False
    dest: Optional[str] = None  # the statistics .npz to write (a new file, or overwrite=true)
    max_images: Optional[int] = None  # the first N images only
    overwrite: bool = False  # replace an existing dest


def check_reference_dest(cfg: RefConfig) -> None:
    """Refuse, before any work, a dest that is missing, not an .npz (np.savez would add the suffix), or an existing
    file (statistics of other images, perhaps) without overwrite."""
    if cfg.dest is None:
        raise ValueError("metric=ref needs metric.dest=FILE.npz, where the statistics go")
    dest = Path(cfg.dest)
    if dest.is_dir():
        raise FileExistsError(f"metric.dest={cfg.dest} is a folder: name the statistics file, e.g. {dest / 'ref.npz'}")
    if dest.suffix != ".npz":
        raise ValueError(f"metric.dest={cfg.dest}: name the statistics file, ending in .npz (e.g. "
                         f"{dest.with_suffix('.npz')})")
    if dest.exists() and not cfg.overwrite:
        raise FileExistsError(f"metric.dest={cfg.dest} exists: pass metric.overwrite=true to replace it, or give "
                              "another metric.dest")


def write_reference(cfg: RefConfig, batches: Iterable[Tensor], device: torch.device | str = "cpu", *,
                    progress: bool = False) -> dict:
    """Write the Inception statistics of image batches (in [−1, 1]) to cfg.dest (counted on a progress bar when
    `progress`); a summary."""
    check_reference_dest(cfg)
    extractor = load_inception(cfg.inception, device, allow_pickle=cfg.allow_pickle)
    mu, sigma, n = feature_statistics(extractor, batches, device=device, max_images=cfg.max_images, progress=progress)
    key = detector_key(cfg.inception)
    save_statistics(cfg.dest, mu, sigma, n, feature_extractor=key)
    return {"statistics": str(cfg.dest), "num_images": n, "feature_extractor": key}
