"""Shared pytest options and fixtures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edm.core.schedules import SCHEDULES, Schedule


def command(name: str) -> str:
    """The console script `name` that pip installed beside this interpreter (pyproject.toml [project.scripts])."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise AssertionError(f"{name} is not installed beside {sys.executable}: run pip install -e .")
    return str(path)


@pytest.fixture(autouse=True)
def root_log_handlers():
    """A test that runs a command in-process leaves Hydra's console handler on the root logger, bound to that test's
    captured stream, which pytest then closes: each test starts and ends with the root logger's handlers as they were."""
    import logging

    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)


def reference_repo(request, monkeypatch, option: str, what: str) -> None:
    """Put the checkout named by `option` first on sys.path (skip without one); both NVlabs repos have
    `training`, `torch_utils` and `dnnlib` packages and a `generate` module, so imported ones are dropped first."""
    repo = request.config.getoption(option, default=None)
    if not repo:
        pytest.skip(f"needs {option} PATH (an {what} checkout)")
    monkeypatch.syspath_prepend(str(repo))
    for name in [m for m in sys.modules if m.split(".")[0] in ("training", "torch_utils", "dnnlib", "generate")]:
        monkeypatch.delitem(sys.modules, name)


def pytest_addoption(parser):
    parser.addoption(
        "--nvlabs-repo", default=None, metavar="PATH",
        help="NVlabs/edm checkout: also run tests/test_nvlabs.py against the real reference networks",
    )
    parser.addoption(
        "--nvlabs-edm2-repo", default=None, metavar="PATH",
        help="NVlabs/edm2 checkout: also compare EDM2 snapshots with its real reference networks",
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


# Every registered schedule whose time is continuous (round_time the identity): all but iddpm, whose sampler times
# round to its noise levels. The tests "for every schedule" take it, so a schedule added to SCHEDULES is tested too.
CONTINUOUS_SCHEDULES = [name for name, cls in SCHEDULES.items() if cls.round_time is Schedule.round_time]


# Every network preset family, small, on 8x8 images: real structure (2 levels, attention at 4x4), few channels.
SMALL_PRESETS = {
    "tiny": dict(),
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "ncsnpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "adm": dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "edm2-tiny": dict(model_channels=16),
}


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
    "trackers=[]",
]


