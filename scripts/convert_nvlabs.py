"""Convert an official NVlabs/edm snapshot (.pkl) into an edm checkpoint (.pt), without running its code.

    python scripts/convert_nvlabs.py edm-cifar10-32x32-cond-vp.pkl edm-cifar10-32x32-cond-vp.pt

The output holds the denoiser spec, the schedule and the converted weights ("ema" and
"model"), so `edm.checkpoint.load_denoiser(OUT)` rebuilds the same denoiser with
torch.load(weights_only=True) and no pickle.
"""

from __future__ import annotations

import argparse
import sys

from edm.checkpoint import save_checkpoint
from edm.nvlabs import NVlabsError, denoiser_from_snapshot, read_nvlabs, to_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an NVlabs/edm network snapshot (network-snapshot-*.pkl, edm-*.pkl) into an edm "
        "checkpoint. The pickle is read with a restricted unpickler: its embedded code is never run."
    )
    parser.add_argument("input", help="NVlabs/edm pickle (its 'ema' network: EDMPrecond, VPPrecond or VEPrecond)")
    parser.add_argument("output", help="checkpoint to write (.pt), loadable with edm.checkpoint.load_denoiser")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        snap = read_nvlabs(args.input)
        denoiser_from_snapshot(snap, args.input)  # the weights must load strictly before anything is written
    except NVlabsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    save_checkpoint(args.output, to_checkpoint(snap, args.input))
    ref, net = snap.reference, snap.denoiser["network"]
    print(f"{args.input}: {ref['precond_class']}({ref['model_class']}) -> {args.output}")
    print(f"  network {net['name']}: {net['img_resolution']}x{net['img_resolution']}x{net['in_channels']}, "
          f"label_dim {net['label_dim']}, {sum(v.numel() for v in snap.state_dict.values())} parameters")
    print(f"  precond {snap.denoiser['precond']}, schedule {snap.schedule}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
