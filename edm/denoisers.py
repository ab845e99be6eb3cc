"""The ideal denoiser of a finite data set: D(x̂; σ) = E[y | x̂] = Σ_k w_k y_k,
w = softmax_k(−‖x̂ − y_k‖² / (2σ²))  (EDM Appendix B.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["IdealDenoiser"]


def _softmax(logits: Tensor) -> Tensor:
    """Row-wise softmax exp(l − max l) / Σ exp(l − max l).

    Written out because torch.softmax on small CPU tensors can stall for milliseconds in
    OpenMP barriers when the cores are busy; these element-wise ops do not.
    """
    w = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return w / w.sum(dim=1, keepdim=True)


class IdealDenoiser(nn.Module):
    """Exact E[y | x̂ = y + σn] for y uniform over the rows of `data` [K, ...].

    With `labels` ([K] integers) the posterior of a class-conditional call is restricted to
    the points of the requested class (`class_labels` as integers [B] or one-hot [B, L]).
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, chunk_size: int = 4096) -> None:
        super().__init__()
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [K, ...] with K >= 1, got {list(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or Inf values")
        if labels is not None and labels.shape != data.shape[:1]:
            raise ValueError(f"labels must have shape [K] = {list(data.shape[:1])}, got {list(labels.shape)}")
        flat = data.reshape(data.shape[0], -1)
        self.register_buffer("data", flat)
        self.register_buffer("half_sq_norm", 0.5 * (flat**2).sum(dim=1))
        self.register_buffer("labels", None if labels is None else labels.long())
        self.item_shape = tuple(data.shape[1:])
        self.chunk_size = chunk_size

    def log_weights(self, x_hat: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """ln w_k up to a constant per row: (x̂·y_k − ½‖y_k‖²)/σ²; the ‖x̂‖² term cancels in the softmax."""
        x = x_hat.reshape(x_hat.shape[0], -1).to(self.data.dtype)
        score = x @ self.data.T - self.half_sq_norm  # [B, K]
        sigma2 = sigma.to(score.dtype).reshape(-1, 1) ** 2
        # σ = 0: the posterior is a point mass on the nearest data point.
        nearest = torch.where(score == score.amax(dim=1, keepdim=True), 0.0, -torch.inf)
        logits = torch.where(sigma2 > 0, score / sigma2.clamp_min(torch.finfo(score.dtype).tiny), nearest)
        if class_labels is not None:
            logits = logits + self._class_mask(class_labels, x.shape[0])
        return logits

    def _class_mask(self, class_labels: Tensor, batch: int) -> Tensor:
        """0 for points of the requested class, −inf elsewhere."""
        if self.labels is None:
            raise ValueError("class_labels given, but the IdealDenoiser was built without `labels`")
        wanted = class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels.long()
        if wanted.shape != (batch,):
            raise ValueError(f"class_labels must describe {batch} items, got shape {list(class_labels.shape)}")
        match = wanted.reshape(-1, 1) == self.labels.reshape(1, -1)
        if not match.any(dim=1).all():
            raise ValueError("a requested class has no data points")
        zero = torch.zeros((), dtype=self.data.dtype, device=self.data.device)
        return torch.where(match, zero, -torch.inf)

    def forward(self, x_hat: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Σ_k softmax_k(−‖x̂ − y_k‖²/(2σ²)) y_k, batched over x̂ [B, ...] and σ [B] (or scalar)."""
        if tuple(x_hat.shape[1:]) != self.item_shape:
            raise ValueError(f"x_hat items have shape {list(x_hat.shape[1:])}, data items {list(self.item_shape)}")
        sigma = torch.as_tensor(sigma, dtype=x_hat.dtype, device=x_hat.device).expand(x_hat.shape[0])
        out = []
        for start in range(0, x_hat.shape[0], self.chunk_size):
            part = slice(start, start + self.chunk_size)
            labels = None if class_labels is None else class_labels[part]
            out.append(_softmax(self.log_weights(x_hat[part], sigma[part], labels)) @ self.data)
        return torch.cat(out).reshape(x_hat.shape).to(x_hat.dtype)
