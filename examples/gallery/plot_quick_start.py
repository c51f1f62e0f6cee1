"""
Quick start: denoise and upsample an EELS spectrum image
========================================================

The whole workflow on a synthetic atomic-resolution EELS spectrum image of a
perovskite (Ti L\\ :sub:`2,3`, O K and Mn L\\ :sub:`2,3` edges, Poisson noise):
decompose with HyperSpy, reconstruct the loading maps with a Gaussian process at
2× the scan density, and look at the maps, their uncertainty and the spectra.
"""

# %%
# Make the data
# -------------
# :func:`~hyperspy_gp.synthetic.atomic_eels_spectrum_image` returns an exSpy
# ``EELSSpectrum`` with calibrated axes (nm, eV); with a real file you would use
# ``hs.load("file.dm4", signal_type="EELS_GP")`` instead.
import matplotlib.pyplot as plt

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.plotting import plot_reconstruction_summary
from hyperspy_gp.synthetic import atomic_eels_spectrum_image

s = atomic_eels_spectrum_image(shape=(32, 32), n_channels=150, energy_scale=2.0, seed=0)
s.set_signal_type("EELS_GP")  # exSpy's EELSSpectrum plus the gp_reconstruct method
print(s)

# %%
# Decompose
# ---------
# The counts are Poisson distributed, so the SVD is weighted for Poisson noise.  The
# scree plot shows three components well above the noise floor.
s.decomposition(algorithm="SVD", normalize_poissonian_noise=True, print_info=False)
ax = s.plot_explained_variance_ratio(n=20)

# %%
# Reconstruct
# -----------
# One parallel (multi-output) GP for the first four loading maps, predicted on a grid
# twice as dense.  The fourth component is noise: the GP recognises it (its fitted
# noise is as large as the map) and flattens it, so taking one component too many is
# harmless.
rec = s.gp_reconstruct(components=4, mode="parallel", upsampling=2)
print(rec.signal)
print("length scales (px):", rec.hyperparameters["lengthscale_px"][0])
print("length scales (nm):", rec.hyperparameters["lengthscale_calibrated"][0])

# %%
# Look at the result
# ------------------
# Original loading maps, GP means and GP standard deviations, and the spectrum at the
# centre pixel: raw counts against the GP reconstruction.
fig = plot_reconstruction_summary(s, rec, max_components=3)

# %%
# The same with the function
# --------------------------
# :func:`hyperspy_gp.gp_reconstruct` takes any ``Signal1D`` with decomposition
# results (EELS, CL, EDS, ...), so the signal type is optional.  Everything the fit
# found is stored in the metadata, which survives ``save`` and ``load``.
rec_fn = gp_reconstruct(s, components=3, mode="parallel", upsampling=2)
print(rec_fn.signal.metadata.GP_reconstruction.settings)

# %%
# The reconstructed signal keeps HyperSpy's decomposition results (the GP maps and the
# original factors), so HyperSpy's own tools work on it:
rec_fn.signal.plot_decomposition_loadings(comp_ids=3, axes_decor="off")
plt.show()
