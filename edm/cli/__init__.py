"""The command-line programs, installed by pip as console scripts (pyproject.toml [project.scripts]).

    edm-train    python -m edm.train        train a denoiser (edm.train)
    edm-sample   python -m edm.cli.sample   generate images from a model, optionally scored
    edm-eval     python -m edm.cli.evaluate FID, precision/recall, reference statistics, bits/dim
    edm-study    python -m edm.cli.nfe_study FD_cls against NFE for solvers x step counts
    edm-export   python -m edm.cli.export   a model folder without pickles (model.safetensors + model.json)
    edm-posthoc  python -m edm.cli.posthoc  post-hoc EMA (EDM2) from a run's power-EMA snapshots
    edm-convert-nvlabs                      an NVlabs/edm .pkl into that folder, never running its code

All take Hydra key=value overrides, `--help` and Hydra's tab completion (`edm-train -sc install=bash`).
Their configs are the YAML files of configs/ (shipped inside the package as edm/configs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["CONFIG_DIR", "fail"]


def _config_dir() -> str:
    """The Hydra configs: edm/configs in an installed wheel, else configs/ at the top of the repo
    (a checkout or an editable install; Hydra names the folder if it is missing)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "configs"
    return str(packaged if (packaged / "train.yaml").is_file() else package.parent / "configs")


CONFIG_DIR = _config_dir()


def fail(program: str, err: BaseException) -> NoReturn:
    """End a command on an error whose message says what to do: `program: error: ...` on stderr, exit 1."""
    print(f"{program}: error: {err}", file=sys.stderr)
    raise SystemExit(1) from None
