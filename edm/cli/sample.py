"""`edm-sample`: generate images from a trained model (and optionally score them).

    edm-sample checkpoint=RUN_DIR/ckpt.pt num_images=50000 sampler=heun steps=18 out=DIR
    accelerate launch -m edm.cli.sample checkpoint=... seeds=0-49999 format=npz out=DIR

`sampler=<name>` picks configs/sampler/<name>.yaml (an edm.samplers.SamplerConfig); `steps`,
`discretization`, `final_denoise`, `churn`... and `solver_options` override it. Every process
takes images r, r + W, ... of the run; image j always comes from seed j's own generator.
Configuration: SampleConfig below holds every key and its default (configs/sample.yaml only
picks the groups). `--help` lists the options.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from .. import __version__
from ..evaluation import metrics
from ..generation import outputs, sampling
from ..training.build import build_schedule, schedule_spec
from ..files import OutputWriteError, write_json
from ..choices import choose
from . import CONFIG_DIR, close_log, fail, own_folder_files
from edm.cli.evaluate import ScoreConfig, score_images
from ..training.config import ScheduleConfig
from ..data import DatasetConfig
from ..core.denoisers import fast_denoiser
from ..hardware import LaunchSettings, has_accelerator, launch_settings, set_precision_flags
from ..models.loading import ModelInfo, guided, load_model
from ..generation.provenance import claim
from ..files import file_sha256
from ..training.run import RunDirError
from ..files import FolderLock as RunDirLock
from ..core.samplers import SamplerConfig
from ..core.schedules import Schedule, from_spec

log = logging.getLogger("sample")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
REPORT_NAME = "report.json"
FLAT_SOLVER_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise")  # top-level keys passed to solvers that take them


@dataclass
class EvalConfig(ScoreConfig):
    """Scores of the generated images (computed by process 0 once all images exist); edm-eval's fid keys."""

    fid: bool = False


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # RUN_DIR/<file>.pt (edm checkpoint) or an NVlabs *.pkl
    ema: bool = True  # EMA weights (edm checkpoints)
    out: str = "samples"
    format: str = "png"  # png | npz | grid
    num_images: int = 64  # seeds 0 .. num_images - 1 when `seeds` is unset
    seeds: Any = None  # "0-49999", "1,5,10-19" or a list; overrides num_images
    batch: int = 64  # images per forward pass (per process)
    steps: Optional[int] = None  # number of steps; null = the sampler config's (default 18)
    discretization: Optional[str] = None  # null = the sampler config's, else the schedule's own
    churn: Optional[float] = None  # stochastic: S_churn (EDM Algorithm 2); null = the solver's default
    s_tmin: Optional[float] = None  # stochastic: S_tmin
    s_tmax: Optional[float] = None  # stochastic: S_tmax
    s_noise: Optional[float] = None  # stochastic: S_noise
    solver_options: Dict[str, Any] = field(default_factory=dict)  # other solver keywords: +solver_options.NAME=VALUE
    final_denoise: Optional[bool] = None
    schedule_options: Dict[str, Any] = field(default_factory=dict)  # +schedule_options.sigma_min=0.01
    labels: Any = None  # null = random classes (conditional model); an int; or a list, image j gets labels[j % len]
    guidance: float = 1.0  # guidance weight w: D_guide + w (D - D_guide); 1 = none
    guide: Optional[str] = None  # autoguidance: the guide model's file (else classifier-free, with null labels)
    guidance_interval: Optional[List[float]] = None  # [sigma_lo, sigma_hi]: guide only where sigma_lo < sigma <= sigma_hi
    dtype: str = "float32"  # float32 | float64 (sampler state and network input)
    cpu: bool = False  # force CPU even when a GPU is present
    tf32: bool = False  # allow TF32 matmuls/convolutions on Ampere+ GPUs
    mixed_precision: Optional[str] = None  # no | bf16 | fp16: the network under autocast (sampler state stays in `dtype`); null = the launcher's, else no
    compile: Optional[bool] = None  # torch.compile the denoiser (a warm-up compiles once per batch size); null = the launcher's, else off
    channels_last: bool = False  # NHWC weights (keep only where bench.py --channels-last measures faster)
    subdirs: bool = False  # png: one folder per 1000 seeds
    grid_cols: Optional[int] = None  # grid: columns (default ceil(sqrt(N)))
    grid_scale: Optional[int] = None  # grid: pixel upscaling (default: tiles of at least 64 px, as training's grids)
    overwrite: bool = False  # delete out's earlier images first (else a run with other settings is refused)
    image_shape: Optional[List[int]] = None  # [C, H, W] when the model does not say
    progress: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the `sampler` group (configs/sampler/<name>.yaml)
    schedule: Optional[ScheduleConfig] = None  # the `schedule` group (configs/schedule/<name>.yaml): replaces the checkpoint's
    dataset: Optional[DatasetConfig] = None  # the `dataset` group: FID reference data when eval.ref is unset
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


