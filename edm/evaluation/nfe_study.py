"""Sample quality against the number of network evaluations (NFE): one table and one plot per metric.

For a checkpoint, every (schedule, solver, steps) point generates the same seeds 0..N−1 and scores
them with the metrics of edm.evaluation.scorers (eval.metrics; by default FD_cls, edm.evaluation.quality:
offline, lower is better; FID too with local Inception weights). NFE is counted, not assumed: the
network evaluations per image over all images, the guide's included (unguided Heun: 2N − 1, Euler and
DPM-Solver++(2M): N; guidance adds one per guided call; dpm_adaptive: each image's own count, averaged).
With `nfe` budgets (e.g. nfe=[10,20,50]) each solver gets, per budget, the most steps whose counted NFE fits
(counted once on a stand-in denoiser), so solvers of 1, 2 or 3 evaluations a step meet at the same budgets.
An adaptive solver (dpm_adaptive) has one point per tolerance in `rtols` instead of one per step count;
`options` gives a solver its options (e.g. options='{stochastic: {churn: 40, s_noise: 1.003}}').

    edm-study checkpoint=RUN_DIR solvers=[heun,euler,dpmpp_2m] steps=[2,4,8,16,32]
    edm-study checkpoint=ECT_RUN solvers=[consistency] steps=[1,2,4] teacher=RUN_DIR teacher_steps=[2,18]

With `teacher` (e.g. the model a consistency model was tuned from), that model's teacher_solvers × teacher_steps
points join the same table (model "teacher") and plot, so one study shows a few-step model against its teacher.

Writes OUT/table.csv, OUT/table.json, OUT/<metric>_vs_nfe.png, and one OUT/points/*.json per point, so
a rerun with more solvers or steps computes only the new points. OUT/provenance.json (checkpoint hash,
images, data set, metrics and their files, ...) refuses a folder made with other settings.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..core.denoisers import GuidedDenoiser
from ..core.samplers import ADAPTIVE_SOLVERS, SamplerConfig
from ..core.schedules import Schedule, get, model_schedule, to_spec
from ..data import DatasetConfig, dataset_record, root_contents_key, to_uint8
from ..files import FolderLock, atomic_write, to_container, write_json
from ..provenance import claim, refuse_foreign_folder
from ..generation.sampling import chunks, generate_batch, plan_images
from ..latent import VAE, LatentConfig, model_vae, same_latent_space
from ..models.loading import ModelInfo, guided, load_model, model_record
from ..progress import progress_bar
from .plots import plot_score_vs_nfe
from .scorers import EvalConfig, Scorer, ScoringContext, build_scorers, check_metrics, metric_files

__all__ = ["StudyConfig", "run_study"]

logger = logging.getLogger(__name__)


def _fd_cls_only() -> EvalConfig:
    cfg = EvalConfig()
    cfg.metrics = ["fd_cls"]
    return cfg


@dataclass
class StudyConfig:
    """Every key of edm-study and its default."""

    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/<file>.pt, a model folder or an NVlabs .pkl
    ema: bool = True
    solvers: List[str] = field(default_factory=lambda: ["heun", "euler", "dpmpp_2m"])
    steps: List[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    nfe: List[int] = field(default_factory=list)  # NFE budgets, replacing steps (leave steps default)
    rtols: List[float] = field(default_factory=lambda: [0.1, 0.05, 0.02])  # an adaptive solver's points, for steps
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per solver, e.g. {stochastic: {churn: 40}}
    schedules: List[Optional[str]] = field(default_factory=lambda: [None])  # None = the checkpoint's own
    discretization: Optional[str] = None  # None = each schedule's own time grid
    num_images: int = 1000  # seeds 0 .. num_images − 1 at every point
    batch: int = 250
    out: str = "nfe-study"
    overwrite: bool = False  # delete an out folder's earlier results first
    eval: EvalConfig = field(default_factory=_fd_cls_only)  # eval.metrics=[fd_cls,fid] and eval.NAME.KEY options
    dataset: Optional[DatasetConfig] = None  # the metrics' data set; None = the checkpoint's training data
    guidance: float = 1.0  # guidance weight w (edm.core.denoisers.GuidedDenoiser); 1 = none
    guide: Optional[str] = None  # autoguidance: the guide model's file (else classifier-free)
    guidance_interval: Optional[List[float]] = None  # [sigma_lo, sigma_hi]: guided only there
    teacher: Optional[str] = None  # a second model whose points join the table and plot (unguided), e.g. a teacher
    teacher_solvers: List[str] = field(default_factory=lambda: ["heun"])
    teacher_steps: List[int] = field(default_factory=lambda: [2, 18])
    vae: Optional[str] = None  # latent models: the VAE folder that decodes them (null: the one the model records)
    vae_batch: int = LatentConfig.batch  # latent models: images per VAE decoder call
    vae_dtype: str = LatentConfig.dtype  # latent models: the VAE's precision, float32 | bfloat16
    cpu: bool = False
    progress: bool = True


@dataclass
class _Model:
    """One model of a study: its row label, counting denoiser, facts and sampler settings."""

    label: str  # "model", or "teacher"
    denoiser: GuidedDenoiser
    info: ModelInfo
    settings: list[SamplerConfig]
    vae: VAE | None = None  # a latent model's decoder


def _point_name(model: str, schedule: Schedule, settings: SamplerConfig) -> str:
    prefix = "" if model == "model" else f"{model}-"
    if settings.solver in ADAPTIVE_SOLVERS:
        return f"{prefix}{schedule.name}-{settings.solver}-rtol{settings.options['rtol']:g}"
    return f"{prefix}{schedule.name}-{settings.solver}-{settings.num_steps:03d}"


def steps_within(solver: str, budget: int, schedule: Schedule, options: dict, discretization: str | None,
                 guidance: float = 1.0, interval: tuple[float, float] = (0.0, math.inf)) -> int:
    """The most steps (≥ 1) of `solver` whose NFE per image, guided evaluations counted twice, is at most `budget`."""
    steps = 1
    while steps < budget and SamplerConfig(solver, steps + 1, discretization=discretization, options=options
                                           ).evaluations_per_image(schedule, guidance, interval) <= budget:
        steps += 1
    return steps


def _settings(solvers: list[str], steps: list[int], cfg: StudyConfig, schedule: Schedule, guided: GuidedDenoiser
              ) -> list[SamplerConfig]:
    """One SamplerConfig per point: solvers × steps (or the steps that fit cfg.nfe under the guidance of `guided`),
    or × rtols for an adaptive solver, with each solver's options."""
    unknown = sorted(set(cfg.options) - set(solvers) - set(cfg.teacher_solvers if cfg.teacher else []))
    if unknown:
        raise ValueError(f"options names solver(s) {unknown} that the study does not run; its solvers are {solvers}")
    settings = []
    for solver in solvers:
        options = dict(cfg.options.get(solver, {}))
        if solver in ADAPTIVE_SOLVERS:
            settings += [SamplerConfig(solver, 2, discretization=cfg.discretization, options={**options, "rtol": float(rtol)})
                         for rtol in cfg.rtols]
        else:
            counts = steps if not cfg.nfe else sorted({steps_within(solver, budget, schedule, options, cfg.discretization,
                                                                    guided.weight, guided.interval) for budget in cfg.nfe})
            settings += [SamplerConfig(solver, n, discretization=cfg.discretization, options=options) for n in counts]
    return settings


