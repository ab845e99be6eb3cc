"""edm/training/loop.py: every schedule and network option trains through the configs, on one or two
processes, with mixed precision, compilation and channels_last; bad data, a read-only folder and a
diverging loss stop with a message that names the cause."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edm
from edm.data import BadImagesError, DatasetNotFoundError, StreamBatchSampler
from edm.files import OutputWriteError
from edm.models.checkpoint import find_latest, list_checkpoints, load_checkpoint, load_denoiser
from edm.training.build import build_loss
from edm.training.loop import TrainingDivergedError, train

from conftest import REPO, folder_with_bad_files, kill_group, load_script, metrics_records, png, two_nodes, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")



# ----------------------------------------------------------------------------- through Hydra


@pytest.mark.parametrize("schedule", ["vp", "ve", "edm", "fm", "trigflow"])
def test_each_schedule_trains_through_hydra(compose_train, tmp_path, schedule):
    cfg = compose_train(f"schedule={schedule}")
    assert cfg.precond.kind is None and cfg.loss.kind is None  # unset: the schedule's own ...
    assert build_loss(cfg.loss, cfg.schedule.build(), cfg.precond.sigma_data).kind == schedule
    result = train(cfg)
    run_dir = tmp_path / "run"
    assert result.state.step == 4 and result.state.cur_nimg == 32
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4] and result.checkpoint == find_latest(run_dir)
    records = metrics_records(run_dir)
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
    assert all(math.isfinite(r["loss"]) for r in metrics_records(result.metrics.parent))


@pytest.mark.slow  # inductor compilation takes about a minute on CPU
def test_compiled_network_trains_and_saves_plain_weights(compose_train):
    result = train(compose_train("compile=true"))
    state = load_checkpoint(result.checkpoint)
    assert not any("_orig_mod" in key for key in state["model"])
    load_denoiser(result.checkpoint)


def test_missing_data_root_fails_with_instructions(compose_train, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(compose_train("dataset=fashion_mnist", f"dataset.root={tmp_path / 'nowhere'}"))
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):  # mnist has no default root
        train(compose_train("dataset=mnist"))


# ----------------------------------------------------------------------------- resume


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
    with pytest.raises(TrainingDivergedError, match=r"No checkpoint was saved yet\. .*then resume=true \(which starts "
                                                    r"the run over\)$"):
        train(compose_train("total_kimg=0.048", "checkpoint_every=8", "log_every=2", run_dir=tmp_path / "early"),
              callback=poison)


def test_weights_broken_by_an_update_after_a_finite_loss_are_not_saved(compose_train, tmp_path):
    """The loss is computed before the update: weights made non-finite at a checkpoint step (an infinite gradient
    of a finite loss) are caught before that checkpoint is written, so keep_checkpoints=1 keeps the good one."""
    def poison(run):
        if run.state.step == 4:
            with torch.no_grad():
                next(run.net.parameters()).fill_(float("inf"))

    with pytest.raises(TrainingDivergedError, match="weights became non-finite by step 4.*last good checkpoint is "
                                                    ".*checkpoint-00000002.pt"):
        train(compose_train("total_kimg=0.048", "checkpoint_every=2", "log_every=2", "keep_checkpoints=1"),
              callback=poison)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]


def test_a_failed_run_with_loader_workers_leaves_its_folder_free_to_resume(compose_train):
    """DataLoader workers are forked with the run folder's lock: they end with the failed run, even while its
    exception (and so the loop's frame) is kept, as a notebook keeps the last one."""
    def fail(run):
        if run.state.step == 2:
            raise RuntimeError("stop here")

    kept = None
    try:
        train(compose_train("total_kimg=0.048", "checkpoint_every=2", "dataset.num_workers=1"), callback=fail)
    except RuntimeError as err:
        kept = err  # noqa: F841 (held on purpose)
    result = train(compose_train("total_kimg=0.048", "checkpoint_every=2", "dataset.num_workers=1", "resume=true"))
    assert result.state.step == 6 and kept is not None


def test_a_resume_to_fewer_kimg_than_trained_says_there_is_nothing_to_train(compose_train, caplog):
    first = train(compose_train("total_kimg=0.032"))
    with caplog.at_level(logging.WARNING, logger="edm.training.loop"):
        result = train(compose_train("total_kimg=0.016", "resume=true"))
    assert result.state == first.state and result.state.cur_nimg == 32
    assert "total_kimg=0.016, but the run has trained 0.032 kimg already: nothing to train" in caplog.text


# ----------------------------------------------------------------------------- two processes


def test_two_cpu_processes_see_different_data(tmp_path, tiny_train, one_thread_env):
    """Two processes split each batch; the power-function EMAs are tracked and snapshotted once; warnings about the
    settings (VP's loss on EDM's preconditioning; a resume with another lr) are logged once, not per process."""
    run_dir = tmp_path / "ddp"
    power = ["ema_sigma_rel=[0.1]", "ema_snapshot_kimg=0.016", "loss.kind=vp"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train", *tiny_train,
              f"run_dir={run_dir}", "grid_size=0", "cpu=true", *power]
    proc = subprocess.run([*launch, "log_batch_indices=true"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=one_thread_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("not 1 as in each row of EDM Table 1") == 1
    assert find_latest(run_dir).name == "checkpoint-00000004.pt"
    state = load_checkpoint(find_latest(run_dir))
    assert (state["processes"], state["batch_per_device"]) == (2, 4)
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
    resumed = subprocess.run([*launch, "resume=true", "total_kimg=0.048", "lr=1e-3"], cwd=REPO, capture_output=True,
                             text=True, timeout=600, env=one_thread_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("with changed training settings (lr: 0.002 -> 0.001)") == 1


def test_processes_given_different_settings_are_refused_before_any_work(tmp_path, tiny_train, one_thread_env):
    """Each process of a launch reads its own command line (one per node): two given another seed and lr (here an
    interpolation of RANK) would train on their own data order and apply their own updates to the replicas, silently.
    Every process refuses it in one line naming each differing key, and no run folder is made; a setting each
    process may hold its own of (progress) is not compared."""
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train", *tiny_train, "grid_size=0",
              "cpu=true", f"run_dir={run_dir}", "seed=${oc.env:RANK}", "lr=${oc.env:RANK}1e-3",
              "progress=${oc.env:RANK}"]
    proc = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env)
    assert proc.returncode != 0
    line = ("edm-train: error: the 2 processes of this launch were given different settings (lr: 0.001 in process 0, "
            "0.011 in process 1; seed: 0 in process 0, 1 in process 1): start every process")
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert not run_dir.exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_a_run_folder_is_made(compose_train, tmp_path,
                                                                                                tiny_train, one_thread_env):
    """batch_size=1 on 2 processes was a ZeroDivisionError traceback in each; batch_size=3 on 2 and batch_per_device=3
    of 8 on 1 were refused only after the run had made its folder (train.log, .hydra). Each is one line saying what to
    set, before run_dir exists."""
    with pytest.raises(ValueError, match=r"batch_size=8 must be a multiple of batch_per_device \(3\) x processes \(1\) = 3: "
                                         "set batch_per_device to a divisor of 8"):
        train(compose_train("batch_per_device=3"))
    assert not (tmp_path / "run").exists()
    for batch, said in [(1, "batch_size=1 is smaller than the 2 processes of this launch"),
                        (3, "batch_size=3 does not split over the 2 processes of this launch")]:
        run_dir = tmp_path / f"batch-{batch}"
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train",
                               *tiny_train, f"batch_size={batch}", "cpu=true", f"run_dir={run_dir}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env)
        assert proc.returncode != 0 and "ZeroDivisionError" not in proc.stderr
        assert proc.stderr.count(f"edm-train: error: {said} (each takes an equal share of every step): set batch_size to "
                                 "a multiple of 2, or launch") == 2, proc.stderr[-3000:]
        assert not run_dir.exists()


def test_a_sweep_whose_processes_are_in_different_folders_is_refused_naming_hydra_sweep_dir(tmp_path, tiny_train):
    """Each process of a sweep (-m) composes hydra.sweep.dir itself; its default names the second the process started,
    so two processes started either side of a second (here: a folder per RANK) trained in their own folders, and were
    refused as "given different settings", which they were not. Every process names hydra.sweep.dir, before any work."""
    from conftest import one_node_run

    proc = one_node_run("edm.train", ["-m", *tiny_train, "grid_size=0", "cpu=true", "progress=false",
                                      f"hydra.sweep.dir={tmp_path}/sweep" + "${oc.env:RANK}"])
    assert proc.returncode != 0
    said = ("edm-train: error: the processes of this sweep are in different job folders (" + f"{tmp_path}/sweep0/0-")
    assert proc.stderr.count(said) == 2, proc.stderr[-3000:]
    assert "pass hydra.sweep.dir=DIR, one absolute folder for every process" in proc.stderr
    assert not list(tmp_path.glob("sweep*/*/checkpoint-*"))


def _train_processes(args: list[str], processes: int, env: dict) -> str:
    """edm.train in `processes` CPU processes (accelerate launch, gloo) or in one plain process; its stderr."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train"]
    command = launch if processes > 1 else [sys.executable, "-m", "edm.train"]
    proc = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _step_order(run_dir: Path, world_by_step: dict[int, int]) -> dict[int, list[int]]:
    """The images of each step in data-stream order (micro-batch a of process r is the chunk a·W + r)."""
    chunks: dict[int, dict[int, list[int]]] = {}
    for path in run_dir.glob("batch-indices-rank*.jsonl"):
        rank = int(path.stem.removeprefix("batch-indices-rank"))
        for line in path.read_text().splitlines():
            record = json.loads(line)
            world = world_by_step[record["step"]]
            chunks.setdefault(record["step"], {})[record["round"] * world + rank] = record["indices"]
    return {step: sum((chunks[step][j] for j in sorted(chunks[step])), []) for step in sorted(chunks)}


def test_a_run_continues_on_another_number_of_processes_with_the_same_data_and_draws(tmp_path, tiny_train,
                                                                                    one_thread_env):
    """Global batch 8 in micro-batches of 4: 2 processes for 2 steps then 1 (accumulating 2) for 2, and 1 then 2,
    end bit for bit where 1 uncut process ends (dropout 0.1 included): the same images per step and the same
    σ, n and dropout per micro-batch (seeded by its place in the data stream). The resumed run
    says so in one line; micro-batches of 2 images draw differently (the check can fail), and a changed global
    batch is refused, naming both values."""
    base = [*tiny_train, "batch_per_device=4", "grid_size=0", "cpu=true", "progress=false", "log_batch_indices=true",
            "checkpoint_every=2", "network.dropout=0.1"]
    half, full = "total_kimg=0.016", "total_kimg=0.032"

    def run(name: str, layout: tuple[int, int], *extra: str) -> tuple[dict, dict[int, list[int]], str]:
        """Steps 1-2 on layout[0] processes, 3-4 on layout[1]; (None, None): 4 steps on one process, uncut."""
        run_dir = tmp_path / name
        if layout == (None, None):
            log = _train_processes([*base, f"run_dir={run_dir}", full, *extra], 1, one_thread_env)
            return load_checkpoint(find_latest(run_dir)), _step_order(run_dir, dict.fromkeys(range(4), 1)), log
        first = _train_processes([*base, f"run_dir={run_dir}", half, *extra], layout[0], one_thread_env)
        second = _train_processes([*base, f"run_dir={run_dir}", full, "resume=true", *extra], layout[1], one_thread_env)
        order = _step_order(run_dir, {0: layout[0], 1: layout[0], 2: layout[1], 3: layout[1]})
        return load_checkpoint(find_latest(run_dir)), order, first + second

    straight, straight_order, _ = run("one", (None, None))
    start = load_checkpoint(tmp_path / "one" / "checkpoint-00000002.pt")
    for name, layout in [("two-then-one", (2, 1)), ("one-then-two", (1, 2))]:
        state, order, log = run(name, layout)
        assert order == straight_order, name
        assert f"continuing on {layout[1]} process(es) x 4 images per micro-batch (the checkpoint: {layout[0]} x 4)" in log
        for key in ("model", "ema"):  # halving is exact, so gloo's (g₀ + g₁)/2 equals accumulated g₀/2 + g₁/2
            assert all(torch.equal(state[key][k], straight[key][k]) for k in straight[key]), (name, key)
    other, _, log = run("smaller-micro-batches", (None, None), "batch_per_device=2")
    moved = sum(float((straight["model"][k] - start["model"][k]).double().pow(2).sum()) for k in start["model"]) ** 0.5
    apart = sum(float((other["model"][k] - straight["model"][k]).double().pow(2).sum()) for k in start["model"]) ** 0.5
    assert apart > 1e-2 * moved  # other draws: an O(1) share of the last two steps' update
    refused = subprocess.run([sys.executable, "-m", "edm.train", *base, f"run_dir={tmp_path / 'one'}", "total_kimg=0.064",
                              "resume=true", "batch_size=16"], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env=one_thread_env)
    assert refused.returncode != 0 and "batch_size: checkpoint 8, config 16" in refused.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_one_box_train_as_one_node_with_as_many_processes(tmp_path, tiny_train, one_thread_env):
    """Two `accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1` groups of one
    CPU process each (the commands scripts/slurm_launch.py makes from SLURM's variables), on one run_dir,
    end bit for bit where one node with two processes ends (gloo's sum of two gradients is the same
    either way); only node 0's main process logs progress, and each node's log says which node and
    rank it is."""
    train_args = [*tiny_train, "grid_size=0", "cpu=true", "progress=false"]
    fixed = ["--mixed_precision", "no", "--dynamo_backend", "no"]  # what accelerate would otherwise ask its config for
    one_node = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--num_machines", "1", *fixed, "-m", "edm.train", *train_args, f"run_dir={tmp_path / 'one'}"],
                              cwd=REPO, env=one_thread_env, capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    run_dir = tmp_path / "two"
    slurm = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "localhost",
             "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(_free_port())}
    nodes = []
    for node in (0, 1):
        command = load_script("slurm_launch").launch_command(slurm | {"SLURM_NODEID": str(node)},
                                                            [*train_args, f"run_dir={run_dir}"])
        assert command[4:10] == ["--num_machines", "2", "--machine_rank", str(node), "--num_processes", "2"]
        at = command.index("edm.train") - 1  # before "-m edm.train"
        nodes.append(subprocess.Popen([*command[:at], *fixed, *command[at:]], cwd=REPO, env=one_thread_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        logs = [proc.communicate(timeout=600)[0] for proc in nodes]
    finally:
        for proc in nodes:
            kill_group(proc)
    assert [proc.returncode for proc in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "process 0 of 2 (node 0 of 2, local rank 0)" in logs[0]
    assert "process 1 of 2 (node 1 of 2, local rank 0)" in logs[1]
    assert "saved" in logs[0] and "saved" not in logs[1]  # node 1 logs only who it is and warnings
    one, two = (load_checkpoint(find_latest(d)) for d in (tmp_path / "one", run_dir))
    for key in ("model", "ema"):
        assert all(torch.equal(one[key][k], two[key][k]) for k in one[key]), key
    assert two["processes"] == 2 and [r["step"] for r in metrics_records(run_dir)] == [1, 2, 3, 4]


def test_two_nodes_that_do_not_share_run_dir_are_refused(tmp_path, tiny_train, one_thread_env):
    """run_dir=run from two working directories (as two nodes with their own disks): each node saw its own folder, so
    process 1 resumed from no checkpoint while process 0 resumed from its own (the replicas then trained apart, and
    the launch hung when process 0 ended first). Every process refuses such a launch in one line, and node 0's new
    folder is removed."""
    ends = two_nodes(tmp_path, "edm.train", lambda node: [*tiny_train, "grid_size=0", "cpu=true", "run_dir=run"],
                     one_thread_env)
    said = ("edm-train: error: run_dir run is not one folder for every process: process 1 does not see what process 0 "
            "writes there")
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not (tmp_path / "node0" / "run").exists()


def test_two_nodes_that_read_different_data_sets_are_refused(tmp_path, tiny_train, one_thread_env):
    """dataset.root=data from two working directories (as each node's own copy of the data, one of them not whole):
    each process drew its share of every batch from a permutation of its own 13 or 12 images, so the shares repeated
    and missed images, and the run ended with exit 0. Every process refuses such a launch, naming each one's set."""
    run_dir = tmp_path / "run"
    for node, count in ((0, 13), (1, 12)):
        for k in range(count):
            png(tmp_path / f"node{node}" / "data" / f"{k:03d}.png", 8, 10 * k)
    ends = two_nodes(tmp_path, "edm.train", lambda node: [
        *tiny_train, "batch_size=4", "total_kimg=0.016", "grid_size=0", "cpu=true", "dataset=folder", "dataset.root=data",
        "dataset.num_workers=0", f"run_dir={run_dir}"], one_thread_env)
    said = ("edm-train: error: the processes of this launch read different data sets (process 0: 13 images of 1x8x8, "
            "label_dim 0; process 1: 12 images of 1x8x8, label_dim 0; dataset.root=data)")
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not run_dir.exists()


def test_two_nodes_that_read_different_init_files_are_refused(tmp_path, tiny_train, one_thread_env, tiny_checkpoint):
    """init=model.pt from two working directories (each node's own copy, one of other weights; a teacher= alike): the
    settings agree, but what the processes read does not (a teacher of other weights gives other loss targets).
    Every process refuses such a launch, naming the hashes, before any step."""
    for node in (0, 1):
        tiny_checkpoint(tmp_path / f"node{node}" / "model.pt", perturb=0.01 * (node + 1))
    run_dir = tmp_path / "run"
    ends = two_nodes(tmp_path, "edm.train", lambda node: [
        *tiny_train, "batch_size=4", "total_kimg=0.016", "grid_size=0", "cpu=true", "init=model.pt",
        f"run_dir={run_dir}"], one_thread_env)
    said = "edm-train: error: the 2 processes of this launch read different files (init_sha256: "
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not list(run_dir.glob("checkpoint-*.pt"))


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_save_and_end_when_their_launcher_is_killed(tmp_path, tiny_train, one_thread_env):
    """kill -9 of `accelerate launch` (two CPU workers): both workers get SIGTERM from the kernel, save
    a checkpoint and end, and the run folder is free for the resume."""
    from edm.files import FolderLock

    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.train", *tiny_train, f"run_dir={run_dir}",
         "total_kimg=100", "checkpoint_every=100000", "log_every=1", "grid_size=0", "cpu=true"],
        cwd=REPO, env=one_thread_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    workers: list[int] = []
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0,
                 300, "the first logged step")
        workers += [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        assert len(workers) == 2
        launcher.kill()
        launcher.wait(timeout=60)
        wait_for(lambda: not any(_alive(pid) for pid in workers), 120, "the workers to end")
        assert find_latest(run_dir) is not None  # they saved before ending
        FolderLock(run_dir).acquire().release()  # and hold the folder no more
    finally:
        kill_group(launcher)
        for pid in workers:  # torch's launcher starts each worker in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _launch(run_dir: Path, tiny_train: list[str], env: dict, *launcher_args: str, **popen) -> subprocess.Popen:
    """accelerate launch of edm.train on two CPU workers (gloo): 20 steps, a checkpoint every 4."""
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", *launcher_args, "-m", "edm.train", *tiny_train,
         f"run_dir={run_dir}", "total_kimg=0.16", "checkpoint_every=4", "keep_checkpoints=0", "grid_size=0", "cpu=true"],
        cwd=REPO, env=env, start_new_session=True, **popen)


def test_a_killed_worker_makes_the_launcher_restart_the_group_which_resumes_and_ends_as_an_unbroken_run(
        tmp_path, tiny_train, one_thread_env):
    """`accelerate launch --max_restarts 1`: kill -9 of one of two workers after a checkpoint; torchrun's agent
    restarts both, they resume from the newest checkpoint by themselves (a process group of the attempt's own: see
    edm.hardware.join_restarted_group), and the run ends with the weights of a run that was never interrupted."""
    from conftest import worker_pid

    broken, unbroken = tmp_path / "broken", tmp_path / "unbroken"
    launcher = _launch(broken, tiny_train, one_thread_env, "--max_restarts", "1", "--monitor_interval", "1",
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (broken / "checkpoint-00000004.pt").is_file(), 300, "the first checkpoint")
        os.kill(worker_pid(launcher.pid, 1), signal.SIGKILL)
        newest = find_latest(broken)
        output, _ = launcher.communicate(timeout=400)
    finally:
        kill_group(launcher)
    assert launcher.returncode == 0, output[-3000:]
    resumed = [line.rsplit("/", 1)[-1] for line in output.splitlines()
               if "restart 1 (TORCHELASTIC_RESTART_COUNT): resuming from" in line]
    # both workers from one checkpoint: the newest at the kill, or one the surviving worker finished saving after it
    assert len(resumed) == 2 and resumed[0] == resumed[1] >= newest.name
    proc = _launch(unbroken, tiny_train, one_thread_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=400) == 0, proc.stderr.read()[-3000:]
    a, b = load_checkpoint(broken / "checkpoint-00000020.pt"), load_checkpoint(unbroken / "checkpoint-00000020.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key


def test_channels_last_training_is_the_same_computation(compose_train, tmp_path):
    """channels_last=true changes the memory layout only: same losses and weights (CPU, to
    float32 rounding: relative distance of the EMA weights < 1e-5), the network's 4-D weights stored NHWC, a checkpoint any model loads."""
    seen = []
    plain = train(compose_train(run_dir=tmp_path / "plain"))
    nhwc = train(compose_train("channels_last=true", run_dir=tmp_path / "nhwc"),
                 callback=lambda run: seen.append(max((p for p in run.net.parameters() if p.ndim == 4), key=torch.numel)))
    assert seen and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in seen)
    a, b = metrics_records(tmp_path / "plain"), metrics_records(tmp_path / "nhwc")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    a_state, b_state = load_checkpoint(plain.checkpoint), load_checkpoint(nhwc.checkpoint)
    # Whole-model distance: single elements of zero-initialised tensors follow the sign of
    # round-off in Adam's first steps, the weights as a whole do not.
    diff = sum(float((b_state["ema"][k] - v).double().pow(2).sum()) for k, v in a_state["ema"].items())
    size = sum(float(v.double().pow(2).sum()) for v in a_state["ema"].values())
    assert math.sqrt(diff / size) < 1e-5
    denoiser, _ = load_denoiser(nhwc.checkpoint)  # a default-layout model takes the NHWC weights
    assert all(p.is_contiguous() for p in denoiser.parameters())


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


def test_training_on_a_folder_with_bad_images_names_them_skips_them_and_saves_before_a_bad_read(tmp_path, compose_train):
    """Header-bad files stop the run before it starts (or are skipped on request); a file that only
    fails when its pixels are read stops the run with its path, the run's state saved; once the
    file is fixed, resume=true continues."""
    empty, small, truncated = folder_with_bad_files(tmp_path / "images")
    folder = ["dataset=folder", f"dataset.root={tmp_path / 'images'}", "dataset.num_workers=0"]
    with pytest.raises(BadImagesError, match=str(empty)):
        train(compose_train(*folder))
    assert find_latest(tmp_path / "run") is None
    with pytest.raises(BadImagesError, match=f"{truncated}: cannot read its pixels(.|\n)*state after step \\d+ is saved"):
        train(compose_train(*folder, "dataset.skip_bad=true"))
    saved = load_checkpoint(find_latest(tmp_path / "run"))
    assert saved["step"] < 4 and saved["dataset_size"] == 31
    png(truncated, 8, 7)  # fixed
    result = train(compose_train(*folder, "dataset.skip_bad=true", "resume=true"))
    assert result.state.step == 4


def test_a_read_only_run_dir_is_one_line_naming_the_folder(compose_train, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputWriteError, match=f"cannot write .lock in {tmp_path / 'run'}: Read-only file system"):
        train(compose_train())
