"""The GPU fast path on CUDA: skipped on machines without a CUDA GPU.

On a GPU machine: `pytest tests/test_cuda.py -m "slow or not slow"` (minutes: it compiles every
preset with inductor; pytest-xdist's `-n 6` compiles them side by side). The CPU suite covers the
same code paths with the eager backend and CPU autocast; what only a GPU shows is here:
inductor's CUDA kernels, bf16 on tensor cores, channels_last convolutions and fused Adam.
"""

from __future__ import annotations

import math

import pytest
import torch

import edm
from edm import networks
from edm.core.denoisers import fast_denoiser
from edm.training.step import make_optimizer, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 references in true fp32 (the entry points set TF32 from the config; tests must not inherit it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialized output layers would hide broken paths)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.3
            p.copy_((p.ndim == 1) + scale * torch.randn(p.shape, generator=gen))
    return net


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(n: int = 8, label_dim: int = 10):
    gen = torch.Generator(CUDA).manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=gen, device=CUDA).contiguous(memory_format=torch.channels_last)
    c_noise = torch.randn(n, generator=gen, device=CUDA)
    labels = torch.nn.functional.one_hot(torch.arange(n, device=CUDA) % label_dim, label_dim).float()
    return x, c_noise, labels


@pytest.mark.parametrize("preset", ["ddpmpp", "ncsnpp", "adm"])
def test_full_presets_compile_fullgraph_under_bf16_and_channels_last(preset):
    """The CIFAR-size presets (dropout, label dropout, attention) compile with
    fullgraph=True (a graph break would raise), train a step, do not recompile for a new
    c_noise, and the compiled eval forward matches eager within bf16 tolerance. One block per
    level has every layer type of the preset at a third of the compile time."""
    net = networks.build(preset, img_resolution=32, in_channels=3, label_dim=10, dropout=0.13, label_dropout=0.1,
                         num_blocks=1)
    net = randomized(net).to(CUDA).to(memory_format=torch.channels_last).train()
    compiled = torch.compile(net, fullgraph=True)
    x, c_noise, labels = inputs()
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        out = compiled(x, c_noise, labels)
        out.float().square().mean().backward()
        assert out.shape == x.shape
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(x, c_noise + 1, labels)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    net.eval()
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        fast = compiled(x, c_noise, labels)
    with torch.no_grad():
        ref = net(x, c_noise, labels)
    assert 0 < rel_err(fast, ref) < 3e-2


def _short_run(mixed_precision: str, compile: bool, steps: int = 40) -> list[float]:
    """Losses of `steps` train steps of a small DDPM++ on a fixed batch, same seed and weights."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.manual_seed(0)
    net = networks.build("ddpmpp", img_resolution=32, in_channels=3, model_channels=32, channel_mult=[1, 2],
                         num_blocks=1, dropout=0.0)
    den = edm.Precond(net, kind="edm")
    gen = torch.Generator().manual_seed(2)
    base = torch.rand(8, 3, 8, 8, generator=gen) * 2 - 1  # smooth images: a learnable data set
    y = torch.nn.functional.interpolate(base, size=32, mode="bilinear").repeat(8, 1, 1, 1).to(CUDA)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(mixed_precision=mixed_precision, dynamo_backend="inductor" if compile else "no")
    opt = make_optimizer(den.parameters(), 2e-3, (0.9, 0.999), 1e-8, CUDA)
    assert opt.defaults["fused"] is True  # the fused Adam kernel on CUDA
    model, opt = acc.prepare(den, opt)
    g = torch.Generator(CUDA).manual_seed(1)
    loss_fn = edm.Loss(edm.schedules.get("edm"))
    losses = [train_step(model, loss_fn, opt, [(y, None)], acc, g, lr=2e-3) for _ in range(steps)]
    return torch.stack(losses).tolist()  # one host sync, after the run


def test_bf16_compiled_training_follows_the_fp32_loss_curve():
    """The fast path (bf16 autocast + inductor + fused Adam) gives the fp32 loss curve within noise."""
    fp32 = torch.tensor(_short_run("no", compile=False))
    fast = torch.tensor(_short_run("bf16", compile=True))
    assert fp32[-10:].mean() < 0.8 * fp32[:5].mean()  # the run learns
    steps = torch.arange(1, len(fp32) + 1)
    noise = (fp32[1:] - fp32[:-1]).abs().mean()
    assert (fp32.cumsum(0) / steps - fast.cumsum(0) / steps).abs().max() < noise


def test_bf16_compiled_sampling_matches_fp32():
    """edm-sample's fast path (mixed_precision=bf16 compile=true) on CUDA."""
    net = networks.build("ddpmpp", img_resolution=32, in_channels=3, model_channels=32, channel_mult=[1, 2],
                         num_blocks=1, dropout=0.0)
    den = edm.Precond(randomized(net), kind="edm").to(CUDA).eval()
    noise = torch.randn(16, 3, 32, 32, generator=torch.Generator(CUDA).manual_seed(0), device=CUDA)
    with torch.no_grad():
        ref = edm.sample(den, noise, "edm", num_steps=8)
        fast = edm.sample(fast_denoiser(den, "bf16", compile=True), noise, "edm", num_steps=8)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert 0 < rel_err(fast, ref) < 3e-2


def test_the_coefficients_of_every_kind_and_iddpms_rounding_wait_for_no_queued_gpu_work():
    """Every precond kind's table and the iddpm schedule's levels are computed on σ's device: under CUDA's sync
    debug mode "error", a copy from the host (which waits for the queued kernels) would raise."""
    sigma = torch.rand(64, device=CUDA, dtype=torch.float32) * 80
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kind in edm.precond.PRECOND_KINDS:
            edm.precond.coefficients(sigma, kind)
        edm.schedules.get("iddpm").round_time(sigma)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
