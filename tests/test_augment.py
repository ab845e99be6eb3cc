"""Geometric augmentation (edm/data/augment.py): geometry against closed forms, labels, statistics, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edm.data.augment import AUGMENT_DIM, AugmentConfig, AugmentParams, augment, draw_params, inverse_transform, warp

ONLY_GEOMETRY = dict(xflip=0.0, yflip=0.0)


def blob(n: int, size: int, centre: tuple[float, float], width: float = 1.5) -> torch.Tensor:
    """n copies of a Gaussian blob at `centre` = (x, y) pixels from the image centre, in float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * width**2))
    return image.expand(n, 1, size, size).clone()


def centre_of_mass(images: torch.Tensor, near: torch.Tensor, radius: float = 7.0) -> torch.Tensor:
    """(x, y) of each image [N, 1, H, W] within `radius` of `near` [N, 2], pixels from the image centre.

    The window keeps out mirror images of the blob that reflection at the borders brings into
    the corners of rotated or shrunk images.
    """
    size = images.shape[-1]
    coords = torch.arange(size, dtype=images.dtype) - (size - 1) / 2
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    window = (x - near[:, 0, None, None]) ** 2 + (y - near[:, 1, None, None]) ** 2 < radius**2
    mass = images[:, 0] * window
    total = mass.sum(dim=(1, 2))
    return torch.stack([(mass * x).sum(dim=(1, 2)) / total, (mass * y).sum(dim=(1, 2)) / total], -1)


def test_p_zero_changes_nothing():
    images = torch.randn(5, 3, 8, 8)
    out, labels = augment(images, AugmentConfig(p=0.0))
    assert out is images and labels.shape == (5, AUGMENT_DIM) and not labels.any()


def test_quarter_turn_and_integer_shift_are_exact_pixel_moves():
    """G⁻¹ q = L⁻¹(q − t): L⁻¹ = R(90°) is a quarter turn of the pixel grid, t = (2, −1) a shift."""
    images = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    quarter = torch.tensor([[0.0, -1.0], [1.0, 0.0]]).expand(2, 2, 2)
    turned = warp(images, quarter, torch.zeros(2, 2))
    # Output (x, y) reads input (−y, x) about the centre: out[row i, col j] = in[row j, col n−1−i], rot90 with k = 1.
    torch.testing.assert_close(turned, torch.rot90(images, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    shifted = warp(images, torch.eye(2).expand(2, 2, 2), torch.tensor([[2.0, -1.0]]).expand(2, 2))
    torch.testing.assert_close(shifted[:, :, :-1, 2:], images[:, :, 1:, :-2], atol=1e-5, rtol=0)


def test_quarter_turn_of_a_non_square_image():
    """H = 7, W = 9: output (x, y) reads input (−y, x) about the centre, which stays inside for |x| ≤ 3."""
    images = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(5))
    out = warp(images, torch.tensor([[[0.0, -1.0], [1.0, 0.0]]]), torch.zeros(1, 2))
    for i in range(7):  # y = i − 3
        for j in range(1, 8):  # x = j − 4, |x| ≤ 3
            # input column −y + 4 = 7 − i, input row x + 3 = j − 1
            torch.testing.assert_close(out[0, :, i, j], images[0, :, j - 1, 7 - i], atol=1e-5, rtol=0)
    shifted = warp(images, torch.eye(2)[None], torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(shifted[..., 1:, 2:], images[..., :-1, :-2], atol=1e-5, rtol=0)


def test_blob_moves_to_G_of_its_centre():
    """A blob at p₀ lands at G p₀ = R(−r) A R(r) R(−θ) S p₀ + t, built here from the draws alone."""
    cfg = AugmentConfig(p=1.0, translate_frac_std=0.05, **ONLY_GEOMETRY)
    n, size, p0 = 64, 40, (3.0, -2.0)
    images = blob(n, size, p0)
    out, labels = augment(images, cfg, torch.Generator().manual_seed(3))
    params = draw_params(cfg, n, torch.Generator().manual_seed(3))  # the same draws

    def rot(phi: float) -> np.ndarray:
        return np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])

    expected = []
    for i in range(n):
        s = 2 ** (cfg.scale_std * float(params.w_scale[i]))
        a = 2 ** (cfg.aniso_std * float(params.w_aniso[i]))
        r, theta = float(params.r_aniso[i]), float(params.theta[i])
        L = rot(-r) @ np.diag([a, 1 / a]) @ rot(r) @ rot(-theta) * s
        t = cfg.translate_frac_std * size * np.array([float(params.w_tx[i]), float(params.w_ty[i])])
        expected.append(L @ np.array(p0) + t)
    expected = torch.tensor(np.array(expected))
    inside = expected.abs().max(dim=1).values < size / 2 - 7  # the blob and its window stay inside
    assert inside.sum() > 40
    err = (centre_of_mass(out, expected) - expected)[inside].norm(dim=1)
    assert err.max() < 0.05, err.max()
    moved = (expected - torch.tensor(p0, dtype=torch.float64)).norm(dim=1)
    assert (moved > 1).sum() > 20  # the transforms really moved most blobs
    assert not labels[:, :2].any()  # flips were off


