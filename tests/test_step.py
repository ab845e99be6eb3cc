"""edm/training/step.py and ema.py: one optimizer step, its learning rate and the EMA, against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

import edm
from edm.training.ema import ema_beta, update_ema
from edm.training.step import learning_rate, train_step

from conftest import SMALL_PRESETS


class _Accelerator:
    """The two accelerate calls train_step makes, for a single process."""

    @staticmethod
    def no_sync(model):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def backward(loss):
        loss.backward()


class _ConvNet(torch.nn.Module):
    """F(x, c_noise): a convolution modulated by the noise level."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        return self.conv(x) * (1 + c_noise.view(-1, 1, 1, 1))


def test_ema_beta_is_edms_half_life_in_images():
    # no ramp-up: after halflife images at batch B the old weights count 1/2
    beta = ema_beta(10**9, batch_size=50, halflife_kimg=1.0, rampup_ratio=None)
    assert math.isclose(beta ** (1000 / 50), 0.5, rel_tol=1e-12)
    # ramp-up: the half-life is min(halflife, cur_nimg * ratio)
    assert math.isclose(ema_beta(2000, 50, 1000.0, 0.05), 0.5 ** (50 / 100), rel_tol=1e-12)
    assert math.isclose(ema_beta(10**9, 50, 1.0, 0.05), 0.5 ** (50 / 1000), rel_tol=1e-12)
    assert ema_beta(0, 50, 1.0, 0.05) == 0.0  # first step: the EMA takes the weights


def test_update_ema_is_a_lerp_and_copies_buffers():
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ema.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        model.running_mean.fill_(5.0)
    update_ema(ema, model, beta=0.75)
    assert torch.allclose(ema.weight, 0.75 * torch.tensor([3.0, 2.0, 1.0]) + 0.25 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(ema.running_mean, model.running_mean)
    update_ema(ema, model, beta=0.0)
    assert torch.equal(ema.weight, model.weight)


def test_learning_rate_ramp_and_decay():
    assert learning_rate(0, 1e-3, 10) == 0.0
    assert math.isclose(learning_rate(5000, 1e-3, 10), 5e-4)
    assert learning_rate(50_000, 1e-3, 10) == 1e-3
    assert learning_rate(50_000, 1e-3, 0) == 1e-3
    assert math.isclose(learning_rate(400_000, 1e-3, 10, decay_kimg=100), 1e-3 / 2)


def test_train_step_optimizes_the_batch_mean_of_the_per_example_loss_and_reports_it_per_pixel():
    """train_step's update is −lr·∇ mean_B(λ‖D − y‖²) (NVlabs/edm's loss.sum() / batch) and it
    returns that objective / (C·H·W); 2 micro-batches of 4 give the same update as one batch of 8
    (gradients averaged, not summed)."""
    loss = edm.Loss(edm.schedules.EDM())
    y, noise = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4)
    sigma = torch.linspace(0.1, 5.0, 8)
    row = {float(v): i for i, v in enumerate(y[:, 0, 0, 0])}

    def loss_fn(model, y_part, labels, generator=None):  # σ and n fixed per example
        rows = [row[float(v)] for v in y_part[:, 0, 0, 0]]
        return loss(model, y_part, sigma=sigma[rows], noise=noise[rows])

    def fresh():
        torch.manual_seed(0)
        return edm.Precond(_ConvNet(), kind="edm")

    def step(micro_batches):
        den = fresh()
        before = [p.detach().clone() for p in den.parameters()]
        opt = torch.optim.SGD(den.parameters(), lr=0.1)
        out = train_step(den, loss_fn, opt, micro_batches, _Accelerator(), None, lr=0.1)
        return out, before, [p.detach().clone() for p in den.parameters()]

    whole, before, p_whole = step([(y, None)])
    split, _, p_split = step([(y[:4], None), (y[4:], None)])
    den = fresh()
    objective = loss(den, y, sigma=sigma, noise=noise).mean()
    grads = torch.autograd.grad(objective, list(den.parameters()))
    expected = objective.detach() / (2 * 4 * 4)
    assert torch.allclose(whole, expected, rtol=1e-6) and torch.allclose(split, expected, rtol=1e-6)
    for a, b, p0, g in zip(p_whole, p_split, before, grads):  # the updates, to float32 round-off of their size
        update, tol = a - p0, 1e-5 * float((0.1 * g).abs().max())
        assert torch.allclose(update, -0.1 * g, rtol=1e-4, atol=tol) and tol > 0
        assert torch.allclose(b - p0, update, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("schedule", ["vp", "ve", "edm", "fm", "trigflow"])
def test_train_step_reads_nothing_back(schedule, host_reads):
    """No float(t), bool(t), t.item() or t.tolist() in a step, with EDM's augmentation on: on a
    GPU each would make the host wait. (SGD, since torch's CPU Adam reads its step counter.)"""
    from edm.data.augment import AugmentConfig, augment

    reads = host_reads
    net = edm.networks.build("tiny", img_resolution=8, in_channels=2, model_channels=8, augment_dim=9, dropout=0.1)
    den = edm.Precond(net, kind=schedule)
    opt = torch.optim.SGD(den.parameters(), lr=0.01)
    loss_fn = edm.Loss(edm.schedules.get(schedule))
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4, 2, 8, 8, generator=g) * 2 - 1
    reads.clear()
    for _ in range(3):
        y_aug, augment_labels = augment(y, AugmentConfig(p=0.5), g)
        train_step(den, loss_fn, opt, [(y_aug, None, augment_labels), (y, None)], _Accelerator(), g, lr=0.01)
    assert reads == []


