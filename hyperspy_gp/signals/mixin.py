"""Mixin adding Gaussian-process reconstruction to HyperSpy signal classes.

The mixin is a plain class (no HyperSpy base class), so it can be combined with
any signal class, e.g. ``class EELSGPSpectrum(GPReconstructionMixin,
EELSSpectrum)``. It holds no state and defines no ``__init__``.
"""


class GPReconstructionMixin:
    """Add :meth:`gp_reconstruct` to a HyperSpy signal class."""

    def gp_reconstruct(
        self,
        components=None,
        mode="parallel",
        upsampling=1,
        lengthscale_bounds=None,
        isotropic=False,
        **kwargs,
    ):
        """Reconstruct decomposition loading maps with Gaussian processes.

        This is a thin wrapper around :func:`hyperspy_gp.gp_reconstruct`
        called with this signal as its first argument; see there for the
        full description of the algorithm and of every option.

        Parameters
        ----------
        components : int, iterable of int or None, default None
            The decomposition components whose loading maps are
            reconstructed. None selects the engine's default.
        mode : str, default "parallel"
            How the components are fitted (see
            :func:`hyperspy_gp.gp_reconstruct` for the accepted values).
        upsampling : int, default 1
            Integer factor by which the navigation grid of the
            reconstructed maps is refined; 1 keeps the original grid.
        lengthscale_bounds : tuple of float or None, default None
            Lower and upper bounds on the GP kernel lengthscale, in
            navigation-axis units. None uses the engine's default.
        isotropic : bool, default False
            If True, use one lengthscale for both navigation axes,
            otherwise one per axis.
        **kwargs
            Passed on unchanged to :func:`hyperspy_gp.gp_reconstruct`;
            see there.

        Returns
        -------
        GPReconstruction
            The result object returned by
            :func:`hyperspy_gp.gp_reconstruct`.

        See Also
        --------
        hyperspy_gp.gp_reconstruct
        """
        # Imported here so that importing the signal classes (which HyperSpy
        # does on ``hs.load(..., signal_type="EELS_GP")``) never imports torch.
        from hyperspy_gp.reconstruct import gp_reconstruct

        return gp_reconstruct(
            self,
            components=components,
            mode=mode,
            upsampling=upsampling,
            lengthscale_bounds=lengthscale_bounds,
            isotropic=isotropic,
            **kwargs,
        )
