"""EELS spectrum-image signal classes with Gaussian-process reconstruction.

The classes are registered with HyperSpy under the signal type ``"EELS_GP"``
(see ``hyperspy_gp/hyperspy_extension.yaml``). They are exspy's EELS classes
plus :class:`~hyperspy_gp.signals.mixin.GPReconstructionMixin`, so every
exspy EELS method and all EELS metadata keep working.

Importing this module does not import torch or gpytorch.
"""

from exspy.signals import EELSSpectrum, LazyEELSSpectrum

from hyperspy_gp.signals.mixin import GPReconstructionMixin

__all__ = ["EELSGPSpectrum", "LazyEELSGPSpectrum"]


class EELSGPSpectrum(GPReconstructionMixin, EELSSpectrum):
    """EELS spectrum image with Gaussian-process loading-map reconstruction.

    An :class:`exspy.signals.EELSSpectrum` (all its methods, metadata and
    behaviour are unchanged) that also provides :meth:`gp_reconstruct`, which
    reconstructs the loading maps of a decomposition with Gaussian processes.

    The signal type is ``"EELS_GP"``. This class is not normally instantiated
    directly; instead get it with ``hs.load(path, signal_type="EELS_GP")``,
    or convert an existing EELS signal in place with
    ``s.set_signal_type("EELS_GP")`` (``s.set_signal_type("EELS")`` converts
    it back to :class:`exspy.signals.EELSSpectrum`).

    Parameters
    ----------
    *args, **kwargs
        As for :class:`exspy.signals.EELSSpectrum`: the data array and the
        axes, metadata and original metadata of a HyperSpy signal.

    See Also
    --------
    hyperspy_gp.gp_reconstruct, exspy.signals.EELSSpectrum

    Examples
    --------
    >>> import numpy as np
    >>> import exspy
    >>> s = exspy.signals.EELSSpectrum(np.ones((2, 3, 10)))
    >>> s.set_signal_type("EELS_GP")
    >>> s
    <EELSGPSpectrum, title: , dimensions: (3, 2|10)>
    """

    _signal_type = "EELS_GP"
    # exspy's "TEM EELS" alias belongs to "EELS", not to us: do not inherit it.
    _alias_signal_types = []


class LazyEELSGPSpectrum(EELSGPSpectrum, LazyEELSSpectrum):
    """Lazy EELS spectrum image with Gaussian-process reconstruction.

    The lazy twin of :class:`EELSGPSpectrum`, declared like exspy's
    ``LazyEELSSpectrum(EELSSpectrum, LazySignal1D)``: the eager class first,
    then the lazy parent. The computation is delayed until explicitly
    requested.

    This class is not expected to be instantiated directly, instead use
    ``hs.load(path, signal_type="EELS_GP", lazy=True)`` or the
    ``as_lazy()`` method of an :class:`EELSGPSpectrum`.

    Parameters
    ----------
    *args, **kwargs
        As for :class:`exspy.signals.LazyEELSSpectrum`: a dask array and the
        axes, metadata and original metadata of a HyperSpy signal.

    Examples
    --------
    >>> import numpy as np
    >>> import exspy
    >>> s = exspy.signals.EELSSpectrum(np.ones((2, 3, 10)))
    >>> s.set_signal_type("EELS_GP")
    >>> s.as_lazy()
    <LazyEELSGPSpectrum, title: , dimensions: (3, 2|10)>
    """
