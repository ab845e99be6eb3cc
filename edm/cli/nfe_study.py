"""`edm-study`: sample quality against NFE for one checkpoint, a table (CSV/JSON) and a plot (edm.nfe_study).

    edm-study checkpoint=RUN_DIR solvers=[heun,euler,dpmpp_2m] steps=[2,4,8,16,32] out=DIR

The score is FD_cls, the Fréchet distance in the features of a small classifier trained once on
the checkpoint's data set and cached (edm.quality; not FID); with inception=PATH (local
Inception weights) FID as well. `--help` lists every key (edm.nfe_study.StudyConfig).
"""

from __future__ import annotations

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..files import OutputWriteError
from . import CONFIG_DIR, fail
from ..hardware import has_accelerator
from ..evaluation.nfe_study import StudyConfig, run_study
from ..training.run import RunDirError
from ..files import FolderLock as RunDirLock

ConfigStore.instance().store(name="nfe_study_schema", node=StudyConfig)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="nfe_study")
def main(dcfg: DictConfig) -> None:
    try:
        cfg: StudyConfig = OmegaConf.to_object(dcfg)
        device = torch.device("cuda" if has_accelerator() and not cfg.cpu and torch.cuda.is_available() else "cpu")
        lock = RunDirLock(cfg.out, key="out", owner="NFE study").acquire()
        try:
            rows = run_study(cfg, device)
        finally:
            lock.release()
    except (ValueError, FileNotFoundError, ImportError, OutputWriteError, RunDirError) as err:
        fail("edm-study", err)
    print(f"{len(rows)} points -> {cfg.out}/table.csv, {cfg.out}/fd_cls_vs_nfe.png")


if __name__ == "__main__":
    main()
