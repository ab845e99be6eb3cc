"""edm: diffusion and flow matching in one EDM core (Karras et al. 2022).

x(t) = s(t)·(y + σ(t)·n); a schedule is the pair σ(t), s(t); a preconditioned denoiser
D(x̂; σ) = c_skip x̂ + c_out F(c_in x̂; c_noise) serves every schedule; one loss family
and one set of ODE/SDE samplers work with all of them.
"""

from . import denoisers, likelihood, loading, losses, metrics, networks, outputs, precond, samplers, sampling, schedules
from .denoisers import IdealDenoiser
from .losses import Loss
from .nvlabs import load_nvlabs
from .precond import Precond
from .samplers import sample

__version__ = "0.1.0"

__all__ = [
    "schedules",
    "samplers",
    "losses",
    "precond",
    "denoisers",
    "networks",
    "sampling",
    "loading",
    "outputs",
    "metrics",
    "likelihood",
    "Precond",
    "IdealDenoiser",
    "Loss",
    "sample",
    "load_nvlabs",
]
