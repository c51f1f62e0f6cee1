"""Training history: hyperparameters and log likelihood against optimiser iteration."""

from __future__ import annotations

import numpy as np

from hyperspy_gp.plotting._inputs import gp_metadata, is_reconstruction, reconstructed_components

__all__ = ["plot_history"]

#: Line styles of the length scales along the scan axes (numpy order: y, x).
_AXIS_STYLES = ("-", "--", ":")


def plot_history(rec, all_b: bool = False):
    """Plot the hyperparameters and the log likelihood of a GP fit against iteration.

    Four panels sharing the iteration axis (iteration 0 is the starting point of the
    L-BFGS-B optimiser): the length scales (one line per scan axis, and per map in
    independent mode, where each map has its own), the noise variance of each map,
    the task covariance ``B`` (its diagonal: each map's signal variance; with
    `all_b` also the off-diagonal entries) and the log marginal likelihood (one line
    per independent GP, or the joint one of the parallel GP).

    Noise, ``B`` and the likelihood are those of the *standardised* maps the GP is
    fitted to (each map scaled to mean 0, variance 1), as recorded during training:
    a noise variance of 0.1 means 10 % of the map's variance.  The final values in map
    units are in ``rec.hyperparameters``; the likelihoods differ by a constant.

    Parameters
    ----------
    rec : GPReconstruction or signal
        The result of :func:`hyperspy_gp.gp_reconstruct`, or its ``signal`` or
        ``loadings`` (the history is in ``metadata.GP_reconstruction.history``, so
        this works after saving and loading them).
    all_b : bool
        Also draw the off-diagonal entries ``B_ij`` (dashed) of a parallel GP.

    Returns
    -------
    matplotlib.figure.Figure
        A pyplot figure with four axes; close it with ``plt.close(fig)``.

    Raises
    ------
    TypeError
        If `rec` is neither a reconstruction nor a signal produced by one.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from hyperspy_gp import gp_reconstruct
    >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
    >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
    >>> s.decomposition(output_dimension=2, print_info=False)
    >>> rec = gp_reconstruct(s, components=2, mode="independent")
    >>> fig = plot_history(rec)
    >>> [ax.get_title() for ax in fig.axes]
    ['Length scales', 'Noise variance', 'Signal variance (diagonal of B)', 'Log marginal likelihood']
    >>> len(fig.axes[0].lines)  # 2 maps x 2 scan axes
    4
    >>> plt.close(fig)
    """
    import matplotlib.pyplot as plt

    history, labels, axes_names = _read(rec)
    n_iter = history["log_likelihood"].shape[0]
    iterations = np.arange(n_iter)
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(7.0, 9.0), layout="constrained")
    _lengthscale_panel(axes[0], iterations, history["lengthscale"], labels, axes_names)
    _per_map_panel(axes[1], iterations, _per_map(history["noise"]), labels, "Noise variance",
                   "noise variance\n(map variance = 1)", log=True)
    _b_panel(axes[2], iterations, history["task_covariance"], labels, all_b)
    _likelihood_panel(axes[3], iterations, history["log_likelihood"], labels)
    axes[-1].set_xlabel("L-BFGS-B iteration (0 = start)")
    fig.suptitle(f"GP training history ({n_iter - 1} iterations)")
    return fig


def _read(rec) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """History arrays, map labels and scan-axis names (numpy order)."""
    node = gp_metadata(rec, "plot_history")
    if is_reconstruction(rec) and rec.history:
        history = rec.history
    else:
        history = node.history.as_dictionary()
    history = {k: np.asarray(v) for k, v in history.items()}
    labels = [f"component {c}" for c in reconstructed_components(rec, "plot_history")]
    names = [str(n) for n in node.hyperparameters.get_item("axes_names", [])]
    return history, labels, names


def _per_map(values: np.ndarray) -> np.ndarray:
    """``(I, P, T)`` → ``(I, maps)``: one of ``P`` (parallel) and ``T`` (independent) is 1."""
    return values.reshape(values.shape[0], -1)


def _colour(i: int):
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[i % len(cycle)]


def _lengthscale_panel(ax, iterations, lengthscale: np.ndarray, labels, axes_names) -> None:
    n_models, n_axes = lengthscale.shape[1:]
    if n_axes == 1:
        axes_names = [" = ".join(axes_names) if axes_names else "isotropic"]
    elif len(axes_names) != n_axes:
        axes_names = [f"axis {d}" for d in range(n_axes)]
    for p in range(n_models):
        owner = labels[p] if n_models == len(labels) else "shared"
        for d in range(n_axes):
            ax.plot(iterations, lengthscale[:, p, d], color=_colour(p), linestyle=_AXIS_STYLES[d % 3],
                    label=f"{owner}, {axes_names[d]}")
    ax.set_title("Length scales")
    ax.set_ylabel("length scale\n(scan pixels)")
    ax.legend(fontsize="small", ncols=2)


def _per_map_panel(ax, iterations, values: np.ndarray, labels, title: str, ylabel: str, log: bool) -> None:
    for i in range(values.shape[1]):
        ax.plot(iterations, values[:, i], color=_colour(i), label=labels[i] if i < len(labels) else f"map {i}")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log and np.all(values > 0):
        ax.set_yscale("log")
    ax.legend(fontsize="small", ncols=2)


def _b_panel(ax, iterations, task_covariance: np.ndarray, labels, all_b: bool) -> None:
    diagonal = _per_map(np.diagonal(task_covariance, axis1=-2, axis2=-1))
    title = "Signal variance (diagonal of B)"
    _per_map_panel(ax, iterations, diagonal, labels, title, "B entry\n(map variance = 1)", log=not all_b)
    n_tasks = task_covariance.shape[-1]
    if all_b and n_tasks > 1:
        for i, j in zip(*np.triu_indices(n_tasks, k=1)):
            ax.plot(iterations, task_covariance[:, 0, i, j], color=_colour(i), linestyle="--",
                    linewidth=0.9, label=f"B[{i}, {j}]")
        ax.set_title("Task covariance B (solid: diagonal, dashed: B[i, j])")
        ax.legend(fontsize="small", ncols=3)


def _likelihood_panel(ax, iterations, loglik: np.ndarray, labels) -> None:
    n_models = loglik.shape[1]
    names = labels if n_models == len(labels) else ["joint (parallel GP)"]
    _per_map_panel(ax, iterations, loglik, names, "Log marginal likelihood",
                   "log likelihood\n(standardised maps)", log=False)
