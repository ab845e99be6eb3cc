"""`edm-sample`: generate images from a trained model into a folder, optionally scored (edm.generation.job).

    edm-sample checkpoint=RUN_DIR num_images=50000 sampler=heun sampler.num_steps=18 out=DIR
    accelerate launch -m edm.cli.sample checkpoint=... seeds=0-49999 format=npz out=DIR
    edm-sample checkpoint=... format=npz eval.metrics=[fid] eval.fid.inception=PATH eval.fid.ref=REF.npz

Every key and its default: edm.generation.job.SampleConfig, plus `eval` (the metrics of
edm.evaluation.scorers, computed by the main process once all images exist) and `dataset` (their
reference data; by default the model's training set). `--help` lists them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..data import DatasetConfig
from ..evaluation.scorers import EvalConfig, ScoringContext, build_scorers, check_metrics, metric_files
from ..generation.job import SampleConfig, generate_folder
from ..latent import VAE
from ..hardware import share_cpu, unlaunched_cpu_processes, use_cpu
from ..models.loading import ModelInfo
from . import CONFIG_DIR, CONTINUES, close_log, own_folder_files, sweep_job_folder, hydra_errors, typed, user_errors


@dataclass
class SampleCommand(SampleConfig):
    eval: EvalConfig = field(default_factory=EvalConfig)  # eval.metrics=[fid,fd_cls] and their options eval.NAME.KEY
    dataset: Optional[DatasetConfig] = None  # the `dataset` group: the metrics' reference data; null = the model's


ConfigStore.instance().store(name="sample_schema", node=SampleCommand)


def scorer_of(cfg: SampleCommand):
    """The scorer factory of generate_folder for the configured metrics, or None without metrics: given the
    loaded model it builds every scorer (weights read, classifiers trained) before any image is made."""
    if not cfg.eval.metrics:
        return None
    check_metrics(cfg.eval)  # a metric of data, not samples, fails before the model is loaded

    def build(info: ModelInfo, device: torch.device, vae: VAE | None):
        ctx = ScoringContext(dataset=cfg.dataset or info.training_dataset(), device=device, batch=cfg.batch,
                             cache_dir=Path(cfg.out) / "fid-refs", image_shape=vae.pixel_shape(info.img_shape) if vae else info.img_shape, progress=cfg.progress)
        scorers = build_scorers(cfg.eval, ctx)
        files = metric_files(cfg.eval, cfg.eval.metrics)

        def score(pixels: np.ndarray, classes: np.ndarray | None) -> dict:
            """The metrics of uint8 images [N, H, W, C] and their class labels (or None)."""
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
            labels = None if classes is None else torch.from_numpy(classes).long()
            return {"files": files, **{name: scorer(images, labels) for name, scorer in scorers.items()}}

        return score

    return build


@hydra_errors("edm-sample")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(dcfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    handlers: list[logging.Handler] = []
    with user_errors("edm-sample", on_interrupt=CONTINUES):
        job = sweep_job_folder(hydra_cfg)
        if job is not None:
            dcfg.out = job
        cfg: SampleCommand = typed(dcfg)
        share_cpu(use_cpu(cfg.cpu))
        unlaunched_cpu_processes("edm-sample", "edm.cli.sample")
        try:
            report = generate_folder(cfg, scorer=scorer_of(cfg), on_own_folder=lambda out: handlers.append(
                own_folder_files(out, dcfg, hydra_cfg, "sample.log")))
        finally:
            for handler in handlers:
                close_log(handler)
    if report is not None:
        print(f"wrote {report['num_images']} images to {report['output']}; report {Path(cfg.out) / 'report.json'}")
        if "metrics" in report:
            print(json.dumps(report["metrics"], indent=2))


if __name__ == "__main__":
    main()
