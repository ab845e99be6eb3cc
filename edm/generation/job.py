"""A sampling job: images of a model into an output folder, resumable, in one or many processes (edm-sample).

    generate_folder(SampleConfig(checkpoint="runs/digits-edm-tiny", num_images=64, format="grid", out="grid"))

Every process takes images r, r + W, ... of the run; image j always comes from seed j's own
generator (edm.generation.sampling). The folder is owned (FolderLock) and claimed with a provenance
record of every setting that changes the images, so a resumed run continues only a folder made
with the same settings; OUT/report.json records the run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ..choices import choose
from ..core.denoisers import fast_denoiser
from ..core.samplers import ADAPTIVE_SOLVERS, SamplerConfig
from ..core.schedules import Schedule, ScheduleConfig, to_spec
from ..files import FolderLock, package_version, to_container, write_json
from ..hardware import (
    DTYPES, LaunchSettings, check_same_settings, check_shared_folder, launch_settings, set_precision_flags, use_cpu,
)
from ..latent import VAE, LatentConfig, model_vae
from ..models.loading import ModelInfo, guided, load_model, model_record
from . import outputs, sampling
from ..provenance import claim, refuse_foreign_folder

__all__ = ["SampleConfig", "generate_folder", "REPORT_NAME"]

logger = logging.getLogger(__name__)
REPORT_NAME = "report.json"


DEFAULT_NUM_IMAGES = 64  # images when neither num_images nor seeds is given


@dataclass
class SampleConfig:
    """Every key of edm-sample and its default."""

    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/<file>.pt, a model folder or an NVlabs *.pkl
    ema: bool = True  # EMA weights (edm checkpoints)
    out: str = "samples"
    format: str = "png"  # png | npz | grid
    num_images: Optional[int] = None  # seeds 0 .. num_images - 1; null: as many as `seeds`, else DEFAULT_NUM_IMAGES
    seeds: Any = None  # "0-49999", "1,5,10-19" or a list (num_images, when given too, must be its count)
    batch: int = 64  # images per forward pass (per process)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the `sampler` group (configs/sampler/<name>.yaml)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # name null: the model's, its fields replaced by the set ones
    labels: Any = None  # null = random classes (conditional model); an int; or a list, image j gets labels[j % len]
    guidance: float = 1.0  # guidance weight w: D_guide + w (D - D_guide); 1 = none
    guide: Optional[str] = None  # autoguidance: the guide model's file (else classifier-free, with null labels)
    guidance_interval: Optional[List[float]] = None  # [sigma_lo, sigma_hi]: guide only where sigma_lo < sigma <= sigma_hi
    dtype: str = "float32"  # float32 | float64 (sampler state and network input)
    cpu: bool = False  # force the CPU even when a GPU is present
    tf32: bool = False  # allow TF32 matmuls/convolutions on Ampere+ GPUs (off: samples in true fp32; training's is on, for speed)
    mixed_precision: Optional[str] = None  # no | bf16 | fp16: the network under autocast; null = the launcher's, else no
    compile: Optional[bool] = None  # torch.compile the denoiser (once per batch size); null = the launcher's, else off
    channels_last: bool = False  # NHWC weights (keep only where bench.py --channels-last measures faster)
    subdirs: bool = False  # png: one folder per 1000 seeds
    grid_cols: Optional[int] = None  # grid: columns (default ceil(sqrt(N)))
    grid_scale: Optional[int] = None  # grid: pixel upscaling (default: tiles of at least 64 px, as training's grids)
    overwrite: bool = False  # delete out's earlier images first (else a run with other settings is refused)
    image_shape: Optional[List[int]] = None  # [C, H, W] when the model does not say
    vae: Optional[str] = None  # latent models: the VAE folder that decodes them (null: the one the model records)
    vae_batch: int = LatentConfig.batch  # latent models: images per VAE decoder call
    vae_dtype: str = LatentConfig.dtype  # latent models: the VAE's precision, float32 | bfloat16
    progress: bool = True


def _seeds(cfg: SampleConfig) -> list[int]:
    """The seeds to generate: `seeds`, else 0 .. num_images − 1; both given must agree (neither is dropped silently)."""
    if cfg.seeds is None:
        count = DEFAULT_NUM_IMAGES if cfg.num_images is None else cfg.num_images
        if count < 1:
            raise ValueError(f"num_images must be at least 1, got {count}")
        return list(range(count))
    seeds = sampling.parse_seeds(cfg.seeds)
    if cfg.num_images is not None and cfg.num_images != len(seeds):
        raise ValueError(f"num_images={cfg.num_images} but seeds={cfg.seeds} are {len(seeds)} seeds: give one of the two "
                         "(seeds alone picks the images; num_images=N alone is seeds 0..N-1)")
    return seeds


def _label_setting(labels: Any) -> int | list[int] | None:
    """The labels setting as its records hold it: one class as an int (labels=3 and labels=[3] alike), several as
    a list (image j gets labels[j % len]), None for random classes."""
    labels = _labels(labels)
    return labels[0] if isinstance(labels, list) and len(labels) == 1 else labels


def _labels(labels: Any) -> int | list[int] | None:
    if labels is None or isinstance(labels, int):
        return labels
    if isinstance(labels, (list, tuple)):
        return [int(v) for v in labels]
    return [int(v) for v in str(labels).split(",")]


def provenance(cfg: SampleConfig, schedule: Schedule, info: ModelInfo, launch: LaunchSettings, vae: VAE | None = None) -> dict:
    """Every setting that changes the images: a folder only ever holds images of one such record."""
    settings = cfg.sampler
    return {
        **model_record(info.source, "checkpoint"),
        "ema": cfg.ema,
        "solver": settings.solver,
        "num_steps": settings.num_steps,
        "discretization": settings.discretization or schedule.default_discretization,
        "final_denoise": settings.final_denoise,
        "options": settings.options,
        # N of stochastic's γ = S_churn/N counts final_denoise's step; a record without it is of S_churn/(N − 1)
        **({"churn_steps": settings.num_steps} if settings.solver == "stochastic" and settings.final_denoise else {}),
        "t_steps": settings.grid(schedule).tolist(),
        "schedule": to_spec(schedule),
        "labels": _label_setting(cfg.labels),  # labels=3 and labels=[3] label every image alike: one setting
        "label_dim": info.label_dim,
        "guidance": cfg.guidance,
        "guidance_interval": to_container(cfg.guidance_interval),
        "image_shape": list(info.img_shape),
        "dtype": cfg.dtype,
        "mixed_precision": launch.mixed_precision,
        "compile": launch.dynamo_backend != "no",
        "channels_last": cfg.channels_last,
        "tf32": cfg.tf32,
        "format": cfg.format,
        "subdirs": cfg.subdirs,
        "vae_fingerprint": vae.fingerprint if vae is not None else None,
        "vae_dtype": cfg.vae_dtype if vae is not None else None,
    }


def earlier_results(out: Path) -> list[Path]:
    """What earlier runs left in out: images (PNG files and seed folders, parts), merged outputs, the report."""
    pngs = [p for p in out.glob("*.png")] + [p for p in out.glob("[0-9]" * 6) if p.is_dir()]
    return [*pngs, out / outputs.PARTS_DIR, out / outputs.NPZ_NAME, out / REPORT_NAME]


def _check_request(cfg: SampleConfig, scored: bool) -> list[int]:
    """The seeds cfg asks for, once the settings that need no model are checked (bad values fail before any work)."""
    choose(DTYPES, cfg.dtype, "dtype")
    for key in ("batch", "vae_batch"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.format == "grid" and scored:
        raise ValueError("scoring needs the images: use format=png or format=npz")
    return _seeds(cfg)


def _own_folder(out: Path, record: dict, overwrite: bool, on_own_folder: Callable[[Path], Any] | None) -> FolderLock:
    """Lock out and claim it for images of `record` (provenance.claim: another record is refused unless overwrite);
    the lock, held until the images are written, or released when the claim fails."""
    lock = FolderLock(out, key="out", owner="sampler").acquire()
    try:
        claim(out, record, earlier_results(out), command="edm-sample", overwrite=overwrite)
        if on_own_folder is not None:
            on_own_folder(out)
    except BaseException:
        lock.release()
        raise
    return lock


def _work_text(cfg: SampleConfig, nfe: int, guided_nfe: int) -> str:
    """'heun with 18 steps (35 solver evaluations per image)', as the log announces the work; under guidance with
    the network evaluations they cost (a guided one is two)."""
    adaptive = cfg.sampler.solver in ADAPTIVE_SOLVERS  # its grid's points are stops, its steps its own
    steps = f"{cfg.sampler.num_steps} {'stop' if adaptive else 'step'}{'s' * (cfg.sampler.num_steps != 1)}"
    if adaptive:
        calls = "an adaptive number of solver evaluations per image"
    else:
        calls = f"{nfe} solver evaluation{'s' * (nfe != 1)} per image"
        calls += f", {guided_nfe} network evaluations with guidance" if cfg.guidance != 1.0 else ""
    return f"{cfg.sampler.solver} with {steps} ({calls})"


def check_guided_levels(cfg: SampleConfig, nfe: int, guided_nfe: int) -> None:
    """Warn where guidance is asked for but its interval holds none of the noise levels the sampler evaluates (a
    fixed-step solver's count is the same guided and unguided): no image would be guided."""
    if cfg.guidance != 1.0 and cfg.sampler.solver not in ADAPTIVE_SOLVERS and guided_nfe == nfe:
        logger.warning("guidance=%s acts on no image: guidance_interval=%s holds none of the noise levels %s with %d "
                       "steps evaluates (widen the interval, or drop guidance)", cfg.guidance,
                       to_container(cfg.guidance_interval), cfg.sampler.solver, cfg.sampler.num_steps)


# settings each process may have its own of, the rest must agree: its batches (per process; not in the provenance
# record, they do not change the images)
PER_PROCESS_SETTINGS = ("progress", "batch", "vae_batch")


def generate_folder(
    cfg: SampleConfig, *,
    on_own_folder: Callable[[Path], Any] | None = None,
    scorer: Callable[[ModelInfo, torch.device, VAE | None], Callable[[np.ndarray, np.ndarray | None], dict]] | None = None,
) -> dict | None:
    """Generate cfg's images into cfg.out in every process of the launch (accelerate's PartialState); the main
    process owns the folder (then calls `on_own_folder(out)`), finalizes the output and writes OUT/report.json.
    A latent model's samples are decoded by its VAE (cfg.vae, else the one it records) into pixels.
    With `scorer`, the main process calls scorer(info, device, vae) once the model is loaded, before the folder is
    claimed or any image made (a bad metric setting costs nothing), and puts what the score it returns makes
    of the requested seeds' images (uint8 [N, H, W, C], class labels or None; not other images in OUT) under
    "metrics". Returns the report (main process)."""
    from accelerate import PartialState

    seeds = _check_request(cfg, scored=scorer is not None)
    state = PartialState(cpu=use_cpu(cfg.cpu))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise ValueError(f"{launched} processes were launched but accelerate sees {state.num_processes}: pass cpu=true")
    check_same_settings(to_container(cfg), "edm-sample", ignore=PER_PROCESS_SETTINGS)  # each writes its share of one folder
    set_precision_flags(cfg.tf32)
    launch = launch_settings(cfg.mixed_precision, cfg.compile)
    writer = outputs.make_writer(cfg.format, cfg.out, rank=state.process_index, subdirs=cfg.subdirs)
    denoiser, info = load_model(cfg.checkpoint, ema=cfg.ema, device=state.device, image_shape=cfg.image_shape)
    info.check_solver(cfg.sampler.solver)
    vae = model_vae(info.latent, info.img_shape, info.source, cfg.vae, cfg.vae_batch, cfg.vae_dtype, state.device)
    schedule = cfg.schedule.build(info.schedule)
    nfe = cfg.sampler.evaluations_per_image(schedule)  # a bad option value (order, variant, ...) fails here, before work
    denoiser = fast_denoiser(denoiser, launch.mixed_precision, launch.dynamo_backend != "no", cfg.channels_last)
    denoiser, guide_info = guided(denoiser, info, cfg.guidance, cfg.guide, interval=cfg.guidance_interval,
                                  ema=cfg.ema, device=state.device, solvers=[cfg.sampler.solver])
    guided_nfe = nfe if denoiser.weight == 1.0 else cfg.sampler.evaluations_per_image(schedule, denoiser.weight,
                                                                                      denoiser.interval)
    plan = sampling.plan_images(seeds, _labels(cfg.labels), info.label_dim)
    score = scorer(info, state.device, vae) if scorer is not None and state.is_main_process else None
    out = Path(cfg.out)
    refuse_foreign_folder(out)
    record = provenance(cfg, schedule, info, launch, vae) | model_record(guide_info and guide_info.source, "guide")
    check_same_settings({"checkpoint": str(info.source), **record}, "edm-sample", read=True)  # node-local copies alike
    lock = None
    if state.is_main_process:  # one sampler per folder, and only images of one provenance record in it
        lock = _own_folder(out, record, cfg.overwrite, on_own_folder)
        logger.info("%d image(s) of %s, %s, %s schedule, %d process(es) -> %s", len(seeds), info.source,
                    _work_text(cfg, nfe, guided_nfe), schedule.name, state.num_processes, out)
        check_guided_levels(cfg, nfe, guided_nfe)
        if cfg.guidance != 1.0 and cfg.guide is None and info.label_dropout == 0.0:  # in OUT's sample.log too
            logger.warning("guidance=%s, but the network was trained without label dropout: its unconditional output "
                           "is untrained", cfg.guidance)
    try:
        check_shared_folder(state, out, "out")  # every process's images in the one folder the main process finishes
        start = time.time()
        denoiser.evaluations = 0
        made = sampling.generate(
            denoiser, sampling.shard(plan, state.process_index, state.num_processes), schedule, cfg.sampler, writer,
            info.img_shape, batch_size=cfg.batch, label_dim=info.label_dim, device=state.device,
            dtype=DTYPES[cfg.dtype], progress=cfg.progress and state.is_main_process, decode=vae.decode if vae else None,
        )
        logger.info("process %d generated %d image(s)", state.process_index, made)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        output = outputs.finalize(cfg.format, out, seeds, grid_cols=cfg.grid_cols, grid_scale=cfg.grid_scale)
        report = {
            "edm_version": package_version(), "torch_version": torch.__version__,
            "checkpoint": str(Path(info.source).resolve()),
            **({"guide": str(Path(guide_info.source).resolve())} if guide_info is not None else {}), **record,
            "seeds": sampling.format_seeds(seeds), "num_images": len(seeds), "batch": cfg.batch,
            "world_size": state.num_processes, "output": str(output), "seconds": round(time.time() - start, 3),
        }
        if made:  # counted: the guide's evaluations and an adaptive solver's steps included (process 0's images)
            report["nfe_per_image"] = round(denoiser.evaluations / made, 3)
        if vae is not None:  # image_shape is the model's (latent) sample's; the files hold the decoded pixels
            report["pixel_shape"] = list(vae.pixel_shape(info.img_shape))
        if cfg.format == "png":  # a PNG folder keeps the images of earlier runs' seeds: say what it holds
            held = writer.held()
            report["folder_seeds"] = sampling.format_seeds(held)
            if len(held) > len(seeds):
                logger.warning("%s also holds %d image(s) of other seeds (same settings; folder_seeds in the report): "
                               "the report's numbers are of this run's %d, a score of the folder is of all %d",
                               out, len(held) - len(seeds), len(seeds), len(held))
        if score is not None:
            report["metrics"] = score(*writer.read(seeds))  # these seeds' images, not others in the folder
        write_json(out / REPORT_NAME, report)
        return report
    finally:
        if lock is not None:
            lock.release()