def _schedule(name: str | None, info: ModelInfo) -> Schedule:
    """The schedule `name`, or the model's own for None."""
    return model_schedule(info.schedule, "schedules=[NAME]") if name is None else get(name)


def _load(path: str, label: str, solvers: list[str], steps: list[int], cfg: StudyConfig, device: torch.device,
          like: ModelInfo | None = None) -> _Model:
    """A study's model from its file, each solver checked against what it is (denoiser or consistency model); a
    teacher (`like`: the model's info) is refused first when it works in another space than the model, before
    vae= (the model's VAE) is taken for it."""
    denoiser, info = load_model(path, ema=cfg.ema, device=device)
    if like is not None:
        same_latent_space(like.latent, info.latent, f"{label} {info.source}")
    vae = model_vae(info.latent, info.img_shape, info.source, cfg.vae, cfg.vae_batch, cfg.vae_dtype, device)
    prefix = "" if label == "model" else f"{label}_"  # edm-study's keys of this model, which its refusals name
    for solver in solvers:
        info.check_solver(solver, f"{prefix}solvers=[{{}}]", f"{prefix}steps=[1,2,4]", role=label if prefix else "")
    guidance, guide, interval = (cfg.guidance, cfg.guide, cfg.guidance_interval) if label == "model" else (1.0, None, None)
    counting, guide_info = guided(denoiser, info, guidance, guide, interval=interval,
                                  ema=cfg.ema, device=device, solvers=solvers)
    return _Model(label, counting, info, _settings(solvers, steps, cfg, _schedule(cfg.schedules[0], info), counting),
                  vae), guide_info


