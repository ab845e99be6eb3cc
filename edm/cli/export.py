"""`edm-export`: a model as a folder without pickles, OUT/model.safetensors + OUT/model.json (edm.export).

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
from omegaconf import MISSING, DictConfig, OmegaConf

from ..models.checkpoint import CheckpointError, denoiser_from_state

from ..files import OutputWriteError
from . import CONFIG_DIR, fail
from ..models.export import WEIGHTS_NAME, export_state
from ..models.loading import read_model_file
from ..files import file_sha256


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # RUN_DIR, RUN_DIR/<file>.pt or an NVlabs .pkl
    out: str = MISSING  # the model folder to write
    ema: bool = True  # the EMA weights (false: the raw training weights)


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(dcfg: DictConfig) -> None:
    cfg: ExportConfig = OmegaConf.to_object(dcfg)
    try:
        path, state = read_model_file(cfg.checkpoint, cfg.ema)
        denoiser_from_state(state, cfg.ema, str(path))  # the weights must fit their spec before anything is written
        out = export_state(state, cfg.out, ema=cfg.ema, source_sha256=file_sha256(path))
    except (ValueError, FileNotFoundError, CheckpointError, OutputWriteError) as err:
        fail("edm-export", err)
    size = (out / WEIGHTS_NAME).stat().st_size
    print(f"{path} ({'EMA' if cfg.ema else 'raw'} weights) -> {out}/ ({size / 2**20:.1f} MiB of weights)")


if __name__ == "__main__":
    main()
