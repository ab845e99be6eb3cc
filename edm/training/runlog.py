"""What a training run tells its user, and how it is told to stop.

- RunLog / log: the main process's metrics.jsonl, INFO loss lines, the experiment trackers' scalars
  and grids (accelerate's: TensorBoard, W&B, MLflow, ...) and bar.
- StopOnSignal: Ctrl-C, SIGTERM or SIGUSR1 become a request to save and stop after the current step.
- end_with_launcher: a worker of torchrun / accelerate launch gets SIGTERM when its launcher dies.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..hardware import RunWideLog
from ..progress import progress_bar
from ..provenance import METRICS_NAME

__all__ = ["RunLog", "IMAGE_KWARGS", "installed_trackers", "start_trackers", "log", "StopOnSignal", "StopAgreement", "STOP_PREFIX",
           "end_with_launcher"]

STOP_PREFIX = ".stop-"  # run_dir/.stop-<launch token>: the step after which every process stops

logger = logging.getLogger(__name__)
run_logger = RunWideLog(logger)  # what every process would say alike: once per run


# What each tracker's log_images needs besides a batch of HWC images (TensorBoard reads NCHW otherwise).
IMAGE_KWARGS = {"tensorboard": {"dataformats": "NHWC"}}


def installed_trackers(names: list[str]) -> list[str]:
    """The named trackers but accelerate's own whose package is missing (start_trackers names those); a name
    accelerate does not know goes through, for accelerate to refuse it (or find it registered)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available, builtin = {str(t) for t in get_available_trackers()}, {str(t) for t in LoggerType}
    return [name for name in names if name in available or name not in builtin]


def start_trackers(accelerator: Any, names: list[str], project: str, run_dir: Path) -> list:
    """The started experiment trackers of an accelerator made with log_with=installed_trackers(names), writing
    under run_dir (TensorBoard: run_dir/<project>); the named ones whose package is missing are named in the log
    (metrics.jsonl is written either way)."""
    if accelerator.log_with:
        accelerator.init_trackers(project)
    started = {tracker.name for tracker in accelerator.trackers}
    missing = [name for name in names if name not in started]
    if missing:
        run_logger.info("tracker(s) %s not installed (e.g. pip install %s); metrics go to %s", ", ".join(missing),
                        " ".join(missing), Path(run_dir) / METRICS_NAME)
    return list(accelerator.trackers)


class RunLog:
    """Main-process logging sinks: metrics.jsonl (appended on resume; always written), accelerate's experiment
    trackers (TensorBoard, Weights & Biases, MLflow, Aim, Comet, ...: `trackers` in the config) and a tqdm bar."""

    def __init__(
        self, run_dir: Path, total_steps: int, *, enabled: bool = True, initial_step: int = 0,
        trackers: Sequence[Any] = (), progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.trackers = list(trackers) if enabled else []
        self.bar = None
        if not self.enabled:
            return
        self.file = open(self.path, "a", encoding="utf-8")
        if progress:
            self.bar = progress_bar(total_steps, "training", "step", initial=initial_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A PNG (a sample grid) as an image of every tracker that takes images."""
        if not self.trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            batch = np.asarray(im.convert("RGB"))[None]
        for tracker in self.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({tag: batch}, step=step, **IMAGE_KWARGS.get(tracker.name, {}))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        for tracker in self.trackers:
            tracker.finish()
        if self.bar is not None:
            self.bar.close()


def kimg_text(kimg: float) -> str:
    """kimg as the step log writes it: one decimal from 10 on (200000.0, never an exponent), three significant digits
    below (a short run's 0.016, not 0.0)."""
    return f"{kimg:.1f}" if kimg >= 10 else f"{kimg:.3g}"


def log(run_log: RunLog, record: dict) -> None:
    """One metrics record: a JSON line, an INFO line (console and train.log, with or without the
    progress bar), the trackers' scalars and the progress bar's numbers."""
    if not run_log.enabled:
        return
    run_log.file.write(json.dumps(record) + "\n")
    run_log.file.flush()
    logger.info("step %d  kimg %s  loss %.4f  lr %.3g  %.0f img/s", record["step"], kimg_text(record["kimg"]),
                record["loss"], record["lr"], record["images_per_s"])
    run_log.scalars({f"train/{key}": record[key] for key in ("loss", "lr", "images_per_s", "ema_beta")}, record["step"])
    if run_log.bar is not None:
        run_log.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal:
    """While active, the first SIGINT (Ctrl-C), SIGTERM or SIGUSR1 (SLURM's `--signal=USR1@SECONDS` before a
    time limit or preemption) only sets `requested`: the loop then saves a checkpoint and stops. A second
    SIGINT raises KeyboardInterrupt at once. Main thread only."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: saving a checkpoint after this step (Ctrl-C again exits without saving)", signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent thread ends


def end_with_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """In a worker of a launcher (torchrun, accelerate launch: LOCAL_RANK is set), ask Linux for SIGTERM
    when the launcher that started it ends, however it ends (prctl PR_SET_PDEATHSIG): a killed launcher
    then leaves no worker training and holding the run folder. In the loop the signal saves and stops
    (StopOnSignal), as a launcher's own SIGTERM does. Returns whether the request was made (Linux only)."""
    if "LOCAL_RANK" not in env or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker outlives its launcher", ctypes.get_errno())
        return False
    if os.getppid() == 1:  # the launcher ended before the request: it will never fire
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class StopAgreement:
    """The step after which every process of a run stops, agreed through a file instead of a collective.

    The first process asked to stop (any launcher forwards SIGTERM/SIGINT to some or all of its
    workers) creates run_dir/.stop-<token> holding s + 1 after its step s, atomically and only once;
    every process looks for that file after each step (one stat call: no collective, no device
    sync) and stops after the step it names. One step is enough: a process looks for the file
    before it starts its next step, and under DDP no process finishes step s + 1 before every
    other has joined that step's gradient all-reduce, so the file exists before any process has
    finished s + 1. One process stops after the current step. `token` is the same in every process
    of one launch, so a file left by an earlier launch is never read.
    """

    def __init__(self, run_dir: Path, token: str, world_size: int) -> None:
        self.path = Path(run_dir) / f"{STOP_PREFIX}{token}"
        self.world_size = world_size
        self.target: int | None = None

    def should_stop(self, step: int, requested: bool) -> bool:
        """After optimizer step `step`: must this process save and stop now? `requested`: it was signalled."""
        if self.world_size == 1:
            return requested
        if self.target is None:
            if requested:
                self._propose(step + 1)
            if self.path.exists():
                self.target = int(self.path.read_text())
                run_logger.warning("stopping after step %d, as agreed by the processes (%s)", self.target, self.path)
        return self.target is not None and step >= self.target

    def _propose(self, target: int) -> None:
        """Create the file with `target` unless another process already did (write aside, then hard-link)."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(str(target))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