def _score_point(
    denoiser: GuidedDenoiser, schedule: Schedule, settings: SamplerConfig, info: ModelInfo, cfg: StudyConfig,
    scorers: dict[str, Scorer], device: torch.device, label: str = "model", vae: VAE | None = None,
) -> dict:
    """Generate seeds 0..N−1 at one point (quantized to uint8, as saved images are; a latent model's decoded by
    `vae`) and score them."""
    plan = plan_images(range(cfg.num_images), None, info.label_dim)
    images, labels = [], []
    start = time.time()
    denoiser.evaluations = 0
    for batch in chunks(plan, cfg.batch):
        with torch.no_grad():
            x, y = generate_batch(denoiser, batch, schedule, settings, info.img_shape, label_dim=info.label_dim,
                                  device=device, decode=vae.decode if vae else None)
        images.append(to_uint8(x).cpu())
        labels.append(y.cpu() if y is not None else None)
    seconds = time.time() - start
    x = torch.cat(images)
    y = None if labels[0] is None else torch.cat(labels)
    nfe = denoiser.evaluations / len(x)  # per image, over all images
    nfe = int(nfe) if nfe == int(nfe) else round(nfe, 2)
    row = {"model": label, "schedule": schedule.name, "solver": settings.solver, "steps": settings.num_steps, "nfe": nfe,
           "discretization": settings.discretization or schedule.default_discretization,
           "seconds": round(seconds, 2), **({"options": settings.options} if settings.options else {})}
    for scorer in scorers.values():
        row.update(scorer(x, y))
    return row


