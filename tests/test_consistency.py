"""Consistency functions: the boundary condition f(x̂; σ_b) = x̂ on every precond kind and network preset."""

import pytest
import torch

import edm
from edm import networks
from edm.core.precond import PRECOND_KINDS

F64 = torch.float64

# Every preset family, small: real structure (2 levels, attention at 4×4), few channels.
SMALL_PRESETS = {
    "tiny": dict(),
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "ncsnpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "adm": dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "edm2-tiny": dict(model_channels=16),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(preset: str) -> torch.nn.Module:
    """The preset, small, with every parameter moved off its initialization (some presets zero their output layer)."""
    torch.manual_seed(0)
    net = networks.build(preset, img_resolution=8, in_channels=2, **SMALL_PRESETS[preset]).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
@pytest.mark.parametrize("kind", list(PRECOND_KINDS))
def test_the_boundary_condition_holds_exactly_on_every_kind_and_preset(preset, kind):
    """boundary_sigma σ_b: f(x̂; σ_b) = x̂ bit for bit, and f differs from x̂ above it."""
    sigma_b = 0.002
    f = edm.Precond(small_net(preset), kind=kind, boundary_sigma=sigma_b)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.equal(f(x, torch.full((3,), sigma_b, dtype=F64)), x)
    assert not torch.allclose(f(x, torch.full((3,), 0.5, dtype=F64)), x)


@pytest.mark.parametrize("kind", list(PRECOND_KINDS))
def test_the_boundary_shifts_c_skip_and_c_out_only(kind):
    """c_skip and c_out are the row's at σ − σ_b, c_in and c_noise the row's at σ; σ_b = 0 is the plain denoiser.
    For kind edm, c_skip is Song et al.'s σ_d²/((σ − σ_b)² + σ_d²)."""
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=F64)
    plain = edm.Precond(torch.nn.Identity(), kind=kind).coefficients(sigma)
    bounded = edm.Precond(torch.nn.Identity(), kind=kind, boundary_sigma=0.002).coefficients(sigma)
    shifted = edm.Precond(torch.nn.Identity(), kind=kind).coefficients(sigma - 0.002)
    torch.testing.assert_close(bounded, plain._replace(c_skip=shifted.c_skip, c_out=shifted.c_out), rtol=0, atol=0)
    if kind == "edm":
        torch.testing.assert_close(bounded.c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25), rtol=1e-14, atol=0)


def test_a_negative_boundary_is_refused():
    with pytest.raises(ValueError, match="boundary_sigma=-0.1 must be >= 0"):
        edm.Precond(torch.nn.Identity(), boundary_sigma=-0.1)
