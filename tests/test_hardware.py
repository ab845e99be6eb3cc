"""Entry-point switches: the TF32 flags."""

from __future__ import annotations

import pytest
import torch

from edm.hardware import set_precision_flags


@pytest.fixture
def restore_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("tf32", [False, True, False])
def test_precision_flags_read_back_the_same_in_every_spelling(restore_flags, tf32):
    """After set_precision_flags, allow_tf32 (read by inductor and accelerate) and fp32_precision
    (read by newer torch) both say what was set; neither read raises."""
    set_precision_flags(tf32, cudnn_benchmark=True)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is True
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")

