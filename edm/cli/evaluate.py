"""`edm-eval`: one metric of images or of a model (edm.evaluation.scorers.METRICS), or FID reference statistics.

    edm-eval metric=fid images=OUT metric.ref=cifar10-32x32.npz metric.inception=pt_inception-2015-12-05-6726825d.pth
    edm-eval metric=fid images=OUT/samples.npz dataset=cifar10 dataset.root=DATA metric.inception=... metric.precision_recall=true
    edm-eval metric=fd_cls images=OUT dataset=fashion_mnist
    edm-eval metric=bpd checkpoint=RUN dataset=cifar10 dataset.root=DATA metric.max_images=1000
    edm-eval metric=ref dataset=cifar10 dataset.root=DATA metric.inception=... metric.dest=refs/cifar10.npz

`metric=NAME` picks the metric and its options (metric.KEY=...; an unknown key fails at composition).
report=FILE merges the numbers into a JSON file (e.g. edm-sample's report.json) under "metrics" → the metric's name.
Nothing is downloaded (`edm-eval --help`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig

from ..core.schedules import ScheduleConfig
from ..data import DatasetConfig
from ..evaluation import metrics
from ..evaluation.scorers import METRICS, NoDatasetError, ScoringContext, evaluate, option_files
from ..files import folder_holder, folder_turn, write_json
from ..generation.job import REPORT_NAME
from ..hardware import check_one_process, pick_device, share_cpu
from ..models.loading import load_model
from . import CONFIG_DIR, hydra_errors, typed, user_errors

__all__ = ["EvaluateConfig", "run", "merge_report"]


@dataclass
class EvaluateConfig:
    metric: Any = MISSING  # the `metric` group: a row of METRICS, or ref; its options under metric.*
    images: Optional[str] = None  # a metric of samples (fid, fd_cls, ...): the generated images, a folder of image files or an .npz
    data: Optional[str] = None  # a metric of data (bpd, ...) or ref: data images (folder or .npz) instead of dataset=NAME
    checkpoint: Optional[str] = None  # a metric of data (bpd, ...): the model (edm checkpoint, run folder, model folder or NVlabs .pkl)
    ema: bool = True  # the model's EMA weights (false: the raw ones)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the `schedule` group; name null: the model's, its fields replaced by the set ones
    dataset: Optional[DatasetConfig] = None  # the `dataset` group: fid's reference, fd_cls's data, bpd's or ref's images
    report: Optional[str] = None  # merge the numbers into this JSON file (under "metrics" → metric name)
    batch: int = 64  # images per forward pass
    cpu: bool = False  # run on the CPU even when a GPU is present
    progress: bool = True  # progress bars on stderr (classifier training, features, bits/dim)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
for _name, _metric in METRICS.items():
    ConfigStore.instance().store(group="metric", name=_name, node=_metric.schema)
ConfigStore.instance().store(group="metric", name="ref", node=metrics.RefConfig)


def run(cfg: EvaluateConfig, name: str) -> dict:
    """The numbers of metric `name` (or, for "ref", the reference statistics written) for this config."""
    for source in (cfg.images, cfg.data):  # before a classifier is trained or a model loaded
        if source is not None:
            metrics.check_image_source(source)
            check_not_being_written(source)
    device = pick_device(cfg.cpu)
    share_cpu(device.type == "cpu")
    if name == "fid" and cfg.metric.ref is not None and cfg.dataset is not None:
        raise ValueError(f"metric.ref={cfg.metric.ref} and dataset={cfg.dataset.name} both name FID's reference: give one")
    if name == "ref":
        metrics.check_reference_dest(cfg.metric)
        if (cfg.data is None) == (cfg.dataset is None):
            raise ValueError("metric=ref: give the images as data=PATH (folder or .npz) or dataset=NAME")
        batches = metrics.image_batches(cfg.data, cfg.batch) if cfg.data is not None else \
            metrics.dataset_reference(cfg.dataset, cfg.batch)[0]()
        return metrics.write_reference(cfg.metric, batches, device, progress=cfg.progress)
    model = info = None
    dataset = cfg.dataset
    if cfg.checkpoint is not None:
        model, info = load_model(cfg.checkpoint, ema=cfg.ema, device=device)
        if METRICS[name].scores == "data":
            info.require_pixels(f"metric={name} (of the model's own images)")
        if dataset is None and cfg.data is None:
            dataset = info.training_dataset()
        if dataset is not None and METRICS[name].scores == "data":  # with the labels the model takes, unmirrored
            dataset = dataclasses.replace(dataset, cond=info.label_dim > 0, xflip=False)
    schedule = cfg.schedule.build(info.schedule) if info is not None else None
    ctx = ScoringContext(dataset=dataset, device=device, batch=cfg.batch, model=model, info=info, schedule=schedule,
                         progress=cfg.progress)
    try:
        return evaluate(name, cfg.metric, ctx, images=cfg.images, data=cfg.data)
    except NoDatasetError as err:
        made_by = sampled_by(cfg.images) if cfg.images is not None else None
        if made_by is None:
            raise
        raise NoDatasetError(f"{err}; the images' report names their model: checkpoint={made_by} scores them "
                             "against its training set") from None


def check_not_being_written(source: str) -> None:
    """Refuse images (a folder, or an .npz in one) whose folder a running command holds (edm-sample still writing
    them): their score would be of some of them."""
    folder = images_folder(source)
    holder = folder_holder(folder)
    if holder is not None:
        raise ValueError(f"{source} is being written: {folder} is in use by {holder}; score it once that ends "
                         "(edm-sample eval.metrics=[...] scores its images itself when it is done)")


def images_folder(images: str) -> Path:
    """The folder of images=: the folder itself, or an .npz's folder."""
    return Path(images) if Path(images).is_dir() else Path(images).parent


