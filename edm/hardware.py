"""Device and numerics switches that only entry points set (the library never does)."""

from __future__ import annotations

import torch

__all__ = ["set_precision_flags", "has_accelerator"]


def set_precision_flags(tf32: bool, cudnn_benchmark: bool = False) -> None:
    """TF32 for the fp32 matmuls/convs that remain, and cuDNN autotuning."""
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def has_accelerator() -> bool:
    """A CUDA or MPS device: without one, processes run on the CPU (accelerate's gloo backend)."""
    return torch.cuda.is_available() or torch.backends.mps.is_available()
