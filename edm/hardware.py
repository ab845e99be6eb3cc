"""Devices and numerics: the device rule, dtypes and mixed-precision names, and the TF32/cuDNN switches and
launcher settings that only entry points apply (the library never sets them)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

import torch

__all__ = ["set_precision_flags", "has_accelerator", "use_cpu", "pick_device", "DTYPES", "MIXED_PRECISION", "LaunchSettings", "launch_settings", "check_replicated_launch",
           "launcher_restart", "process_identity", "idle_cores", "share_cpu", "is_main_process", "RunWideLog",
           "check_same_settings", "launch_token", "check_shared_folder", "check_one_process", "unlaunched_cpu_processes"]

logger = logging.getLogger(__name__)

# What `accelerate launch` passes on (from its flags, else from `accelerate config`'s file).
LAUNCH_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
LAUNCH_DYNAMO_BACKEND = "ACCELERATE_DYNAMO_BACKEND"
# Launches that shard or split the model, which edm-train does not do: it keeps a whole copy in each process (DDP),
# and its EMA, power-EMA snapshots and checkpoints are of whole parameters. flag -> (name, the launcher's option).
SHARDED_LAUNCHES = MappingProxyType({
    "ACCELERATE_USE_FSDP": ("FSDP", "--use_fsdp"),
    "ACCELERATE_USE_DEEPSPEED": ("DeepSpeed", "--use_deepspeed"),
    "ACCELERATE_USE_MEGATRON_LM": ("Megatron-LM", "--use_megatron_lm"),
})
PARALLELISM_SIZES = ("DP_SHARD_SIZE", "TP_SIZE", "CP_SIZE", "SP_SIZE")  # ACCELERATE_USE_PARALLELISM_CONFIG's splits


def set_precision_flags(tf32: bool, cudnn_benchmark: bool = False) -> None:
    """TF32 for the fp32 matmuls/convs that remain, and cuDNN autotuning.

    Set through the allow_tf32 switches, the one spelling that every torch >= 2.4 reads back
    consistently: from torch 2.9 on, setting cuDNN's or cuBLAS's `fp32_precision` makes a later
    read of `allow_tf32` (by inductor's conv templates, accelerate or the caller) raise
    "you have used a mix of the legacy and new APIs". Both spellings then agree.
    """
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def has_accelerator() -> bool:
    """A CUDA or MPS device: without one, processes run on the CPU (accelerate's gloo backend)."""
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def use_cpu(cpu: bool) -> bool:
    """Every command's device rule: the CPU when asked (cpu=true) or when there is no CUDA or MPS device."""
    return cpu or not has_accelerator()


def pick_device(cpu: bool = False) -> torch.device:
    """The device of a single-process command under that rule: CUDA, else MPS, else the CPU."""
    if use_cpu(cpu):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "mps")


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """{cpu: (busy, total) jiffies} from the per-CPU lines of /proc/stat (busy: all but idle and iowait)."""
    times = {}
    with open(path) as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                numbers = [int(v) for v in values]
                idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)
                times[int(name[3:])] = (sum(numbers) - idle, sum(numbers))
    return times


def idle_cores(interval: float = 0.2, read: Callable[[], dict[int, tuple[int, int]]] = _cpu_times) -> float | None:
    """How many of this process's CPUs (its affinity) no process used over `interval` seconds:
    Σ_cpu (1 − Δbusy/Δtotal), from /proc/stat; None where that cannot be read (not Linux)."""
    try:
        mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        before = read()
        time.sleep(interval)
        after = read()
    except (OSError, ValueError, IndexError):
        return None
    cpus = [c for c in after if c in before and (mine is None or c in mine)]
    idle = 0.0
    for c in cpus:
        busy, total = after[c][0] - before[c][0], after[c][1] - before[c][1]
        idle += 1.0 - busy / total if total > 0 else 1.0
    return idle if cpus else None


