"""The training loop: `train(cfg)` builds a run (`setup`) and takes its steps to total_kimg.

Each step: micro-batches from the (seed, epoch) data stream (edm.data.stream), one optimizer step
(edm.training.step), the EMA updates (edm.training.ema, .phema), logging (edm.training.runlog),
checkpoints and resume (edm.training.run) and sample grids (edm.generation). The config's objects
are built once (edm.training.build). The command `edm-train` is edm.cli.train.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import BadImagesError, StreamBatchSampler, build_dataset, make_loader, micro_batch_start, to_model_space
from ..data.augment import augment
from ..evaluation.plots import LOSS_CURVE_NAME, plot_loss_curve
from ..files import FolderLock, to_container
from ..generation.outputs import save_grid
from ..provenance import METRICS_NAME, other_records, run_marks
from ..generation.sampling import generate_batch, plan_images
from ..hardware import (
    LaunchSettings, RunWideLog, check_replicated_launch, check_same_settings, check_shared_folder, launch_settings, launch_token,
    launcher_restart, use_cpu,
)
from ..models import checkpoint as ckpt
from ..latent import final_latents
from .build import Resolved, check_objective, check_few_step_settings, check_target_weight, initial_denoiser, latent_facts, latent_vae, load_initial_weights, resolve, with_teacher
from .config import TrainConfig, check_config, run_folder
from .ema import ema_beta, update_ema
from .phema import PowerEMA, trim_snapshots
from .run import (
    Run, RunDirError, RunState, check_batch_layout, other_run, remove_stale_temporaries, restore, model_inputs, run_inputs,
    save_checkpoint, save_snapshot, seed_draws, trim_metrics,
)
from .runlog import (
    STOP_PREFIX, RunLog, StopAgreement, StopOnSignal, end_with_launcher, installed_trackers, kimg_text, log, start_trackers,
)
from .step import learning_rate, make_optimizer, train_step

__all__ = ["train", "setup", "TrainResult", "TrainingDivergedError", "RunDirError"]

logger = logging.getLogger(__name__)
run_logger = RunWideLog(logger)  # what every process would say alike: once per run


def weights_finite(net: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host read for all of them)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in net.parameters()]).all())


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or Inf; nothing was saved after the last finite check."""


def _restart(run_dir: Path) -> str:
    """How to go on after a divergence: from the run's last checkpoint, or over from the start when it has none."""
    last = ckpt.find_latest(run_dir)
    where = f"The last good checkpoint is {last}" if last is not None else "No checkpoint was saved yet"
    then = "resume=true" if last is not None else "resume=true (which starts the run over)"
    return f"{where}. Lower lr, set grad_clip or use mixed_precision=no, then {then}"


@dataclass
class TrainResult:
    """What a finished (or interrupted) run left behind."""

    state: RunState
    checkpoint: Path | None
    grid: Path | None
    metrics: Path
    interrupted: bool = False


@torch.no_grad()
def write_grid(run: Run, path: Path, run_log: RunLog | None = None) -> Path:
    """Sample grid_size images with the EMA denoiser and the configured sampler, image j from seed
    grid_seed + j (and class j mod label_dim), as edm-sample generates them; also to the run log's
    trackers."""
    cfg, ds = run.cfg, run.dataset
    seeds = range(cfg.grid_seed, cfg.grid_seed + cfg.grid_size)
    plan = plan_images(seeds, list(range(ds.label_dim)) or None, ds.label_dim)
    images, _ = generate_batch(run.ema, plan, run.schedule, cfg.sampler, (ds.channels, ds.resolution, ds.resolution),
                               label_dim=ds.label_dim, device=run.accelerator.device,
                               decode=run.vae.decode if run.vae else None)
    path = save_grid(path, images, scale=cfg.grid_scale)
    if run_log is not None:
        run_log.image("samples", path, run.state.step)
    return path


def _data_grid(run: Run) -> torch.Tensor:
    """The first grid_size training images (for a latent set, its posterior means decoded)."""
    reals = torch.stack([run.dataset[i][0] for i in range(min(run.cfg.grid_size, len(run.dataset)))])
    if run.vae is None:
        return to_model_space(reals)
    mean = final_latents(reals, torch.zeros_like(reals[:, : run.dataset.channels]), run.vae.scale, run.vae.bias)
    return run.vae.decode(mean.to(run.accelerator.device))


