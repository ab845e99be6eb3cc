"""edm/hardware.py: the TF32 flags and the launcher's mixed precision and dynamo backend."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.mark.parametrize("launched,named", [
    ({"ACCELERATE_USE_FSDP": "true"}, "trains with FSDP, .* launch without --use_fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "trains with DeepSpeed, .* launch without --use_deepspeed"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "trains with Megatron-LM"),
    ({"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_DP_SHARD_SIZE": "2",
      "PARALLELISM_CONFIG_TP_SIZE": "1"}, "a parallelism config of dp_shard_size 2, which"),
])
def test_a_launch_that_shards_the_model_is_refused_before_any_work(compose_train, monkeypatch, tmp_path, launched,
                                                                   named):
    """edm-train replicates the model (DDP) and averages whole parameters into its EMA: FSDP, DeepSpeed, Megatron-LM
    or a parallelism config that splits the model is refused, naming it and the launch that trains, before the run
    folder is made; a parallelism config of replicas only (or no flag) is a plain launch."""
    from edm.hardware import check_replicated_launch
    from edm.training.loop import train

    for flag, value in launched.items():
        monkeypatch.setenv(flag, value)
    with pytest.raises(ValueError, match=named):
        train(compose_train(run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    replicas = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2",
                "PARALLELISM_CONFIG_TP_SIZE": "1", "ACCELERATE_USE_FSDP": "false"}
    check_replicated_launch(replicas)  # not refused


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


def test_idle_cores_are_read_from_the_cpu_times_of_this_process_cpus():
    """Two CPUs over the interval: cpu0 busy 75 of 100 jiffies, cpu1 10 of 100 -> 0.25 + 0.9 idle."""
    import os

    from edm.hardware import idle_cores

    mine = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else [0, 1]
    snapshots = iter([{mine[0]: (0, 0), mine[-1]: (0, 0)}, {mine[0]: (75, 100), mine[-1]: (10, 100)}])
    expected = 0.25 + 0.9 if len(mine) == 2 else 0.9
    assert idle_cores(0.0, read=lambda: next(snapshots)) == pytest.approx(expected)
    assert idle_cores(0.0, read=lambda: (_ for _ in ()).throw(OSError("no /proc"))) is None


def test_a_cpu_run_takes_as_many_threads_as_cores_are_idle_unless_omp_num_threads_says():
    from edm.hardware import share_cpu

    default = torch.get_num_threads()
    try:
        assert share_cpu(False, env={}, idle=lambda: 0.0) is None  # not on the CPU
        assert share_cpu(True, env={"OMP_NUM_THREADS": "4"}, idle=lambda: 0.0) is None  # the user chose
        assert share_cpu(True, env={}, idle=lambda: None) is None  # nothing to read
        assert share_cpu(True, env={}, idle=lambda: float(default)) == default == torch.get_num_threads()
        assert share_cpu(True, env={}, idle=lambda: 0.2) == 1 == torch.get_num_threads()  # busy: one thread
    finally:
        torch.set_num_threads(default)


@pytest.mark.parametrize("rank, logged", [(None, 1), (0, 1), (1, 0)])
def test_a_run_wide_warning_is_logged_by_the_main_process_only(monkeypatch, caplog, rank, logged):
    """RunWideLog: the only process (no process group) and rank 0 log it, rank 1 does not; the plain logger under it
    logs in every process."""
    import logging

    from edm.hardware import RunWideLog, is_main_process

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: rank is not None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    plain = logging.getLogger("edm.test_run_wide")
    with caplog.at_level(logging.INFO, logger="edm.test_run_wide"):
        RunWideLog(plain).warning("setting %s", "x")
        RunWideLog(plain).info("note")
        plain.warning("this process's own")
    assert is_main_process() is (logged == 1)
    assert [r.getMessage() for r in caplog.records].count("setting x") == logged
    assert [r.getMessage() for r in caplog.records].count("note") == logged
    assert [r.getMessage() for r in caplog.records].count("this process's own") == 1


@pytest.mark.parametrize("env,refused", [({}, False), ({"WORLD_SIZE": "1"}, False), ({"WORLD_SIZE": "4"}, True),
                                         ({"OMPI_COMM_WORLD_SIZE": "2"}, True)])
def test_a_single_process_command_refuses_a_launch_of_several(env, refused):
    """edm-eval, edm-study, edm-export, edm-posthoc, edm-convert-nvlabs split no work: N launched processes would each
    do all of it into one folder."""
    from edm.hardware import check_one_process

    if not refused:
        check_one_process("edm-eval", env)
        return
    with pytest.raises(ValueError, match=r"edm-eval runs in one process, but this launch started \d .*run edm-eval itself"):
        check_one_process("edm-eval", env)
    name = next(iter(env))  # a variable a process inherits from another launcher's job (torchrun's worker that runs
    with pytest.raises(ValueError, match=rf"; where edm-eval is the only process .*: unset {name} \(env -u {name} "
                                         r"edm-eval \.\.\.\)$"):  # edm-eval, a cluster's container): a way out
        check_one_process("edm-eval", env)


@pytest.mark.parametrize("launcher_args,cuda,warned,way_out", [
    (["--cpu", "--num_processes", "2"], False, True, " cpu=true"),
    (["--cpu", "--num_processes", "2"], True, True, " cpu=true"),  # --cpu on a GPU machine: still CPU processes
    (["--num_processes", "2"], False, True, " cpu=true"),  # no --multi_gpu, no GPU
    (["--num_processes", "2"], True, True, " (one GPU each)"),  # no --multi_gpu, one GPU: one process on it
    (["--cpu", "--num_processes", "1"], False, False, None),
    (["--multi_gpu", "--num_processes", "2"], False, False, None)])
def test_a_launch_of_several_processes_that_started_one_says_so(monkeypatch, caplog, launcher_args, cuda, warned,
                                                                 way_out):
    """`accelerate launch [--cpu] --num_processes 2` without --multi_gpu runs one process unless MPI is set up,
    silently: the run said "1 process(es)" only. The environment accelerate's launchers give the worker (their own
    functions build it here) tells: a warning names how to start two, with cpu=true only where the run is on CPUs."""
    import logging

    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    from edm.hardware import unlaunched_cpu_processes

    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = launch_command_parser().parse_args([*launcher_args, "--num_machines", "1", "--mixed_precision", "no",
                                               "--dynamo_backend", "no", "-m", "edm.train"])
    args.use_cpu = getattr(args, "use_cpu", False)  # what accelerate's config would add (none here)
    if args.multi_gpu:
        env = prepare_multi_gpu_env(args) | {"WORLD_SIZE": "2"}  # torchrun's, per worker
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    with caplog.at_level(logging.WARNING, logger="edm.hardware"):
        assert unlaunched_cpu_processes("edm-train", "edm.train", env, cuda=cuda) is warned
    if warned:
        assert caplog.text.rstrip().endswith("use accelerate launch --multi_gpu --num_processes N -m edm.train ..."
                                             + way_out)
        assert "on CPUs" not in caplog.text
    else:
        assert caplog.text == ""


def test_a_process_with_a_stale_view_of_the_folder_still_sees_the_mark(monkeypatch, tmp_path):
    """On NFS a process that looked FOLDER up before the main process made it (edm-sample's and edm-encode's
    refuse_foreign_folder runs in every process) keeps that negative lookup until its parent folder's cached attributes
    expire (acdirmin, 30 s by default), longer than the 5 s it looks for the mark; opening the parent (close-to-open)
    revalidates it. Modelled here: FOLDER stays hidden from this process until its parent is opened after it was made."""
    import edm.hardware as hardware
    import accelerate.utils

    folder = tmp_path / "out"
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    real_is_file = Path.is_file

    def stale_is_file(self):
        if folder in self.parents and folder.parent not in opened:
            return False  # the negative entry for FOLDER, cached before it existed
        return real_is_file(self)

    class Other:  # process 1 of 2; process 0 has made FOLDER and its mark by the barrier
        num_processes, is_main_process = 2, False

        def wait_for_everyone(self):
            folder.mkdir()
            (folder / ".launch-abc.tmp").write_bytes(b"edm")

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects, from_process=0: ["abc"])
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: [True, *objects])
    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(Path, "is_file", stale_is_file)
    monkeypatch.setattr(hardware, "SHARED_WAIT_S", 0.5)
    hardware.check_shared_folder(Other(), folder, "out")
