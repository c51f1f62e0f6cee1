"""
Lazy data: reconstruct and write to .zspy chunk by chunk
========================================================

A lazy spectrum image is a dask array that is never loaded whole.  The GP itself
only needs the loading maps (pixels × components, small), so a lazy workflow is:
decompose lazily, fit the GP, and let the reconstructed spectrum image stay lazy
(``lazy_output=True``, the default for lazy input) so that ``save`` computes and
writes it chunk by chunk.  The prediction of the GP maps runs as dask tasks over
chunks of rows, on whichever dask scheduler is active.
"""

# %%
# A lazy spectrum image
# ---------------------
# ``lazy=True`` builds the data as a dask array, chunked over scan rows; nothing is
# computed yet.  With a real file: ``hs.load("big.zspy", lazy=True)``.
import tempfile
from pathlib import Path

import hyperspy.api as hs
import matplotlib.pyplot as plt
import numpy as np

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.synthetic import atomic_eels_spectrum_image

s = atomic_eels_spectrum_image(shape=(32, 32), n_channels=150, energy_scale=2.0, seed=0,
                               lazy=True, chunk_rows=16)
print(s)
print(s.data)

# %%
# Decompose lazily
# ----------------
# HyperSpy's lazy decomposition streams over the chunks.  The incremental SVD is exact
# and deterministic; the default ``svd_solver="randomized"`` is faster on large data
# but gives slightly different loading maps at every run.
s.decomposition(algorithm="SVD", svd_solver="incremental", output_dimension=6,
                normalize_poissonian_noise=True, print_info=False)

# %%
# Reconstruct at 2× the scan density
# ----------------------------------
# ``chunks`` sets how many rows of the upsampled grid each prediction task computes
# (by default enough to keep each task's temporaries under 64 MB).  The output signal
# is lazy: its data is ``GP maps @ factorsᵀ`` as a dask array.
rec = gp_reconstruct(s, components=3, upsampling=2, chunks=16)
print(rec.signal)
print(rec.signal.data)

# %%
# Write to .zspy and load it back
# -------------------------------
# ``save`` computes the reconstructed spectrum image one chunk at a time.  The GP
# hyperparameters, settings and training history travel in the metadata.
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "reconstruction.zspy"
    rec.signal.save(path)
    back = hs.load(path, lazy=True)
    print(back)
    print(back.metadata.GP_reconstruction.settings)
    hyper = back.metadata.GP_reconstruction.hyperparameters
    print("length scales (px):", np.asarray(hyper.lengthscale_px)[0])
    mean_spectrum = back.mean(axis=(0, 1))
    mean_spectrum.compute()

# %%
# The mean spectrum of the reconstruction, computed from the file:
energy = mean_spectrum.axes_manager.signal_axes[0]
fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
ax.plot(energy.axis, mean_spectrum.data)
ax.set_xlabel(f"{energy.name} ({energy.units})")
ax.set_ylabel("counts")
ax.set_title("Mean spectrum of the lazy GP reconstruction")
plt.show()

# %%
# On a cluster
# ------------
# Prediction tasks run on the current dask scheduler, so with a
# ``dask.distributed`` client they run on its workers::
#
#     from dask.distributed import Client
#     client = Client("scheduler-address:8786")   # or Client() for a local cluster
#     rec = gp_reconstruct(s, components=6, upsampling=4)
#     rec.signal.save("reconstruction.zspy")      # chunks computed on the workers
#
# See :doc:`/user_guide/lazy` for what runs where.
