"""Figures of GP reconstructions.

* :func:`plot_reconstruction_summary`: original vs GP maps, GP std and spectra at a glance;
* :func:`plot_history`: hyperparameters and likelihood against optimiser iteration;
* :func:`plot_rgb_composite` / :func:`rgb_composite`: three maps as one RGB image;
* :func:`plot_maps_with_uncertainty`: each GP map next to its predictive std;
* :func:`plot_spectrum_with_band` / :func:`spectrum_std`: the reconstructed spectrum at a
  pixel with its ±2σ band.

Every function returns a matplotlib figure (close it with ``plt.close(fig)``).
matplotlib is imported inside the functions, so importing this package is cheap.
"""

from hyperspy_gp.plotting.history import plot_history
from hyperspy_gp.plotting.maps import plot_maps_with_uncertainty, plot_rgb_composite, rgb_composite
from hyperspy_gp.plotting.spectra import plot_spectrum_with_band, spectrum_std
from hyperspy_gp.plotting.summary import (
    DATA_COLOUR,
    DISPLAY_UNITS,
    GP_COLOUR,
    LENGTH_UNITS,
    plot_reconstruction_summary,
)

__all__ = [
    "plot_reconstruction_summary",
    "plot_history",
    "plot_rgb_composite",
    "rgb_composite",
    "plot_maps_with_uncertainty",
    "plot_spectrum_with_band",
    "spectrum_std",
    "GP_COLOUR",
    "DATA_COLOUR",
    "LENGTH_UNITS",
    "DISPLAY_UNITS",
]
