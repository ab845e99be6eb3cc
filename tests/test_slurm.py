"""scripts/slurm_launch.py and scripts/slurm_train.sbatch: SLURM's variables become `accelerate launch`
options, the commands they make train on this box, and the batch script saves and requeues on USR1
(srun and scontrol stood in for by small scripts)."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from edm.models.checkpoint import find_latest

from conftest import REPO, kill_group, load_script, wait_for

slurm = load_script("slurm_launch")


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("gpu[03-05,9],cpu1", "gpu03"), ("a[7,9]", "a7"), ("rack-2[010-011]", "rack-2010"),
    ("n1,n2", "n1"), ("rack[1-2]-gpu[01-02]", "rack1-gpu01"), ("rack[1-2]-gpu[01,03],n9", "rack1-gpu01"),
])
def test_the_first_host_of_a_node_list(nodelist, host):
    assert slurm.first_host(nodelist) == host


def test_slurm_variables_become_the_launch_options():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    command = slurm.launch_command(env, ["dataset=cifar10"], python="python")
    assert command == ["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                       "--machine_rank", "1", "--num_processes", "16", "--main_process_ip", "gpu03",
                       "--main_process_port", "29500", "-m", "edm.train", "dataset=cifar10"]
    other = slurm.launch_command(env | {"MAIN_PROCESS_IP": "10.0.0.1", "MAIN_PROCESS_PORT": "2900"}, [], gpus_per_node=4)
    options = dict(zip(other[4:12:2], other[5:13:2]))
    assert options == {"--num_machines": "2", "--machine_rank": "1", "--num_processes": "8",
                       "--main_process_ip": "10.0.0.1"} and other[12:14] == ["--main_process_port", "2900"]
    one = slurm.launch_command({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1",
                                "SLURM_JOB_NODELIST": "gpu01"}, [], python="python")
    assert "--multi_gpu" not in one and one[one.index("--num_processes") + 1] == "1"  # accelerate refuses it for one
    with pytest.raises(ValueError, match="SLURM_NODEID is not set"):
        slurm.launch_command({"SLURM_NNODES": "2"}, [])
    with pytest.raises(ValueError, match="SLURM_GPUS_ON_NODE is not set"):
        slurm.launch_command({"SLURM_NNODES": "1", "SLURM_NODEID": "0"}, [])


@pytest.mark.parametrize("name, value", [("SLURM_NNODES", "two"), ("SLURM_NODEID", "-1"), ("SLURM_GPUS_ON_NODE", "gpu:4"),
                                         ("MAIN_PROCESS_PORT", "http"), ("MAIN_PROCESS_PORT", "70000")])
def test_a_variable_that_is_no_count_or_port_is_named_with_its_value(name, value):
    """int()'s own message ("invalid literal for int() with base 10") named neither the variable nor the fix."""
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    with pytest.raises(ValueError, match=f"^{name}={value!r} is not a (whole number|TCP port): "):
        slurm.launch_command(env | {name: value}, [])


@pytest.mark.parametrize("changed, message", [
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not below SLURM_NNODES=2"),
    ({"SLURM_NNODES": "0", "SLURM_NODEID": "0"}, "SLURM_NODEID=0 is not below SLURM_NNODES=0"),
    ({"SLURM_LOCALID": "3"}, "SLURM_LOCALID=3: this is not the first task on its node"),
])
def test_a_rank_outside_the_allocation_or_a_second_task_on_a_node_is_refused(changed, message):
    """Each would launch a group that never forms (a machine rank nobody else counts, or two launchers of one rank)."""
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[03-04]",
           "SLURM_LOCALID": "0"}
    assert slurm.launch_command(env, [])[6:8] == ["--machine_rank", "1"]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        slurm.launch_command(env | changed, [])


def test_gpus_per_node_below_one_is_named_as_the_option_given():
    env = {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu01"}
    with pytest.raises(ValueError, match=r"^--gpus-per-node 0: give 1 or more"):
        slurm.launch_command(env, [], gpus_per_node=0)


def _fake_slurm_tools(folder):
    """srun that runs its command (dropping its options) and scontrol that records its arguments."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {folder / "scontrol.log"}\n')
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod((folder / tool).stat().st_mode | stat.S_IEXEC)
    return folder


def test_the_batch_script_saves_and_requeues_on_usr1(tmp_path, tiny_train, one_thread_env):
    """scripts/slurm_train.sbatch on one node with two CPU processes: USR1 (SLURM's warning before the time
    limit) makes the training save a checkpoint and stop, and the job is requeued (scontrol requeue JOB)."""
    tools = _fake_slurm_tools(tmp_path / "bin")
    run_dir = tmp_path / "run"
    env = one_thread_env | {"PATH": f"{tools}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2",
                            "SLURM_JOB_NODELIST": "localhost", "MAIN_PROCESS_IP": "127.0.0.1",
                            "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO)}
    job = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm_train.sbatch"), *tiny_train, f"run_dir={run_dir}",
                            "total_kimg=100", "checkpoint_every=100000", "grid_size=0", "cpu=true"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0,
                 300, "training to start")
        os.kill(job.pid, signal.SIGUSR1)
        out, _ = job.communicate(timeout=120)
    finally:
        kill_group(job)
    assert job.returncode == 0, out[-3000:]
    assert "saving, then requeueing job 4242" in out
    assert find_latest(run_dir) is not None, out[-3000:]
    assert (tools / "scontrol.log").read_text().split() == ["requeue", "4242"]
