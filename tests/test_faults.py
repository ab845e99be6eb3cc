"""Fault injection: kills, signals, two runs on one folder, crafted files, bad images, a full disk.

Each test repeats a trial a user could run by hand (kill -9, SIGTERM to a launcher, a second
training on the same run_dir, a file built to run code, a broken image) and checks that nothing
saved is lost, nothing is mixed, nothing from the file runs, and the message names the cause.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edm.evaluation import metrics
from edm.models import checkpoint
from edm.models.checkpoint import CheckpointError, find_latest, list_checkpoints, load_checkpoint
from edm.files import OutputWriteError, atomic_write
from edm.data import BadImagesError, DatasetConfig, build_dataset
from edm.training.loop import train

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of `proc` (started with start_new_session=True): no worker outlives a test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- one folder, one training


def test_a_second_training_on_a_run_dir_in_use_is_refused_and_a_killed_owner_blocks_nothing(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "run"
    owner = subprocess.Popen(
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "total_kimg=1000", "grid_size=0"],
        cwd=REPO, env=one_thread_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(lambda: find_latest(run_dir) is not None, 120, "the first training's first checkpoint")
        second = subprocess.run([sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "resume=true"],
                                cwd=REPO, env=one_thread_env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert f"run_dir {run_dir} is in use by another training" in second.stderr
        assert f'"pid": {owner.pid}' in second.stderr  # the owner is named
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert "total_kimg=1000" in overrides and "resume=true" not in overrides  # the refused run wrote nothing there
        assert not (REPO / "train.log").exists() and not (REPO / ".hydra").exists()  # nor anywhere else
    finally:
        _kill_group(owner)  # kill -9
    steps = _steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # only the owner logged
    # kill -9 released the lock: the next run resumes at once, from the last checkpoint.
    saved = load_checkpoint(find_latest(run_dir))["step"]
    resumed = train(_compose(tiny_train, run_dir, "resume=true", f"total_kimg={(saved + 1) * 8 / 1000}"))
    assert resumed.state.step == saved + 1
    assert _steps(run_dir) == list(range(1, saved + 2))  # records after the checkpoint were dropped, then relogged


def _compose(overrides, run_dir, *more):
    from edm.cli import compose

    return compose("train", [*overrides, f"run_dir={run_dir}", *more])


# ----------------------------------------------------------------------------- kills during checkpoint writes


KILL_DURING_SAVE = """
import os, sys, torch
from edm.models import checkpoint
from edm.training.loop import train
sys.path.insert(0, {tests!r})
from test_faults import _compose
saves = []
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # the second checkpoint (step 4): half a file, then kill -9
        f.write(b"PK\\x03\\x04 half a checkpoint"); f.flush(); os._exit(9)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
