"""edm/training/run.py: a run's checkpoints and resume. Resume is exact and refuses another loss, data or
seed; one training owns a run folder; a kill, even during a checkpoint write, loses nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

import edm
from edm.cli import compose
from edm.files import to_container
from edm.models.checkpoint import CheckpointError, find_latest, list_checkpoints, load_checkpoint, save_checkpoint
from edm.training.loop import RunDirError, train

from conftest import REPO, kill_group, metric_steps, metrics_records, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


RESUME = ["network.dropout=0.2", "batch_per_device=4", "dataset.max_size=12", "dataset.xflip=true",
          "lr_rampup_kimg=0.01", "ema_rampup_ratio=0.5", "checkpoint_every=2"]


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


@pytest.mark.parametrize("how, augment", [("extend", "0"), ("SIGINT", "0"), ("SIGINT", "0.5"), ("SIGUSR1", "0")])
def test_resume_is_bit_exact(compose_train, tmp_path, how, augment):
    """6 steps straight == 3 steps, then resume=true for 3 more (CPU, bit for bit); stopped by Ctrl-C or
    by SLURM's SIGUSR1 warning, the run saves first; with augmentation, its draws come from the same
    saved generator."""
    settings = [*RESUME, f"augment.p={augment}"]
    straight = train(compose_train(*settings, "total_kimg=0.048", run_dir=tmp_path / "a"))
    b = tmp_path / "b"
    if how == "extend":  # a shorter run, then the same run extended
        first = train(compose_train(*settings, "total_kimg=0.024", run_dir=b))
    else:  # a signal after step 3: a checkpoint is saved before stopping
        def interrupt(run):
            if run.state.step == 3:
                signal.raise_signal(getattr(signal, how))

        first = train(compose_train(*settings, "total_kimg=0.048", run_dir=b), callback=interrupt)
        assert first.interrupted
    assert first.state.step == 3 and first.checkpoint.name == "checkpoint-00000003.pt"
    half = load_checkpoint(first.checkpoint)
    resumed = train(compose_train(*settings, "total_kimg=0.048", "resume=true", run_dir=b))
    assert resumed.state.step == 6
    a_state, b_state = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    _assert_same_state(a_state, b_state)
    assert any(not torch.equal(half["model"][k], b_state["model"][k]) for k in half["model"])  # it trained on
    assert [r["loss"] for r in metrics_records(tmp_path / "a")] == [r["loss"] for r in metrics_records(b)]


def test_no_two_random_streams_of_training_share_a_seed():
    """The noise, global and augment streams of micro-batches at 32 stream positions, for seeds 0..49, and the data
    permutations P_0..P_99 of those seeds: every seed differs (a linear seed·7919 + 1 + position would give seed
    0's noise the seed of its P_1)."""
    from edm.training.run import stream_seed

    streams = [stream_seed(seed, stream, position) for seed in range(50) for stream in ("noise", "global", "augment")
               for position in [0, 1, 2, 4, 8, 16, 1000, 10**9] + list(range(32, 32 * 25, 32))]
    permutations = [(seed * 1_000_003 + epoch) % 2**63 for seed in range(50) for epoch in range(100)]
    assert len(set(streams)) == len(streams)
    assert not set(streams) & set(permutations)
    assert all(0 <= s < 2**63 for s in streams)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def test_the_training_draws_are_independent_of_each_other_of_the_data_and_across_steps_and_processes():
    """The draws of two processes over 400 steps of 32 images each, as edm-train makes them (seed_draws at each
    micro-batch's stream position, then edm.Loss's σ draw and n from that generator; indices from StreamBatchSampler):
    z = (ln σ − P_mean)/P_std is N(0, 1) (Kolmogorov-Smirnov distance below its 1 % critical value),
    and its correlation with the noise's norm and first element, with the data index and its class
    (index mod 10), with the next step's z and with the other process's z at the same place are all
    within 4/√N of 0 (N = 12,800 pairs): a shared or reused seed makes one of them ~1."""
    from statistics import NormalDist

    from edm.data import StreamBatchSampler, micro_batch_start
    from edm.training.run import seed_draws

    loss, steps, micro, world = edm.Loss(edm.schedules.EDM()), 400, 32, 2
    z, norms, firsts, indices = {}, {}, {}, {}
    for rank in range(world):
        generator = torch.Generator()
        order = iter(StreamBatchSampler(60_000, 0, micro * world, micro, rank, world))
        zs, ns, fs, ix = [], [], [], []
        for step in range(steps):
            seed_draws(generator, 0, micro_batch_start(step * micro * world, 0, rank, world, micro))
            sigma = loss.sample_sigma(micro, generator=generator)
            noise = torch.randn((micro, 1, 16, 16), generator=generator)
            zs.append((sigma.log() - loss.P_mean) / loss.P_std)
            ns.append(noise.flatten(1).pow(2).sum(1))
            fs.append(noise.flatten(1)[:, 0])
            ix.append(torch.tensor(next(order), dtype=torch.float64))
        z[rank], norms[rank], firsts[rank], indices[rank] = (torch.stack(v) for v in (zs, ns, fs, ix))
    n = steps * micro
    bound = 4 / n**0.5
    ordered = z[0].flatten().double().sort().values
    cdf = torch.tensor([NormalDist().cdf(float(v)) for v in ordered], dtype=torch.float64)
    ks = float(torch.maximum((torch.arange(1, n + 1) / n - cdf).abs(), (torch.arange(n) / n - cdf).abs()).max())
    assert ks < 1.63 / n**0.5
    for rank in range(world):
        assert abs(_correlation(z[rank], norms[rank])) < bound
        assert abs(_correlation(z[rank], firsts[rank])) < bound
        assert abs(_correlation(z[rank], indices[rank])) < bound
        assert abs(_correlation(z[rank], indices[rank] % 10)) < bound
        assert abs(_correlation(z[rank][:-1], z[rank][1:])) < 4 / (n - micro) ** 0.5
    assert abs(_correlation(z[0], z[1])) < bound
    assert not set(indices[0].flatten().tolist()) & set(indices[1][: 60_000 // (micro * world) - 1].flatten().tolist())


def test_dropout_training_noise_and_augmentation_draw_different_bits():
    """seed_draws seeds the training generator (σ, n) and the global RNG (dropout) from different streams, so a
    dropout mask is no function of the noise it is applied with; the augmentation's stream is a third; the same
    position gives the same draws again (resume), the next micro-batch's position others."""
    from edm.training.run import seed_draws

    generator = torch.Generator()
    seed_draws(generator, 0, 64)
    noise, dropout = torch.rand(64, generator=generator), torch.rand(64)
    assert not torch.equal(noise, dropout)
    seed_draws(generator, 0, 64, "augment")
    assert not torch.equal(noise, torch.rand(64, generator=generator))
    seed_draws(generator, 0, 64)
    assert torch.equal(noise, torch.rand(64, generator=generator)) and torch.equal(dropout, torch.rand(64))
    seed_draws(generator, 0, 96)
    assert not torch.equal(noise, torch.rand(64, generator=generator))


def test_existing_run_needs_resume_flag(compose_train, tmp_path):
    train(compose_train("total_kimg=0.016"))
    with pytest.raises(RunDirError, match="resume=true"):
        train(compose_train("total_kimg=0.016"))
    # resuming a finished run does nothing more and reports its checkpoint
    again = train(compose_train("total_kimg=0.016", "resume=true"))
    assert again.state.step == 2 and again.checkpoint.name == "checkpoint-00000002.pt"


def test_a_refused_run_writes_nothing_in_the_folder_it_is_refused(compose_train, tmp_path):
    """The refusals come before the run's own files (.hydra record, train.log): a fresh run pointed at a run with
    checkpoints (one of other fixed settings named as such, not offered resume=true), at another command's output folder, or at an earlier run's metrics.jsonl records or power-EMA
    snapshots without a checkpoint (a new run would overwrite some and sit beside the rest) leaves the folder as it
    was; resume=true starts such a run over without its snapshots; an empty metrics.jsonl is no earlier run."""
    run = tmp_path / "run"
    train(compose_train("total_kimg=0.016"))
    owned = []
    with pytest.raises(RunDirError, match="already holds checkpoint-00000002.pt; pass resume=true"):
        train(compose_train("total_kimg=0.016"), on_own_run_dir=owned.append)
    with pytest.raises(RunDirError, match=r"holds another run \(checkpoint-00000002.pt; seed: run 0, now 1\), which this "
                                          r"one cannot continue: choose another run_dir=DIR"):  # resume=true would fail
        train(compose_train("total_kimg=0.016", "seed=1"), on_own_run_dir=owned.append)
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "provenance.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"is another command's output folder \(it holds provenance.json\)"):
        train(compose_train("total_kimg=0.016", run_dir=samples), on_own_run_dir=owned.append)
    for ckpt_file in run.glob("checkpoint-*.pt"):
        ckpt_file.unlink()
    (run / "phema").mkdir()
    (run / "phema" / "snapshot-000000000128.safetensors").write_bytes(b"an earlier run's")
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    with pytest.raises(RunDirError, match=r"holds metrics.jsonl and power-EMA snapshots phema/ of an earlier run but no "
                                          r"checkpoint: .*pass resume=true to start that run over"):
        train(compose_train("total_kimg=0.016"), on_own_run_dir=owned.append)
    assert owned == [] and files() == before
    assert train(compose_train("total_kimg=0.016", "resume=true")).state.step == 2  # resume=true starts it over
    assert not list((run / "phema").iterdir())  # without the earlier snapshots, which a post-hoc EMA would mix in
    fresh = tmp_path / "failed-at-step-1"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text("")  # a run that failed before its first record
    assert train(compose_train("total_kimg=0.016", run_dir=fresh)).state.step == 2


def test_a_run_refused_while_setting_up_keeps_the_folders_record_and_leaves_no_folder_it_made(compose_train, tmp_path):
    """A refusal after the run owns its folder (a resume with another network; a data set without its root) comes
    before on_started, where edm-train writes the folder's .hydra record, so the record stays the last started
    run's; a run_dir the refused run made (its lock, its log) is removed once what on_own_run_dir opened there is
    closed, and so is none it did not make, even one named through a folder that did not exist (typo/../run)."""
    run, new = tmp_path / "run", tmp_path / "new" / "run"
    owned, started = [], []
    train(compose_train("total_kimg=0.016"), on_own_run_dir=owned.append, on_started=started.append)
    assert owned == started == [run]
    with pytest.raises(CheckpointError, match="denoiser.network.dropout: checkpoint 0.0, config 0.2"):
        train(compose_train("total_kimg=0.032", "resume=true", "network.dropout=0.2"), on_own_run_dir=owned.append,
              on_started=started.append)
    assert owned == [run, run] and started == [run]  # owned, never started
    let_go = []  # what on_own_run_dir opened in the folder is closed while the folder is still there

    def own(run_dir):
        owned.append(run_dir)
        return lambda err: let_go.append(run_dir.is_dir())

    with pytest.raises(edm.data.DatasetNotFoundError, match="dataset=latent needs dataset.root"):
        train(compose_train("dataset=latent", run_dir=new), on_own_run_dir=own, on_started=started.append)
    assert owned[-1] == new and not new.exists() and new.parent.is_dir() and started == [run]  # (run_dir only)
    assert let_go == [True]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("a user's")
    with pytest.raises(edm.data.DatasetNotFoundError, match="dataset=latent needs dataset.root"):
        train(compose_train("dataset=latent", run_dir=tmp_path / "typo" / ".." / "precious"))
    assert (precious / "notes.txt").read_text() == "a user's"


def test_what_owns_the_run_folder_lets_it_go_with_the_runs_error_while_the_run_still_holds_it(compose_train, tmp_path):
    """on_own_run_dir's LetGo is called once per run with the error that ends it (a refusal while setting up, an
    error in the loop) or None, before the lock is released: edm-train's train.log gets its last line then, so a run
    that takes the folder next never gets it."""
    from edm.files import folder_holder

    calls = []

    def own(run_dir):
        return lambda err: calls.append((type(err).__name__, folder_holder(run_dir) is not None))

    train(compose_train("total_kimg=0.016"), on_own_run_dir=own)
    with pytest.raises(CheckpointError):
        train(compose_train("total_kimg=0.032", "resume=true", "network.dropout=0.2"), on_own_run_dir=own)

    def fail(run):
        raise ValueError("a fault in the loop")

    with pytest.raises(ValueError, match="a fault in the loop"):
        train(compose_train("total_kimg=0.032", "resume=true"), callback=fail, on_own_run_dir=own)
    assert calls == [("NoneType", True), ("CheckpointError", True), ("ValueError", True)]
    assert folder_holder(tmp_path / "run") is None


def test_a_let_go_that_fails_still_lets_the_run_folder_go(compose_train, tmp_path):
    """A LetGo that raises (edm-train's train.log closed on a full disk) still releases the run folder, at the end
    of a run and on a refusal while setting up (a folder the run made is still removed): the next run in this
    process takes it instead of being refused as in use by itself."""
    from edm.files import folder_holder

    def own(run_dir):
        def let_go(err):
            raise OSError("[Errno 28] No space left on device")
        return let_go

    with pytest.raises(OSError, match="No space left"):
        train(compose_train("total_kimg=0.016"), on_own_run_dir=own)
    assert folder_holder(tmp_path / "run") is None
    new = tmp_path / "new" / "run"
    with pytest.raises(OSError, match="No space left"):
        train(compose_train("dataset=latent", run_dir=new), on_own_run_dir=own)
    assert folder_holder(new) is None and not new.exists()
    assert train(compose_train("total_kimg=0.032", "resume=true")).state.step == 4


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
    # every refused difference at once, the denoiser's and the fixed settings'
    with pytest.raises(CheckpointError, match=r"does not match the config \(denoiser.network.model_channels: checkpoint 8, "
                                              r"config 16\) and was trained with other settings that a resume may not "
                                              r"change \(seed: checkpoint 0, config 1;"):
        train(compose_train("total_kimg=0.032", "resume=true", "network.model_channels=16", "seed=1"))


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


def test_a_second_training_on_a_run_dir_in_use_is_refused_and_a_killed_owner_blocks_nothing(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "run"
    owner = subprocess.Popen(
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "total_kimg=1000", "grid_size=0"],
        cwd=REPO, env=one_thread_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: find_latest(run_dir) is not None, 120, "the first training's first checkpoint")
        second = subprocess.run([sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "resume=true"],
                                cwd=REPO, env=one_thread_env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert f"run_dir {run_dir} is in use by a training" in second.stderr
        assert f"(pid {owner.pid}, " in second.stderr  # the owner is named
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert "total_kimg=1000" in overrides and "resume=true" not in overrides  # the refused run wrote nothing there
        assert not (REPO / "train.log").exists() and not (REPO / ".hydra").exists()  # nor anywhere else
    finally:
        kill_group(owner)  # kill -9
    steps = metric_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # only the owner logged
    # kill -9 released the lock: the next run resumes at once, from the last checkpoint.
    saved = load_checkpoint(find_latest(run_dir))["step"]
    resumed = train(compose("train", [*tiny_train, f"run_dir={run_dir}", "resume=true", f"total_kimg={(saved + 1) * 8 / 1000}"]))
    assert resumed.state.step == saved + 1
    assert metric_steps(run_dir) == list(range(1, saved + 2))  # records after the checkpoint were dropped, then relogged


def test_a_launcher_restart_resumes_from_the_newest_checkpoint_by_itself(compose_train, tmp_path, monkeypatch):
    """Inside a launcher's restart (TORCHELASTIC_RESTART_COUNT > 0, as torchrun's elastic agent sets it after
    a worker failed) or a requeued SLURM job (SLURM_RESTART_COUNT > 0) a run folder with checkpoints is
    resumed without resume=true; on a first start it is refused, as always."""
    run_dir = tmp_path / "run"
    first = train(compose_train("total_kimg=0.016", run_dir=run_dir))
    with pytest.raises(RunDirError, match="pass resume=true"):
        train(compose_train("total_kimg=0.032", run_dir=run_dir))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    resumed = train(compose_train("total_kimg=0.032", run_dir=run_dir))
    assert resumed.state.step == 4
    assert load_checkpoint(resumed.checkpoint)["resumes"][0]["step"] == first.state.step == 2
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a requeued SLURM job
    assert train(compose_train("total_kimg=0.048", run_dir=run_dir)).state.step == 6


KILL_DURING_SAVE = """
import os, torch
from edm.cli import compose
from edm.training.loop import train
saves = []
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # the second checkpoint (step 4): half a file, then kill -9
        f.write(b"PK\\x03\\x04 half a checkpoint"); f.flush(); os._exit(9)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
train(compose("train", [*{overrides!r}, "run_dir=" + {run_dir!r}, "total_kimg=0.048"]))
"""


def test_a_kill_during_a_checkpoint_write_loses_nothing_and_resume_cleans_up(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "run"
    script = KILL_DURING_SAVE.format(overrides=tiny_train, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=one_thread_env, capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]  # the torn write left no checkpoint-4
    torn = list(run_dir.glob(".checkpoint-*.tmp"))
    assert len(torn) == 1 and metric_steps(run_dir) == [1, 2, 3, 4]  # steps 3 and 4 were logged before the kill
    load_checkpoint(find_latest(run_dir))  # the previous checkpoint is whole
    resumed = train(compose("train", [*tiny_train, f"run_dir={run_dir}", "total_kimg=0.048", "resume=true"]))
    assert resumed.state.step == 6
    assert not list(run_dir.glob(".checkpoint-*.tmp"))  # stale temporaries removed at start
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 once, from the resumed run


def test_a_resume_on_fewer_processes_drops_the_batch_records_of_the_missing_ranks_after_its_checkpoint(compose_train,
                                                                                                     tmp_path):
    """log_batch_indices=true: a run of two processes killed after logging steps past its last checkpoint, resumed on
    one. Each process trims its own batch-indices file to the checkpoint; rank 1's, which no process of the resumed
    run writes, kept the killed run's records of the steps the resumed run took again, and the log then said two
    sets of images for those steps. The main process trims it too."""
    run_dir = tmp_path / "run"
    train(compose_train("log_batch_indices=true", "checkpoint_every=2", "keep_checkpoints=0"))
    (run_dir / "checkpoint-00000004.pt").unlink()  # killed after step 4's records, before its checkpoint
    killed_rank1 = [{"step": step, "round": 0, "indices": [step]} for step in range(4)]  # rank 1's file of that run
    (run_dir / "batch-indices-rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed_rank1))
    train(compose_train("log_batch_indices=true", "checkpoint_every=2", "resume=true"))
    assert [r["step"] for r in map(json.loads, (run_dir / "batch-indices-rank1.jsonl").read_text().splitlines())] == [0, 1]
    assert [r["step"] for r in map(json.loads, (run_dir / "batch-indices-rank0.jsonl").read_text().splitlines())] == [0, 1, 2, 3]


KILL_DURING_SNAPSHOT = """
import os
import edm.training.phema as phema
from edm.cli import compose
from edm.training.loop import train
real_write = phema.atomic_write
def dying_write(path, write, durable=True):
    if path.name == "snapshot-000000000032.safetensors":  # the second snapshot: half a file, then kill -9
        return real_write(path, lambda f: (f.write(b"half a snapshot"), f.flush(), os._exit(9)), durable)
    return real_write(path, write, durable)
phema.atomic_write = dying_write
train(compose("train", [*{overrides!r}, "run_dir=" + {run_dir!r}, "ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016"]))
"""


def test_a_kill_during_a_snapshot_write_leaves_no_temporary_after_the_resume(tmp_path, tiny_train, one_thread_env):
    """A power-EMA snapshot is written atomically too: a kill -9 in the middle leaves its .snapshot-*.tmp in
    run_dir/phema, which the resume removes as it removes a checkpoint's (it stayed there, one model's EMAs per kill)."""
    run_dir = tmp_path / "run"
    script = KILL_DURING_SNAPSHOT.format(overrides=tiny_train, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=one_thread_env, capture_output=True, timeout=300)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert len(list((run_dir / "phema").glob(".snapshot-*.tmp"))) == 1
    resumed = train(compose("train", [*tiny_train, f"run_dir={run_dir}", "ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016",
                                      "resume=true"]))
    assert resumed.state.step == 4
    assert sorted(p.name for p in (run_dir / "phema").iterdir()) == ["snapshot-000000000016.safetensors",
                                                                    "snapshot-000000000032.safetensors"]


def test_a_digits_run_that_recorded_a_root_it_never_read_resumes_and_scores_without_it(compose_train, tmp_path):
    """A digits checkpoint that records a root (the set reads none): a resume without it continues (it is neither a
    setting nor an input of that set), and its model is scored against digits, no root."""
    from edm.models.loading import load_model

    first = train(compose_train("total_kimg=0.016"))
    state = load_checkpoint(first.checkpoint)
    state["config"]["dataset"]["root"] = "/data/ignored"
    state["inputs"] = state["inputs"] | {"dataset_root": "/data/ignored", "dataset_contents": "0:abc"}
    save_checkpoint(first.checkpoint, state)
    assert load_model(first.checkpoint)[1].training_dataset().root is None
    resumed = train(compose_train("total_kimg=0.032", "resume=true"))
    assert resumed.state.step == 4


def test_resume_refuses_a_changed_seed_loss_or_data_set_and_records_other_changes(compose_train, tmp_path, caplog):
    train(compose_train("total_kimg=0.016"))
    with pytest.raises(CheckpointError, match="seed: checkpoint 0, config 1.*resume with the settings it was trained with"):
        train(compose_train("total_kimg=0.032", "resume=true", "seed=1"))
    with pytest.raises(CheckpointError, match="other settings that a resume may not change \\(loss.P_mean: checkpoint -1.2, config -1.0"):
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


def test_a_resume_names_the_images_seen_as_the_step_log_does(compose_train, caplog):
    """A short run's 16 images are 0.016 kimg in the resume's line as in metrics.jsonl and the step log, not 0.0."""
    train(compose_train("total_kimg=0.016"))
    with caplog.at_level("INFO"):
        train(compose_train("total_kimg=0.032", "resume=true"))
    assert "at step 2 (0.016 kimg)" in caplog.text


def test_a_resume_with_another_grid_sampler_is_not_warned_of_as_a_changed_training(compose_train, caplog):
    """The `sampler` group draws the sample grids only: a resume that changes it trains as the saved run would have,
    so no warning says otherwise; the change is recorded all the same."""
    train(compose_train("total_kimg=0.016"))
    with caplog.at_level("WARNING"):
        result = train(compose_train("total_kimg=0.032", "resume=true", "sampler.num_steps=3"))
    assert "changed training settings" not in caplog.text
    changes = load_checkpoint(result.checkpoint)["resumes"][0]["changes"]
    assert {"key": "sampler.num_steps", "checkpoint": 2, "config": 3} in changes


def test_a_resume_reads_the_data_folder_the_run_read_whatever_the_working_directory(compose_train, tmp_path, caplog,
                                                                                      monkeypatch):
    """dataset.root=fold from two directories names two folders: the run records the resolved root and its files'
    contents key, so a resume from the other directory is refused, the same folder by its absolute path resumes, and
    files rewritten in place are warned of and recorded."""
    import os

    import numpy as np
    from PIL import Image

    for where, value in (("a", 0), ("b", 255)):
        (tmp_path / where / "fold").mkdir(parents=True)
        for k in range(16):
            Image.fromarray(np.full((8, 8), (value + 9 * k) % 256, np.uint8)).save(tmp_path / where / "fold" / f"{k}.png")
    run = ("dataset=folder", "dataset.root=fold", "dataset.num_workers=0", f"run_dir={tmp_path / 'run'}")
    monkeypatch.chdir(tmp_path / "a")
    first = train(compose_train("total_kimg=0.016", *run))
    assert load_checkpoint(first.checkpoint)["inputs"]["dataset_root"] == str(tmp_path / "a" / "fold")
    monkeypatch.chdir(tmp_path / "b")
    from edm.models.loading import load_model

    assert load_model(tmp_path / "run")[1].training_dataset().root == str(tmp_path / "a" / "fold")  # scored against it
    with pytest.raises(RunDirError, match=rf"holds another run .*dataset.root: run '{tmp_path / 'a' / 'fold'}', now "
                                          rf"'{tmp_path / 'b' / 'fold'}'"):
        train(compose_train("total_kimg=0.032", *run))
    with pytest.raises(RunDirError, match="pass resume=true to continue that run"):  # the same folder, named absolutely
        train(compose_train("total_kimg=0.032", *run[:1], f"dataset.root={tmp_path / 'a' / 'fold'}", *run[2:]))
    with pytest.raises(CheckpointError, match=rf"trained on other inputs \(inputs.dataset_root: checkpoint "
                                              rf"'{tmp_path / 'a' / 'fold'}', now '{tmp_path / 'b' / 'fold'}'\)"):
        train(compose_train("total_kimg=0.032", "resume=true", *run))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "fold" / "3.png")
    os.utime(tmp_path / "a" / "fold" / "3.png", ns=(1, 1))
    with caplog.at_level("WARNING"):
        result = train(compose_train("total_kimg=0.032", "resume=true", *run[:-1][:1],
                                     f"dataset.root={tmp_path / 'a' / 'fold'}", *run[2:]))
    assert "inputs.dataset_contents changed since the checkpoint" in caplog.text
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "a" / "fold" / "5.png")
    os.utime(tmp_path / "a" / "fold" / "5.png", ns=(2, 2))
    with caplog.at_level("WARNING"):
        load_model(tmp_path / "run")[1].training_dataset()
    assert f"the files of {tmp_path / 'a' / 'fold'} changed since" in caplog.text
    (tmp_path / "a" / "fold").rename(tmp_path / "a" / "moved")  # the data moved: the config's root, with a warning
    with caplog.at_level("WARNING"):
        assert load_model(tmp_path / "run")[1].training_dataset().root == str(tmp_path / "a" / "fold")  # as resumed
    assert f"was trained on {tmp_path / 'a' / 'fold'}, which is not here" in caplog.text
    changes = load_checkpoint(result.checkpoint)["resumes"][0]["changes"]
    assert [c["key"] for c in changes if c["key"].startswith("inputs.")] == ["inputs.dataset_contents"]


def test_resume_inputs_refuse_another_teacher_file_and_warn_of_another_init_file(tmp_path, caplog):
    """A teacher is read at every step: one whose file changed (its run trained on) is refused; the init model only
    started the run, so another file there is warned of, but adding or dropping init= is refused; a checkpoint
    without inputs is left to its settings' check."""
    from edm.training.run import check_resume_inputs

    saved = {"dataset_root": None, "dataset_contents": None, "init_sha256": "a", "teacher_sha256": "t"}
    with pytest.raises(CheckpointError, match="inputs.teacher_sha256: checkpoint 't', now 'u'"):
        check_resume_inputs(saved, saved | {"teacher_sha256": "u"}, tmp_path / "c.pt")
    with caplog.at_level("WARNING"):
        assert check_resume_inputs(saved, saved | {"init_sha256": "b"}, tmp_path / "c.pt") == [
            {"key": "inputs.init_sha256", "checkpoint": "a", "config": "b"}]
    assert "inputs.init_sha256 changed since the checkpoint ('a' -> 'b')" in caplog.text
    assert check_resume_inputs(None, saved, tmp_path / "c.pt") == []
    scratch = saved | {"init_sha256": None}
    with pytest.raises(CheckpointError, match="inputs.init_sha256: checkpoint None, now 'a'.*init_file: None then, "
                                              "/m/init.pt now"):
        check_resume_inputs(scratch, saved | {"init_file": "/m/init.pt"}, tmp_path / "c.pt")  # init= added on resume
    with pytest.raises(CheckpointError, match="inputs.init_sha256: checkpoint 'a', now None"):
        check_resume_inputs(saved, scratch, tmp_path / "c.pt")  # ... or dropped


def test_a_resume_with_other_adam_settings_optimizes_with_them_and_a_torn_metrics_line_is_dropped(compose_train, caplog):
    """The optimizer's saved state brings its saved betas and eps; a resume that records new ones (a warned change)
    must also use them. A last metrics.jsonl line cut short by a crash does not block the resume."""
    first = train(compose_train("total_kimg=0.016"))
    metrics = first.checkpoint.parent / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        result = train(compose_train("total_kimg=0.032", "resume=true", "adam_betas=[0.5,0.6]", "adam_eps=0.001"))
    assert "adam_betas: [0.9, 0.99] -> [0.5, 0.6]" in caplog.text and "not JSON records" in caplog.text
    groups = load_checkpoint(result.checkpoint)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.6) and g["eps"] == 0.001 for g in groups)
    assert all(json.loads(line) for line in metrics.read_text().splitlines() if line.strip())


def test_the_batch_indices_log_holds_each_step_once_after_a_resume(compose_train):
    """Steps logged after the checkpoint (before a crash) are taken again by the resumed run: their old records go."""
    first = train(compose_train("total_kimg=0.016", "log_batch_indices=true"))
    log = first.checkpoint.parent / "batch-indices-rank0.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 2, "round": 0, "indices": [0]}) + "\n")  # a step past it
    train(compose_train("total_kimg=0.032", "resume=true", "log_batch_indices=true"))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]


def test_the_batch_indices_of_the_steps_before_a_checkpoint_are_on_disk_when_it_is(compose_train):
    """A kill -9 after a checkpoint loses no record the resumed run will not write again: once checkpoint-2 exists,
    the log on disk (not in the process's buffer) holds steps 0 and 1."""
    on_disk = {}

    def read(run):
        path = run.run_dir / "batch-indices-rank0.jsonl"
        on_disk[run.state.step] = [json.loads(line)["step"] for line in path.read_text().splitlines()]

    train(compose_train("total_kimg=0.032", "log_batch_indices=true"), callback=read)
    assert on_disk[3][:2] == [0, 1]  # step 3's callback runs after checkpoint-2 was saved


def test_resume_refuses_another_resize_filter_and_a_resized_checkpoint_that_names_none_is_neither_resumed_nor_scored(
        compose_train, tmp_path):
    resized = ("dataset.resolution=6",)
    train(compose_train("total_kimg=0.016", *resized))
    with pytest.raises(CheckpointError, match="dataset.resample: checkpoint 'lanczos', config 'bilinear'"):
        train(compose_train("total_kimg=0.032", "resume=true", *resized, "dataset.resample=bilinear"))
    path = find_latest(tmp_path / "run")
    state = load_checkpoint(path)
    del state["config"]["dataset"]["resample"]  # a checkpoint of an edm without the setting
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"dataset.resample: checkpoint 'unrecorded \(bilinear, or bicubic for folders\)', config 'lanczos'"):
        train(compose_train("total_kimg=0.032", "resume=true", *resized))
    from edm.models.loading import load_model  # nor is it scored against data of a filter it never saw

    with pytest.raises(ValueError, match=r"resized to 6px before runs recorded dataset.resample .*dataset.resample="):
        load_model(path)[1].training_dataset()
    native = tmp_path / "native"  # such a checkpoint at the native size: nothing was resized, so it resumes
    train(compose_train("total_kimg=0.016", run_dir=native))
    state = load_checkpoint(find_latest(native))
    del state["config"]["dataset"]["resample"]
    save_checkpoint(find_latest(native), state)
    assert train(compose_train("total_kimg=0.032", "resume=true", run_dir=native)).state.step == 4


# dropout exercises the global RNG, accumulation the micro-batch path, 12 images the epoch wrap


def test_a_batch_layout_refusal_names_a_fix_that_passes():
    """batch_size=10 with batch_per_device=2 on 4 processes: no batch_per_device splits 10 over 4 processes, but the
    refusal said "set batch_per_device to a divisor of 2" (1 is refused again). It says batch_size must split over
    the processes; where it does, each divisor it names passes."""
    from edm.training.config import TrainConfig
    from edm.training.run import check_batch_layout

    with pytest.raises(ValueError, match=r"batch_size=10 does not split over the 4 processes of this launch .*set "
                                         r"batch_size to a multiple of 4"):
        check_batch_layout(TrainConfig(batch_size=10, batch_per_device=2), 4)
    with pytest.raises(ValueError, match=r"set batch_per_device to a divisor of 6$"):
        check_batch_layout(TrainConfig(batch_size=24, batch_per_device=4), 4)
    for micro in (1, 2, 3, 6):
        assert check_batch_layout(TrainConfig(batch_size=24, batch_per_device=micro), 4) == micro
