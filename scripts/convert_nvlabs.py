"""Convert an official NVlabs/edm snapshot (.pkl) into a model folder without pickles, never running its code.

    python scripts/convert_nvlabs.py edm-cifar10-32x32-cond-vp.pkl cifar10-vp        # cifar10-vp/model.safetensors + model.json
    python scripts/convert_nvlabs.py edm-cifar10-32x32-cond-vp.pkl cifar10-vp.pt     # or an edm checkpoint

The folder is what scripts/export.py writes (edm.export): the weights in safetensors and the
denoiser spec and schedule in JSON, read back by every command with no pickle at all. An output
ending in .pt is an edm checkpoint instead (torch.load(weights_only=True)).
"""

from __future__ import annotations

import argparse
import sys

from edm.checkpoint import save_checkpoint
from edm.export import export_state
from edm.provenance import file_sha256
from edm.nvlabs import NVlabsError, denoiser_from_snapshot, read_nvlabs, to_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an NVlabs/edm network snapshot (network-snapshot-*.pkl, edm-*.pkl) into an edm "
        "checkpoint. The pickle is read with a restricted unpickler: its embedded code is never run."
    )
    parser.add_argument("input", help="NVlabs/edm pickle (its 'ema' network: EDMPrecond, VPPrecond or VEPrecond)")
    parser.add_argument("output", help="model folder to write (model.safetensors + model.json), or a .pt checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        snap = read_nvlabs(args.input)
        denoiser_from_snapshot(snap, args.input)  # the weights must load strictly before anything is written
    except NVlabsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    state = to_checkpoint(snap, args.input)
    if args.output.endswith(".pt"):
        save_checkpoint(args.output, state)
    else:
        export_state(state, args.output, source_sha256=file_sha256(args.input))
    ref, net = snap.reference, snap.denoiser["network"]
    print(f"{args.input}: {ref['precond_class']}({ref['model_class']}) -> {args.output}")
    print(f"  network {net['name']}: {net['img_resolution']}x{net['img_resolution']}x{net['in_channels']}, "
          f"label_dim {net['label_dim']}, {sum(v.numel() for v in snap.state_dict.values())} parameters")
    print(f"  precond {snap.denoiser['precond']}, schedule {snap.schedule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
