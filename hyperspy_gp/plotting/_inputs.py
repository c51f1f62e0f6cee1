"""What the figures accept: a GPReconstruction, or one of its signals (also after save→load)."""

from __future__ import annotations

import numpy as np

#: The metadata node ``gp_reconstruct`` writes on its output signals.
GP_NODE = "GP_reconstruction"


def is_reconstruction(obj) -> bool:
    """Duck-typed :class:`~hyperspy_gp.GPReconstruction` (no import of the engine)."""
    return hasattr(obj, "signal") and hasattr(obj, "loadings") and hasattr(obj, "history")


def gp_metadata(obj, what: str):
    """The ``metadata.GP_reconstruction`` node of ``obj`` (a reconstruction or a signal)."""
    signal = obj.loadings if is_reconstruction(obj) else obj
    metadata = getattr(signal, "metadata", None)
    if metadata is None or not metadata.has_item(GP_NODE):
        raise TypeError(
            f"{what} needs a GPReconstruction (from gp_reconstruct) or a signal it produced "
            f"(rec.signal or rec.loadings, also after saving and loading), not {type(obj).__name__}."
        )
    return metadata.get_item(GP_NODE)


def reconstructed_components(obj, what: str) -> list[int]:
    """Decomposition component indices of the reconstructed maps, in loadings order."""
    return [int(c) for c in gp_metadata(obj, what).settings.components]


def choose_rows(done: list[int], components, what: str) -> list[tuple[int, int]]:
    """``(component, row)`` pairs of the requested components (default: all)."""
    wanted = done if components is None else [int(c) for c in np.atleast_1d(components)]
    missing = [c for c in wanted if c not in done]
    if missing:
        raise ValueError(f"{what}: components {missing} were not reconstructed; reconstructed: {done}.")
    return [(c, done.index(c)) for c in wanted]


def text(value) -> str:
    """A HyperSpy axis name or units, ``""`` when undefined."""
    return value if isinstance(value, str) and value != "<undefined>" else ""


def label(name: str, units: str) -> str:
    """``"name (units)"``, or ``name`` without units."""
    return f"{name} ({units})" if units else name


def axis_label(axis) -> str:
    """Label of a HyperSpy axis: its name (or "axis") and its units."""
    return label(text(axis.name) or "axis", text(axis.units))


def check_pixel(pixel, shape, grid: str) -> tuple[int, ...]:
    """``pixel`` as ints, if it lies inside ``shape`` (numpy order); else a ValueError naming ``grid``."""
    pixel = tuple(int(p) for p in pixel)
    if len(pixel) != len(shape) or not all(0 <= p < n for p, n in zip(pixel, shape)):
        raise ValueError(f"pixel {pixel} is outside the {grid} of shape {tuple(shape)} (numpy order: row, column).")
    return pixel


def image_extent(x: np.ndarray, x_step: float, y: np.ndarray, y_step: float) -> tuple[float, float, float, float]:
    """imshow extent (pixel edges, calibrated) with the first row at the top."""
    return (x[0] - x_step / 2, x[-1] + x_step / 2, y[-1] + y_step / 2, y[0] - y_step / 2)


def as_numpy(array) -> np.ndarray:
    return np.asarray(array.compute() if hasattr(array, "compute") else array)
