"""`edm-convert-nvlabs`: an official NVlabs/edm snapshot (.pkl) as a model folder without pickles, never running
its code (edm.models.nvlabs.convert).

    edm-convert-nvlabs pkl=edm-cifar10-32x32-cond-vp.pkl out=cifar10-vp        # cifar10-vp/model.safetensors + model.json
    edm-convert-nvlabs pkl=edm-cifar10-32x32-cond-vp.pkl out=cifar10-vp.pt     # or an edm checkpoint

The folder is what edm-export writes (edm.models.export): the weights in safetensors and the denoiser
spec and schedule in JSON, read back by every command with no pickle at all. An output ending
in .pt is an edm checkpoint instead (torch.load(weights_only=True)).
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..hardware import check_one_process
from ..models.nvlabs import convert
from . import CONFIG_DIR, hydra_errors, typed, user_errors


@dataclass
class ConvertConfig:
    pkl: str = "???"  # NVlabs/edm pickle (network-snapshot-*.pkl, edm-*.pkl): its 'ema' network
    out: str = "???"  # the model folder to write (model.safetensors + model.json), or a .pt checkpoint
    overwrite: bool = False  # replace a model folder of another source (or a .pt file) at out


ConfigStore.instance().store(name="convert_nvlabs_schema", node=ConvertConfig)


@hydra_errors("edm-convert-nvlabs")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convert_nvlabs")
def main(dcfg: DictConfig) -> None:
    with user_errors("edm-convert-nvlabs"):
        check_one_process("edm-convert-nvlabs")
        cfg: ConvertConfig = typed(dcfg)
        snap = convert(cfg.pkl, cfg.out, cfg.overwrite)
    ref, net = snap.reference, snap.denoiser["network"]
    print(f"{cfg.pkl}: {ref['precond_class']}({ref['model_class']}) -> {cfg.out}")
    print(f"  network {net['name']}: {net['img_resolution']}x{net['img_resolution']}x{net['in_channels']}, "
          f"label_dim {net['label_dim']}, {sum(v.numel() for v in snap.state_dict.values())} parameters")
    print(f"  precond {snap.denoiser['precond']}, schedule {snap.schedule}")


if __name__ == "__main__":
    main()
