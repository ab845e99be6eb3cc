"""Named network presets and the builder the trainer calls: `build(name, **overrides)`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, Callable, List, Optional

from torch import nn

from ..choices import choose
from .dhariwal_unet import DhariwalUNet
from .edm2 import EDM2UNet
from .song_unet import SongUNet

logger = logging.getLogger(__name__)

# Keyword arguments that hold integer lists (converted to tuples so configs can pass any sequence).
_SEQUENCE_FIELDS = ("channel_mult", "attn_resolutions", "resample_filter")


@dataclasses.dataclass
class NetworkConfig:
    """Structured config for `build`: a preset name plus optional overrides (None = preset default).

    in_channels defaults to the preset's; out_channels defaults to in_channels. With a preset whose
    attention is at its lowest resolution only (tiny, edm2-tiny), attn_resolutions defaults to the U-Net's lowest.
    """

    name: str = "tiny"
    img_resolution: Optional[int] = None
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    label_dim: Optional[int] = None
    augment_dim: Optional[int] = None
    model_channels: Optional[int] = None
    channel_mult: Optional[List[int]] = None
    channel_mult_emb: Optional[int] = None
    num_blocks: Optional[int] = None
    attn_resolutions: Optional[List[int]] = None
    dropout: Optional[float] = None
    label_dropout: Optional[float] = None
    second_noise: Optional[bool] = None  # a second, zero-initialized noise-level input (MeanFlow's t − r); default off
    # SongUNet only (DDPM++ / NCSN++ switches).
    embedding_type: Optional[str] = None
    channel_mult_noise: Optional[int] = None
    encoder_type: Optional[str] = None
    decoder_type: Optional[str] = None
    resample_filter: Optional[List[int]] = None


def _ddpmpp() -> dict[str, Any]:
    """CIFAR-10 DDPM++ (EDM config F, VP): 32x32x3, 128 channels x (2, 2, 2), 4 blocks, attention at 16."""
    return dict(
        img_resolution=32, in_channels=3, label_dim=0, augment_dim=0,
        model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
        attn_resolutions=(16,), dropout=0.13, label_dropout=0.0,
        embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
        decoder_type="standard", resample_filter=(1, 1),
    )


def _ncsnpp() -> dict[str, Any]:
    """CIFAR-10 NCSN++ (EDM config F, VE): DDPM++ with Fourier embedding, residual encoder, FIR resampling."""
    return _ddpmpp() | dict(
        embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1)
    )


def _tiny() -> dict[str, Any]:
    """A DDPM++-style U-Net for CPU runs: 32 channels x (1, 2), 1 block, no dropout."""
    return _ddpmpp() | dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.0)


def _adm() -> dict[str, Any]:
    """ImageNet-64 ADM: 64x64x3, 1000 classes, 192 channels x (1, 2, 3, 4), 3 blocks, attention 32/16/8."""
    return dict(
        img_resolution=64, in_channels=3, label_dim=1000, augment_dim=0,
        model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
        attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0,
    )


# EDM2 sizes (its config presets): model channels and dropout; the rest is EDM2's UNet default.
EDM2_SIZES = MappingProxyType({
    "xxs": (64, 0.0), "xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1), "xl": (384, 0.1), "xxl": (448, 0.1),
})


def _edm2(size: str) -> Callable[[], dict[str, Any]]:
    """EDM2 (config G) at `size`, in the latent ImageNet-512 shape (64x64x4, 1000 classes); ImageNet-64
    runs get 64x64x3 from their data: 4 levels (1, 2, 3, 4), 3 blocks, attention 16/8."""
    channels, dropout = EDM2_SIZES[size]
    return lambda: dict(
        img_resolution=64, in_channels=4, label_dim=1000, model_channels=channels, channel_mult=(1, 2, 3, 4),
        channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=(16, 8), dropout=dropout,
        label_dropout=0.0, label_balance=0.5, concat_balance=0.5, res_balance=0.3, attn_balance=0.3, clip_act=256,
        channels_per_head=64, resample_filter=(1, 1),
    )


def _edm2_tiny() -> dict[str, Any]:
    """EDM2's architecture for CPU runs: 32x32x3, 32 channels x (1, 2), 1 block, attention at 16."""
    return _edm2("s")() | dict(img_resolution=32, in_channels=3, label_dim=0, model_channels=32, channel_mult=(1, 2),
                               num_blocks=1, attn_resolutions=(16,))


