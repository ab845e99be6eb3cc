"""`edm-study`: sample quality against NFE for one checkpoint, a table (CSV/JSON) and a plot per metric
(edm.evaluation.nfe_study).

    edm-study checkpoint=RUN_DIR solvers=[heun,euler,dpmpp_2m] steps=[2,4,8,16,32] out=DIR

The default metric is FD_cls, the Fréchet distance in the features of a small classifier trained once on
the checkpoint's data set and cached (edm.evaluation.quality; not FID); eval.metrics=[fd_cls,fid] with
eval.fid.inception=PATH (local Inception weights) adds FID. `--help` lists every key
(edm.evaluation.nfe_study.StudyConfig).
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..evaluation.nfe_study import StudyConfig, run_study
from ..hardware import check_one_process, pick_device, share_cpu
from . import CONFIG_DIR, CONTINUES, hydra_errors, typed, user_errors

ConfigStore.instance().store(name="nfe_study_schema", node=StudyConfig)


@hydra_errors("edm-study")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="nfe_study")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-study", on_interrupt=CONTINUES):
        check_one_process("edm-study")
        cfg: StudyConfig = typed(dcfg)
        device = pick_device(cfg.cpu)
        share_cpu(device.type == "cpu")
        rows = run_study(cfg, device)
    print(f"{len(rows)} points -> {cfg.out}/table.csv, " + ", ".join(f"{cfg.out}/{m}_vs_nfe.png" for m in cfg.eval.metrics))


if __name__ == "__main__":
    main()