def test_labels_follow_the_draws_in_nvlabs_order():
    params = AugmentParams(
        xflip=torch.tensor([1.0]), yflip=torch.tensor([0.0]), w_scale=torch.tensor([0.5]),
        theta=torch.tensor([math.pi / 2]), w_aniso=torch.tensor([2.0]), r_aniso=torch.tensor([math.pi / 3]),
        w_tx=torch.tensor([-1.0]), w_ty=torch.tensor([0.25]),
    )
    expected = [1, 0, 0.5, -1, 1, 2 * 0.5, 2 * math.sqrt(3) / 2, -1, 0.25]
    torch.testing.assert_close(params.labels(), torch.tensor([expected]), atol=1e-6, rtol=0)


def test_draws_are_nvlabs_augment_pipe_calls_in_its_order():
    """NVlabs' AugmentPipe (EDM's recipe) draws, per transform: x-flip randint, rand; y-flip randint, rand; scale
    randn, rand; rotation rand, rand; aniso randn, rand (its angle), rand, rand; translation randn([2, N]), rand. The
    same generator state gives the same labels, so draws can be compared with the reference's, call for call."""
    cfg, n = AugmentConfig(p=0.5, rotate_frac_max=0.7), 64
    g = torch.Generator().manual_seed(4)
    fire = lambda mult: torch.rand(n, generator=g) < cfg.p * mult  # noqa: E731
    xflip = torch.randint(2, (n,), generator=g) * fire(cfg.xflip)
    yflip = torch.randint(2, (n,), generator=g) * fire(cfg.yflip)
    w_s = torch.randn(n, generator=g) * fire(cfg.scale)
    theta = (torch.rand(n, generator=g) * 2 - 1) * (math.pi * cfg.rotate_frac_max) * fire(cfg.rotate_frac)
    w_a, r = torch.randn(n, generator=g), (torch.rand(n, generator=g) * 2 - 1) * math.pi
    w_a, r = w_a * fire(cfg.aniso), r * (torch.rand(n, generator=g) < cfg.aniso_rotate_prob)
    w_t = torch.randn(2, n, generator=g) * fire(cfg.translate_frac)
    expected = torch.stack([xflip, yflip, w_s, theta.cos() - 1, theta.sin(), w_a * r.cos(), w_a * r.sin(), *w_t], 1)
    assert torch.equal(draw_params(cfg, n, torch.Generator().manual_seed(4)).labels(), expected.float())


def test_borders_mirror_about_the_edge_pixels_as_nvlabs_reflect_padding():
    """Outside the image, a warp reads the image mirrored about its edge pixels, the edge pixel not repeated (NVlabs
    pads with torch's 'reflect'): a shift by (3, −2) is a crop of the reflect-padded image."""
    images = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(6))
    shifted = warp(images, torch.eye(2).expand(2, 2, 2), torch.tensor([[3.0, -2.0]]).expand(2, 2))
    padded = F.pad(images, [3, 0, 0, 2], mode="reflect")  # left 3, bottom 2
    torch.testing.assert_close(shifted, padded[:, :, 2:, :9], atol=1e-5, rtol=0)
    # A shift by more than the image (12 pixels of 9) reflects again at the far edge: period 2·(9 − 1).
    far = warp(images, torch.eye(2).expand(2, 2, 2), torch.tensor([[12.0, 0.0]]).expand(2, 2))
    columns = [8 - abs(8 - (j - 12) % 16) for j in range(9)]
    torch.testing.assert_close(far, images[..., columns], atol=1e-5, rtol=0)


