"""`edm-encode`: a data set through a VAE into a latent data set in NVlabs/edm2's layout (edm.data.encode).

    edm-encode dataset=folder dataset.root=IMAGES latent.vae=VAE_FOLDER out=LATENTS        # or out=LATENTS.zip
    accelerate launch -m edm.cli.encode dataset=... latent.vae=... out=LATENTS             # several processes
    edm-train dataset=latent dataset.root=LATENTS network=edm2-xs                           # then train on it
"""

from __future__ import annotations

import json

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..data.encode import EncodeConfig, encode_dataset
from ..hardware import share_cpu, unlaunched_cpu_processes, use_cpu
from . import CONFIG_DIR, CONTINUES, hydra_errors, typed, user_errors

ConfigStore.instance().store(name="encode_schema", node=EncodeConfig)


@hydra_errors("edm-encode")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="encode")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-encode", on_interrupt=CONTINUES):
        cfg: EncodeConfig = typed(dcfg)
        share_cpu(use_cpu(cfg.cpu))
        unlaunched_cpu_processes("edm-encode", "edm.cli.encode")
        report = encode_dataset(cfg)
    if torch.distributed.is_initialized():  # each process lets go of its process group before the interpreter ends
        torch.distributed.destroy_process_group()
    if report:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
