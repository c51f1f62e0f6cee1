"""The automatic "input unchanged" check of conftest.py guards every signal entry point."""

import importlib
import inspect
import pkgutil

import hyperspy.api as hs
import numpy as np
import pytest

import hyperspy_gp

#: Subpackages whose functions take arrays or tensors, never signals.
NOT_SIGNAL_APIS = ("hyperspy_gp.gp", "hyperspy_gp.cli")


def _public_functions_taking_a_signal():
    found = set()
    for info in pkgutil.walk_packages(hyperspy_gp.__path__, "hyperspy_gp."):
        name = info.name
        if any(part.startswith("_") for part in name.split(".")) or name.startswith(NOT_SIGNAL_APIS):
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            func = inspect.unwrap(value) if callable(value) else None
            if attr.startswith("_") or not inspect.isfunction(func) or func.__module__ != name:
                continue
            params = list(inspect.signature(func).parameters)
            if params and params[0] == "signal":
                found.add(f"{name}:{attr}")
    return found


def test_every_public_function_taking_a_signal_is_registered(signal_entry_points):
    registered = {":".join(entry.split(":")[:2]) for entry in signal_entry_points}
    missing = _public_functions_taking_a_signal() - registered
    assert not missing, f"add {sorted(missing)} to SIGNAL_ENTRY_POINTS in tests/conftest.py"


def test_registered_entry_points_are_guarded_however_imported(signal_entry_points):
    from hyperspy_gp import gp_reconstruct  # binds at import time, after conftest ran

    for entry in signal_entry_points:
        module, name = entry.split(":")[:2]
        assert hasattr(getattr(importlib.import_module(module), name), "input_guarded"), entry
    assert gp_reconstruct.input_guarded == "signal"
    assert hyperspy_gp.gp_reconstruct is gp_reconstruct


def _signal():
    s = hs.signals.Signal1D(np.arange(24.0).reshape(2, 3, 4))
    s.decomposition(print_info=False)
    return s


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda s: s.data.__setitem__((0, 0, 0), -1.0), "data"),
        (lambda s: s.change_dtype("float32"), "data"),
        (lambda s: setattr(s.axes_manager[0], "scale", 2.0), "axes"),
        (lambda s: s.metadata.set_item("General.title", "changed"), "metadata"),
        (lambda s: s.original_metadata.set_item("a", 1), "original_metadata"),
        (lambda s: s.learning_results.factors.__setitem__((0, 0), 7.0), "learning_results"),
        (lambda s: setattr(s.learning_results, "centre", "navigation"), "learning_results"),
    ],
)
def test_guard_catches_every_kind_of_change(make_input_guard, mutate, what):
    def careless(signal):
        mutate(signal)
        return "done"

    s = _signal()
    with pytest.raises(AssertionError, match=f"careless.*changed the input signal's {what}"):
        make_input_guard(careless)(s)


def test_guard_catches_a_change_before_an_error_and_passes_clean_calls(make_input_guard):
    def half_done(signal):
        signal.data[0, 0, 0] = np.nan
        raise ValueError("bad request")

    def clean(signal, factor=2):
        return signal.data.sum() * factor

    s = _signal()
    with pytest.raises(AssertionError, match="half_done") as info:
        make_input_guard(half_done)(s)
    assert isinstance(info.value.__context__, ValueError)
    assert make_input_guard(clean)(_signal(), factor=3) == 3 * np.arange(24.0).sum()
    # Not a signal, or a wrong call: the function itself answers.
    repeat = make_input_guard(lambda signal, factor=2: signal * factor)
    assert repeat("ab", factor=2) == "abab"
    with pytest.raises(TypeError):
        repeat()
