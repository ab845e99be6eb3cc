"""`edm-export`: a model as a folder without pickles, OUT/model.safetensors + OUT/model.json (edm.models.export).

    edm-export checkpoint=RUN_DIR out=export/my-model          # the EMA denoiser
    edm-sample checkpoint=export/my-model num_images=64        # loads it with no pickle

`checkpoint` is anything edm-sample reads (an edm checkpoint, a run folder, an NVlabs .pkl). The
folder holds only the chosen weights (EMA by default, ema=false: the raw ones), a few MB for the
tiny net instead of a checkpoint with optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..hardware import check_one_process
from ..models.export import WEIGHTS_NAME
from ..models.loading import export_model
from . import CONFIG_DIR, hydra_errors, typed, user_errors


@dataclass
class ExportConfig:
    checkpoint: str = "???"  # RUN_DIR, RUN_DIR/<file>.pt or an NVlabs .pkl
    out: str = "???"  # the model folder to write
    ema: bool = True  # the EMA weights (false: the raw training weights)
    overwrite: bool = False  # replace a model folder exported from another file or weights


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@hydra_errors("edm-export")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-export"):
        check_one_process("edm-export")
        cfg: ExportConfig = typed(dcfg)
        path, out = export_model(cfg.checkpoint, cfg.out, cfg.ema, cfg.overwrite)
    size = (out / WEIGHTS_NAME).stat().st_size
    print(f"{path} ({'EMA' if cfg.ema else 'raw'} weights) -> {out}/ ({size / 2**20:.1f} MiB of weights)")


if __name__ == "__main__":
    main()
