"""Pixels and model space: uint8 0..255 <-> float in [−1, 1], the one conversion each way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_model_space", "to_uint8", "as_model_space", "eight_bit", "read_image"]


def to_model_space(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [−1, 1]: y = x/127.5 − 1."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images: Tensor) -> Tensor:
    """[−1, 1] -> uint8 0..255: x = floor(127.5 y + 128) clipped, i.e. round(127.5 (y + 1)) with
    ties up, as NVlabs' generate.py writes images (so FID sees the reference's pixels). uint8 images (decoded
    latents, edm.latent) are pixels already and come back as they are."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def as_model_space(images: Tensor) -> Tensor:
    """Images in [−1, 1] as float32: uint8 pixels through to_model_space, floats as they are."""
    return images.to(torch.float32) if images.is_floating_point() else to_model_space(images)


def eight_bit(image):
    """A PIL image with 16-bit gray pixels (modes I;16, I;16B, ...) as 8-bit L, each value's high byte v >> 8
    (= k for the 16-bit k·257 of an 8-bit k; PIL decodes 16-bit RGB PNGs so); other images as they are. PIL's own
    convert("L") clips 16-bit values to 255."""
    from PIL import Image

    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")


def read_image(path: str | Path) -> np.ndarray:
    """uint8 [H, W, C] of an image file: grayscale (C = 1) and RGB as they are, 16-bit gray at its scale (eight_bit),
    other modes as RGB. A file that is not a readable image (cut short, damaged) is a ValueError naming it; a missing
    one PIL's FileNotFoundError."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = eight_bit(image)
            array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError ("image file is truncated"), SyntaxError, ...
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}: {err}): replace or delete it (edm-sample "
                         "makes a deleted image of its out folder again)") from None
    return array[:, :, None] if array.ndim == 2 else array
