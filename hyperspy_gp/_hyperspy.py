"""All contact with HyperSpy internals lives here.

Reading decomposition results, building output signals with the right class and
axes, and HyperSpy preferences.  Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np


@dataclass
class Decomposition:
    """The parts of ``signal.learning_results`` a reconstruction needs.

    Attributes
    ----------
    maps
        Loading maps ``(*nav_shape_numpy, T)`` of the chosen components (a copy).
    factors
        Spectral factors ``(sig_size, T)`` of the chosen components (a copy).
    mean
        Mean spectrum ``(sig_size,)`` removed by ``centre="navigation"``, else ``None``.
    components
        The chosen component indices.
    algorithm
        The decomposition algorithm's name, as HyperSpy recorded it.
    """

    maps: np.ndarray
    factors: np.ndarray
    mean: np.ndarray | None
    components: list[int]
    algorithm: str | None


def has_decomposition(signal) -> bool:
    lr = getattr(signal, "learning_results", None)
    return lr is not None and lr.loadings is not None and lr.factors is not None


def is_lazy(signal) -> bool:
    """Whether ``signal`` holds a dask array (a ``Lazy*`` signal class)."""
    return bool(signal._lazy)


def navigation_shape(signal) -> tuple[int, ...]:
    """Navigation shape in numpy (array) order, e.g. ``(ny, nx)``."""
    return tuple(signal.axes_manager._navigation_shape_in_array)


def read_decomposition(signal, components: list[int]) -> Decomposition:
    """Copy the chosen components out of ``signal.learning_results`` (never modified).

    After a lazy decomposition the learning results may be dask arrays (e.g.
    ``svd_solver="full"``); only the chosen columns are computed, loadings, factors and
    mean together in one ``dask.compute`` so that a graph they share runs once.

    A mean is added back when HyperSpy stored one per channel: ``centre="navigation"``,
    and lazy ``algorithm="PCA"``, which keeps scikit-learn's ``mean_`` with
    ``centre=None``.
    """
    lr = signal.learning_results
    if lr.centre == "signal":
        raise NotImplementedError(_SIGNAL_CENTRE_MESSAGE)
    nav_shape = navigation_shape(signal)
    loadings, factors, mean = _compute(lr.loadings[:, components], lr.factors[:, components], lr.mean)
    if mean is not None:
        if mean.size != factors.shape[0]:
            raise NotImplementedError(_SIGNAL_CENTRE_MESSAGE)
        mean = np.array(mean, dtype=np.float64).reshape(-1)
    maps = np.array(loadings, copy=True).reshape(*nav_shape, len(components))
    return Decomposition(maps, np.array(factors, copy=True), mean, list(components), lr.decomposition_algorithm)


_SIGNAL_CENTRE_MESSAGE = (
    "The decomposition was centred with centre='signal' (a mean per pixel), "
    "which a GP reconstruction cannot upsample yet. Run "
    "s.decomposition(centre=None) or s.decomposition(centre='navigation')."
)


def n_decomposition_components(signal) -> int:
    return int(signal.learning_results.loadings.shape[1])


def _compute(*arrays):
    """numpy versions of ``arrays`` (``None`` kept); dask ones in a single compute."""
    import dask

    return tuple(None if a is None else np.asarray(a) for a in dask.compute(*arrays))


def navigation_axes(signal) -> list:
    """Navigation axes in numpy (array) order."""
    return list(signal.axes_manager.navigation_axes[::-1])


def upsampled_axis_dicts(axes, upsampling: int) -> list[dict]:
    """Axis dictionaries with ``size·u`` points and ``scale/u``; offsets are kept.

    Original pixel ``i`` then sits at index ``i·u`` with the same coordinate.
    """
    out = []
    for axis in axes:
        d = axis.get_axis_dictionary()
        d = {k: v for k, v in d.items() if k in ("name", "units", "navigate", "scale", "offset", "size")}
        d.update(size=axis.size * upsampling, scale=axis.scale / upsampling, offset=axis.offset)
        out.append(d)
    return out


def axis_dict(axis, navigate: bool) -> dict:
    d = axis.get_axis_dictionary()
    d["navigate"] = navigate
    return d


def build_signal(data, axes: list[dict], metadata: dict, original_metadata: dict | None = None, lazy: bool = False):
    """A signal of the class HyperSpy assigns to ``metadata`` (as ``hs.load`` does)."""
    from hyperspy.io import dict2signal

    signal_dict = {
        "data": data,
        "axes": axes,
        "metadata": copy.deepcopy(metadata),
        "original_metadata": copy.deepcopy(original_metadata or {}),
    }
    return dict2signal(signal_dict, lazy=lazy)


def metadata_dict(signal) -> dict:
    return signal.metadata.as_dictionary()


def original_metadata_dict(signal) -> dict:
    return signal.original_metadata.as_dictionary()


def set_learning_results(signal, loadings: np.ndarray, factors: np.ndarray, mean, algorithm) -> None:
    """Give ``signal`` decomposition results (HyperSpy's own layout)."""
    lr = signal.learning_results
    lr.loadings = loadings
    lr.factors = factors
    lr.output_dimension = factors.shape[1]
    lr.decomposition_algorithm = f"GP reconstruction of {algorithm}" if algorithm else "GP reconstruction"
    if mean is not None:
        lr.centre = "navigation"
        lr.mean = mean.reshape(1, -1)


def resolve_show_progressbar(show_progressbar: bool | None) -> bool:
    """``None`` follows ``hs.preferences.General.show_progressbar``."""
    if show_progressbar is not None:
        return bool(show_progressbar)
    from hyperspy.defaults_parser import preferences

    return bool(preferences.General.show_progressbar)


def clear_learning_results(signal) -> None:
    """Drop ``signal``'s decomposition results (e.g. after its data changed)."""
    from hyperspy.learn import LearningResults

    signal.learning_results = LearningResults()


def dask_progressbar(show: bool):
    """dask's progress bar when ``show`` (as HyperSpy's lazy signals), else a null context."""
    if not show:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar()
