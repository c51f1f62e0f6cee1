"""Gaussian-process reconstruction of hyperspectral electron-microscopy data.

Importing this package is cheap: torch and gpytorch are imported only when a GP is
fitted, so ``hs.load`` of a file with our signal type never pulls them in.
"""

__version__ = "0.1.0.dev0"

__all__ = ["gp_reconstruct", "GPReconstruction", "__version__"]


def __getattr__(name):
    # Lazy attributes keep ``import hyperspy_gp`` (done by HyperSpy when it loads
    # our signal classes) free of torch.
    if name in ("gp_reconstruct", "GPReconstruction"):
        from hyperspy_gp import reconstruct

        return getattr(reconstruct, name)
    raise AttributeError(f"module 'hyperspy_gp' has no attribute {name!r}")