train(_compose({overrides!r}, {run_dir!r}, "total_kimg=0.048"))
"""


def test_a_kill_during_a_checkpoint_write_loses_nothing_and_resume_cleans_up(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "run"
    script = KILL_DURING_SAVE.format(tests=str(REPO / "tests"), overrides=tiny_train, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=one_thread_env, capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]  # the torn write left no checkpoint-4
    torn = list(run_dir.glob(".checkpoint-*.tmp"))
    assert len(torn) == 1 and _steps(run_dir) == [1, 2, 3, 4]  # steps 3 and 4 were logged before the kill
    load_checkpoint(find_latest(run_dir))  # the previous checkpoint is whole
    resumed = train(_compose(tiny_train, run_dir, "total_kimg=0.048", "resume=true"))
    assert resumed.state.step == 6
    assert not list(run_dir.glob(".checkpoint-*.tmp"))  # stale temporaries removed at start
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 once, from the resumed run


# ----------------------------------------------------------------------------- signals under two processes


def _worker_pid(launcher: int, rank: int) -> int:
    """The pid of the worker process with RANK=rank among the launcher's children."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.parametrize("target, sig", [  # the other two signal paths run in `pytest -m slow`
    ("launcher", signal.SIGTERM), pytest.param("launcher", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("rank 1", signal.SIGTERM, marks=pytest.mark.slow),
])
def test_a_stop_signal_under_two_processes_saves_within_a_few_steps(tmp_path, tiny_train, target, sig, one_thread_env):
    """log_every and checkpoint_every far away: the processes still agree on a step to stop after
    (within two steps) and save it, before the launcher's 30 s grace period ends; also when only
    one worker is signalled (a scheduler that signals one process)."""
    run_dir = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train",
              *tiny_train, f"run_dir={run_dir}", "total_kimg=10000", "log_every=1000000", "checkpoint_every=1000000",
              "grid_size=0", "cpu=true", "log_batch_indices=true"]
    proc = subprocess.Popen(launch, cwd=REPO, env=one_thread_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so cleanup reaches the workers too
    try:
        indices = run_dir / "batch-indices-rank1.jsonl"
        _wait_for(lambda: indices.is_file() and indices.stat().st_size > 0, 180, "both processes training")
        signalled = time.monotonic()
        os.kill(proc.pid if target == "launcher" else _worker_pid(proc.pid, 1), sig)
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - signalled
    finally:
        _kill_group(proc)
    assert find_latest(run_dir) is not None, err[-3000:]
    state = load_checkpoint(find_latest(run_dir))
    assert state["step"] > 0 and len(state["rng"]) == 2  # both processes' random states: resumable exactly
    assert took < 30, took
    assert not list(run_dir.glob(".stop-*"))  # the agreement file is removed


# ----------------------------------------------------------------------------- crafted files


class _Payload:
    """Unpickling this calls open(marker, 'w'): proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_torchscript_detector_runs_only_with_the_opt_in(tmp_path):
    marker = tmp_path / "ran"

    class Evil(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            torch.save(x, self.path)  # a side effect from the file's own code
            return x.float().flatten(1)

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Evil(str(marker))), str(path))
    with pytest.raises(ValueError, match="TorchScript archive.*allow_pickle"):
        metrics.load_inception(path)
    assert not marker.exists()
    metrics.load_inception(path, allow_pickle=True)(torch.zeros(1, 3, 2, 2))
    assert marker.exists()  # the control: with the opt-in, the file's code does run


def test_a_pickle_detector_is_not_unpickled_without_the_opt_in(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="pickle: loading it runs code"):
        metrics.load_inception(path)
    assert not marker.exists()


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"denoiser": _Payload(marker), "schedule": {}, "model": {}, "ema": {}, "config": {}}, path)
    with pytest.raises(CheckpointError, match=f"{path.name}.*corrupt or not a torch file.*Unpickl"):
        load_checkpoint(path)
    assert not marker.exists()


def test_reference_statistics_carrying_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        metrics.load_statistics(path)
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_not_called_a_corrupt_one(tmp_path):
    (tmp_path / "notes.pt").write_text("a text file")
    with pytest.raises(CheckpointError, match="notes.pt is not a checkpoint: it is a file that starts with b'a te'"):
        load_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is not a checkpoint: it is an empty file"):
        load_checkpoint(tmp_path / "empty.pt")
    good = tmp_path / "checkpoint-00000002.pt"
    checkpoint.save_checkpoint(good, {"denoiser": {}, "schedule": {}, "model": {}, "ema": {}, "config": {}})
    good.write_bytes(good.read_bytes()[:200])  # a torn torch archive is what "corrupt" means
    with pytest.raises(CheckpointError, match="corrupt or not a torch file.*delete it to fall back"):
        load_checkpoint(good)


# ----------------------------------------------------------------------------- bad images


def _png(path: Path, size: int, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def _folder_with_bad_files(root: Path) -> tuple[Path, Path, Path]:
    for k in range(30):
        _png(root / f"{k:03d}.png", 8, 8 * k)
    empty, small = root / "015-empty.png", root / "020-small.png"
    empty.write_bytes(b"")
    _png(small, 6, 0)
    truncated = root / "025-truncated.png"
    _png(truncated, 8, 7)
    truncated.write_bytes(truncated.read_bytes()[:45])  # a header that opens, pixels that do not
    return empty, small, truncated


def test_bad_images_are_found_before_training_and_named_by_path(tmp_path):
    empty, small, truncated = _folder_with_bad_files(tmp_path / "images")
    cfg = DatasetConfig(name="folder", root=str(tmp_path / "images"))
    with pytest.raises(BadImagesError) as err:
        build_dataset(cfg)
    message = str(err.value)
    assert "2 of 33 image files" in message and str(empty) in message and str(small) in message
    assert "6x6, but the first image is 8x8" in message and "dataset.skip_bad=true" in message
    data = build_dataset(DatasetConfig(name="folder", root=str(tmp_path / "images"), skip_bad=True))
    assert len(data) == 31 and empty not in data.files and small not in data.files
    with pytest.raises(BadImagesError, match=f"{truncated}: cannot read its pixels.*resume=true"):
        for i in range(len(data)):
            data[i]


def test_training_on_a_folder_with_bad_images_names_them_skips_them_and_saves_before_a_bad_read(tmp_path, compose_train):
    """Header-bad files stop the run before it starts (or are skipped on request); a file that only
    fails when its pixels are read stops the run with its path, the run's state saved; once the
    file is fixed, resume=true continues."""
    empty, small, truncated = _folder_with_bad_files(tmp_path / "images")
    folder = ["dataset=folder", f"dataset.root={tmp_path / 'images'}", "dataset.num_workers=0"]
    with pytest.raises(BadImagesError, match=str(empty)):
        train(compose_train(*folder))
    assert find_latest(tmp_path / "run") is None
    with pytest.raises(BadImagesError, match=f"{truncated}: cannot read its pixels(.|\n)*state after step \\d+ is saved"):
        train(compose_train(*folder, "dataset.skip_bad=true"))
    saved = load_checkpoint(find_latest(tmp_path / "run"))
    assert saved["step"] < 4 and saved["dataset_size"] == 31
    _png(truncated, 8, 7)  # fixed
    result = train(compose_train(*folder, "dataset.skip_bad=true", "resume=true"))
    assert result.state.step == 4


# ----------------------------------------------------------------------------- disk, values, resume settings


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path):
    def no_space(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError, match=f"cannot write x.pt in {tmp_path}: No space left on device; .* [MG]iB free there"):
        atomic_write(tmp_path / "x.pt", no_space)

    def miniz(f):  # what torch.save raises when the disk fills mid-archive
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(OutputWriteError, match="cannot write x.pt.*file write failed"):
        atomic_write(tmp_path / "x.pt", miniz)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_a_read_only_run_dir_is_one_line_naming_the_folder(compose_train, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputWriteError, match=f"cannot write .lock in {tmp_path / 'run'}: Read-only file system"):
        train(compose_train())


def test_values_that_overflow_are_rejected_before_training(compose_train, tmp_path):
    with pytest.raises(ValueError, match="lr=1e\\+39 overflows float32"):
        train(compose_train("lr=1e39"))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_seed_loss_or_data_set_and_records_other_changes(compose_train, tmp_path, caplog):
    train(compose_train("total_kimg=0.016"))
    with pytest.raises(CheckpointError, match="seed: checkpoint 0, config 1.*resume with the checkpoint's values"):
        train(compose_train("total_kimg=0.032", "resume=true", "seed=1"))
    with pytest.raises(CheckpointError, match="another loss.*loss.P_mean: checkpoint -1.2, config -1.0"):
        train(compose_train("total_kimg=0.032", "resume=true", "loss.P_mean=-1.0"))
    with pytest.raises(CheckpointError, match="loss.kind: checkpoint 'edm', config 'vp'"):
        train(compose_train("total_kimg=0.032", "resume=true", "loss.kind=vp"))
    with pytest.raises(CheckpointError, match="dataset.max_size: checkpoint None, config 100"):
        train(compose_train("total_kimg=0.032", "resume=true", "dataset.max_size=100"))
    with caplog.at_level("WARNING"):
        result = train(compose_train("total_kimg=0.032", "resume=true", "lr=0.01"))
    assert "lr: 0.002 -> 0.01" in caplog.text
    resumes = load_checkpoint(result.checkpoint)["resumes"]
    assert resumes[0]["step"] == 2
    assert {"key": "lr", "checkpoint": 0.002, "config": 0.01} in resumes[0]["changes"]
    assert {"key": "total_kimg", "checkpoint": 0.016, "config": 0.032} in resumes[0]["changes"]
