"""HyperSpy signal classes provided by hyperspy_gp.

Importing this subpackage does not import torch or gpytorch.
"""

from hyperspy_gp.signals.eels_gp import EELSGPSpectrum, LazyEELSGPSpectrum
from hyperspy_gp.signals.mixin import GPReconstructionMixin

__all__ = ["EELSGPSpectrum", "LazyEELSGPSpectrum", "GPReconstructionMixin"]
