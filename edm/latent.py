"""Latent diffusion as EDM2 does it: a Stable Diffusion VAE (diffusers' AutoencoderKL) between pixels and latents.

    raw pixels (uint8)  --encode_pixels-->  raw latents: the posterior's mean and std (what a latent data set stores)
    raw latents  --final_latents-->  final latents x = (mean + std·n)·scale + bias   (the model's data, n ~ N(0, I))
    final latents  --decode-->  raw pixels: VAE decoder of (x − bias)/scale, floor(255·clamp(p, 0, 1))

As NVlabs/edm2's StabilityVAEEncoder: the VAE sees pixels in [0, 1] (x/255), and scale = final_std/raw_std,
bias = final_mean − raw_mean·scale per channel, in float32, from EDM2's raw statistics of ImageNet-512 latents
(LatentConfig's defaults). A VAE is named by a local folder in diffusers' `from_pretrained` layout (or a hub
name where there is network) and known by the fingerprint of its weights, so a run, a data set and a sampler
can tell whether they use the same one. diffusers is the optional extra `pip install edm-diffusion[latent]`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EDM2_RAW_MEAN", "EDM2_RAW_STD", "LATENTS_NAME", "LatentConfig", "VAEError", "latent_affine", "final_latents",
    "raw_latents", "decoded_pixels", "load_autoencoder", "weights_fingerprint", "VAE", "vae_name", "load_vae", "model_vae",
    "same_latent_space", "pixel_channels", "check_vae",
]

EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # EDM2's assumed mean of stabilityai/sd-vae-ft-mse's raw latents
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)  # ... and their standard deviation, per channel
LATENTS_NAME = "latents.json"  # what a latent data set was encoded from, beside its dataset.json
VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class VAEError(ValueError):
    """The VAE cannot be loaded or does not fit; the message says what to do."""


@dataclass
class LatentConfig:
    """The `latent` config group: the VAE and the map from its raw latents to the model's final latents.

    vae: a local folder in diffusers' from_pretrained layout, or a hub name (needs network); None = the one
    the latent data set (or the model) records. raw_mean/raw_std: the raw latents' statistics per channel;
    final_mean/final_std: what they become (EDM2: mean 0, std 0.5). batch: images per VAE call; dtype: the
    VAE's precision (float32 | bfloat16)."""

    vae: Optional[str] = None
    raw_mean: List[float] = field(default_factory=lambda: list(EDM2_RAW_MEAN))
    raw_std: List[float] = field(default_factory=lambda: list(EDM2_RAW_STD))
    final_mean: float = 0.0
    final_std: float = 0.5
    batch: int = 8
    dtype: str = "float32"


# ----------------------------------------------------------------------------- the maps


def latent_affine(raw_mean: Sequence[float], raw_std: Sequence[float], final_mean: float = LatentConfig.final_mean,
                  final_std: float = LatentConfig.final_std) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per channel, in float32 as EDM2: scale = final_std / raw_std, bias = final_mean − raw_mean·scale."""
    if len(raw_mean) != len(raw_std):
        raise ValueError(f"latent.raw_mean has {len(raw_mean)} channels, latent.raw_std {len(raw_std)}: give one value "
                         "per latent channel in both")
    if min(raw_std) <= 0 or final_std <= 0:
        raise ValueError(f"latent.raw_std={list(raw_std)} and latent.final_std={final_std} must be positive")
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return scale.astype(np.float32), bias.astype(np.float32)


def _per_channel(values: Tensor | np.ndarray, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def final_latents(mean_std: Tensor, noise: Tensor, scale: Tensor | np.ndarray, bias: Tensor | np.ndarray) -> Tensor:
    """x = (mean + std·n)·scale + bias: a draw of the VAE posterior [B, 2C, h, w] (mean, std) as the model's data."""
    mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
    z = mean + std * noise
    return z * _per_channel(scale, z) + _per_channel(bias, z)


def raw_latents(x: Tensor, scale: Tensor | np.ndarray, bias: Tensor | np.ndarray) -> Tensor:
    """z = (x − bias) / scale: final latents back to the VAE's raw latents."""
    x = x.to(torch.float32)
    return (x - _per_channel(bias, x)) / _per_channel(scale, x)


def decoded_pixels(p: Tensor, channels: int = 3) -> Tensor:
    """The VAE decoder's output p (pixels in [0, 1]) as uint8, floor(255·clamp(p, 0, 1)) as EDM2; one channel
    (a grayscale data set, encoded as gray RGB) is the mean of the three."""
    p = p.to(torch.float32)
    if channels == 1:
        p = p.mean(dim=1, keepdim=True)
    return p.clamp(0, 1).mul(255).to(torch.uint8)


# ----------------------------------------------------------------------------- the VAE


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise VAEError("latent diffusion needs diffusers' AutoencoderKL: pip install 'edm-diffusion[latent]' "
                       "(or pip install diffusers)") from None
    return diffusers


