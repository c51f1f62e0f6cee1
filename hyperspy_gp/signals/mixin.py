"""Mixin adding Gaussian-process reconstruction to HyperSpy signal classes.

The mixin is a plain class (no HyperSpy base class), so it can be combined with
any signal class, e.g. ``class EELSGPSpectrum(GPReconstructionMixin,
EELSSpectrum)``. It holds no state and defines no ``__init__``.
"""


class GPReconstructionMixin:
    """Add :meth:`gp_reconstruct` and its companions to a HyperSpy signal class.

    Examples
    --------
    >>> from exspy.signals import EELSSpectrum
    >>> class MyEELS(GPReconstructionMixin, EELSSpectrum):
    ...     pass
    >>> hasattr(MyEELS, "gp_reconstruct"), issubclass(MyEELS, EELSSpectrum)
    (True, True)
    """

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
        lengthscale_bounds : tuple of float, "auto" or None, default None
            Lower and upper bounds on the GP kernel lengthscale, in pixels
            of the scan. "auto" takes the bounds suggested by
            :meth:`gp_lengthscale_scan`. None uses the engine's default.
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

        Raises
        ------
        ValueError
            As :func:`hyperspy_gp.gp_reconstruct`, e.g. when the signal has
            no decomposition results.

        See Also
        --------
        hyperspy_gp.gp_reconstruct

        Examples
        --------
        >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
        >>> s = atomic_eels_spectrum_image(shape=(12, 12), n_channels=32, seed=0)
        >>> s.set_signal_type("EELS_GP")
        >>> s.decomposition(output_dimension=2, print_info=False)
        >>> rec = s.gp_reconstruct(components=2, upsampling=2)
        >>> rec.signal.axes_manager.navigation_shape
        (24, 24)
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

    def remove_spatial_outliers(self, threshold=8.0, radius=None):
        """Replace spatial outlier spectra by the mean of their valid neighbours.

        A thin wrapper around :func:`hyperspy_gp.outliers.remove_spatial_outliers`
        called with this signal; see there for the statistics used.

        Parameters
        ----------
        threshold : float, default 8.0
            Robust z-score above which a scan pixel is an outlier.
        radius : int or None, default None
            Neighbourhood half-width in pixels; None gives 1 for a 2-D scan
            and 2 for a line scan.

        Returns
        -------
        signal
            A new signal of the same class; this one is not modified.  The
            boolean map of the replaced pixels is in
            ``metadata.Spatial_outliers.mask``.

        See Also
        --------
        hyperspy_gp.outliers.find_spatial_outliers

        Examples
        --------
        >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
        >>> s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
        >>> s.set_signal_type("EELS_GP")
        >>> s.data[3, 4] = 0
        >>> s.remove_spatial_outliers().metadata.Spatial_outliers.n_outliers
        1
        """
        from hyperspy_gp.outliers import remove_spatial_outliers

        return remove_spatial_outliers(self, threshold=threshold, radius=radius)

    def gp_lengthscale_scan(self, components=None, upper_bounds=None, **kwargs):
        """Scan the upper length-scale bound of independent GPs on the loading maps.

        A thin wrapper around
        :func:`hyperspy_gp.lengthscale_scan.lengthscale_scan` called with
        this signal; see there for the method.

        Parameters
        ----------
        components : int, iterable of int or None, default None
            The decomposition components whose loading maps are scanned.
        upper_bounds : sequence of float or None, default None
            Increasing upper bounds in pixels; None gives 12 values from
            1 px to 30 px.
        **kwargs
            Passed on unchanged to
            :func:`hyperspy_gp.lengthscale_scan.lengthscale_scan`.

        Returns
        -------
        LengthscaleScan
            Converged length scales against the bound, their basins and the
            suggested ``lengthscale_bounds``; ``.plot()`` draws the curves.

        See Also
        --------
        hyperspy_gp.lengthscale_scan.lengthscale_scan

        Examples
        --------
        >>> from hyperspy_gp.synthetic import atomic_eels_spectrum_image
        >>> s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
        >>> s.set_signal_type("EELS_GP")
        >>> s.decomposition(output_dimension=2, print_info=False)
        >>> s.gp_lengthscale_scan(components=1, upper_bounds=[1.0, 2.0]).lengthscales.shape
        (2, 1, 2)
        """
        from hyperspy_gp.lengthscale_scan import lengthscale_scan

        return lengthscale_scan(self, components=components, upper_bounds=upper_bounds, **kwargs)