def _trainable(preset: str, kind: str, **overrides) -> edm.Precond:
    from edm import networks

    torch.manual_seed(0)
    net = networks.build(preset, img_resolution=8, in_channels=1, **SMALL_PRESETS[preset], **overrides)
    return edm.Precond(net, kind=kind).train()


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
@pytest.mark.parametrize("objective", ["ect", "sct", "meanflow"])
def test_the_few_step_losses_train_every_preset_in_training_mode(preset, objective):
    """ECT's second pass and the JVP of sCT and MeanFlow see no in-place write in the network's forward (EDM2's
    forced weight normalization happens before the step): one step trains, its loss is finite, the weights move."""
    from edm.core.consistency import ECTLoss, SCMLoss
    from edm.core.meanflow import MeanFlowLoss

    loss_fn = {"ect": ECTLoss(), "sct": SCMLoss().at(10**9), "meanflow": MeanFlowLoss(ratio=1.0)}[objective]
    from edm.networks.edm2 import force_weight_normalization_

    model = _trainable(preset, {"ect": "edm", "sct": "trigflow", "meanflow": "fm"}[objective],
                       **({"second_noise": True} if objective == "meanflow" else {}))
    force_weight_normalization_(model)  # (what the step starts with: only the optimizer moves the weights after it)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = train_step(model, loss_fn, opt, [(y, None)], _Accelerator(), torch.Generator().manual_seed(2), lr=1e-3)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_step_normalizes_edm2_weights_before_its_forward_passes():
    """EDM2's forced weight normalization w ← normalize(w) (unit RMS per output channel) is part of the step: with
    lr = 0 the step leaves every MPConv weight normalized."""
    from edm.networks.edm2 import MPConv

    model = _trainable("edm2-tiny", "edm")
    convs = [m for m in model.modules() if isinstance(m, MPConv)]
    with torch.no_grad():
        for m in convs:
            m.weight.mul_(3.0)
    y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    train_step(model, edm.Loss(edm.schedules.EDM()), opt, [(y, None)], _Accelerator(), torch.Generator(), lr=0.0)
    for m in convs:
        rms = m.weight.pow(2).mean(dim=list(range(1, m.weight.ndim))).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)