def sampled_by(images: str) -> str | None:
    """The checkpoint that edm-sample's report.json beside `images` (images_folder) names, if any."""
    try:
        return json.loads((images_folder(images) / REPORT_NAME).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None


def _read_report(path: str) -> dict[str, Any]:
    """The JSON object at report=`path` ({} where no file is yet); a folder, or a file that is not a JSON object, is
    a ValueError naming it, so that it is refused before any scoring."""
    if Path(path).is_dir():
        raise ValueError(f"report={path} is a folder: give the JSON file to merge the numbers into, "
                         f"e.g. report={Path(path) / REPORT_NAME}")
    if not Path(path).exists():
        return {}
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"report={path} cannot be read as JSON ({err}): give another report=PATH, or delete it") from None
    if not isinstance(report, dict):
        raise ValueError(f"report={path} holds JSON that is not an object {{...}} (a report): "
                         "give another report=PATH, or delete it")
    scores = report.get("metrics", {})
    if not isinstance(scores, dict) or not isinstance(scores.get("files", {}), dict):
        raise ValueError(f"report={path} holds a \"metrics\" entry that is not an object {{...}} of scores (nor its "
                         "\"files\"): give another report=PATH, or mend or delete it")
    return report


def _scorable(folder: Path, report: dict) -> Path:
    """What of an edm-sample folder edm-eval scores: its .npz (format=npz), else the folder (format=png; a grid's
    folder is refused by name when scored)."""
    output = Path(str(report.get("output", "")))
    return folder / output.name if output.suffix == ".npz" else folder


def check_report(path: str | None, images: str | None) -> None:
    """An edm-sample report (one naming its "output") takes only the scores of its own folder's images: report=
    with other images is a ValueError naming both, before any work; so is a report= that is a folder or a file
    that is not a JSON object."""
    report = _read_report(path) if path is not None else {}
    if "output" not in report:
        return
    folder = Path(path).resolve().parent
    scored = Path(images).resolve() if images is not None else None
    if scored is None or not (scored == folder or (scored.parent == folder and scored.suffix == ".npz")):
        raise ValueError(f"report={path} is edm-sample's report of the images in {folder}, not of "
                         f"{images if images is not None else 'a model or data set'}: score images={_scorable(folder, report)} "
                         "(its images), or write another report= file")


def merge_report(path: str | None, name: str, numbers: dict, files: dict[str, str], images: str | None) -> None:
    """Put `numbers`, with the scored `images` (resolved) when images were scored, at "metrics" → `name` of the JSON
    file at `path` (created if absent), where edm-sample puts a metric's numbers, and the hashes of the files its
    options name (`files`, option_files) under "metrics" → "files"; other metrics there are kept, and the flat keys
    of these numbers that a report may hold at "metrics" are dropped."""
    if path is None:
        return
    with folder_turn(Path(path).resolve().parent):  # another edm-eval's merge into the same file waits its turn
        report = _read_report(path)
        merged = report.setdefault("metrics", {})
        for key in numbers:
            merged.pop(key, None)
        merged[name] = numbers | ({"images": str(Path(images).resolve())} if images is not None else {})
        merged["files"] = {k: v for k, v in merged.get("files", {}).items() if not k.startswith(f"{name}.")} | files
        write_json(path, report)


@hydra_errors("edm-eval")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-eval"):
        check_one_process("edm-eval")
        name = HydraConfig.get().runtime.choices.get("metric")
        if name is None:
            raise ValueError(f"say what to compute: metric={' | '.join([*METRICS, 'ref'])} (edm-eval --help)")
        cfg: EvaluateConfig = typed(dcfg)
        check_report(cfg.report, cfg.images)
        numbers = run(cfg, name)
        merge_report(cfg.report, name, numbers, option_files(name, cfg.metric), cfg.images)
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