def write_table(rows: list[dict], out: Path) -> list[Path]:
    """table.csv and table.json (rows sorted by schedule, solver, NFE)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows([{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()} for row in rows])
    data = text.getvalue().encode()
    atomic_write(out / "table.csv", lambda f: f.write(data))
    write_json(out / "table.json", {"rows": rows})
    return [out / "table.csv", out / "table.json"]


def run_study(cfg: StudyConfig, device: torch.device | str = "cpu") -> list[dict]:
    """Score every (schedule, solver, steps) point; returns the table's rows (also written to cfg.out, which
    this process owns meanwhile)."""
    device = torch.device(device)
    out = Path(cfg.out)
    refuse_foreign_folder(out)
    if cfg.num_images < 2:
        raise ValueError(f"num_images={cfg.num_images}: a Fréchet distance needs at least 2 images")
    if not cfg.eval.metrics:
        raise ValueError("eval.metrics is empty: name the metrics to plot, e.g. eval.metrics=[fd_cls]")
    check_metrics(cfg.eval)  # a misspelt or data-only metric is refused by name, before the model is loaded
    if not cfg.solvers or not (cfg.steps or cfg.nfe) or not cfg.schedules:
        raise ValueError(f"the study has no point: solvers={cfg.solvers}, steps={cfg.steps}, nfe={cfg.nfe}, schedules="
                         f"{cfg.schedules}; give at least one solver, one step count (or NFE budget) and one schedule")
    if cfg.nfe:  # budgets replace step counts: steps other than the default (which cannot be told from a user's) clash
        defaults = StudyConfig()
        for key in ("steps", "teacher_steps") if cfg.teacher is not None else ("steps",):
            if getattr(cfg, key) and list(getattr(cfg, key)) != getattr(defaults, key):
                raise ValueError(f"{key}={list(getattr(cfg, key))} and nfe={list(cfg.nfe)}: nfe budgets replace step "
                                 f"counts (each solver gets its most steps within each budget); drop {key}= to study "
                                 f"the budgets, or nfe= to study those step counts")
    main, guide_info = _load(cfg.checkpoint, "model", cfg.solvers, cfg.steps, cfg, device)
    info, models = main.info, [main]
    if cfg.teacher is not None:
        teacher, _ = _load(cfg.teacher, "teacher", cfg.teacher_solvers, cfg.teacher_steps, cfg, device, like=info)
        if teacher.info.img_shape != info.img_shape or teacher.info.label_dim != info.label_dim:
            raise ValueError(f"teacher {teacher.info.source} makes {teacher.info.img_shape} images with "
                             f"{teacher.info.label_dim} classes, {info.source} {info.img_shape} with {info.label_dim}: "
                             "give teacher= a model of the same data (e.g. the one the model was tuned from)")
        models.append(teacher)
    schedules = [_schedule(name, info) for name in cfg.schedules]
    for schedule in schedules:  # a bad option value (order, variant, ...) fails here, before OUT is claimed
        for model in models:
            for point in model.settings:
                point.evaluations_per_image(schedule)
    dataset = cfg.dataset or info.training_dataset()
    if dataset is None:
        raise ValueError(f"{info.source} does not say what data it was trained on: pass dataset=NAME [dataset.root=PATH]")
    # the scorers, and all that can refuse a metric's setting (its files, the data set), before OUT is claimed:
    # a refused study writes nothing there
    ctx = ScoringContext(dataset=dataset, device=device, batch=cfg.batch, cache_dir=out / "fid-refs",
                         image_shape=main.vae.pixel_shape(info.img_shape) if main.vae else info.img_shape, progress=cfg.progress)
    scorers = build_scorers(cfg.eval, ctx)
    with FolderLock(out, key="out", owner="NFE study"):
        record = {**model_record(info.source, "checkpoint"), "ema": cfg.ema, "num_images": cfg.num_images,
                  "dataset": dataset_record(dataset),
                  "dataset_contents": root_contents_key(dataset.root) if dataset.root else None,
                  "metrics": {name: to_container(getattr(cfg.eval, name)) for name in cfg.eval.metrics},
                  **metric_files(cfg.eval, cfg.eval.metrics),
                  "guidance": cfg.guidance, **model_record(guide_info and guide_info.source, "guide"),
                  "guidance_interval": cfg.guidance_interval,
                  **model_record(models[1].info.source if cfg.teacher else None, "teacher"),
                  "vae_fingerprint": main.vae.fingerprint if main.vae is not None else None,
                  "vae_dtype": cfg.vae_dtype if main.vae is not None else None,
                  "options": to_container(cfg.options), "discretization": cfg.discretization}
        results = [out / "points", out / "table.csv", out / "table.json", *out.glob("*_vs_nfe.png")]
        claim(out, record, results, command="edm-study", overwrite=cfg.overwrite)
        rows = _score_points(cfg, models, schedules, scorers, device)
        write_table(rows, out)
        for row in rows:
            parts = ([row["model"]] if len(models) > 1 else []) + ([row["schedule"]] if len(schedules) > 1 else [])
            row["series"] = " ".join(parts + [row["solver"]])
        for name in scorers:
            plot_score_vs_nfe(rows, out / f"{name}_vs_nfe.png", score=name, series="series",
                              title=f"{Path(info.source).parent.name}/{Path(info.source).name}: {cfg.num_images} images "
                                    "per point (lower is better)")
        for row in rows:
            del row["series"]
    return rows


def _score_points(cfg: StudyConfig, models: list[_Model], schedules: list[Schedule], scorers: dict[str, Scorer],
                  device: torch.device) -> list[dict]:
    """Every point's row, read from OUT/points/ when an earlier run scored it, sorted by model, schedule, solver, NFE."""
    out = Path(cfg.out)
    points = [(m, schedule, s) for m in models for schedule in schedules for s in m.settings]
    rows = []
    bar = progress_bar(len(points), "NFE study", "point") if cfg.progress else None
    for m, schedule, s in points:
        path = out / "points" / f"{_point_name(m.label, schedule, s)}.json"
        if path.is_file():
            row = json.loads(path.read_text())
        else:
            row = _score_point(m.denoiser, schedule, s, m.info, cfg, scorers, device, m.label, m.vae)
            row["schedule_spec"] = to_spec(schedule)
            write_json(path, row)
        rows.append(row)
        options = "".join(f" {key}={value}" for key, value in (row.get("options") or {}).items())
        whose = "" if m.label == "model" else f"{m.label}: "  # the teacher's points, as the table and plot label them
        logger.info("%s%s %s%s %d steps: NFE %g, %s", whose, row["schedule"], row["solver"], options, row["steps"],
                    row["nfe"], ", ".join(f"{name} {row[name]:.4g}" for name in scorers))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(rows, key=lambda r: (r.get("model", "model"), r["schedule"], r["solver"], r["nfe"]))