def _is_path(name: str) -> bool:
    """A name that can only be a folder: absolute, relative with ./ or ~, not of the hub's one-'/' form
    ("owner/model"), or of that form with a local folder for its owner (runs/vae: a typo'd path, not a hub name)."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name).parent.is_dir()


def load_autoencoder(name: str, device: torch.device | str = "cpu") -> Any:
    """diffusers' AutoencoderKL in float32 from a local folder (from_pretrained layout), or from a hub name (the
    local cache first, then the network), in eval mode without gradients."""
    diffusers = _diffusers()
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise VAEError(f"VAE folder {folder} has no config.json: give a folder that AutoencoderKL.save_pretrained "
                           "wrote (config.json and diffusion_pytorch_model.safetensors)")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise VAEError(f"VAE folder {folder} cannot be read ({str(err).splitlines()[0]})") from None
    elif _is_path(name):
        raise VAEError(f"VAE folder {name} does not exist: point latent.vae (vae=) at a folder in diffusers' "
                       "from_pretrained layout (e.g. stabilityai/sd-vae-ft-mse, downloaded with "
                       "`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR`)")
    else:
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(name, local_files_only=True)
        except OSError:
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(name)
            except OSError as err:
                raise VAEError(f"VAE {name!r} is neither a local folder nor loadable from the hub "
                               f"({str(err).splitlines()[0]}); download it where there is network "
                               f"(`huggingface-cli download {name} --local-dir DIR`) and pass that folder") from None
    return vae.eval().requires_grad_(False).to(device)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """BLAKE2b of a module's parameters and buffers (names, shapes, float32 values): the same weights, wherever
    they were loaded from, have one fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{list(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


class VAE:
    """One VAE between uint8 pixels and final latents (see the module's maps), run in batches of `batch` in `dtype`.
    Its fingerprint is of the float32 weights it is given, so a VAE run in bfloat16 is still the same VAE."""

    def __init__(self, autoencoder: Any, name: str, scale: np.ndarray | None, bias: np.ndarray | None,
                 batch: int = LatentConfig.batch, dtype: str = LatentConfig.dtype, pixel_channels: int = 3) -> None:
        if batch < 1:
            raise ValueError(f"latent.batch={batch} must be at least 1")
        if dtype not in VAE_DTYPES:
            raise ValueError(f"VAE dtype {dtype!r} is not one of {', '.join(VAE_DTYPES)}")
        self.autoencoder, self.name, self.batch, self.dtype = autoencoder, str(name), int(batch), dtype
        self.pixel_channels = int(pixel_channels)  # decoded images: RGB, or gray (the mean of RGB) for gray data
        config = autoencoder.config
        self.latent_channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)  # pixels per latent, each way
        self.in_channels = int(config.in_channels)
        if scale is not None and len(scale) != self.latent_channels:
            raise VAEError(f"VAE {name} makes {self.latent_channels}-channel latents, but the latent map has {len(scale)} "
                           "channels: give the VAE of the data set or model (whose channels it has), or one "
                           "latent.raw_mean/raw_std value per channel of this VAE")
        self.scale = None if scale is None else np.asarray(scale, np.float32)  # None: encoding only
        self.bias = None if bias is None else np.asarray(bias, np.float32)
        self.fingerprint = weights_fingerprint(autoencoder)
        torch.nn.Module.to(autoencoder, VAE_DTYPES[dtype])  # (diffusers' own .to warns about float32 modules)

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    def _batches(self, x: Tensor):
        dtype = VAE_DTYPES[self.dtype]
        for part in x.split(self.batch):
            yield part.to(self.device, dtype)

    @torch.no_grad()
    def encode_pixels(self, images: Tensor) -> Tensor:
        """uint8 pixels [B, C, H, W] (C = 1 is repeated to RGB) -> raw latents [B, 2c, H/f, W/f]: the posterior's
        mean and std of the VAE encoder, which sees x/255 (EDM2's range)."""
        if images.shape[1] == 1 and self.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        out = []
        for x in self._batches(images.to(torch.float32) / 255):
            posterior = self.autoencoder.encode(x).latent_dist
            out.append(torch.cat([posterior.mean, posterior.std], dim=1).to(torch.float32))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Final latents [B, c, h, w] -> uint8 pixels [B, pixel_channels, h·f, w·f] (decoded_pixels of the VAE
        decoder's output for raw_latents(x))."""
        z = raw_latents(x, self.scale, self.bias)
        return torch.cat([decoded_pixels(self.autoencoder.decode(part).sample, self.pixel_channels)
                          for part in self._batches(z)])

    def pixel_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """[C, H, W] of the images that latents of `latent_shape` [c, h, w] decode to."""
        return self.pixel_channels, int(latent_shape[1]) * self.factor, int(latent_shape[2]) * self.factor

    def facts(self) -> dict[str, Any]:
        """What a run, model or data set records of this VAE: its name, fingerprint and the latent map."""
        return {"vae": self.name, "vae_fingerprint": self.fingerprint, "scale": self.scale.tolist(),
                "bias": self.bias.tolist()}


def vae_name(name: str) -> str:
    """A local VAE folder as its absolute path (what runs and data sets record), a hub name as it is."""
    folder = Path(name).expanduser()
    return str(folder.resolve()) if folder.is_dir() else name


def pixel_channels(latent: dict) -> int:
    """The channels of the images a latent record's latents decode to: its pixel data's, else RGB."""
    return (latent.get("pixel_shape") or [3])[0]


def check_vae(vae: VAE, channels: int, latent: dict, whose: str, fix: str) -> None:
    """The VAE of `whose` (a latent data set or model, recording `latent`) makes `channels`-channel latents and, where
    the record has a fingerprint, has those weights; else a VAEError that ends with `fix`."""
    if vae.latent_channels != channels:
        raise VAEError(f"VAE {vae.name} makes {vae.latent_channels}-channel latents, {whose} holds {channels}-channel "
                       f"latents: {fix}")
    recorded = latent.get("vae_fingerprint")
    if recorded and recorded != vae.fingerprint:
        raise VAEError(f"VAE {vae.name} has other weights (fingerprint {vae.fingerprint}) than the VAE of {whose} "
                       f"({latent.get('vae')}, fingerprint {recorded}): {fix}")


def load_vae(cfg: LatentConfig, name: str | None = None, device: torch.device | str = "cpu",
             pixel_channels: int = 3, latent_map: bool = True) -> VAE:
    """The VAE of `cfg` (its vae, else `name`), with cfg's batch and dtype and (latent_map) its latent map."""
    name = cfg.vae or name
    if not name:
        raise VAEError("no VAE named: set latent.vae=FOLDER (a folder in diffusers' from_pretrained layout)")
    if cfg.dtype not in VAE_DTYPES:
        raise ValueError(f"latent.dtype={cfg.dtype!r} is not one of {', '.join(VAE_DTYPES)}")
    scale, bias = latent_affine(cfg.raw_mean, cfg.raw_std, cfg.final_mean, cfg.final_std) if latent_map else (None, None)
    return VAE(load_autoencoder(name, device), vae_name(name), scale, bias, cfg.batch, cfg.dtype, pixel_channels)


def same_latent_space(a: dict | None, b: dict | None, what: str, other: str = "the model") -> None:
    """Two models mixed in one sampler (a guide, a teacher), or a run and the model it starts from or distils, must
    work in one space: both pixels, or latents of the same map (scale, bias) and, where both record it, the same
    VAE. `what` names b's side, `other` a's."""
    if a is None and b is None:
        return
    if (a is None) != (b is None):
        raise VAEError(f"{what} {'makes pixels' if b is None else 'makes VAE latents'}, {other} "
                       f"{'pixels' if a is None else 'VAE latents'}: both must work in one space")
    fingerprints = {a.get("vae_fingerprint"), b.get("vae_fingerprint")} - {None}
    if not np.allclose(a["scale"], b["scale"]) or not np.allclose(a["bias"], b["bias"]) or len(fingerprints) > 1:
        raise VAEError(f"{what} works in other VAE latents ({b['vae']}, scale {b['scale']}, bias {b['bias']}) than "
                       f"{other} ({a['vae']}, scale {a['scale']}, bias {a['bias']}): give one trained on the same latents")


def model_vae(latent: dict | None, img_shape: Sequence[int], source: str, vae: str | None,
              batch: int = LatentConfig.batch, dtype: str = LatentConfig.dtype,
              device: torch.device | str = "cpu") -> VAE | None:
    """The VAE that decodes a model's samples: None for a pixel model (where naming a VAE is refused). `latent`
    is what the model records (edm.models.loading.ModelInfo.latent): its VAE, unless `vae` names another folder
    of the same weights, and its scale and bias; a VAE of other weights than the recorded fingerprint is refused."""
    if latent is None:
        if vae is not None:
            raise VAEError(f"{source} is a pixel model: vae={vae} is for latent models (drop it)")
        return None
    if dtype not in VAE_DTYPES:
        raise ValueError(f"vae_dtype={dtype!r} is not one of {', '.join(VAE_DTYPES)}")
    name = vae or latent["vae"]
    decoder = VAE(load_autoencoder(name, device), vae_name(name), np.asarray(latent["scale"], np.float32),
                  np.asarray(latent["bias"], np.float32), batch, dtype, pixel_channels(latent))
    check_vae(decoder, img_shape[0], latent, f"model {source}", "give the VAE it was trained with (vae=FOLDER)")
    return decoder
