"""What a training run tells its user, and how it is told to stop.

- RunLog / log: the main process's metrics.jsonl, INFO loss lines, TensorBoard scalars and grids
  (when installed) and bar.
- StopOnSignal: Ctrl-C / SIGTERM become a request to save and stop after the current step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ..progress import progress_bar

__all__ = ["RunLog", "log", "StopOnSignal", "StopAgreement", "STOP_PREFIX"]

STOP_PREFIX = ".stop-"  # run_dir/.stop-<launch token>: the step after which every process stops

logger = logging.getLogger(__name__)


class RunLog:
    """Main-process logging sinks: metrics.jsonl (appended on resume), TensorBoard if installed, a tqdm bar."""

    def __init__(
        self, run_dir: Path, total_steps: int, *, enabled: bool = True, initial_step: int = 0,
        tensorboard: bool = True, progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
        if progress:
            self.bar = progress_bar(total_steps, "training", "step", initial=initial_step)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A PNG (a sample grid) as a TensorBoard image, when TensorBoard is on."""
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def log(run_log: RunLog, record: dict) -> None:
    """One metrics record: a JSON line, an INFO line (console and train.log, with or without the
    progress bar), TensorBoard scalars and the progress bar's numbers."""
    if not run_log.enabled:
        return
    run_log.file.write(json.dumps(record) + "\n")
    run_log.file.flush()
    logger.info("step %d  kimg %.1f  loss %.4f  lr %.3g  %.0f img/s", record["step"], record["kimg"], record["loss"],
                record["lr"], record["images_per_s"])
    if run_log.writer is not None:
        for key in ("loss", "lr", "images_per_s", "ema_beta"):
            run_log.writer.add_scalar(f"train/{key}", record[key], record["step"])
    if run_log.bar is not None:
        run_log.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", refresh=False)


class StopOnSignal:
    """While active, the first SIGINT (Ctrl-C) or SIGTERM only sets `requested`: the loop then saves a
    checkpoint and stops. A second SIGINT raises KeyboardInterrupt at once. Main thread only."""

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
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """The step after which every process of a run stops, agreed through a file instead of a collective.

    The first process asked to stop (any launcher forwards SIGTERM/SIGINT to some or all of its
    workers) creates run_dir/.stop-<token> holding step + 2, atomically and only once; every
    process looks for that file after each step (one stat call: no collective, no device sync)
    and stops after the step it names. Two steps are enough: under DDP no process finishes step
    s + 1 before every other has finished step s, so none has passed s + 2 when the file
    appears. One process stops after the current step. `token` is the same in every process of
    one launch, so a file left by an earlier launch is never read.
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
                self._propose(step + 2)
            if self.path.exists():
                self.target = int(self.path.read_text())
                logger.warning("stopping after step %d, as agreed by the processes (%s)", self.target, self.path)
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
