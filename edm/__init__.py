"""edm: diffusion and flow matching in one EDM core (Karras et al. 2022).

x(t) = s(t)·(y + σ(t)·n); a schedule is the pair σ(t), s(t); a preconditioned denoiser
D(x̂; σ) = c_skip x̂ + c_out F(c_in x̂; c_noise) serves every schedule; one loss family
and one set of ODE/SDE samplers work with all of them.

The package, floor by floor (each imports only from the floors below it, with one exception: edm.core's
Precond builds EDM2's uncertainty head from edm.networks' magnitude-preserving layers, imported when asked for):
  edm.choices, edm.hardware, edm.files, edm.progress   generic helpers
  edm.provenance  what made an output folder (its record), what a training run's folder holds
  edm.latent      EDM2's latent map and the VAE between pixels and latents (diffusers, optional)
  edm.core        the paper's math: schedules, precond, losses, samplers, denoisers, likelihood
  edm.networks    the U-Nets (DDPM++/NCSN++, ADM, EDM2) and the FID Inception
  edm.data        data sets, data order, augmentation
  edm.models      model files: checkpoints, model folders, NVlabs snapshots, and load_model
  edm.generation  image generation: seeds, batches, outputs
  edm.evaluation  metrics (FID, precision/recall, FD_cls, bits/dim) and the NFE study
  edm.training    training configs, the step, the run and its loop
  edm.cli         the commands
"""

from .core import denoisers, likelihood, losses, precond, samplers, schedules
from .core.denoisers import IdealDenoiser
from .core.losses import Loss
from .core.precond import Precond
from .core.samplers import sample
from . import latent, networks
from .files import package_version
from .evaluation import metrics, quality
from .generation import outputs, sampling
from .models import loading
from .models.nvlabs import load_nvlabs

__version__ = package_version()  # pyproject.toml's

__all__ = [
    "schedules",
    "samplers",
    "losses",
    "precond",
    "denoisers",
    "networks",
    "latent",
    "sampling",
    "loading",
    "outputs",
    "metrics",
    "quality",
    "likelihood",
    "Precond",
    "IdealDenoiser",
    "Loss",
    "sample",
    "load_nvlabs",
    "__version__",
]
