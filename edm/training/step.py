"""One optimizer step of training, and the learning rate and optimizer it uses.

The step: draw σ and n, per-example loss λ(σ)‖D(y + σn; σ) − y‖² (edm.Loss, summed over pixels),
optimize its batch mean: NVlabs/edm's objective (its loss.sum() / batch), so Adam's eps and grad_clip
act as in the reference. The loss it reports is that objective per pixel, divided by C·H·W.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.losses import Loss
from ..networks.edm2 import force_weight_normalization_

__all__ = ["learning_rate", "train_step", "make_optimizer"]


def learning_rate(cur_nimg: int, lr: float, rampup_kimg: float, decay_kimg: float = 0.0) -> float:
    """lr · min(n / (rampup_kimg·1000), 1), times 1/sqrt(max(n / (decay_kimg·1000), 1)) if decay_kimg > 0."""
    value = lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1.0)
    if decay_kimg > 0:
        value /= math.sqrt(max(cur_nimg / (decay_kimg * 1000), 1.0))
    return value


def make_optimizer(
    params, lr: float, betas: Sequence[float], eps: float, device: torch.device
) -> torch.optim.Optimizer:
    """Adam; the fused CUDA kernel on GPUs (one launch for all parameters), the default elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def train_step(
    model: nn.Module,
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[Tensor, Tensor | None]],
    accelerator: Any,
    generator: torch.Generator,
    lr: float,
    grad_clip: float | None = None,
    seed_draws: Callable[[int], None] | None = None,
) -> Tensor:
    """One optimizer step on the global batch, split into micro-batches (gradient accumulation).

    Each micro-batch is (y, class_labels) or (y, class_labels, augment_labels); `seed_draws(i)` (if given) seeds
    the draws of micro-batch i (σ, n from `generator`, dropout from the global RNG) before its loss. Optimizes
    mean_batch(λ‖D − y‖²), gradients averaged over micro-batches and processes; EDM2 weights are normalized before
    each micro-batch (force_weight_normalization_), so the forward passes write nothing in place. Returns that
    objective per pixel, mean_batch(λ‖D − y‖²) / (C·H·W), as a device tensor (no host sync).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (y, labels, *augment_labels) in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        force_weight_normalization_(model)  # before each micro-batch's forward passes, as NVlabs/edm2's forward does it
        if seed_draws is not None:
            seed_draws(i)
        kwargs = {"augment_labels": augment_labels[0]} if augment_labels and augment_labels[0] is not None else {}
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            objective = loss_fn(model, y, labels, generator=generator, **kwargs).mean()
            accelerator.backward(objective / len(micro_batches))
        total += objective.detach() / y[0].numel()
    if grad_clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)