# ----------------------------------------------------------------------------- the run


PER_PROCESS_SETTINGS = ("progress", "dataset.num_workers")  # settings each process may have its own of: the rest must agree


def as_launched(cfg: TrainConfig) -> tuple[TrainConfig, LaunchSettings]:
    """cfg with mixed_precision and compile as this launch resolves them (hardware.launch_settings: the config's,
    else the launcher's), as a run records them, and those settings; a launch that shards the model is refused
    (hardware.check_replicated_launch: training replicates it; sampling, which wraps no model, is not refused)."""
    check_replicated_launch()
    launch = launch_settings(cfg.mixed_precision, cfg.compile)
    return dataclasses.replace(cfg, mixed_precision=launch.mixed_precision, compile=launch.dynamo_backend != "no"), launch


LetGo = Callable[[BaseException | None], None]  # called with a run's error (None: it ended well) before it lets run_dir go


def setup(cfg: TrainConfig, on_own_run_dir: Callable[[Path], LetGo | None] | None = None,
          on_started: Callable[[Path], None] | None = None) -> Run:
    """Schedule, loss, data, denoiser, EMA, optimizer and accelerator, each built once from `cfg`;
    the main process locks run_dir (released by `train`, or here if set-up fails) and then calls
    `on_own_run_dir(run_dir)`, and `on_started(run_dir)` once the run is set up; resumes from run_dir's latest
    checkpoint if asked. Bad values, schedule options or loss/precond combinations fail before any work. What
    on_own_run_dir returns (a LetGo: it records the error and closes what it opened there, e.g. its log) is called
    while the run still holds run_dir: here on a refusal, before a run_dir the run made (FolderLock.created) is
    removed, and by `train` at the end (Run.let_go). run_dir None is run_folder(cfg)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_config(cfg)
    resolved = resolve(cfg)
    cfg = dataclasses.replace(cfg, run_dir=run_folder(cfg))
    end_with_launcher()  # a worker whose launcher is killed saves and stops instead of training on

    # accelerate keeps mixed precision and dynamo settings in a process-wide singleton; forget
    # those of an earlier train() in this process (the distributed PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    cfg, launch = as_launched(cfg)
    accelerator = Accelerator(mixed_precision=launch.mixed_precision, cpu=use_cpu(cfg.cpu), dynamo_backend=launch.dynamo_backend,
                              log_with=installed_trackers(cfg.trackers) or None, project_dir=cfg.run_dir)
    check_same_settings(to_container(cfg), "edm-train", ignore=PER_PROCESS_SETTINGS)  # before any process does work
    check_batch_layout(cfg, accelerator.num_processes)  # before run_dir is made
    if launch.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        run_logger.warning("mixed_precision=fp16 has no effect on CPU (accelerate autocasts only bf16 there); use bf16")
    run_dir = Path(cfg.run_dir)
    lock = FolderLock(run_dir).acquire() if accelerator.is_main_process else None
    let_go = None
    try:
        check_shared_folder(accelerator, run_dir, "run_dir")  # its checkpoints, its stop file
        cfg = resume_or_refuse(cfg, run_dir)  # before the run writes its train.log there
        if lock is not None and on_own_run_dir is not None:
            let_go = on_own_run_dir(run_dir)
        logger.info("mixed_precision=%s, dynamo backend %s", launch.mixed_precision, launch.dynamo_backend)
        run = _setup_run(cfg, accelerator, resolved, lock)
        run.let_go = let_go
        if lock is not None and on_started is not None:
            on_started(run_dir)
        return run
    except BaseException as err:
        if lock is not None:
            try:
                if let_go is not None:  # while the folder is held; no file stays open in it (NFS keeps a removed open
                    let_go(err)  # file as .nfs*)
            finally:  # a LetGo that fails (a log's last write on a full disk) still lets the folder go
                if lock.created:  # run_dir did not exist: it holds nothing but this refused run's lock and log
                    shutil.rmtree(run_dir, ignore_errors=True)
                lock.release()
        raise


def resume_or_refuse(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """cfg with resume on where a launcher restarted the job; refused: a run_dir with a checkpoint and resume off,
    and, where it holds no checkpoint, another command's output folder, or without resume an earlier run's
    metrics.jsonl records or power-EMA snapshots (a new run would overwrite some and sit beside the rest)."""
    latest = ckpt.find_latest(run_dir)
    restart, counter = launcher_restart()
    if restart and not cfg.resume:  # a launcher restarted the group, or a scheduler requeued the job: continue
        logger.warning("restart %d (%s): resuming from %s", restart, counter, latest or "the start (no checkpoint yet)")
        cfg = dataclasses.replace(cfg, resume=True)
    if latest is not None:
        if not cfg.resume:
            other = other_run(latest, cfg)
            if other:
                raise RunDirError(f"run_dir {run_dir} holds another run ({latest.name}; {'; '.join(other)}), which this "
                                  "one cannot continue: choose another run_dir=DIR (or delete the folder)")
            raise RunDirError(f"run_dir {run_dir} already holds {latest.name}; pass resume=true to continue that run, "
                              "or choose another run_dir (or delete the folder) to start over")
        return cfg
    foreign = other_records(run_dir)
    if foreign:
        raise RunDirError(f"run_dir {run_dir} is another command's output folder (it holds {', '.join(foreign)}), not a "
                          "training run's: choose another run_dir")
    earlier = run_marks(run_dir)
    if earlier and not cfg.resume:
        raise RunDirError(f"run_dir {run_dir} holds {' and '.join(earlier)} of an earlier run but no checkpoint: a new run "
                          "there would overwrite some of them and leave the rest beside its own; pass resume=true to "
                          "start that run over (its records and snapshots are dropped), or choose another run_dir")
    return cfg


def _setup_run(cfg: TrainConfig, accelerator: Any, resolved: Resolved, lock: FolderLock | None) -> Run:
    run_dir = Path(cfg.run_dir)
    latest = ckpt.find_latest(run_dir)
    if lock is not None:
        remove_stale_temporaries(run_dir)
        for stale in run_dir.glob(f"{STOP_PREFIX}*"):  # stop files of earlier launches
            stale.unlink(missing_ok=True)
    dataset = build_dataset(cfg.dataset)
    check_same_data(accelerator, dataset, cfg.dataset.root)
    vae = latent_vae(cfg, dataset, accelerator.device)
    latent = latent_facts(vae, dataset) if vae is not None else None
    spec, init_weights, init_file = (initial_denoiser(cfg, dataset, latent) if cfg.init else
                                     (resolved.denoiser_spec(cfg, dataset), None, None))
    check_objective(cfg.objective, spec, cfg.init)
    check_target_weight(resolved.loss, spec["precond"]["kind"], resolved.schedule)
    check_few_step_settings(cfg)

    torch.manual_seed(cfg.seed)  # identical initial weights in every process
    net = ckpt.build_denoiser(spec).train()
    if init_weights is not None:
        load_initial_weights(net, init_weights)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = make_optimizer(net.parameters(), cfg.lr, cfg.adam_betas, cfg.adam_eps, accelerator.device)
    model, optimizer = accelerator.prepare(net, optimizer)
    ema.to(accelerator.device)
    generator = torch.Generator(accelerator.device)  # seeded per micro-batch (seed_draws)
    phema = PowerEMA(net, cfg.ema_sigma_rel) if cfg.ema_sigma_rel else None
    loss, teacher_file = (with_teacher(resolved.loss, cfg, dataset, accelerator.device, latent) if cfg.objective == "scd"
                          else (resolved.loss, None))
    models = model_inputs(init_file, teacher_file)  # each process's own reading: node-local copies must be alike, as
    check_same_settings(models, "edm-train", read=True)  # a teacher of other weights would give other loss targets
    run = Run(cfg, accelerator, model, net, ema, optimizer, loss, resolved.schedule, generator, spec, dataset, lock=lock,
              phema=phema, vae=vae, inputs=_on_main(accelerator, lambda: run_inputs(cfg, init_file, teacher_file, models)))
    if cfg.resume and latest is not None:
        restore(run, latest)
    elif cfg.resume:
        run_logger.warning("resume=true but %s holds no checkpoint: starting a new run", run_dir)
    if lock is not None:
        dropped = trim_metrics(run_dir / METRICS_NAME, run.state.step)
        if dropped:
            logger.info("dropped %d metrics record(s) logged after step %d, which this run logs again", dropped, run.state.step)
        for rank_log in run_dir.glob("batch-indices-rank*.jsonl"):  # of processes this launch has not: no writer
            rank = rank_log.stem.removeprefix("batch-indices-rank")
            if rank.isdigit() and int(rank) >= accelerator.num_processes:  # (each other trims its own: _loop)
                trim_metrics(rank_log, run.state.step - 1)
        snapshots = trim_snapshots(run_dir, run.state.cur_nimg)
        if snapshots:
            logger.info("deleted %d power-EMA snapshot(s) taken after %d images (%s ...), which this run takes again",
                        len(snapshots), run.state.cur_nimg, snapshots[0].name)
    nparams = sum(p.numel() for p in net.parameters())
    logger.info("network %s: %d parameters; %d process(es) on %s", spec["network"]["name"], nparams, accelerator.num_processes, accelerator.device)
    return run


def _on_main(accelerator: Any, make: Callable[[], Any]) -> Any:
    """make() on the main process, its value handed to every process (one reading of files, one answer for all)."""
    from accelerate.utils import broadcast_object_list

    value = [make() if accelerator.is_main_process else None]
    return broadcast_object_list(value, from_process=0)[0] if accelerator.num_processes > 1 else value[0]


def check_same_data(accelerator: Any, dataset: Any, root: str | None) -> None:
    """Refuse, in every process, a launch whose processes read data sets of other sizes or shapes (a copy of the data
    on each node's own disk that is not whole, a relative dataset.root from other working directories): each process
    draws its share of the batch from a permutation of its own set's images, so the shares would repeat and miss
    images, silently."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    every = gather_object([(len(dataset), dataset.channels, dataset.resolution, dataset.label_dim)])
    if len(set(every)) > 1:
        held = "; ".join(f"process {rank}: {n} images of {c}x{r}x{r}, label_dim {d}" for rank, (n, c, r, d) in enumerate(every))
        raise ValueError(f"the processes of this launch read different data sets ({held}; dataset.root={root}): every "
                         "process must read the same images; make each node's copy whole and alike, or give "
                         "dataset.root on a file system every node sees")


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which saves before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(run: Run, micro_batch: int):
    """Endless (y, one-hot labels or None, indices) micro-batches on the device: y the images in [−1, 1], or for a
    latent data set the VAE posteriors (mean, std) that _inputs draws latents from."""
    acc, cfg = run.accelerator, run.cfg
    sampler = StreamBatchSampler(
        len(run.dataset), cfg.seed, cfg.batch_size, micro_batch, acc.process_index, acc.num_processes,
        start_nimg=run.state.cur_nimg,
    )
    loader = make_loader(
        run.dataset, sampler, cfg.dataset.num_workers, pin_memory=acc.device.type == "cuda",
        worker_init_fn=_ignore_sigint,
    )
    for images, labels, indices in loader:
        y = images.to(acc.device, non_blocking=True)
        y = y if run.vae is not None else to_model_space(y)
        labels = labels.to(acc.device, non_blocking=True) if labels.shape[1] > 0 else None
        yield y, labels, indices


def _inputs(run: Run, micro_batches: list, positions: list[int]) -> list:
    """(y, labels, augmentation labels or None) per micro-batch: a latent set's latents drawn from their posteriors
    (y = (mean + std·n)·scale + bias), augmented (cfg.augment), each draw seeded by the micro-batch's place in the
    data stream."""
    out = []
    for (y, labels, _), position in zip(micro_batches, positions):
        if run.vae is not None:
            seed_draws(run.generator, run.cfg.seed, position, "latent")
            n = torch.randn(y[:, : run.dataset.channels].shape, generator=run.generator, device=y.device)
            y = final_latents(y, n, run.vae.scale, run.vae.bias)
        if run.cfg.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        augment_labels = None
        if run.cfg.augment.p > 0:
            seed_draws(run.generator, run.cfg.seed, position, "augment")
            y, augment_labels = augment(y, run.cfg.augment, run.generator)
        out.append((y, labels, augment_labels))
    return out


def train(
    cfg: TrainConfig, callback: Callable[[Run], None] | None = None,
    on_own_run_dir: Callable[[Path], LetGo | None] | None = None,
    on_started: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train until total_kimg; `on_own_run_dir(run_dir)` runs in the main process once the run owns
    run_dir, and what it returns is called with the run's error (or None) while the run still owns it (setup),
    `on_started(run_dir)` once it is set up (data, model, resume: a run refused there has not started),
    `callback(run)` after every step (tests use it to inject faults)."""
    run = setup(cfg, on_own_run_dir, on_started)
    error = None
    try:
        return _loop(run, callback)
    except BaseException as err:
        error = err
        raise
    finally:
        try:
            if run.let_go is not None:
                run.let_go(error)
        finally:  # a LetGo that fails (a log's last write on a full disk) still lets the folder go
            if run.lock is not None:
                run.lock.release()


def _loop(run: Run, callback: Callable[[Run], None] | None) -> TrainResult:
    """The steps from run.state to total_kimg, with logging, checkpoints, grids and stop requests."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    world = acc.num_processes
    micro = check_batch_layout(cfg, world)
    accum = cfg.batch_size // (micro * world)
    total_nimg = int(round(cfg.total_kimg * 1000))
    total_steps = state.step + max(0, math.ceil((total_nimg - state.cur_nimg) / cfg.batch_size))
    if state.cur_nimg > total_nimg:
        run_logger.warning("total_kimg=%s, but the run has trained %s kimg already: nothing to train (a longer run "
                           "needs a larger total_kimg)", cfg.total_kimg, kimg_text(state.cur_nimg / 1000))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main and state.step == 0 and cfg.grid_size > 0:
        save_grid(run.run_dir / "data.png", _data_grid(run), scale=cfg.grid_scale)
    indices_log = None
    if cfg.log_batch_indices:  # each process's own file; records of steps after the restored one are logged again
        indices_path = run.run_dir / f"batch-indices-rank{acc.process_index}.jsonl"
        trim_metrics(indices_path, state.step - 1)  # a record's step is the step's index before it is taken
        indices_log = open(indices_path, "a", buffering=1)  # each record on disk at once: a killed run loses none before
        # its checkpoint, which the resumed run does not log again
    logger.info("training %d steps of %d images (%d x %d x %d accumulation) to %s", total_steps - state.step,
                cfg.batch_size, micro, world, accum, run.run_dir)

    batches = _batches(run, micro)
    run_log = RunLog(run.run_dir, total_steps, enabled=run.is_main, initial_step=state.step,
                     trackers=start_trackers(acc, cfg.trackers, cfg.tracker_project, run.run_dir), progress=cfg.progress)
    interval = _Interval(torch.zeros((), device=acc.device), 0, time.perf_counter(), state.cur_nimg)
    checkpoint, grid, interrupted = ckpt.find_latest(run.run_dir), None, False
    agreement = StopAgreement(run.run_dir, launch_token(acc), world)
    try:
        with StopOnSignal() as stop:
            while state.cur_nimg < total_nimg:
                micro_batches = _next_micro_batches(run, batches, accum, indices_log)
                loss, lr, beta = _step(run, micro_batches, micro, total_nimg)
                interval.add(loss)
                run_log.advance()
                if callback is not None:
                    callback(run)

                done = state.cur_nimg >= total_nimg
                save_now = state.step % cfg.checkpoint_every == 0
                grid_now = cfg.grid_every > 0 and state.step % cfg.grid_every == 0 and not done
                stopping = agreement.should_stop(state.step, stop.requested)
                if not (done or save_now or grid_now or stopping or state.step % cfg.log_every == 0):
                    continue
                interval.log(run, run_log, lr, beta)  # the loop's only host syncs
                if grid_now and run.is_main:
                    write_grid(run, run.run_dir / f"samples-{state.step:08d}.png", run_log)
                if save_now or done or stopping:
                    checkpoint = _save_finite(run)
                if stopping:
                    interrupted = True
                    run_logger.warning("stopped at step %d on request; resume with resume=true", state.step)
                    break
        if not interrupted and run.is_main:
            if cfg.grid_size > 0:
                grid = write_grid(run, run.run_dir / "samples-final.png", run_log)
                logger.info("wrote %s", grid)
            curve = plot_loss_curve(run_log.path, run.run_dir / LOSS_CURVE_NAME)
            logger.info("wrote %s", curve)
    finally:
        batches.close()  # ends the DataLoader's workers now: forked, they hold the run folder's lock while alive
        run_log.close()
        if indices_log is not None:
            indices_log.close()
        if run.is_main:
            agreement.path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    return TrainResult(state, checkpoint, grid, run.run_dir / METRICS_NAME, interrupted)


def _next_micro_batches(run: Run, batches, accum: int, indices_log) -> list:
    """The step's `accum` micro-batches of this process; their image indices logged when asked. Bad images in a
    one-process run save the state first, so the run resumes once they are mended."""
    try:
        micro_batches = [next(batches) for _ in range(accum)]
    except BadImagesError as err:
        if run.accelerator.num_processes > 1:  # the other processes are inside a step: the launcher ends them
            raise
        saved = save_checkpoint(run)
        raise BadImagesError(f"{err}\nThe run's state after step {run.state.step} is saved in {saved}.") from None
    if indices_log is not None:
        for i, (*_, indices) in enumerate(micro_batches):
            indices_log.write(json.dumps({"step": run.state.step, "round": i, "indices": indices.tolist()}) + "\n")
    return micro_batches


def _step(run: Run, micro_batches: list, micro: int, total_nimg: int) -> tuple[torch.Tensor, float, float]:
    """One optimizer step at lr(cur_nimg), the EMA at β(cur_nimg) and the power EMAs (a snapshot each time cur_nimg
    passes a multiple of ema_snapshot_kimg, and at the end); returns (loss on the device, lr, β)."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    lr = learning_rate(state.cur_nimg, cfg.lr, cfg.lr_rampup_kimg, cfg.lr_decay_kimg)
    positions = [micro_batch_start(state.cur_nimg, a, acc.process_index, acc.num_processes, micro)
                 for a in range(len(micro_batches))]
    loss = train_step(run.model, run.loss_fn.at(state.cur_nimg), run.optimizer, _inputs(run, micro_batches, positions),
                      acc, run.generator, lr, cfg.grad_clip,
                      seed_draws=lambda a: seed_draws(run.generator, cfg.seed, positions[a]))
    beta = ema_beta(state.cur_nimg, cfg.batch_size, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
    update_ema(run.ema, run.net, beta)
    state.step += 1
    state.cur_nimg += cfg.batch_size
    if run.phema is not None:
        run.phema.update(run.net, state.cur_nimg, cfg.batch_size)
        every = round(cfg.ema_snapshot_kimg * 1000)
        if every and (state.cur_nimg // every > (state.cur_nimg - cfg.batch_size) // every or state.cur_nimg >= total_nimg):
            save_snapshot(run)
    return loss, lr, beta


@dataclass
class _Interval:
    """The steps since the last log record: their losses summed on the device (no host sync per step), their
    count, and the time and image count at its start."""

    loss_sum: torch.Tensor
    count: int
    t_start: float
    nimg_start: int

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.count += 1

    def log(self, run: Run, run_log: RunLog, lr: float, beta: float) -> None:
        """One record: the mean loss over every process's steps of the interval (a non-finite one stops the run
        unsaved), lr, β and images/s; then a new interval starts."""
        state, world = run.state, run.accelerator.num_processes
        mean_loss = float(run.accelerator.reduce(self.loss_sum, "sum")) / (self.count * world)
        if not math.isfinite(mean_loss):
            raise TrainingDivergedError(f"loss became {mean_loss} in steps {state.step - self.count + 1} to "
                                        f"{state.step}; stopped without saving. {_restart(run.run_dir)}")
        now = time.perf_counter()
        log(run_log, {
            "step": state.step, "kimg": state.cur_nimg / 1000, "loss": mean_loss, "lr": lr, "ema_beta": beta,
            "images_per_s": (state.cur_nimg - self.nimg_start) / max(now - self.t_start, 1e-9), "time": time.time(),
        })
        self.loss_sum.zero_()
        self.count, self.t_start, self.nimg_start = 0, now, state.cur_nimg


def _save_finite(run: Run) -> Path:
    """save_checkpoint, unless an update after a finite loss (an infinite gradient) made the weights non-finite."""
    if not weights_finite(run.net):
        raise TrainingDivergedError(f"the weights became non-finite by step {run.state.step} (the losses before were "
                                    f"finite); stopped without saving. {_restart(run.run_dir)}")
    return save_checkpoint(run)
