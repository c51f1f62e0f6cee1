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


#: Public functions that take a signal, as ``"module:function"`` or
#: ``"module:function:parameter"`` (default parameter: ``signal``).  For the whole
#: session each is replaced, as a module attribute, by a guard that snapshots that
#: argument before every call and asserts it is bit-identical afterwards, also when the
#: call raises.  Register new entry points here; tests/test_input_guard.py fails for a
#: public function with a ``signal`` parameter that is missing.
SIGNAL_ENTRY_POINTS = (
    "hyperspy_gp.reconstruct:gp_reconstruct",
    "hyperspy_gp.request:validate_request",
    "hyperspy_gp.outputs:build_outputs",
    "hyperspy_gp.lengthscale_scan:lengthscale_scan",
    "hyperspy_gp.outliers:find_spatial_outliers",
    "hyperspy_gp.outliers:remove_spatial_outliers",
    "hyperspy_gp.plotting.summary:plot_reconstruction_summary:original",
)

_ORIGINALS = {}


def pytest_configure(config):
    """Guard the entry points before any test module is imported.

    Test modules bind ``from hyperspy_gp import gp_reconstruct`` at import time, so
    an autouse fixture (run after collection) would be too late; ``pytest_configure``
    of this conftest runs before the tests below it are collected.  The package's
    lazy ``__getattr__`` and the signal methods' call-time imports then resolve to
    the guarded functions.
    """
    import importlib

    for entry in SIGNAL_ENTRY_POINTS:
        module_name, name, *param = entry.split(":")
        module = importlib.import_module(module_name)
        original = getattr(module, name)
        _ORIGINALS[(module, name)] = original
        setattr(module, name, input_guard(original, *param))


def pytest_unconfigure(config):
    for (module, name), original in _ORIGINALS.items():
        setattr(module, name, original)
    _ORIGINALS.clear()


def input_guard(func, parameter="signal"):
    """Wrap ``func`` so that every call leaves its ``parameter`` signal bit-identical."""
    import functools
    import inspect

    from hyperspy.signal import BaseSignal

    signature = inspect.signature(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        try:
            signal = signature.bind(*args, **kwargs).arguments.get(parameter)
        except TypeError:  # let the function report its own call error
            signal = None
        if not isinstance(signal, BaseSignal):
            return func(*args, **kwargs)
        before = _snapshot(signal)
        try:
            return func(*args, **kwargs)
        finally:
            _assert_same(before, _snapshot(signal), f"{func.__module__}.{func.__qualname__}({parameter}=...)")

    guarded.input_guarded = parameter
    return guarded


@pytest.fixture(scope="session")
def make_input_guard():
    """The wrapper applied to :data:`SIGNAL_ENTRY_POINTS` (to test the mechanism)."""
    return input_guard


@pytest.fixture(scope="session")
def signal_entry_points():
    """:data:`SIGNAL_ENTRY_POINTS`, the guarded ``"module:function[:parameter]"`` names."""
    return SIGNAL_ENTRY_POINTS


def _snapshot(signal):
    """Deep copies of everything a call could change: data, axes, metadata, learning results."""
    import copy

    lr = signal.learning_results
    return {
        "class": type(signal),
        "data": _copy_array(signal.data),
        "axes": copy.deepcopy(signal.axes_manager._get_axes_dicts()),
        "metadata": copy.deepcopy(signal.metadata.as_dictionary()),
        "original_metadata": copy.deepcopy(signal.original_metadata.as_dictionary()),
        "learning_results": {k: _copy_array(v) if _is_array(v) else copy.deepcopy(v) for k, v in vars(lr).items()},
    }


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _copy_array(value):
    import numpy as np

    return np.array(value.compute() if hasattr(value, "compute") else value, copy=True)


def _assert_same(before, after, where="the block"):
    assert after["class"] is before["class"], f"{where} changed the signal class"
    for key in ("data", "axes", "metadata", "original_metadata", "learning_results"):
        _assert_tree_equal(before[key], after[key], f"{where} changed the input signal's {key}")


def _assert_tree_equal(before, after, path):
    """Recursive bit-identity of dicts, lists and arrays (NaN equals NaN, dtypes must match)."""
    import numpy as np

    if isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), path
        for key in before:
            _assert_tree_equal(before[key], after[key], f"{path}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert type(after) is type(before) and len(after) == len(before), path
        for i, (b, a) in enumerate(zip(before, after)):
            _assert_tree_equal(b, a, f"{path}[{i}]")
    elif _is_array(before) or _is_array(after):
        assert _is_array(before) and _is_array(after) and before.dtype == after.dtype, f"{path}: dtype"
        np.testing.assert_array_equal(after, before, err_msg=path, strict=True)
    elif type(before).__eq__ is object.__eq__:
        # objects without value equality (e.g. the fitted ORPCA estimator a lazy
        # decomposition keeps in learning_results._object): compare their pickled state
        import pickle

        assert type(after) is type(before) and pickle.dumps(after) == pickle.dumps(before), path
    else:
        assert type(after) is type(before) and (after == before or (after != after and before != before)), path


@pytest.fixture
def unchanged():
    """``with unchanged(signal): ...`` asserts the block leaves ``signal`` bit-identical.

    Class, data (dtype included), axes, metadata, original metadata and every
    learning result are compared, also when the block raises.  Calls of the entry
    points in :data:`SIGNAL_ENTRY_POINTS` are checked this way automatically.
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
