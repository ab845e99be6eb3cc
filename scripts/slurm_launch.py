"""Start edm-train on one node of a SLURM allocation: `accelerate launch` with its options from SLURM's variables.

    srun --ntasks-per-node=1 python scripts/slurm_launch.py dataset=cifar10 dataset.root=/data run_dir=/shared/r
    python scripts/slurm_launch.py --dry-run dataset=cifar10 ...      # print the command, start nothing

scripts/slurm_train.sbatch runs it on every node (one task per node). From the environment:
  SLURM_NNODES          -> --num_machines           SLURM_NODEID       -> --machine_rank
  SLURM_GPUS_ON_NODE    -> processes per node (--gpus-per-node overrides; --num_processes is their total)
  SLURM_JOB_NODELIST    -> --main_process_ip, its first host (MAIN_PROCESS_IP overrides)
  MAIN_PROCESS_PORT     -> --main_process_port (default 29500)
A node rank outside the allocation, or a second task on one node (SLURM_LOCALID > 0: one task starts all of a node's
processes), is refused.
The run resumes by itself when SLURM requeues the job (SLURM_RESTART_COUNT > 0, edm.hardware.launcher_restart);
SIGUSR1 or SIGTERM makes it save and stop (edm.training.runlog.StopOnSignal).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Mapping, Sequence

DEFAULT_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'rack[1-2]-gpu[01,03]' -> 'rack1-gpu01'
    (the first name of each bracket, zero padding kept)."""
    text, depth = nodelist.strip(), 0
    token = text
    for i, char in enumerate(text):  # the first entry: up to a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            token = text[:i]
            break
    if not token:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return re.sub(r"\[([^\]]*)\]", lambda bracket: re.split(r"[,-]", bracket.group(1))[0], token)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ValueError(f"{name} is not set: run this under srun in a SLURM job (or set it for a dry run)")
    return value


def _count(name: str, value: str) -> int:
    """`value` (the variable `name`'s) as a whole number ≥ 0; anything else is a ValueError naming the variable."""
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r} is not a whole number: run this under srun in a SLURM job, where SLURM sets "
                         "it (or set it so for a dry run)")
    return int(value)


def launch_command(env: Mapping[str, str], train_args: Sequence[str], gpus_per_node: int | None = None,
                   python: str = sys.executable) -> list[str]:
    """The `accelerate launch ... -m edm.train ARGS` command of this node, from SLURM's variables (--multi_gpu for
    two or more processes in all: accelerate refuses it for one)."""
    nodes, node = _count("SLURM_NNODES", _required(env, "SLURM_NNODES")), _count("SLURM_NODEID", _required(env, "SLURM_NODEID"))
    if not node < nodes:  # (SLURM_NNODES=0 too): a rank no launcher group has, or no machine at all
        raise ValueError(f"SLURM_NODEID={node} is not below SLURM_NNODES={nodes}: the node ranks run from 0 to "
                         "SLURM_NNODES − 1; run this under srun in a SLURM job (or set them so for a dry run)")
    if _count("SLURM_LOCALID", env.get("SLURM_LOCALID") or "0") > 0:
        raise ValueError(f"SLURM_LOCALID={env['SLURM_LOCALID']}: this is not the first task on its node, and one task "
                         "starts all of a node's processes: run it with srun --ntasks-per-node=1")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: give 1 or more processes per node")
    per_node = gpus_per_node if gpus_per_node is not None else _count("SLURM_GPUS_ON_NODE", env.get("SLURM_GPUS_ON_NODE") or "0")
    if per_node < 1:
        raise ValueError("SLURM_GPUS_ON_NODE is not set: request GPUs (#SBATCH --gpus-per-node=N) or pass --gpus-per-node")
    host = env.get("MAIN_PROCESS_IP") or first_host(_required(env, "SLURM_JOB_NODELIST"))
    port = env.get("MAIN_PROCESS_PORT") or str(DEFAULT_PORT)
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"MAIN_PROCESS_PORT={port!r} is not a TCP port: set a number from 1 to 65535 (or unset it for "
                         f"{DEFAULT_PORT})")
    multi = ["--multi_gpu"] if nodes * per_node > 1 else []
    return [python, "-m", "accelerate.commands.launch", *multi, "--num_machines", str(nodes),
            "--machine_rank", str(node), "--num_processes", str(nodes * per_node), "--main_process_ip", host,
            "--main_process_port", port, "-m", "edm.train", *train_args]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, help="processes per node (default: SLURM_GPUS_ON_NODE)")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("train_args", nargs="*", help="edm-train overrides (run_dir on a shared file system)")
    args = p.parse_args(argv)
    try:
        command = launch_command(os.environ, args.train_args, args.gpus_per_node)
    except ValueError as err:
        raise SystemExit(f"slurm_launch.py: error: {err}") from None
    if args.dry_run:
        print(shlex.join(command))
        return command
    os.execv(command[0], command)  # the launcher takes this task's place: srun's signals reach it directly
    return command


if __name__ == "__main__":
    main()
