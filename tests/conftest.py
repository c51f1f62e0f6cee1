"""Shared pytest configuration and fixtures for the hyperspy_gp test suite.

Add new fixtures below, grouped by section.
"""

import os
from pathlib import Path

import matplotlib

# Non-interactive backend: tests must never open windows. Set at import so it
# is in effect before any test module imports matplotlib.pyplot.
matplotlib.use("Agg")

import pytest  # noqa: E402

#: Test data shared between checkouts: <repository>/../shared/data
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------
# Session-wide settings
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _hyperspy_progressbar_off():
    """Turn HyperSpy's progress bars off for the test session, then restore."""
    import hyperspy.api as hs

    old = hs.preferences.General.show_progressbar
    hs.preferences.General.show_progressbar = False
    yield
    hs.preferences.General.show_progressbar = old


# --------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data():
    """Path of the shared test-data folder (it may not exist)."""
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def data_file(shared_data):
    """Return a function ``data_file(name)`` giving the path of a data file.

    If the file is missing the calling test is skipped, or fails when the
    environment variable ``CI`` is ``"true"`` (data must be present on CI).
    """

    def _data_file(name):
        path = shared_data / name
        if not path.is_file():
            reason = (
                f"test data file {name!r} not found in {shared_data} "
                "(the shared data folder next to the repository checkout)"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        return path

    return _data_file
