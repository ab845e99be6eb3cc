"""`edm-train` (or `python -m edm.train`): train any network under any schedule, on CPU, one GPU or many.

    edm-train                                              # tiny net on embedded digits, CPU, minutes
    edm-train schedule=ve network=ddpmpp dataset=cifar10 dataset.root=/data
    accelerate launch -m edm.train dataset=cifar10 ...      # multi-GPU / multi-node

The schema is edm.training.config.TrainConfig (every key and its default); the loop is
edm.training.loop.train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable, Collection, Iterator

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..hardware import (
    join_restarted_group, process_identity, set_precision_flags, share_cpu, unlaunched_cpu_processes, use_cpu,
)
from ..provenance import run_marks
from ..training.config import TrainConfig
from ..training.loop import train
from ..training.runlog import kimg_text
from . import CONFIG_DIR, USER_ERRORS, close_log, error_line, log_to, folder_log, sweep_job_folder, hydra_errors, typed, user_errors, write_hydra_record

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def check_same_sweep(state, job: str) -> None:
    """Refuse, in every process, a sweep (-m) whose processes are in different job folders: each composes
    hydra.sweep.dir itself, and its default, runs/sweeps/${now:...}, names the second that process started, so
    processes started either side of a second (or, with a relative one, in other working directories) would each train
    in their own folder (edm.training.loop refuses them too, but as processes "given different settings", which they
    were not)."""
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    jobs = gather_object([job])
    if len(set(jobs)) > 1:
        held = ", ".join(f"{folder} in process {rank}" for rank, folder in enumerate(jobs))
        raise ValueError(f"the processes of this sweep are in different job folders ({held}): each process makes its "
                         "own of hydra.sweep.dir, whose default names the second it started (and a relative one its "
                         "working directory); pass hydra.sweep.dir=DIR, one absolute folder for every process")


def _job_settings(folder: Path, free: Collection[str]) -> frozenset[str] | None:
    """A sweep job folder's overrides (<job number>-<KEY-VALUE__...>) less those of the keys `free`, or None for a
    folder not named so."""
    number, dash, name = folder.name.partition("-")
    if not (dash and number.isdigit() and folder.is_dir()):
        return None
    return frozenset(item for item in name.split("__") if item.partition("-")[0].lstrip("+~") not in free)


def continued_job_folder(job: str, free: Collection[str]) -> str:
    """The folder a sweep job (-m) trains in: its own, hydra.sweep.dir/<job number>-<its overrides>, unless that holds
    no run and one other job folder of the same overrides does: that run's, so resume=true continues it and a new run
    is refused there as in any run_dir. A rerun of some of the sweep's jobs, or in another order, numbers them
    otherwise; overrides of the keys `free` (hydra.job.config.override_dirname.exclude_keys: those a resume may
    change, kept out of folder names, which an older folder's name may hold) do not count. The empty folder Hydra made
    for the job is removed."""
    own = Path(job)
    settings = _job_settings(own, free)
    if settings is None or run_marks(own):
        return job
    others = sorted(folder for folder in own.parent.iterdir()
                    if folder != own and _job_settings(folder, free) == settings and run_marks(folder))
    if not others:
        return job
    try:
        own.rmdir()  # Hydra's, empty: the job trains in another, or is refused
    except OSError:
        pass
    if len(others) > 1:
        number, name = own.name.split("-", 1)
        raise ValueError(f"sweep job {number} ({name}) has several runs of its settings in {own.parent}: "
                         f"{', '.join(folder.name for folder in others)}; delete or move all but the one to continue")
    return str(others[0])


@contextlib.contextmanager
def sweep_way_out(job: str | None) -> Iterator[None]:
    """In a sweep job (-m), an error whose way out is another run_dir says how to get one: a job's run_dir is its
    folder under hydra.sweep.dir, and run_dir on a sweep's command line is refused."""
    try:
        yield
    except USER_ERRORS as err:
        if job is None or not re.search(r"(another|a new) run_dir", str(err)):
            raise
        try:
            told = type(err)(f"{err} (a sweep job's run_dir is its folder under hydra.sweep.dir: for another, pass "
                             "another hydra.sweep.dir=DIR)")
        except TypeError:  # an error type made with other arguments keeps its own message
            raise err from None
        raise told from err


@hydra_errors("edm-train")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(dcfg: DictConfig) -> None:
    from accelerate import PartialState

    hydra_cfg = HydraConfig.get()
    with user_errors("edm-train", on_interrupt="rerun it with resume=true to continue from its last checkpoint"):
        cfg: TrainConfig = typed(dcfg)
        numbered = sweep_job_folder(hydra_cfg, key="run_dir")
        job = None if numbered is None else continued_job_folder(
            numbered, hydra_cfg.job.config.override_dirname.exclude_keys)
        if job is not None:
            dcfg.run_dir = job
            cfg = dataclasses.replace(cfg, run_dir=job)
        share_cpu(use_cpu(cfg.cpu))  # as many threads as idle cores, unless OMP_NUM_THREADS says
        unlaunched_cpu_processes("edm-train", "edm.train")
        join_restarted_group(use_cpu(cfg.cpu))  # a launcher's restart: a process group of this attempt's own
        state = PartialState(cpu=use_cpu(cfg.cpu))  # the state train's Accelerator joins
        if job is not None:
            check_same_sweep(state, job)
        is_main = state.is_main_process
        if state.num_processes > 1:  # every process says who it is; then only the main one logs below warnings
            logging.getLogger(__name__).info("%s on %s", process_identity(state.process_index, state.num_processes),
                                             state.device)
        if not is_main:
            logging.getLogger("edm").setLevel(logging.WARNING)
        if job != numbered:
            logging.getLogger(__name__).info("the run of this sweep job's settings is in %s (named by an earlier "
                                             "command): the job trains there", job)
        set_precision_flags(cfg.tf32, cfg.cudnn_benchmark)

        def own_run_dir(run_dir: Path) -> Callable[[BaseException | None], None]:  # its train.log
            handler = folder_log(run_dir, "train.log")

            def let_go(err: BaseException | None) -> None:  # while the run holds run_dir: no later owner gets the line
                if isinstance(err, USER_ERRORS):  # the run's log says why it stopped, as stderr does (user_errors)
                    log_to([handler], error_line("edm-train", err))
                close_log(handler)
            return let_go

        with sweep_way_out(job):
            result = train(cfg, on_own_run_dir=own_run_dir,
                           on_started=lambda run_dir: write_hydra_record(run_dir, dcfg, hydra_cfg))
    if is_main:
        print(f"step {result.state.step} ({kimg_text(result.state.cur_nimg / 1000)} kimg); checkpoint: {result.checkpoint}")
        if result.grid is not None:
            print(f"samples: {result.grid}")
    if result.interrupted:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
