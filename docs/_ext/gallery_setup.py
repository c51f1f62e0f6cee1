"""Settings applied before every gallery example (``reset_modules`` of sphinx-gallery)."""

from __future__ import annotations

import warnings


def quiet_hyperspy(gallery_conf, fname, when=None) -> None:
    """Keep the rendered output to what the example prints.

    HyperSpy's progress bars print one line per update, and HyperSpy 2.x warns about
    its own deprecated internal imports the first time exSpy's lazy classes load.
    """
    import hyperspy.api as hs

    hs.preferences.General.show_progressbar = False
    warnings.filterwarnings("ignore", message=r"Importing `\w+` from `hyperspy\._signals")
