"""eoc_dit — Error-Optimized Cache (EOC, arXiv 2501.19243) for Diffusion Transformers.

The DiT integration of eoc-kernels: the DiT model, DDIM/DDPM samplers, caching schedules,
calibration of the EOC prior, and ``apply_eoc`` which patches a model to sample with cached,
corrected features. The ops themselves live in ``eoc_kernels``.
"""

from .adapters import BlockAdapter, DiTAdapter, DiTBlockAdapter, ModelAdapter
from .calibration import calibrate
from .config import EOCConfig
from .diffusion import DDIMSampler, DDPMSampler, noise_for_seed, sample_pairs
from .fitting import fit_coefficients
from .models import DiT, DiT_models, load_dit
from .patching import EOCHandle, apply_eoc, remove_eoc
from .prior import CoefficientFit, Prior, model_fingerprint
from .schedules import FORASchedule, MaskSchedule, TaylorSeerSchedule

__version__ = "0.1.0"

__all__ = [
    "BlockAdapter", "DiTAdapter", "DiTBlockAdapter", "ModelAdapter", "EOCConfig", "DDIMSampler", "DDPMSampler",
    "DiT", "DiT_models", "load_dit", "fit_coefficients", "CoefficientFit", "EOCHandle", "apply_eoc", "remove_eoc",
    "Prior", "calibrate",
    "model_fingerprint", "noise_for_seed", "FORASchedule", "MaskSchedule", "TaylorSeerSchedule",
    "sample_pairs",
]
