"""`edm-posthoc`: post-hoc EMA (EDM2): any σ_rel's EMA of a run, from its power-EMA snapshots (edm.training.posthoc).

    edm-train ... ema_sigma_rel=[0.05,0.10] ema_snapshot_kimg=8            # snapshots in RUN/phema/
    edm-posthoc run_dir=RUN sigma_rel=[0.02,0.05,0.10,0.15,0.20] out=RUN/posthoc
    edm-sample checkpoint=RUN/posthoc/ema-0.100 num_images=64 format=grid
"""

from __future__ import annotations

import json

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..hardware import check_one_process
from ..training.posthoc import PosthocConfig, reconstruct
from . import CONFIG_DIR, hydra_errors, typed, user_errors

ConfigStore.instance().store(name="posthoc_schema", node=PosthocConfig)


@hydra_errors("edm-posthoc")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="posthoc")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-posthoc"):
        check_one_process("edm-posthoc")
        cfg: PosthocConfig = typed(dcfg)
        summary = reconstruct(cfg)
    for row in summary:
        files = len({part["snapshot"] for part in row["inputs"]})
        print(f"sigma_rel {row['sigma_rel']:.3f} at {row['at_kimg']:g} kimg from {len(row['inputs'])} EMA profiles of "
              f"{files} snapshot(s) (residual {row['residual']:.2e}) -> {row['folder']}")
    print(json.dumps({"out": str(cfg.out), "profiles": len(summary)}))


if __name__ == "__main__":
    main()