@pytest.fixture
def tiny_train() -> list[str]:
    """The TINY_TRAIN overrides (for command lines)."""
    return list(TINY_TRAIN)


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides, run_dir=None) -> TrainConfig through Hydra's compose API and
    configs/train.yaml, with the TINY_TRAIN settings first and run_dir in tmp_path."""
    from edm.cli import compose

    def _compose(*overrides: str, run_dir=None):
        return compose("train", [*TINY_TRAIN, f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

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
    """tiny_checkpoint(path, label_dim=0, perturb=0.0, kind="edm", schedule=EDM's, raw_offset=0.0, objective=None,
    second_noise=False, label_dropout=0.1) -> path: a tiny untrained 1×8×8 model saved through edm.models.checkpoint (the training
    checkpoint format).

    `perturb` adds N(0, perturb²) to every weight, so that the zero-initialized output layer no
    longer makes F ≈ 0; the raw weights ("model") are the EMA weights plus `raw_offset`. `objective` is the one its
    config records (None: none, a denoiser); `second_noise` gives the network MeanFlow's second noise input.
    """
    import torch

    from edm.models import checkpoint

    def _save(path, label_dim=0, perturb=0.0, kind="edm", schedule=None, raw_offset=0.0, objective=None,
              second_noise=False, label_dropout=0.1):
        spec = {
            "network": {"name": "tiny", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": label_dim,
                        "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "label_dropout": label_dropout,
                        **({"second_noise": True} if second_noise else {})},
            "precond": {"kind": kind, "sigma_data": 0.5},
        }
        torch.manual_seed(0)
        weights = checkpoint.build_denoiser(spec).state_dict()
        weights = {k: v + perturb * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()}
        raw = {k: v + raw_offset if v.is_floating_point() else v for k, v in weights.items()}
        schedule = {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0} if schedule is None else schedule
        config = {"objective": objective} if objective else {}
        state = {"denoiser": spec, "schedule": schedule, "ema": weights, "model": raw, "config": config, "step": 10}
        checkpoint.save_checkpoint(path, state)
        return path

    return _save


# ----------------------------------------------------------------------------- Inception-v3 (random weights)


def inception_key_shapes():
    """The state-dict layout of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (Szegedy et al. 2016, TF graph)."""
    shapes = {}

    def conv(name, cin, cout, kh, kw=None):
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{p}"] = (cout,)

    def block_a(n, cin, pool):
        conv(f"{n}.branch1x1", cin, 64, 1), conv(f"{n}.branch5x5_1", cin, 48, 1), conv(f"{n}.branch5x5_2", 48, 64, 5)
        conv(f"{n}.branch3x3dbl_1", cin, 64, 1), conv(f"{n}.branch3x3dbl_2", 64, 96, 3)
        conv(f"{n}.branch3x3dbl_3", 96, 96, 3), conv(f"{n}.branch_pool", cin, pool, 1)

    def block_c(n, c7):
        conv(f"{n}.branch1x1", 768, 192, 1), conv(f"{n}.branch7x7_1", 768, c7, 1)
        conv(f"{n}.branch7x7_2", c7, c7, 1, 7), conv(f"{n}.branch7x7_3", c7, 192, 7, 1)
        conv(f"{n}.branch7x7dbl_1", 768, c7, 1), conv(f"{n}.branch7x7dbl_2", c7, c7, 7, 1)
        conv(f"{n}.branch7x7dbl_3", c7, c7, 1, 7), conv(f"{n}.branch7x7dbl_4", c7, c7, 7, 1)
        conv(f"{n}.branch7x7dbl_5", c7, 192, 1, 7), conv(f"{n}.branch_pool", 768, 192, 1)

    def block_e(n, cin):
        conv(f"{n}.branch1x1", cin, 320, 1), conv(f"{n}.branch3x3_1", cin, 384, 1)
        conv(f"{n}.branch3x3_2a", 384, 384, 1, 3), conv(f"{n}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{n}.branch3x3dbl_1", cin, 448, 1), conv(f"{n}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{n}.branch3x3dbl_3a", 384, 384, 1, 3), conv(f"{n}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{n}.branch_pool", cin, 192, 1)

    conv("Conv2d_1a_3x3", 3, 32, 3), conv("Conv2d_2a_3x3", 32, 32, 3), conv("Conv2d_2b_3x3", 32, 64, 3)
    conv("Conv2d_3b_1x1", 64, 80, 1), conv("Conv2d_4a_3x3", 80, 192, 3)
    block_a("Mixed_5b", 192, 32), block_a("Mixed_5c", 256, 64), block_a("Mixed_5d", 288, 64)
    conv("Mixed_6a.branch3x3", 288, 384, 3), conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3), conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for n, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(n, c7)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1), conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1), conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    block_e("Mixed_7b", 1280), block_e("Mixed_7c", 2048)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random state dict with pytorch-fid's key names and shapes, saved like the real .pth."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in inception_key_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / fan_in)
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 1 + 0.1 * torch.rand(shape, generator=g)
        else:
            state[key] = 0.01 * torch.randn(shape, generator=g)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


# ----------------------------------------------------------------------------- helpers of several test files

REPO = Path(__file__).resolve().parent.parent  # the repository's root


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules, as dataclasses need)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"edm_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def metrics_records(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def metric_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in metrics_records(run_dir)]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of `proc` (started with start_new_session=True). Workers of torch's
    launcher run in sessions of their own: they end through the SIGTERM that edm.training.runlog.end_with_launcher
    asks the kernel for when the launcher dies."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def one_node_run(module: str, args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` as an `accelerate launch` of `processes` CPU processes (one thread each) on this
    box, run to its end in the repository (its output captured)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module]
    return subprocess.run([*launch, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))


def two_nodes(folder: Path, module: str, args_of_node, env: dict[str, str]) -> list[tuple[int, str]]:
    """`python -m <module> <args_of_node(N)>` as two `accelerate launch` nodes of one CPU process each on this box
    (node N in folder/nodeN, standing for its own disk when a path is relative); (exit code, output) per node."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for node in (0, 1):
        (folder / f"node{node}").mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
             str(node), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *args_of_node(node)],
            cwd=folder / f"node{node}", env=env | {"PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    return [(proc.returncode, log) for proc, log in zip(procs, logs)]


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of the worker process with RANK=rank among the launcher's children."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class CodePayload:
    """Unpickling this calls open(marker, 'w'): proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def png(path: Path, size: int, value: int) -> None:
    """A size x size grayscale PNG of one value."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def folder_with_bad_files(root: Path) -> tuple[Path, Path, Path]:
    """30 good 8x8 PNGs and three bad files: (an empty one, a 6x6 one, one whose pixels do not read)."""
    for k in range(30):
        png(root / f"{k:03d}.png", 8, 8 * k)
    empty, small = root / "015-empty.png", root / "020-small.png"
    empty.write_bytes(b"")
    png(small, 6, 0)
    truncated = root / "025-truncated.png"
    png(truncated, 8, 7)
    truncated.write_bytes(truncated.read_bytes()[:45])  # a header that opens, pixels that do not
    return empty, small, truncated


def power_run(tiny_train, run_dir, *extra):
    """A tiny training that tracks two power-function EMAs (σ_rel 0.05, 0.1) and snapshots them every 16 images."""
    from edm.cli import compose
    from edm.training.loop import train

    return train(compose("train", [*tiny_train, f"run_dir={run_dir}", "total_kimg=0.064", "ema_sigma_rel=[0.05,0.1]",
                                   "ema_snapshot_kimg=0.016", *extra]))


# ----------------------------------------------------------------------------- the samplers' test problems
# (defined in tests/test_samplers.py; fixtures here so that every solver test module shares them)


@pytest.fixture(scope="module")
def problem():
    """(the ideal denoiser of 8 points in 3-D, the points, 8 noise vectors): the ODE problem of the solver tests."""
    from test_samplers import make_problem

    return make_problem()


@pytest.fixture(scope="module")
def reference(problem):
    """x̂(σ = 0.5) from σ = 80 by RK4 on that problem: what the solvers' orders are measured against."""
    from test_samplers import SIGMA_END, SIGMA_MAX, rk4_reference

    den, _, noise = problem
    return rk4_reference(den, SIGMA_MAX * noise, SIGMA_MAX, SIGMA_END)


@pytest.fixture(scope="module")
def gaussian_data():
    """64 points of a correlated 2-D Gaussian: the data set of the SDE tests."""
    from test_samplers import make_gaussian_data

    return make_gaussian_data()
