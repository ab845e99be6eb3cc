"""`edm-convert-nvlabs`: an official NVlabs/edm snapshot (.pkl) as a model folder without pickles, never running its code.

    edm-convert-nvlabs pkl=edm-cifar10-32x32-cond-vp.pkl out=cifar10-vp        # cifar10-vp/model.safetensors + model.json
    edm-convert-nvlabs pkl=edm-cifar10-32x32-cond-vp.pkl out=cifar10-vp.pt     # or an edm checkpoint

The folder is what edm-export writes (edm.export): the weights in safetensors and the denoiser
spec and schedule in JSON, read back by every command with no pickle at all. An output ending
in .pt is an edm checkpoint instead (torch.load(weights_only=True)).
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..files import OutputWriteError

from ..models.checkpoint import save_checkpoint
from . import CONFIG_DIR, fail
from ..models.export import export_state
from ..models.nvlabs import NVlabsError, denoiser_from_snapshot, read_nvlabs, to_checkpoint
from ..files import file_sha256


@dataclass
class ConvertConfig:
    pkl: str = MISSING  # NVlabs/edm pickle (network-snapshot-*.pkl, edm-*.pkl): its 'ema' network
    out: str = MISSING  # the model folder to write (model.safetensors + model.json), or a .pt checkpoint


ConfigStore.instance().store(name="convert_nvlabs_schema", node=ConvertConfig)


def convert(pkl: str, out: str) -> str:
    """Read `pkl` with the restricted unpickler, check that its weights load, write `out`; a summary."""
    snap = read_nvlabs(pkl)
    denoiser_from_snapshot(snap, pkl)  # the weights must load strictly before anything is written
    state = to_checkpoint(snap, pkl)
    if out.endswith(".pt"):
        save_checkpoint(out, state)
    else:
        export_state(state, out, source_sha256=file_sha256(pkl))
    ref, net = snap.reference, snap.denoiser["network"]
    return "\n".join([
        f"{pkl}: {ref['precond_class']}({ref['model_class']}) -> {out}",
        f"  network {net['name']}: {net['img_resolution']}x{net['img_resolution']}x{net['in_channels']}, "
        f"label_dim {net['label_dim']}, {sum(v.numel() for v in snap.state_dict.values())} parameters",
        f"  precond {snap.denoiser['precond']}, schedule {snap.schedule}",
    ])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convert_nvlabs")
def main(dcfg: DictConfig) -> None:
    cfg: ConvertConfig = OmegaConf.to_object(dcfg)
    try:
        print(convert(cfg.pkl, cfg.out))
    except (NVlabsError, OutputWriteError) as err:
        fail("edm-convert-nvlabs", err)


if __name__ == "__main__":
    main()
