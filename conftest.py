"""Session-wide pytest settings, for the tests and the doctests in the package."""

import matplotlib

# Non-interactive backend: tests must never open windows.
matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _hyperspy_progressbar_off():
    """Turn HyperSpy's progress bars (and so ours) off for the session, then restore."""
    import hyperspy.api as hs

    old = hs.preferences.General.show_progressbar
    hs.preferences.General.show_progressbar = False
    yield
    hs.preferences.General.show_progressbar = old
