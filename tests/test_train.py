"""edm/train.py and the Hydra configs: every schedule trains, resume is exact, failures are clear."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

import edm
from edm.files import to_container
from edm.models.checkpoint import (
    CheckpointError, find_latest, list_checkpoints, load_checkpoint, load_denoiser, save_checkpoint,
)
from edm.training.config import TrainConfig, run_folder
from edm.data import DatasetNotFoundError, StreamBatchSampler
from edm.training.build import build_loss
from edm.training.ema import ema_beta, update_ema
from edm.training.step import learning_rate, train_step
from edm.training.loop import RunDirError, TrainingDivergedError, train

from conftest import command

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- step math


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


@pytest.mark.parametrize("schedule", ["vp", "ve", "edm", "fm"])
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


# ----------------------------------------------------------------------------- through Hydra


@pytest.mark.parametrize("schedule", ["vp", "ve", "edm", "fm"])
def test_each_schedule_trains_through_hydra(compose_train, tmp_path, schedule):
    cfg = compose_train(f"schedule={schedule}")
    assert cfg.precond.kind is None and cfg.loss.kind is None  # unset: the schedule's own ...
    assert build_loss(cfg.loss, cfg.schedule.build(), cfg.precond.sigma_data).resolved_kind == schedule
    result = train(cfg)
    run_dir = tmp_path / "run"
    assert result.state.step == 4 and result.state.cur_nimg == 32
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4] and result.checkpoint == find_latest(run_dir)
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    state = load_checkpoint(result.checkpoint)
    assert state["schedule"]["name"] == schedule and state["denoiser"]["precond"]["kind"] == schedule  # ... resolved
    assert state["schedule"] == {"name": schedule, **dataclasses.asdict(edm.schedules.get(schedule))}
    assert state["denoiser"]["network"]["img_resolution"] == 8 and state["denoiser"]["network"]["in_channels"] == 1
    assert state["config"]["schedule"]["name"] == schedule and state["step"] == 4
    den, _ = load_denoiser(result.checkpoint)
    x = den(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 3.0]))
    assert torch.isfinite(x).all()
    assert (run_dir / "samples-final.png").is_file() and (run_dir / "data.png").is_file()


@pytest.mark.slow  # the same CLI path runs (in two processes) in test_two_cpu_processes_see_different_data
def test_cli_main_job_writes_checkpoint_grid_and_metrics(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "schedule=fm", "sampler=euler"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples:" in proc.stdout
    assert find_latest(run_dir).name == "checkpoint-00000004.pt"
    assert (run_dir / "samples-final.png").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert len(_metrics(run_dir)) == 4
    again = subprocess.run(  # known errors end with a one-line message and status 1
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "schedule=fm"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env,
    )
    assert again.returncode == 1 and "edm-train: error: run_dir" in again.stderr and "resume=true" in again.stderr


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
    assert logged == [(r["step"], r["loss"]) for r in _metrics(tmp_path / "run")] and len(logged) == 4
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
    assert len(_metrics(tmp_path / "run")) > 0


def test_a_loss_line_reaches_the_log_without_a_progress_bar_and_a_loss_curve_is_drawn(compose_train, tmp_path, caplog):
    """Batch jobs (progress=false) still get an INFO line per log_every steps; the run ends with loss.png."""
    import logging

    with caplog.at_level(logging.INFO, logger="edm.training.runlog"):
        train(compose_train("progress=false", "log_every=2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "edm.training.runlog" and r.getMessage().startswith("step ")]
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    assert lines == [f"step {r['step']}  kimg {r['kimg']:.1f}  loss {r['loss']:.4f}  lr {r['lr']:.3g}  "
                     f"{r['images_per_s']:.0f} img/s" for r in records]
    from PIL import Image

    with Image.open(tmp_path / "run" / "loss.png") as png:
        assert png.format == "PNG" and min(png.size) > 100


def test_network_shape_follows_the_data_set(compose_train):
    cfg = compose_train("network=ddpmpp", "dataset.cond=true", "network.model_channels=8", "network.num_blocks=1",
                        "network.channel_mult=[1]", "network.attn_resolutions=[]", "total_kimg=0.008", "grid_size=2")
    result = train(cfg)
    net = load_checkpoint(result.checkpoint)["denoiser"]["network"]
    assert (net["name"], net["img_resolution"], net["in_channels"], net["out_channels"], net["label_dim"]) == (
        "ddpmpp", 8, 1, 1, 10)


def test_bf16_mixed_precision_autocasts_the_network(compose_train):
    seen = []

    def watch(run):  # from step 2 on, record whether the network runs under bf16 autocast
        if run.state.step == 1:
            run.net.net.register_forward_pre_hook(
                lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))

    result = train(compose_train("mixed_precision=bf16", "grad_clip=0.5", "grid_size=0"), callback=watch)
    assert seen and set(seen) == {(True, torch.bfloat16)}
    assert all(math.isfinite(r["loss"]) for r in _metrics(result.metrics.parent))


@pytest.mark.slow  # inductor compilation takes about a minute on CPU
def test_compiled_network_trains_and_saves_plain_weights(compose_train):
    result = train(compose_train("compile=true"))
    state = load_checkpoint(result.checkpoint)
    assert not any("_orig_mod" in key for key in state["model"])
    load_denoiser(result.checkpoint)


@pytest.mark.parametrize("overrides, error, needle", [
    (["not_a_key=1"], ConfigCompositionException, "Could not override 'not_a_key'"),
    (["dataset.bogus=1"], ConfigCompositionException, "Could not override 'dataset.bogus'"),
    (["batch_size=many"], ConfigCompositionException, "Error merging override batch_size=many"),
    (["schedule=nonexistent"], MissingConfigException, "Could not find 'schedule/nonexistent'"),
])
def test_bad_key_or_value_fails_at_composition(compose_train, overrides, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        compose_train(*overrides)


def test_the_cli_defaults_are_the_dataclass_defaults():
    """One default per key: `python -m edm.train` and `train(TrainConfig())` train the same run."""
    from edm.cli import compose

    cli = compose("train")
    assert cli == TrainConfig()
    assert run_folder(cli) == "runs/digits-edm-tiny"  # named after the data set, schedule and network
    assert run_folder(compose("train", ["schedule=vp", "network=ddpmpp"])) == "runs/digits-vp-ddpmpp"


@pytest.mark.parametrize("overrides, needle", [
    (["mixed_precision=fp8"], "mixed_precision 'fp8' is not valid; choose one of: no, fp16, bf16"),
    (["sampler.solver=rk45"], "solver 'rk45' is not valid; choose one of: euler, heun"),
    (["sampler=heun", "+sampler.options.churn=1"], "solver 'heun' does not take option(s) ['churn']"),
    (["precond.kind=edm2"], "precond.kind 'edm2' is not valid; choose one of: vp, ve, edm, fm"),
    (["schedule.beta_d=3"], "bad option for schedule 'edm'"),
    (["batch_size=0"], "batch_size=0 must be > 0"),
])
def test_bad_value_fails_before_training(compose_train, tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        train(compose_train(*overrides))
    assert not (tmp_path / "run").exists()


def test_missing_data_root_fails_with_instructions(compose_train, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(compose_train("dataset=fashion_mnist", f"dataset.root={tmp_path / 'nowhere'}"))
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):  # mnist has no default root
        train(compose_train("dataset=mnist"))


# ----------------------------------------------------------------------------- resume


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, sa in opt_a["state"].items():
        for k, v in sa.items():
            assert torch.equal(v, opt_b["state"][i][k]), f"optimizer state {i}.{k} differs"
    assert (a["step"], a["cur_nimg"]) == (b["step"], b["cur_nimg"])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"]) and torch.equal(ra["generator"], rb["generator"])


# dropout exercises the global RNG, accumulation the micro-batch path, 12 images the epoch wrap
RESUME = ["network.dropout=0.2", "batch_per_device=4", "dataset.max_size=12", "dataset.xflip=true",
          "lr_rampup_kimg=0.01", "ema_rampup_ratio=0.5", "checkpoint_every=2"]


@pytest.mark.parametrize("how, augment", [("extend", "0"), ("interrupt", "0"), ("interrupt", "0.5")])
def test_resume_is_bit_exact(compose_train, tmp_path, how, augment):
    """6 steps straight == 3 steps, then resume=true for 3 more (CPU, bit for bit); with
    augmentation, its draws come from the same saved generator."""
    settings = [*RESUME, f"augment.p={augment}"]
    straight = train(compose_train(*settings, "total_kimg=0.048", run_dir=tmp_path / "a"))
    b = tmp_path / "b"
    if how == "extend":  # a shorter run, then the same run extended
        first = train(compose_train(*settings, "total_kimg=0.024", run_dir=b))
    else:  # Ctrl-C after step 3: a checkpoint is saved before stopping
        def interrupt(run):
            if run.state.step == 3:
                signal.raise_signal(signal.SIGINT)

        first = train(compose_train(*settings, "total_kimg=0.048", run_dir=b), callback=interrupt)
        assert first.interrupted
    assert first.state.step == 3 and first.checkpoint.name == "checkpoint-00000003.pt"
    half = load_checkpoint(first.checkpoint)
    resumed = train(compose_train(*settings, "total_kimg=0.048", "resume=true", run_dir=b))
    assert resumed.state.step == 6
    a_state, b_state = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    _assert_same_state(a_state, b_state)
    assert any(not torch.equal(half["model"][k], b_state["model"][k]) for k in half["model"])  # it trained on
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == [r["loss"] for r in _metrics(b)]


def test_no_two_random_streams_of_training_share_a_seed():
    """The noise and global streams of 8 processes, started at any of 4 steps, for seeds 0..49, and
    the data permutations P_0..P_99 of those seeds: every seed differs (a linear seed·7919 + 1 + rank
    would give seed 0's noise the seed of its P_1)."""
    from edm.training.run import stream_seed

    streams = [stream_seed(seed, stream, rank, step) for seed in range(50) for stream in ("noise", "global")
               for rank in range(8) for step in (0, 1, 2, 1000)]
    permutations = [(seed * 1_000_003 + epoch) % 2**63 for seed in range(50) for epoch in range(100)]
    assert len(set(streams)) == len(streams)
    assert not set(streams) & set(permutations)
    assert all(0 <= s < 2**63 for s in streams)


def test_dropout_and_training_noise_draw_different_bits(compose_train):
    """After set-up the global RNG (dropout) and the training generator (σ, n) are in different
    states, so a dropout mask is no function of the noise it is applied with."""
    from edm.training.loop import setup

    run = setup(compose_train())
    try:
        assert not torch.equal(torch.get_rng_state(), run.generator.get_state())
        assert not torch.equal(torch.rand(64), torch.rand(64, generator=run.generator))
    finally:
        run.lock.release()


def test_existing_run_needs_resume_flag(compose_train, tmp_path):
    train(compose_train("total_kimg=0.016"))
    with pytest.raises(RunDirError, match="resume=true"):
        train(compose_train("total_kimg=0.016"))
    # resuming a finished run does nothing more and reports its checkpoint
    again = train(compose_train("total_kimg=0.016", "resume=true"))
    assert again.state.step == 2 and again.checkpoint.name == "checkpoint-00000002.pt"


def test_corrupt_checkpoint_on_resume(compose_train, tmp_path):
    train(compose_train("total_kimg=0.016"))
    latest = find_latest(tmp_path / "run")
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{latest.name}.*corrupt"):
        train(compose_train("total_kimg=0.032", "resume=true"))


def test_mismatched_checkpoint_on_resume(compose_train):
    train(compose_train("total_kimg=0.016"))
    with pytest.raises(CheckpointError, match="does not match the config \\(denoiser.network.model_channels: checkpoint 8, config 16\\)"):
        train(compose_train("total_kimg=0.032", "resume=true", "network.model_channels=16"))
    with pytest.raises(CheckpointError, match="denoiser.precond.kind: checkpoint 'edm', config 'vp'.*schedule.name: checkpoint 'edm', config 'vp'"):
        train(compose_train("total_kimg=0.032", "resume=true", "schedule=vp"))


def test_a_checkpoint_stores_its_network_resolved_and_resumes_however_it_spelled_it(compose_train, tmp_path):
    """The saved network spec holds every constructor argument (so it rebuilds the same network
    whatever the presets become); resume compares resolved specs, so a checkpoint that left the
    preset's values out (or spelled them out) still resumes, and a real change is still refused."""
    first = train(compose_train("total_kimg=0.016"))
    state = load_checkpoint(first.checkpoint)
    network = state["denoiser"]["network"]
    _, kwargs = edm.networks.resolve(**network)
    assert network == {"name": "tiny", **to_container(kwargs)}
    assert network["model_channels"] == 8 and network["attn_resolutions"] == [4] and network["dropout"] == 0.0
    state["denoiser"]["network"] = {k: network[k] for k in ("name", "img_resolution", "in_channels", "out_channels",
                                                             "label_dim", "model_channels")}
    save_checkpoint(first.checkpoint, state)
    assert train(compose_train("total_kimg=0.024", "resume=true")).state.step == 3
    with pytest.raises(CheckpointError, match="denoiser.network.dropout: checkpoint 0.0, config 0.2"):
        train(compose_train("total_kimg=0.032", "resume=true", "network.dropout=0.2"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(compose_train, tmp_path):
    def poison(run):
        if run.state.step == 3:
            with torch.no_grad():
                next(run.net.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match="loss became nan in steps 3 to 4.*last good checkpoint is .*checkpoint-00000002.pt"):
        train(compose_train("total_kimg=0.048", "checkpoint_every=2", "log_every=2"), callback=poison)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    state = load_checkpoint(find_latest(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- two processes


def test_two_cpu_processes_see_different_data(tmp_path, tiny_train, one_thread_env):
    """Two processes split each batch; the power-function EMAs are tracked and snapshotted once."""
    run_dir = tmp_path / "ddp"
    power = ["ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016"]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train",
         *tiny_train, f"run_dir={run_dir}", "log_batch_indices=true", "grid_size=0", "cpu=true", *power],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert find_latest(run_dir).name == "checkpoint-00000004.pt"
    state = load_checkpoint(find_latest(run_dir))
    assert len(state["rng"]) == 2  # both processes' random states
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
    logs = [[json.loads(line) for line in (run_dir / f"batch-indices-rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    single = StreamBatchSampler(1797, 0, batch_size=8, micro_batch=8)
    for step in range(4):
        rank0, rank1 = logs[0][step]["indices"], logs[1][step]["indices"]
        assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)
        assert rank0 + rank1 == single.micro_batch_indices(8 * step, 0)
    from edm.training.phema import list_snapshots

    snapshots = list_snapshots(run_dir)
    assert [s.cur_nimg for s in snapshots] == [16, 32]
    last, live = snapshots[-1].weights(0), state["phema"]["emas"][0]
    assert all(torch.equal(last[k], live[k]) for k in live) and not all(torch.equal(live[k], state["model"][k]) for k in live)


def test_every_config_ships_in_the_wheel():
    """pyproject.toml packages configs/ as edm/configs (for non-editable installs): its globs
    must reach every yaml file, and the folder must be the one edm.train reads in a checkout."""
    tomllib = pytest.importorskip("tomllib")
    from fnmatch import fnmatch

    from edm.cli import CONFIG_DIR

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder = root / setup["package-dir"]["edm.configs"]
    assert "edm.configs" in setup["packages"] and Path(CONFIG_DIR) == folder
    yamls = [p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")]
    assert "train.yaml" in yamls and "dataset/digits.yaml" in yamls
    missed = [y for y in yamls if not any(fnmatch(y, g) and y.count("/") == g.count("/") for g in setup["package-data"]["edm.configs"])]
    assert not missed, f"not packaged: {missed}"


def test_channels_last_training_is_the_same_computation(compose_train, tmp_path):
    """channels_last=true changes the memory layout only: same losses and weights (CPU, to
    float32 rounding: relative distance of the EMA weights < 1e-5), the network's 4-D weights stored NHWC, a checkpoint any model loads."""
    seen = []
    plain = train(compose_train(run_dir=tmp_path / "plain"))
    nhwc = train(compose_train("channels_last=true", run_dir=tmp_path / "nhwc"),
                 callback=lambda run: seen.append(max((p for p in run.net.parameters() if p.ndim == 4), key=torch.numel)))
    assert seen and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in seen)
    a, b = _metrics(tmp_path / "plain"), _metrics(tmp_path / "nhwc")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    a_state, b_state = load_checkpoint(plain.checkpoint), load_checkpoint(nhwc.checkpoint)
    # Whole-model distance: single elements of zero-initialised tensors follow the sign of
    # round-off in Adam's first steps, the weights as a whole do not.
    diff = sum(float((b_state["ema"][k] - v).double().pow(2).sum()) for k, v in a_state["ema"].items())
    size = sum(float(v.double().pow(2).sum()) for v in a_state["ema"].values())
    assert math.sqrt(diff / size) < 1e-5
    denoiser, _ = load_denoiser(nhwc.checkpoint)  # a default-layout model takes the NHWC weights
    assert all(p.is_contiguous() for p in denoiser.parameters())


# Karras et al. 2022 (EDM), Table 7, CIFAR-10 (config F), as NVlabs/edm train.py runs it.
EDM_CIFAR10_TABLE7 = {
    "dataset.name": "cifar10", "dataset.xflip": False, "batch_size": 512, "total_kimg": 200_000, "lr": 1e-3,
    "lr_rampup_kimg": 10_000, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "ema_halflife_kimg": 500,
    "ema_rampup_ratio": 0.05, "network.dropout": 0.13, "augment.p": 0.12, "network.augment_dim": 9,
}


@pytest.mark.parametrize("schedule,network", [("vp", "ddpmpp"), ("ve", "ncsnpp"), ("edm", "ddpmpp")])
def test_recipe_edm_cifar10_sets_the_papers_hyperparameters(schedule, network):
    from edm.cli import compose

    cfg = compose("train", ["recipe=edm-cifar10", f"schedule={schedule}", f"network={network}", "dataset.root=DATA"])
    for key, value in EDM_CIFAR10_TABLE7.items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    aug = cfg.augment  # every transform of EDM's pipe on, at its default strength
    assert (aug.xflip, aug.yflip, aug.scale, aug.rotate_frac, aug.aniso, aug.translate_frac) == (1e8, 1, 1, 1, 1, 1)
    assert (cfg.schedule.name, cfg.network.name) == (schedule, network)
    assert cfg.precond.kind is None and cfg.loss.kind is None  # the schedule's own (Table 1 column)
    assert (cfg.loss.P_mean, cfg.loss.P_std, cfg.precond.sigma_data) == (-1.2, 1.2, 0.5)


# NVlabs/edm2 train_edm2.py, preset edm2-img64-s, and its training_loop.py defaults, in our units.
EDM2_IMG64_S = dict(duration=1024 << 20, batch=2048, channels=192, lr=0.0100, decay=35000, dropout=0.00, P_mean=-0.8,
                    P_std=1.6, rampup_Mimg=10, betas=(0.9, 0.99), stds=(0.050, 0.100), snapshot_nimg=8 << 20)


def test_recipe_edm2_img64_sets_the_reference_presets_values():
    from edm.cli import compose
    from edm.training.build import resolved_network

    cfg = compose("train", ["recipe=edm2-img64", "dataset.root=DATA"])
    ref = EDM2_IMG64_S
    assert cfg.total_kimg * 1000 == pytest.approx(ref["duration"]) and cfg.batch_size == ref["batch"]
    assert cfg.lr == ref["lr"] and cfg.lr_rampup_kimg * 1000 == ref["rampup_Mimg"] * 1e6
    assert cfg.lr_decay_kimg * 1000 == ref["decay"] * ref["batch"]  # t_ref = ref_batches batches
    assert tuple(cfg.adam_betas) == ref["betas"] and tuple(cfg.ema_sigma_rel) == ref["stds"]
    assert cfg.ema_snapshot_kimg * 1000 == pytest.approx(ref["snapshot_nimg"])
    assert (cfg.loss.kind, cfg.loss.P_mean, cfg.loss.P_std) == ("edm2", ref["P_mean"], ref["P_std"])
    network = resolved_network({"name": cfg.network.name})
    assert (network["model_channels"], network["dropout"]) == (ref["channels"], ref["dropout"])
    assert cfg.dataset.cond and cfg.augment.p == 0 and not cfg.dataset.xflip


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


def test_a_two_by_two_sweep_trains_four_jobs_into_four_folders(tmp_path, tiny_train, one_thread_env):
    """python -m edm.train -m schedule=vp,fm lr=1e-3,2e-3: 4 jobs, each in its own folder under
    hydra.sweep.dir with its own checkpoint and settings; multirun.yaml beside them. A run_dir on the
    command line of a sweep is refused (it would be one folder for every job)."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "edm.train", "-m", *tiny_train, "schedule=vp,fm", "lr=1e-3,2e-3", "progress=false"]
    proc = subprocess.run([*args, f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=one_thread_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and (sweep / "multirun.yaml").is_file()
    settings = set()
    for job in jobs:
        state = load_checkpoint(find_latest(job))
        settings.add((state["config"]["schedule"]["name"], state["config"]["lr"]))
        assert state["config"]["run_dir"] == str(job) and (job / "train.log").is_file()
    assert settings == {("vp", 1e-3), ("vp", 2e-3), ("fm", 1e-3), ("fm", 2e-3)}
    assert all("=" not in job.name and "," not in job.name for job in jobs)  # a job folder is a valid override value
    sample = subprocess.run([command("edm-sample"), f"checkpoint={jobs[0]}", "num_images=1",
                             "sampler.num_steps=2", f"out={tmp_path / 'from-job'}", "progress=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env)
    assert sample.returncode == 0, sample.stderr[-2000:]
    proc = subprocess.run([*args, f"run_dir={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=one_thread_env)
    assert proc.returncode == 1 and "pass hydra.sweep.dir=DIR instead of run_dir" in proc.stderr
    assert not (tmp_path / "one").exists()


def test_accelerate_launch_mixed_precision_bf16_trains_under_bf16(tmp_path, tiny_train, one_thread_env):
    """The launcher's flag, not only its environment variable: `accelerate launch --mixed_precision bf16
    -m edm.train` (config leaves mixed_precision unset) records bf16 in the checkpoint and train.log."""
    run_dir = tmp_path / "bf16"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "edm.train"]
    proc = subprocess.run([*launch, *tiny_train, f"run_dir={run_dir}", "progress=false", "grid_size=0"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=one_thread_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(find_latest(run_dir))["config"]["mixed_precision"] == "bf16"
    assert "mixed_precision=bf16" in (run_dir / "train.log").read_text()


def test_recipe_guide_trains_a_smaller_shorter_model_in_its_own_folder():
    from edm.cli import compose
    from edm.networks import presets

    main, guide = compose("train"), compose("train", ["recipe=guide"])
    main_channels = presets.resolve(main.network.name)[1]["model_channels"]
    assert guide.network.model_channels == main_channels // 2 and guide.total_kimg == main.total_kimg / 4
    assert guide.run_dir == run_folder(main) + "-guide" and guide.dataset == main.dataset and guide.schedule == main.schedule
