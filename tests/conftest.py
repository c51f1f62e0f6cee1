"""Fixtures of the hyperspy_gp test suite (session settings are in ../conftest.py).

Add new fixtures below, grouped by section.
"""

import os
from pathlib import Path

import pytest

#: Test data shared between checkouts: <repository>/../shared/data
SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


# --------------------------------------------------------------------------
# The input is never modified
# --------------------------------------------------------------------------


def _snapshot(signal):
    import copy

    import numpy as np

    lr = signal.learning_results
    arrays = {}
    for name in ("loadings", "factors", "mean", "navigation_mask", "signal_mask", "explained_variance"):
        value = getattr(lr, name, None)
        arrays[name] = None if value is None else np.array(value, copy=True)
    return {
        "data": np.array(signal.data, copy=True),
        "dtype": signal.data.dtype,
        "axes": copy.deepcopy(signal.axes_manager._get_axes_dicts()),
        "metadata": copy.deepcopy(signal.metadata.as_dictionary()),
        "learning_results": arrays,
        "centre": lr.centre,
    }


def _assert_same(before, after):
    import numpy as np

    assert after["dtype"] == before["dtype"]
    np.testing.assert_array_equal(after["data"], before["data"])
    assert after["axes"] == before["axes"]
    assert repr(after["metadata"]) == repr(before["metadata"])
    assert after["centre"] == before["centre"]
    for name, value in before["learning_results"].items():
        if value is None:
            assert after["learning_results"][name] is None, name
        else:
            np.testing.assert_array_equal(after["learning_results"][name], value, err_msg=name)


@pytest.fixture
def unchanged():
    """``with unchanged(signal): ...`` asserts the block leaves ``signal`` bit-identical.

    Data, dtype, axes, metadata and learning results are compared, also when the
    block raises.
    """
    from contextlib import contextmanager

    @contextmanager
    def _unchanged(signal):
        before = _snapshot(signal)
        try:
            yield
        finally:
            _assert_same(before, _snapshot(signal))

    return _unchanged