_PRESETS: MappingProxyType[str, tuple[type[nn.Module], Callable[[], dict[str, Any]]]] = MappingProxyType({
    "tiny": (SongUNet, _tiny), "ddpmpp": (SongUNet, _ddpmpp), "ncsnpp": (SongUNet, _ncsnpp), "adm": (DhariwalUNet, _adm),
    "edm2-tiny": (EDM2UNet, _edm2_tiny), **{f"edm2-{size}": (EDM2UNet, _edm2(size)) for size in EDM2_SIZES},
})
PRESETS = tuple(_PRESETS)


def preset(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The network class and a fresh dict of its keyword arguments for preset `name`."""
    cls, kwargs = choose(_PRESETS, name, "network preset")
    return cls, kwargs()


def _normalize(value: Any) -> Any:
    """Lists (also OmegaConf ListConfig) become tuples; other values pass through."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def resolve(name: str, **overrides: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and every constructor argument of preset `name` with keyword overrides (None values
    keep the preset's default): what `build` constructs.

    Accepts the fields of NetworkConfig; out_channels defaults to in_channels, second_noise to False; a preset with
    attention at its lowest resolution only (tiny, edm2-tiny) keeps it at the lowest one unless attn_resolutions is
    given. Overrides the architecture does not know (e.g. encoder_type for adm) raise a ValueError.
    """
    overrides = {key: _normalize(value) for key, value in overrides.items() if value is not None}
    cls, kwargs = preset(name)
    unknown = sorted(set(overrides) - set(kwargs) - {"out_channels", "second_noise"})
    if unknown:
        raise ValueError(f"{cls.__name__} (preset {name!r}) has no option(s) {', '.join(unknown)}")
    at_lowest = _attends_at_lowest(kwargs)
    kwargs |= overrides
    _check_sizes(name, kwargs)
    if at_lowest and "attn_resolutions" not in overrides:
        kwargs["attn_resolutions"] = (_lowest_resolution(kwargs),)
    kwargs.setdefault("out_channels", kwargs["in_channels"])
    kwargs.setdefault("second_noise", False)
    return cls, kwargs


def _lowest_resolution(kwargs: dict[str, Any]) -> int:
    """R/2^(L − 1): the resolution of the U-Net's lowest level (L = len(channel_mult))."""
    return kwargs["img_resolution"] >> (len(kwargs["channel_mult"]) - 1)


def _attends_at_lowest(kwargs: dict[str, Any]) -> bool:
    """Whether a preset's attention is at its lowest resolution only (tiny, edm2-tiny): built at another
    resolution or depth, it stays at the lowest one."""
    return tuple(kwargs.get("attn_resolutions") or ()) == (_lowest_resolution(kwargs),)


def _check_sizes(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse sizes no network has (0 channels, an empty channel_mult, a dropout outside [0, 1]), naming the key."""
    sizes = {key: kwargs[key] for key in ("img_resolution", "in_channels", "out_channels", "model_channels",
                                          "channel_mult_emb", "num_blocks", "channel_mult_noise")
             if kwargs.get(key) is not None}  # (None: the architecture's own choice)
    bad = [f"{key}={value}" for key, value in sizes.items() if not (isinstance(value, int) and value >= 1)]
    mult = kwargs.get("channel_mult")
    if mult is not None and (not mult or any(not (isinstance(m, int) and m >= 1) for m in mult)):
        bad.append(f"channel_mult={list(mult)}")
    for key in ("dropout", "label_dropout"):
        if kwargs.get(key) is not None and not 0 <= kwargs[key] <= 1:
            bad.append(f"{key}={kwargs[key]}")
    if bad:
        raise ValueError(f"network {name!r}: {', '.join(bad)} cannot be built; sizes are whole numbers >= 1 "
                         "(channel_mult: one or more), dropouts in [0, 1]")


def build(name: str, **overrides: Any) -> nn.Module:
    """Build preset `name` with keyword overrides: `resolve(name, **overrides)`'s class and arguments."""
    cls, kwargs = resolve(name, **overrides)
    net = cls(**kwargs)
    logger.debug("built %s preset %r: %d parameters", cls.__name__, name, sum(p.numel() for p in net.parameters()))
    return net
