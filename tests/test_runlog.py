"""edm/training/runlog.py: what a run tells its user (metrics.jsonl, loss lines, accelerate's trackers, the
loss curve) and how it stops: a signal to any process of a launch saves and stops all within a few steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edm.models.checkpoint import find_latest, load_checkpoint
from edm.training.loop import train
from edm.training.runlog import kimg_text

from conftest import REPO, kill_group, metrics_records, wait_for, worker_pid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trackers_get_the_logged_scalars_and_the_sample_grids_through_accelerate(compose_train, tmp_path):
    """trackers=[NAME] reaches any of accelerate's experiment trackers (TensorBoard, W&B, MLflow, ...): each
    logged record's scalars and each sample grid, as accelerate's tracker API delivers them; a tracker whose
    package is missing is skipped with a message, and metrics.jsonl is written either way."""
    tracking = pytest.importorskip("accelerate.tracking")
    if not hasattr(tracking, "register_tracker_class"):
        pytest.skip("this accelerate cannot register a tracker class")
    calls = []

    class Recording(tracking.GeneralTracker):
        name, requires_logging_directory, main_process_only = "recording", False, True

        def __init__(self, run_name: str, **kwargs):
            super().__init__()
            calls.append(("init", run_name))

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            calls.extend((tag, value, step) for tag, value in values.items())

        def log_images(self, values, step=None, **kwargs):
            calls.extend((tag, image.shape, step) for tag, image in values.items())

        def finish(self):
            calls.append(("finish",))

    tracking.register_tracker_class(Recording)
    train(compose_train("trackers=[recording]", "tracker_project=digits", "grid_every=2"))
    assert calls[0] == ("init", "digits") and calls[-1] == ("finish",)
    logged = [(c[2], c[1]) for c in calls if c[0] == "train/loss"]
    assert logged == [(r["step"], r["loss"]) for r in metrics_records(tmp_path / "run")] and len(logged) == 4
    from PIL import Image

    final = np.asarray(Image.open(tmp_path / "run" / "samples-final.png").convert("RGB"))
    assert [c[1:] for c in calls if c[0] == "samples"] == [((1, *final.shape), 2), ((1, *final.shape), 4)]


def test_the_default_tensorboard_tracker_writes_under_the_run_or_says_it_is_missing(compose_train, tmp_path, caplog):
    import importlib.util

    with caplog.at_level("INFO"):
        train(compose_train("trackers=[tensorboard]"))
    if importlib.util.find_spec("tensorboard") is None:
        assert "tracker(s) tensorboard not installed (e.g. pip install tensorboard)" in caplog.text
    else:
        assert any((tmp_path / "run" / "edm").rglob("events.out.tfevents.*"))
    assert len(metrics_records(tmp_path / "run")) > 0


def test_a_loss_line_reaches_the_log_without_a_progress_bar_and_a_loss_curve_is_drawn(compose_train, tmp_path, caplog):
    """Batch jobs (progress=false) still get an INFO line per log_every steps; the run ends with loss.png."""
    import logging

    with caplog.at_level(logging.INFO, logger="edm.training.runlog"):
        train(compose_train("progress=false", "log_every=2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "edm.training.runlog" and r.getMessage().startswith("step ")]
    records = metrics_records(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    assert lines == [f"step {r['step']}  kimg {kimg_text(r['kimg'])}  loss {r['loss']:.4f}  lr {r['lr']:.3g}  "
                     f"{r['images_per_s']:.0f} img/s" for r in records]
    assert records[0]["kimg"] < 0.05 and f"kimg {records[0]['kimg']:g} " in lines[0]  # a short run's kimg is not 0.0
    assert [kimg_text(k) for k in (0.016, 1.5, 12345.64, 199999.936)] == ["0.016", "1.5", "12345.6", "199999.9"]
    from PIL import Image

    with Image.open(tmp_path / "run" / "loss.png") as png:
        assert png.format == "PNG" and min(png.size) > 100


def test_a_loss_curve_of_one_record_shows_its_point(tmp_path):
    """A run shorter than log_every has one record: a line through one point draws nothing, a marker does."""
    import json

    import numpy as np
    from PIL import Image

    from edm.evaluation.plots import plot_loss_curve

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kimg": 0.016, "loss": 0.5, "lr": 1e-3}) + "\n")
    with Image.open(plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")) as png:
        rgb = np.asarray(png.convert("RGB")).astype(int)
    h, w, _ = rgb.shape
    middle = rgb[int(0.2 * h) : int(0.8 * h), int(0.3 * w) : int(0.7 * w)]  # one point sits mid-axes, the labels outside
    assert (np.abs(middle - np.array([31, 119, 180])).sum(-1) < 40).sum() >= 10  # tab:blue, the loss's colour


@pytest.mark.parametrize("target, sig", [  # the other two signal paths run in `pytest -m slow`
    ("launcher", signal.SIGTERM), pytest.param("launcher", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("rank 1", signal.SIGTERM, marks=pytest.mark.slow),
])
def test_a_stop_signal_under_two_processes_saves_within_a_few_steps(tmp_path, tiny_train, target, sig, one_thread_env):
    """log_every and checkpoint_every far away: the processes still agree on a step to stop after
    (the step after the signalled one) and save it, before the launcher's 30 s grace period ends; also when only
    one worker is signalled (a scheduler that signals one process)."""
    run_dir = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train",
              *tiny_train, f"run_dir={run_dir}", "total_kimg=10000", "log_every=1000000", "checkpoint_every=1000000",
              "grid_size=0", "cpu=true", "log_batch_indices=true"]
    proc = subprocess.Popen(launch, cwd=REPO, env=one_thread_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: killed at cleanup, the workers follow
    try:
        indices = run_dir / "batch-indices-rank1.jsonl"
        wait_for(lambda: indices.is_file() and indices.stat().st_size > 0, 180, "both processes training")
        signalled = time.monotonic()
        os.kill(proc.pid if target == "launcher" else worker_pid(proc.pid, 1), sig)
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - signalled
    finally:
        kill_group(proc)
    assert find_latest(run_dir) is not None, err[-3000:]
    state = load_checkpoint(find_latest(run_dir))
    assert state["step"] > 0 and state["processes"] == 2  # written by the two processes' run
    assert took < 30, took
    assert not list(run_dir.glob(".stop-*"))  # the agreement file is removed