def test_flips_match_their_labels():
    cfg = AugmentConfig(p=1.0, xflip=1.0, yflip=1.0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
    images = torch.randn(32, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    out, labels = augment(images, cfg, torch.Generator().manual_seed(2))
    for image, result, (fx, fy) in zip(images, out, labels[:, :2]):
        expected = image.flip(2) if fx else image
        expected = expected.flip(1) if fy else expected
        assert torch.equal(result, expected)
    assert 0 < labels[:, 0].sum() < 32 and 0 < labels[:, 1].sum() < 32
    assert not labels[:, 2:].any()


def test_firing_rates_follow_p_times_the_multipliers():
    """EDM's recipe at p = 0.12: x-flip drawn for all (flips ½), y-flip fires 0.12 (flips ½), the
    others 0.12; unchanged images keep zero labels."""
    n = 40_000
    params = draw_params(AugmentConfig(p=0.12), n, torch.Generator().manual_seed(0))
    labels = params.labels()

    def check(rate: torch.Tensor, expected: float) -> None:
        assert abs(float(rate) - expected) < 5 * math.sqrt(expected * (1 - expected) / n), (float(rate), expected)

    check(labels[:, 0].mean(), 0.5)
    check(labels[:, 1].mean(), 0.06)
    for column in (2, 4, 7):  # scale, rotation (sin θ), translation
        check((labels[:, column] != 0).float().mean(), 0.12)
    check((labels[:, 5] != 0).float().mean(), 0.12)  # aniso: w cos r ≠ 0 whenever it fires
    assert torch.equal(labels[:, 7] != 0, labels[:, 8] != 0)  # x and y translation fire together
    assert abs(float(params.w_scale[params.w_scale != 0].std()) - 1) < 0.05


def test_a_generator_state_fixes_the_augmentation():
    images = torch.randn(8, 3, 16, 16)
    a = augment(images, AugmentConfig(p=0.5), torch.Generator().manual_seed(7))
    b = augment(images, AugmentConfig(p=0.5), torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    unchanged = ~a[1][:, 1:].any(dim=1) & (a[1][:, 0] == 0)
    assert torch.equal(a[0][unchanged], images[unchanged])  # no transform: the image is bit-exact


def test_inverse_transform_is_identity_without_draws():
    params = draw_params(AugmentConfig(p=0.0), 3, torch.Generator().manual_seed(0))
    L_inv, t = inverse_transform(AugmentConfig(), params, 8, 8)
    torch.testing.assert_close(L_inv, torch.eye(2).expand(3, 2, 2), atol=1e-6, rtol=0)  # R(−r) I R(r) = I
    assert not t.any()


# ----------------------------------------------------------------------------- training


def test_training_with_augmentation_gives_the_network_nine_labels(compose_train, tmp_path):
    from edm.core import losses
    from edm.models import checkpoint
    from edm.training.loop import train

    seen = []
    original = losses.Loss.__call__

    def spy(self, denoiser, y, class_labels=None, **kw):
        seen.append(kw.get("augment_labels"))
        return original(self, denoiser, y, class_labels, **kw)

    cfg = compose_train("augment.p=0.5")
    losses.Loss.__call__ = spy
    try:
        result = train(cfg)
    finally:
        losses.Loss.__call__ = original
    assert len(seen) == 4 and all(a is not None and a.shape == (8, AUGMENT_DIM) for a in seen)
    assert any(a[:, 2:].any() for a in seen)  # geometric transforms fired
    state = checkpoint.load_checkpoint(result.checkpoint)
    assert state["denoiser"]["network"]["augment_dim"] == AUGMENT_DIM
    assert result.grid is not None and result.grid.exists()  # sampling runs with labels absent (= 0)


@pytest.mark.parametrize("override, message", [
    ("augment.p=1.5", "augment.p=1.5 must be in [0, 1]"),
    ("augment.scale_std=-1", "augment.scale_std=-1"),
])
def test_bad_augment_settings_fail_clearly(compose_train, override, message):
    from edm.training.config import check_config

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_config(compose_train(override))


def test_augment_dim_must_fit(compose_train):
    from edm.training.config import check_config

    with pytest.raises(ValueError, match="network.augment_dim=4.*set network.augment_dim=9"):
        check_config(compose_train("augment.p=0.1", "network.augment_dim=4"))