# ----------------------------------------------------------------------------- config -> library arguments


def sampler_config(cfg: DictConfig) -> SamplerConfig:
    """The sampler group (configs/sampler/<name>.yaml) with the top-level overrides applied: steps,
    discretization, final_denoise, churn/s_tmin/s_tmax/s_noise and solver_options. Checked once, here."""
    group = OmegaConf.to_container(cfg.sampler, resolve=True)
    options = {**group.pop("options"), **cfg.solver_options, **{k: cfg[k] for k in FLAT_SOLVER_OPTIONS if cfg[k] is not None}}
    overrides = {"num_steps": cfg.steps, "discretization": cfg.discretization, "final_denoise": cfg.final_denoise}
    return SamplerConfig(**{**group, **{k: v for k, v in overrides.items() if v is not None}, "options": options})


def resolve_schedule(cfg: DictConfig, default: Optional[Schedule]) -> Schedule:
    """The checkpoint's schedule unless `schedule=<name>` is given; schedule_options override its fields."""
    if cfg.get("schedule") is not None:
        schedule = build_schedule(ScheduleConfig(**OmegaConf.to_container(cfg.schedule, resolve=True)))
    elif default is not None:
        schedule = default
    else:
        raise ValueError("the checkpoint stores no schedule: pass schedule=vp|ve|edm|fm")
    if not cfg.schedule_options:
        return schedule
    return from_spec({**schedule_spec(schedule), **cfg.schedule_options})


def image_seeds(cfg: DictConfig) -> list[int]:
    if cfg.seeds is None:
        if cfg.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {cfg.num_images}")
        return list(range(cfg.num_images))
    seeds = cfg.seeds
    return sampling.parse_seeds(list(seeds) if OmegaConf.is_list(seeds) else seeds)


def class_labels(cfg: DictConfig) -> int | list[int] | None:
    labels = cfg.labels
    if labels is None or isinstance(labels, int):
        return labels
    if OmegaConf.is_list(labels):
        return [int(v) for v in labels]
    return [int(v) for v in str(labels).split(",")]


# ----------------------------------------------------------------------------- the run


