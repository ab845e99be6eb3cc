"""Shared pytest options and fixtures."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--nvlabs-repo", default=None, metavar="PATH",
        help="NVlabs/edm checkout: also run tests/test_nvlabs.py against the real reference networks",
    )


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a loaded 2-core machine
    OpenMP's spinning threads stall in barriers: these tests run single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread_env() -> dict:
    """The environment for subprocesses of such tests: one OpenMP thread, no GPU."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


# A few-second training run: a very small tiny network on embedded digits, 8 images a step.
TINY_TRAIN = [
    "network.model_channels=8",
    "batch_size=8",
    "total_kimg=0.032",  # 4 steps
    "lr_rampup_kimg=0",
    "log_every=1",
    "checkpoint_every=2",
    "grid_size=4",
    "sampler.num_steps=2",
    "progress=false",
    "tensorboard=false",
]


@pytest.fixture
def tiny_train() -> list[str]:
    """The TINY_TRAIN overrides (for command lines)."""
    return list(TINY_TRAIN)


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides, run_dir=None) -> TrainConfig through Hydra's compose API and
    configs/train.yaml, with the TINY_TRAIN settings first and run_dir in tmp_path."""
    from hydra import compose, initialize_config_dir

    from edm.config import from_dictconfig, register_configs
    from edm.train import CONFIG_DIR

    register_configs()

    def _compose(*overrides: str, run_dir=None):
        run_dir = run_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            dcfg = compose("train", overrides=[*TINY_TRAIN, f"run_dir={run_dir}", *overrides])
        return from_dictconfig(dcfg)

    return _compose


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """A list that records every device-to-host read of a tensor (float(t), bool(t), t.item(),
    t.tolist()) made while the test runs: on a GPU each one makes the host wait for the device."""
    import torch

    reads: list[str] = []
    for name in ("__float__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """tiny_checkpoint(path, label_dim=0, perturb=0.0, kind="edm", schedule=EDM's, raw_offset=0.0) -> path:
    a tiny untrained 1×8×8 model saved through edm.checkpoint (the training checkpoint format).

    `perturb` adds N(0, perturb²) to every weight, so that the zero-initialized output layer no
    longer makes F ≈ 0; the raw weights ("model") are the EMA weights plus `raw_offset`.
    """
    import torch

    from edm import checkpoint

    def _save(path, label_dim=0, perturb=0.0, kind="edm", schedule=None, raw_offset=0.0):
        spec = {
            "network": {"name": "tiny", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": label_dim,
                        "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "label_dropout": 0.1},
            "precond": {"kind": kind, "sigma_data": 0.5},
        }
        torch.manual_seed(0)
        weights = checkpoint.build_denoiser(spec).state_dict()
        weights = {k: v + perturb * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()}
        raw = {k: v + raw_offset if v.is_floating_point() else v for k, v in weights.items()}
        schedule = {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0} if schedule is None else schedule
        state = {"denoiser": spec, "schedule": schedule, "ema": weights, "model": raw, "config": {}, "step": 10}
        checkpoint.save_checkpoint(path, state)
        return path

    return _save
