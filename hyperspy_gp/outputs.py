"""HyperSpy signals from a GP fit of loading maps.

The reconstructed spectrum image (GP maps × factors, + the decomposition mean) on the
upsampled navigation axes, eager or as a lazy dask array built chunk by chunk, and the
stack of GP maps with their variance in ``metadata.Signal.Noise_properties.variance``.
Settings, hyperparameters and history go to ``metadata.GP_reconstruction``.
"""

from __future__ import annotations

import numpy as np

from hyperspy_gp import _hyperspy as hsglue
from hyperspy_gp.maps_gp import MapsFit
from hyperspy_gp.request import Request


def build_outputs(signal, decomposition, fit: MapsFit, request: Request, lazy: bool, isotropic: bool):
    """The output signals of ``signal``'s reconstruction.

    Parameters
    ----------
    signal
        The input spectrum image (read, never modified).
    decomposition
        Its chosen components (:class:`hyperspy_gp._hyperspy.Decomposition`).
    fit
        The GP fit of their maps.
    request
        The validated request.
    lazy, isotropic
        Lazy spectrum image; whether the length scales were tied.

    Returns
    -------
    tuple
        ``(spectrum image, GP loadings with variance, hyperparameters)``, the first
        three fields of :class:`hyperspy_gp.GPReconstruction`.

    Examples
    --------
    >>> from hyperspy_gp import _hyperspy as hsglue
    >>> from hyperspy_gp.maps_gp import fit_and_predict_maps
    >>> from hyperspy_gp.request import validate_request
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(8, 8), n_channels=16, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> request = validate_request(s, 2, "parallel", 2, None, "separable", 1, "auto", "cpu", "float64", None)
    >>> decomposition = hsglue.read_decomposition(s, request.components)
    >>> fit = fit_and_predict_maps(decomposition.maps, request, False, 1000, 1e-9, False)
    >>> spectra, loadings, hyper = build_outputs(s, decomposition, fit, request, False, False)
    >>> spectra.axes_manager.navigation_shape, loadings.data.shape
    ((16, 16), (2, 16, 16))
    """
    nav_axes = hsglue.navigation_axes(signal)
    scales = np.array([a.scale for a in nav_axes])
    hyper = dict(fit.hyperparameters)
    hyper["lengthscale_calibrated"] = hyper["lengthscale_px"] * scales
    hyper["axes_names"] = [str(a.name) for a in nav_axes]
    hyper["axes_units"] = [str(a.units) for a in nav_axes]
    settings = {
        "mode": request.mode,
        "kernel": request.kernel,
        "components": list(decomposition.components),
        "upsampling": request.upsampling,
        "lengthscale_bounds": "None" if request.lengthscale_bounds is None else
        [np.nan if b is None else b for b in request.lengthscale_bounds],
        "isotropic": bool(isotropic),
        "rank": request.rank if request.mode == "parallel" else 0,
        "solver": request.solver,
        "missing_pixels": request.n_missing,
        # How the missing pixels on the kept lines were handled: "dense", "schur", "schur-cg", "iterative"
        # or "none".
        "masked_solver": "none" if request.observed is None else request.masked_solver,
        # Scan lines without data, left out of the fit (per axis, numpy order).
        "skipped_lines": request.skipped_lines(decomposition.maps.shape[:-1]),
    }
    if request.lengthscale_scan is not None:
        settings["lengthscale_bounds_requested"] = "auto"
        settings["lengthscale_scan"] = request.lengthscale_scan.as_dictionary()
    gp_metadata = {"settings": settings, "hyperparameters": hyper, "history": fit.history}
    up_axes = hsglue.upsampled_axis_dicts(nav_axes, request.upsampling)
    loadings = _loadings_signal(signal, fit, up_axes, gp_metadata)
    reconstructed = _spectrum_image(signal, decomposition, fit, up_axes, gp_metadata, lazy)
    return reconstructed, loadings, hyper


def _component_axis(n: int) -> dict:
    return {"name": "Decomposition component index", "units": "", "size": n, "navigate": True}


def _loadings_signal(signal, fit: MapsFit, up_axes, gp_metadata):
    def stack(data, title):
        axes = [_component_axis(data.shape[-1])] + [dict(a, navigate=False) for a in up_axes]
        md = {"General": {"title": title}, "Signal": {"signal_type": ""}}
        return hsglue.build_signal(np.ascontiguousarray(np.moveaxis(data, -1, 0)), axes, md)

    title = signal.metadata.General.title or "signal"
    maps = stack(fit.mean, f"GP loadings of {title}")
    maps.metadata.set_item("Signal.Noise_properties.variance", stack(fit.variance, f"GP loadings variance of {title}"))
    maps.metadata.set_item("GP_reconstruction", gp_metadata)
    return maps


def _spectrum_image(signal, decomposition, fit: MapsFit, up_axes, gp_metadata, lazy: bool):
    maps, factors, mean = fit.mean, decomposition.factors, decomposition.mean
    data = _lazy_cube(maps, factors, mean) if lazy else _cube_block(maps, factors.T, mean)
    sig_axis = hsglue.axis_dict(signal.axes_manager.signal_axes[0], navigate=False)
    md = hsglue.metadata_dict(signal)
    md.setdefault("General", {})["title"] = f"{signal.metadata.General.title} (GP reconstruction)".strip()
    md.pop("_HyperSpy", None)
    out = hsglue.build_signal(data, up_axes + [sig_axis], md, hsglue.original_metadata_dict(signal), lazy=lazy)
    hsglue.set_learning_results(out, maps.reshape(-1, maps.shape[-1]), factors, mean, decomposition.algorithm)
    out.metadata.set_item("GP_reconstruction", gp_metadata)
    out.metadata.set_item("GP_reconstruction.loadings_variance", np.moveaxis(fit.variance, -1, 0))
    return out


def _lazy_cube(maps: np.ndarray, factors: np.ndarray, mean: np.ndarray | None):
    """``maps @ factors.T (+ mean)`` as a dask array built one navigation chunk per task.

    As HyperSpy's ``get_decomposition_model(lazy_output=True)``: the whole signal axis
    in every chunk, navigation chunks sized by dask's ``array.chunk-size`` setting, so
    computing or saving it holds a few chunks at a time, never the cube.
    """
    import dask.array as da

    dtype = np.result_type(maps, factors, *([] if mean is None else [mean]))
    shape = maps.shape[:-1] + factors.shape[:1]
    chunks = da.core.normalize_chunks(("auto",) * (maps.ndim - 1) + (-1,), shape, dtype=dtype)
    lazy_maps = da.from_array(maps, chunks=chunks[:-1] + (-1,))
    return da.map_blocks(_cube_block, lazy_maps, factors.T, mean, chunks=chunks, dtype=dtype)


def _cube_block(maps: np.ndarray, factors_t: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Spectra of a block of maps ``(..., T)``: ``maps @ factors_t``, plus the mean."""
    out = maps @ factors_t
    if mean is not None:
        out += mean
    return out