def provenance(
    cfg: DictConfig, settings: SamplerConfig, schedule: Schedule, info: ModelInfo, launch: LaunchSettings
) -> dict:
    """Every setting that changes the images: a folder only ever holds images of one such record."""
    t_steps = schedule.time_steps(settings.num_steps, settings.discretization)
    return {
        "checkpoint_sha256": file_sha256(info.source),
        "ema": cfg.ema,
        "solver": settings.solver,
        "num_steps": settings.num_steps,
        "discretization": settings.discretization or schedule.default_discretization,
        "final_denoise": settings.final_denoise,
        "options": settings.options,
        "t_steps": t_steps.tolist(),
        "schedule": schedule_spec(schedule),
        "labels": OmegaConf.to_container(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels,
        "label_dim": info.label_dim,
        "guidance": cfg.guidance,
        "guidance_interval": OmegaConf.to_container(cfg.guidance_interval) if cfg.guidance_interval is not None else None,
        "image_shape": list(info.img_shape),
        "dtype": cfg.dtype,
        "mixed_precision": launch.mixed_precision,
        "compile": launch.dynamo_backend != "no",
        "channels_last": cfg.channels_last,
        "tf32": cfg.tf32,
        "format": cfg.format,
        "subdirs": cfg.subdirs,
    }


def report(record: dict, cfg: DictConfig, info: ModelInfo, seeds: list[int], output: Path, world_size: int,
           seconds: float) -> dict:
    """The provenance record plus how this run went: enough to regenerate every image."""
    return {
        "edm_version": __version__,
        "torch_version": torch.__version__,
        "checkpoint": str(Path(info.source).resolve()),
        **record,
        "seeds": sampling.format_seeds(seeds),
        "num_images": len(seeds),
        "batch": cfg.batch,
        "world_size": world_size,
        "output": str(output),
        "seconds": round(seconds, 3),
    }


def earlier_results(out: Path) -> list[Path]:
    """What earlier runs left in out: images (PNG files and seed folders, parts), merged outputs, the report."""
    pngs = [p for p in out.glob("*.png")] + [p for p in out.glob("[0-9]" * 6) if p.is_dir()]
    return [*pngs, out / outputs.PARTS_DIR, out / outputs.NPZ_NAME, out / REPORT_NAME]


def dataset_config(cfg: DictConfig) -> Optional[DatasetConfig]:
    """The `dataset` group (configs/dataset/<name>.yaml, as in training) as an edm.data.DatasetConfig."""
    return None if cfg.get("dataset") is None else DatasetConfig(**OmegaConf.to_container(cfg.dataset, resolve=True))


def run(cfg: DictConfig) -> None:
    from accelerate import PartialState

    settings = sampler_config(cfg)
    choose(DTYPES, cfg.dtype, "dtype")  # a bad dtype fails before any work
    if cfg.eval.fid:  # fail before sampling, not after
        if cfg.format == "grid":
            raise ValueError("eval.fid needs the images: use format=png or format=npz")
        if cfg.eval.inception is None or not Path(cfg.eval.inception).is_file():
            raise FileNotFoundError(f"eval.inception={cfg.eval.inception} is not a file.\n{metrics.INCEPTION_HELP}")
        if cfg.eval.ref is None and cfg.get("dataset") is None:
            raise ValueError("eval.fid=true needs a reference: eval.ref=STATS.npz|IMAGES or dataset=NAME [dataset.root=PATH]")
    state = PartialState(cpu=cfg.cpu or not has_accelerator())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise ValueError(f"{launched} processes were launched but accelerate sees {state.num_processes}: pass cpu=true")
    set_precision_flags(cfg.tf32)
    launch = launch_settings(cfg.mixed_precision, cfg.compile)
    writer = outputs.make_writer(cfg.format, cfg.out, rank=state.process_index, subdirs=cfg.subdirs)
    denoiser, info = load_model(cfg.checkpoint, ema=cfg.ema, device=state.device, image_shape=cfg.image_shape)
    info.require_pixels()
    schedule = resolve_schedule(cfg, info.schedule)
    denoiser = fast_denoiser(denoiser, launch.mixed_precision, launch.dynamo_backend != "no", cfg.channels_last)
    if cfg.guidance != 1.0 and cfg.guide is None and info.label_dropout == 0.0:
        log.warning("guidance=%s, but the network was trained without label dropout: its unconditional output is untrained", cfg.guidance)
    denoiser, guide_info = guided(denoiser, info, cfg.guidance, cfg.guide, interval=cfg.guidance_interval,
                                  ema=cfg.ema, device=state.device)
    guide_sha256 = file_sha256(guide_info.source) if guide_info is not None else None
    seeds = image_seeds(cfg)
    plan = sampling.plan_images(seeds, class_labels(cfg), info.label_dim)
    out = Path(cfg.out)
    record = provenance(cfg, settings, schedule, info, launch) | {"guide_sha256": guide_sha256}
    lock = log_file = None
    if state.is_main_process:  # one sampler per folder, and only images of one provenance record in it
        lock = RunDirLock(out, key="out", owner="sampler").acquire()
        try:
            claim(out, record, earlier_results(out), overwrite=cfg.overwrite)
        except BaseException:
            lock.release()
            raise
        log_file = own_folder_files(out, cfg, HydraConfig.get(), "sample.log")
        log.info("%d images, %s with %d steps, %s schedule, %d process(es) -> %s",
                 len(seeds), settings.solver, settings.num_steps, schedule.name, state.num_processes, out)
    state.wait_for_everyone()
    try:
        _generate_and_report(cfg, state, denoiser, plan, schedule, settings, writer, info, seeds, record, out)
    finally:
        if log_file is not None:
            close_log(log_file)
        if lock is not None:
            lock.release()


def _generate_and_report(cfg, state, denoiser, plan, schedule, settings, writer, info, seeds, record, out) -> None:
    dtype = choose(DTYPES, cfg.dtype, "dtype")
    start = time.time()
    made = sampling.generate(
        denoiser, sampling.shard(plan, state.process_index, state.num_processes), schedule, settings, writer,
        info.img_shape, batch_size=cfg.batch, label_dim=info.label_dim, device=state.device,
        dtype=dtype, progress=cfg.progress and state.is_main_process,
    )
    log.info("process %d generated %d image(s)", state.process_index, made)
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    output = outputs.finalize(cfg.format, out, seeds, grid_cols=cfg.grid_cols, grid_scale=cfg.grid_scale)
    result = report(record, cfg, info, seeds, output, state.num_processes, time.time() - start)
    if cfg.eval.fid:
        result["metrics"] = score_images(OmegaConf.to_object(cfg.eval), output, dataset_config(cfg), state.device,
                                         default_cache=out / "fid-refs")  # EvalConfig is a ScoreConfig
    write_json(out / REPORT_NAME, result)
    print(f"wrote {len(seeds)} images to {output}; report {out / REPORT_NAME}")
    if "metrics" in result:
        print(json.dumps(result["metrics"], indent=2))


def sweep_job_folder(cfg: DictConfig) -> None:
    """In a Hydra multirun (-m), each job writes to its own folder OUT/<job number>-<its overrides>
    (hydra.sweep in configs/sample.yaml), beside the sweep's multirun.yaml in OUT."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.out = hc.runtime.output_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        sweep_job_folder(cfg)
        run(cfg)
    except (ValueError, FileNotFoundError, ImportError, OutputWriteError, RunDirError) as err:
        fail("edm-sample", err)


if __name__ == "__main__":
    main()
