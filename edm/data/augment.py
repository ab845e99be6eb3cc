"""Geometric augmentation with conditioning labels (EDM section 5, augmentation regularization;
the non-leaking augmentations of Karras et al. 2020, "Training GANs with Limited Data").

Each transform fires per image with probability p · multiplier. The network receives what was
done as 9 augmentation labels (`augment_labels`, network `augment_dim = 9`); the loss compares D
with the augmented image. At sampling the labels are absent (= 0, "not augmented"), so the
model generates clean images while training saw p-augmented data. The labels, in order:

    [xflip, yflip, w_s, cos θ − 1, sin θ, w_a cos r, w_a sin r, w_x, w_y]

with flips in {0, 1}; w_s, w_a, w_x, w_y ~ N(0, 1); θ ~ U(−π, π)·rotate_frac_max; r ~ U(−π, π)
with probability aniso_rotate_prob, else 0; each zero when its transform does not fire. The
same layout as the NVlabs/edm pipeline, so its networks with augment_dim 9 read the same labels.

The geometric part maps output pixel q (in pixels, relative to the image centre) to input pixel

    G⁻¹ q = S⁻¹ R(θ) R(−r) A⁻¹ R(r) (q − t),   S = 2^(scale_std·w_s) I,  A = diag(a, 1/a),
    a = 2^(aniso_std·w_a),  t = translate_frac_std · (W w_x, H w_y),  R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]],

sampled bilinearly, reading the image mirrored about its edge pixels outside it (NVlabs' reflect padding).
NVlabs resamples through a 2× wavelet upsampling instead; that anti-aliasing is not reproduced here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUGMENT_DIM", "AugmentConfig", "AugmentParams", "draw_params", "inverse_transform", "reflect", "warp", "augment"]

AUGMENT_DIM = 9


@dataclass
class AugmentConfig:
    """Probability p (0 = off) and per-transform multipliers and ranges; the defaults are EDM's
    CIFAR-10 recipe apart from p (EDM: p = 0.12; xflip = 1e8 makes x-flips fire for every image,
    each flipping with probability ½)."""

    p: float = 0.0
    xflip: float = 1e8
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125


@dataclass
class AugmentParams:
    """Per-image draws, each of shape [N] (zero where the transform did not fire)."""

    xflip: Tensor
    yflip: Tensor
    w_scale: Tensor
    theta: Tensor
    w_aniso: Tensor
    r_aniso: Tensor
    w_tx: Tensor
    w_ty: Tensor

    def labels(self) -> Tensor:
        """The 9 augmentation labels [N, 9] (layout in the module docstring)."""
        return torch.stack([
            self.xflip, self.yflip, self.w_scale, self.theta.cos() - 1, self.theta.sin(),
            self.w_aniso * self.r_aniso.cos(), self.w_aniso * self.r_aniso.sin(), self.w_tx, self.w_ty,
        ], dim=1).float()


def draw_params(cfg: AugmentConfig, n: int, generator: torch.Generator | None = None, device=None) -> AugmentParams:
    """Draw the transforms of n images in NVlabs' AugmentPipe's order, call for call (so a generator state fixes
    them, and the state the reference's global RNG has gives its draws)."""

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    def fires(multiplier: float) -> Tensor:
        return (rand(n) < cfg.p * multiplier).float()

    def randn() -> Tensor:
        return torch.randn(n, generator=generator, device=device)

    xflip = torch.randint(2, (n,), generator=generator, device=device).float() * fires(cfg.xflip)
    yflip = torch.randint(2, (n,), generator=generator, device=device).float() * fires(cfg.yflip)
    w_scale = randn() * fires(cfg.scale)
    theta = (rand(n) * 2 - 1) * (math.pi * cfg.rotate_frac_max) * fires(cfg.rotate_frac)
    w_aniso, r_aniso = randn(), (rand(n) * 2 - 1) * math.pi  # NVlabs draws both before either decision
    w_aniso = w_aniso * fires(cfg.aniso)
    r_aniso = r_aniso * (rand(n) < cfg.aniso_rotate_prob).float()
    w_tx, w_ty = torch.randn(2, n, generator=generator, device=device)  # one draw of 2n, as NVlabs' randn([2, N])
    translate = fires(cfg.translate_frac)  # x and y move together
    w_tx, w_ty = w_tx * translate, w_ty * translate
    return AugmentParams(xflip, yflip, w_scale, theta, w_aniso, r_aniso, w_tx, w_ty)


def _rotation(phi: Tensor) -> Tensor:
    """R(φ) [N, 2, 2]."""
    c, s = phi.cos(), phi.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def inverse_transform(cfg: AugmentConfig, params: AugmentParams, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(L⁻¹ [N, 2, 2], t [N, 2]) with G⁻¹ q = L⁻¹ (q − t), in pixels about the image centre."""
    s = torch.exp2(cfg.scale_std * params.w_scale)
    a = torch.exp2(cfg.aniso_std * params.w_aniso)
    a_inv = torch.diag_embed(torch.stack([1 / a, a], -1))
    r = params.r_aniso
    L_inv = (_rotation(params.theta) @ _rotation(-r) @ a_inv @ _rotation(r)) / s[:, None, None]
    t = cfg.translate_frac_std * torch.stack([width * params.w_tx, height * params.w_ty], -1)
    return L_inv, t


def reflect(x: Tensor, size: int) -> Tensor:
    """Pixel coordinates mirrored into [0, size − 1] about the edge pixels' centres, the edge pixel not repeated
    (torch's pad mode 'reflect', as NVlabs pads): x ↦ (size − 1) − |(size − 1) − (x mod 2(size − 1))|. Bilinear
    interpolation at the mirrored coordinate equals interpolation in the mirrored image."""
    if size < 2:
        return torch.zeros_like(x)
    return (size - 1) - ((size - 1) - x.remainder(2 * (size - 1))).abs()


def warp(images: Tensor, L_inv: Tensor, t: Tensor) -> Tensor:
    """Output pixel q takes the input at L⁻¹ (q − t) (pixels about the centre; bilinear; outside the image, the
    image mirrored about its edge pixels, as NVlabs' reflect padding)."""
    n, _, h, w = images.shape
    # In affine_grid's coordinates (align_corners=False) pixel x maps to u = 2x/w, y to 2y/h:
    # scale L⁻¹ by those factors (Python scalars, so no host-to-device copy in the step).
    shift = (L_inv @ t.unsqueeze(-1)).squeeze(-1)
    theta = torch.stack([
        torch.stack([L_inv[:, 0, 0], L_inv[:, 0, 1] * (h / w), -shift[:, 0] * (2 / w)], -1),
        torch.stack([L_inv[:, 1, 0] * (w / h), L_inv[:, 1, 1], -shift[:, 1] * (2 / h)], -1),
    ], -2).to(images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
    # grid_sample's own "reflection" mirrors about the image's outer edges (the edge pixel repeated): mirror the
    # pixel coordinates u·size/2 + (size − 1)/2 about the edge pixels' centres here instead.
    x = reflect((grid[..., 0] + 1) * (w / 2) - 0.5, w)
    y = reflect((grid[..., 1] + 1) * (h / 2) - 0.5, h)
    grid = torch.stack([(x + 0.5) * (2 / w) - 1, (y + 0.5) * (2 / h) - 1], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(augmented images, augmentation labels [N, 9]) for images [N, C, H, W]; cfg.p = 0 returns them unchanged."""
    n, _, h, w = images.shape
    if cfg.p <= 0:
        return images, torch.zeros(n, AUGMENT_DIM, device=images.device)
    params = draw_params(cfg, n, generator, images.device)
    view = (n, 1, 1, 1)
    images = torch.where(params.xflip.view(view) > 0, images.flip(3), images)
    images = torch.where(params.yflip.view(view) > 0, images.flip(2), images)
    labels = params.labels()
    moved = labels[:, 2:].ne(0).any(dim=1)  # a geometric transform fired; others keep their exact pixels
    images = torch.where(moved.view(view), warp(images, *inverse_transform(cfg, params, h, w)), images)
    return images, labels