def share_cpu(on_cpu: bool, env: Mapping[str, str] = os.environ,
              idle: Callable[[], float | None] = idle_cores) -> int | None:
    """On the CPU, unless OMP_NUM_THREADS chooses: torch uses as many threads as cores are idle at the start
    (at least one, at most its default). OpenMP threads that share a core with another busy process wait
    for each other at every barrier: measured on 2 cores beside one busy process, the default digits run
    did 310 img/s with 2 threads and 930 with 1 (alone: 1380 and 900). Returns the threads set, else None."""
    if not on_cpu or env.get("OMP_NUM_THREADS"):
        return None
    free = idle()
    if free is None:
        return None
    threads = max(1, min(torch.get_num_threads(), int(free + 0.5)))
    if threads < torch.get_num_threads():
        logger.info("%.1f of %d CPU cores are idle: using %d thread(s) (OMP_NUM_THREADS=N chooses)", free,
                    torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads


MIXED_PRECISION: MappingProxyType[str, torch.dtype | None] = MappingProxyType(
    {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
)
"""mixed_precision= of the commands -> the autocast dtype of the network (None: no autocast)."""

DTYPES: MappingProxyType[str, torch.dtype] = MappingProxyType({"float32": torch.float32, "float64": torch.float64})
"""dtype= of the commands: the sampler's state and the network input."""


def is_main_process() -> bool:
    """Whether this process is a run's main one: rank 0 of the initialized process group, or the only process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


class RunWideLog(logging.LoggerAdapter):
    """A logger for what every process of a run would say alike (its settings, its data): the main process logs it,
    once per run; what holds for one process (its signal, its restart) goes to the plain logger."""

    def isEnabledFor(self, level: int) -> bool:
        return is_main_process() and super().isEnabledFor(level)


def process_identity(process_index: int, num_processes: int, env: Mapping[str, str] = os.environ) -> str:
    """'process R of W (node N of M, local rank L)': who this process is, from the launcher's environment
    (torchrun and accelerate launch set GROUP_RANK, the node's rank, LOCAL_RANK and LOCAL_WORLD_SIZE)."""
    local, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", num_processes))
    node, nodes = int(env.get("GROUP_RANK", 0)), max(num_processes // max(local_world, 1), 1)
    return f"process {process_index} of {num_processes} (node {node} of {nodes}, local rank {local})"


def setting_splits(every: list[dict]) -> list[str]:
    """'KEY: V in process(es) 0, W in 1' for each key whose value is not the same in every process's flat settings."""
    keys = sorted(set().union(*every), key=str)
    splits = []
    for key in keys:
        values = [settings.get(key) for settings in every]
        if any(value != values[0] for value in values):
            held: dict[str, list[int]] = {}
            for rank, value in enumerate(values):
                held.setdefault(repr(value), []).append(rank)
            splits.append(f"{key}: " + ", ".join(f"{value} in process{'es' * (len(ranks) > 1)} "
                                                 f"{', '.join(map(str, ranks))}" for value, ranks in held.items()))
    return splits


def check_same_settings(settings: Mapping, command: str, ignore: tuple[str, ...] = (), read: bool = False) -> None:
    """Refuse, in every process alike, a launch whose processes were given different settings (a node's launcher
    started with other arguments, or an interpolation that differs by rank): each process would compute with its
    own, silently (other data, lr, steps, a different number of collectives). `settings` are this process's,
    compared leaf by leaf (edm.files.flatten) but for the `ignore` keys; nothing to do outside a process group.
    `read`: the settings are facts of what the processes read (a model file's hash), not their arguments."""
    import torch.distributed as dist

    from .files import flatten

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {key: value for key, value in flatten(dict(settings)).items() if key not in ignore}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    splits = setting_splits(every)
    if splits:
        if read:
            raise ValueError(f"the {len(every)} processes of this launch read different files ({'; '.join(splits)}): give "
                             f"every process (each node) the same files, e.g. on a file system every node sees")
        raise ValueError(f"the {len(every)} processes of this launch were given different settings ({'; '.join(splits)}): "
                         f"start every process (each node's `accelerate launch`) with the same {command} arguments")


SHARED_WAIT_S = 5.0  # how long a process looks for the main process's mark in a folder (a network file system's caches)


def _sees(path: Path) -> bool:
    """Whether `path` is a file, looked up afresh: each of its folders is opened first, top down, which on NFS
    (close-to-open) revalidates the folder's cached attributes and with them the negative entries cached under it (a
    folder this process looked up before another node made it stays absent until its parent's attributes expire,
    acdirmin 30 s by default)."""
    for parent in reversed(path.parents):
        try:
            os.close(os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
        except OSError:
            break
    return path.is_file()


def launch_token(state) -> str:
    """A random token that every process of this launch shares (the main process draws it; `state`: accelerate's
    state or Accelerator)."""
    from accelerate.utils import broadcast_object_list

    token = [os.urandom(8).hex() if state.is_main_process else None]
    return broadcast_object_list(token, from_process=0)[0] if state.num_processes > 1 else token[0]


def check_shared_folder(state, folder: Path, key: str) -> None:
    """Refuse, in every process, a launch whose processes do not all see the folder the main process owns (a folder on
    each node's own disk, or a relative path from other working directories): what they write there would be missing
    from the main process's output, and what it writes (checkpoints, a stop file) missing for them. The main process
    (accelerate's state or Accelerator), which holds the folder's lock, writes FOLDER/.launch-<token>.tmp; each other
    process looks for it. `key` is the option that names the folder."""
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    from .files import atomic_write

    mark = Path(folder) / f".launch-{launch_token(state)}.tmp"  # a killed launch's is a stale temporary
    if state.is_main_process:
        atomic_write(mark, lambda f: f.write(b"edm"))
    state.wait_for_everyone()
    deadline = time.monotonic() + SHARED_WAIT_S
    while not (seen := state.is_main_process or _sees(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    blind = [rank for rank, sees in enumerate(gather_object([seen])) if not sees]
    if state.is_main_process:
        mark.unlink(missing_ok=True)
    if blind:
        who = f"process {blind[0]} does" if len(blind) == 1 else f"processes {', '.join(map(str, blind))} do"
        raise ValueError(f"{key} {folder} is not one folder for every process: {who} not see what process 0 writes "
                         "there (a folder on each node's own disk, or a relative path from other working directories): "
                         f"give {key} as one absolute path on a file system every node sees")


WORLD_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun's, MPI's (as accelerate reads them)


def check_one_process(command: str, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch of several processes (torchrun, `accelerate launch --num_processes N`, mpirun) of a command
    that splits no work between processes: each would do all of it, into the same output folder."""
    sizes = [name for name in WORLD_SIZES if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1]
    if sizes:
        value = env[sizes[0]]
        inherited = f"unset {' '.join(sizes)} (env{''.join(f' -u {name}' for name in sizes)} {command} ...)"
        raise ValueError(f"{command} runs in one process, but this launch started {value} ({sizes[0]}={value}), each of "
                         f"which would do all the work into the same folder: run {command} itself, without "
                         "accelerate launch or torchrun (edm-sample and edm-train spread their work over processes); "
                         f"where {command} is the only process and the variable is another launcher's (inherited by a "
                         f"script of a torchrun job, or set by a cluster's container): {inherited}")


def unlaunched_cpu_processes(command: str, module: str, env: Mapping[str, str] = os.environ,
                             cuda: bool | None = None) -> bool:
    """Warn where `accelerate launch --num_processes N` (N > 1) without --multi_gpu, or with --cpu, started this one
    process: accelerate's plain launcher starts N only through MPI (--mpirun_hostfile) and otherwise runs one, saying
    nothing (on a machine with one GPU, or none). Its signs: ACCELERATE_USE_CPU, which that launcher alone sets, and
    the MASTER_ADDR it sets for N > 1, with no world size (WORLD_SIZES) beside them. The launch it names ends with
    cpu=true where the run is on CPUs (--cpu, or `cuda` false: no GPU). Returns whether it warned."""
    if "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env or any(name in env for name in WORLD_SIZES):
        return False
    cuda = torch.cuda.is_available() if cuda is None else cuda
    on_cpus = env["ACCELERATE_USE_CPU"].lower() in ("true", "1", "yes") or not cuda
    logger.warning("accelerate launch --num_processes N without --multi_gpu (or with --cpu) starts one process unless "
                   "MPI is set up: this %s runs as one process; for N processes use accelerate launch --multi_gpu "
                   "--num_processes N -m %s ...%s", command, module, " cpu=true" if on_cpus else " (one GPU each)")
    return True


RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")  # torchrun's elastic agent; SLURM's requeue


def launcher_restart(env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """(n, variable): the n-th restart of this run by its launcher (torchrun's elastic agent, `accelerate launch
    --max_restarts K`: TORCHELASTIC_RESTART_COUNT) or its scheduler (SLURM's requeue: SLURM_RESTART_COUNT);
    (0, "") on a first start and outside both."""
    for name in RESTART_COUNTS:
        try:
            count = int(env.get(name, "0"))
        except ValueError:
            continue
        if count > 0:
            return count, name
    return 0, ""


def join_restarted_group(cpu: bool, env: Mapping[str, str] = os.environ) -> bool:
    """In a restart by torchrun's elastic agent (TORCHELASTIC_RESTART_COUNT > 0, workers on the agent's store), join
    the default process group through a store prefixed by the attempt, before accelerate would join it. The agent's
    store keeps the failed attempt's keys, and torch's env:// rendezvous (2.14) reuses them unprefixed: the new gloo
    group then dials the dead worker's address and fails or hangs. Returns whether it joined."""
    import torch.distributed as dist

    restart = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False)
    backend = "gloo" if cpu or not torch.cuda.is_available() else "nccl"
    dist.init_process_group(backend, store=dist.PrefixStore(f"edm/attempt-{restart}", store), rank=rank, world_size=world)
    return True


class LaunchSettings(NamedTuple):
    mixed_precision: str  # no | fp16 | bf16
    dynamo_backend: str  # "no", or the torch.compile backend


def check_replicated_launch(env: Mapping[str, str] = os.environ) -> None:
    """Refuse a launch that shards or splits the model (SHARDED_LAUNCHES; a parallelism config with a shard, tensor,
    context or sequence size above 1): training replicates it in every process."""
    def on(flag: str) -> bool:
        return env.get(flag, "false").lower() in ("true", "1", "yes")

    flags = [name for flag, name in SHARDED_LAUNCHES.items() if on(flag)]
    if on("ACCELERATE_USE_PARALLELISM_CONFIG"):
        given = {size: env.get(f"PARALLELISM_CONFIG_{size}", "1") for size in PARALLELISM_SIZES}
        sizes = [f"{size.lower()} {value}" for size, value in given.items() if value.isdigit() and int(value) > 1]
        flags += [("a parallelism config of " + ", ".join(sizes), "--parallelism_config_*")] if sizes else []
    if flags:
        names, options = ", ".join(name for name, _ in flags), " / ".join(option for _, option in flags)
        raise ValueError(f"this launch trains with {names}, which edm-train does not do: it keeps a whole copy of the "
                         "model in every process (DDP), and its EMA and checkpoints are of whole parameters; launch "
                         f"without {options} (and without it in `accelerate config`'s file): accelerate launch "
                         "--multi_gpu --num_processes N -m edm.train ...")


def launch_settings(
    mixed_precision: str | None, compile: bool | None, env: Mapping[str, str] = os.environ
) -> LaunchSettings:
    """A run's mixed precision and compilation: the config's value, else what accelerate was given
    (`accelerate launch --mixed_precision/--dynamo_backend`, or `accelerate config`). The launcher's
    default ("no") counts as not given; any other launcher value that the config contradicts fails,
    naming both."""
    launched_mp = env.get(LAUNCH_MIXED_PRECISION, "no").lower()
    launched_dynamo = env.get(LAUNCH_DYNAMO_BACKEND, "no").lower()
    if mixed_precision is not None and launched_mp != "no" and mixed_precision != launched_mp:
        raise ValueError(
            f"mixed_precision={mixed_precision} contradicts the launcher's mixed precision {launched_mp} "
            f"({LAUNCH_MIXED_PRECISION}, from accelerate launch --mixed_precision or accelerate config): "
            "drop one of them"
        )
    if compile is False and launched_dynamo != "no":
        raise ValueError(
            f"compile=false contradicts the launcher's dynamo backend {launched_dynamo} ({LAUNCH_DYNAMO_BACKEND}, "
            "from accelerate launch --dynamo_backend or accelerate config): drop one of them"
        )
    dynamo = launched_dynamo if launched_dynamo != "no" else ("inductor" if compile else "no")
    return LaunchSettings(mixed_precision or launched_mp, dynamo)
