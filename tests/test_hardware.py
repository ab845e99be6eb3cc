"""edm/hardware.py: the TF32 flags and the launcher's mixed precision and dynamo backend."""

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


@pytest.mark.parametrize("given,launched,expected", [
    ((None, None), {}, ("no", "no")),  # nothing anywhere: fp32, eager
    ((None, None), {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, ("bf16", "inductor")),
    (("bf16", True), {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}, ("bf16", "inductor")),
    (("fp16", None), {"ACCELERATE_MIXED_PRECISION": "fp16"}, ("fp16", "no")),  # agreeing values
])
def test_launch_settings_take_the_config_else_the_launcher(given, launched, expected):
    from edm.hardware import launch_settings

    assert tuple(launch_settings(*given, env=launched)) == expected


@pytest.mark.parametrize("given,launched,named", [
    (("no", None), {"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision=no contradicts the launcher's mixed precision bf16"),
    ((None, False), {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "compile=false contradicts the launcher's dynamo backend inductor"),
])
def test_a_config_that_contradicts_the_launcher_fails_naming_both(given, launched, named):
    from edm.hardware import launch_settings

    with pytest.raises(ValueError, match=named):
        launch_settings(*given, env=launched)


def test_the_launchers_bf16_reaches_the_accelerator(compose_train, monkeypatch):
    """`accelerate launch --mixed_precision bf16 -m edm.train` sets ACCELERATE_MIXED_PRECISION=bf16;
    with the config's default (None) the run trains under bf16 and records it."""
    from edm.training.loop import setup

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = setup(compose_train())
    try:
        assert run.accelerator.mixed_precision == "bf16" and run.cfg.mixed_precision == "bf16"
    finally:
        run.lock.release()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    run = setup(compose_train(run_dir=run.run_dir.parent / "fp32"))
    try:
        assert run.accelerator.mixed_precision == "no"
    finally:
        run.lock.release()
