"""Tests for the EELS_GP signal classes and their HyperSpy registration."""

import copy
import subprocess
import sys
import textwrap
import types

import hyperspy.api as hs
import numpy as np
import pytest
from exspy.signals import EELSSpectrum, LazyEELSSpectrum

from hyperspy_gp.signals import (
    EELSGPSpectrum,
    GPReconstructionMixin,
    LazyEELSGPSpectrum,
)

EELS_SI = "EELS_SI.dm4"
SIGNAL_TYPE = "EELS_GP"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture
def eels_si_path(data_file):
    return data_file(EELS_SI)


@pytest.fixture
def s_gp(eels_si_path):
    """The EELS spectrum image loaded as EELS_GP."""
    return hs.load(eels_si_path, signal_type=SIGNAL_TYPE)


def _axes_props(s):
    return [
        (ax.name, ax.size, ax.offset, ax.scale, str(ax.units), ax.navigate)
        for ax in s.axes_manager._axes
    ]


def _assert_axes_equal(s1, s2):
    p1, p2 = _axes_props(s1), _axes_props(s2)
    assert len(p1) == len(p2)
    for a, b in zip(p1, p2):
        assert a[0] == b[0] and a[1] == b[1] and a[4:] == b[4:]
        np.testing.assert_allclose(a[2:4], b[2:4])


def _assert_is_eels_gp(s, lazy=False):
    assert type(s) is (LazyEELSGPSpectrum if lazy else EELSGPSpectrum)
    assert s._lazy is lazy
    assert s.metadata.Signal.signal_type == SIGNAL_TYPE


def _comparable_metadata(s):
    """Metadata as a dict, without the load history and the signal type."""
    md = s.metadata.as_dictionary()
    del md["General"]["FileIO"]
    del md["Signal"]["signal_type"]
    return md




# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


def test_known_signal_types_lists_eels_gp(capsys):
    hs.print_known_signal_types()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "EELSGPSpectrum" in line]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells == [SIGNAL_TYPE, "", "EELSGPSpectrum", "hyperspy_gp"]
    # exspy keeps "EELS" for its own class
    assert any(
        "EELSSpectrum" in line and "exspy" in line and "EELSGP" not in line
        for line in out.splitlines()
    )


def test_registry_entries():
    from hyperspy.extensions import ALL_EXTENSIONS

    signals = ALL_EXTENSIONS["signals"]
    for name, lazy in (("EELSGPSpectrum", False), ("LazyEELSGPSpectrum", True)):
        entry = signals[name]
        assert entry["signal_type"] == SIGNAL_TYPE
        assert entry["signal_dimension"] == 1
        assert entry["dtype"] == "real"
        assert entry["lazy"] is lazy
        assert entry["module"] == "hyperspy_gp.signals.eels_gp"
    # We must never take over exspy's signal type.
    ours = [v for v in signals.values() if v["module"].startswith("hyperspy_gp")]
    assert all(v["signal_type"] == SIGNAL_TYPE for v in ours)
    assert signals["EELSSpectrum"]["module"] == "exspy.signals.eels"


@pytest.mark.parametrize("lazy", [False, True])
def test_assign_signal_subclass(lazy):
    from hyperspy.io import assign_signal_subclass

    cls = assign_signal_subclass(
        dtype=np.dtype("float32"),
        signal_dimension=1,
        signal_type=SIGNAL_TYPE,
        lazy=lazy,
    )
    assert cls is (LazyEELSGPSpectrum if lazy else EELSGPSpectrum)
    eels = assign_signal_subclass(
        dtype=np.dtype("float32"), signal_dimension=1, signal_type="EELS", lazy=lazy
    )
    assert eels is (LazyEELSSpectrum if lazy else EELSSpectrum)


def test_class_hierarchy():
    assert issubclass(EELSGPSpectrum, EELSSpectrum)
    assert issubclass(EELSGPSpectrum, GPReconstructionMixin)
    assert issubclass(LazyEELSGPSpectrum, EELSGPSpectrum)
    assert issubclass(LazyEELSGPSpectrum, LazyEELSSpectrum)
    assert EELSGPSpectrum._signal_type == SIGNAL_TYPE
    assert LazyEELSGPSpectrum._signal_type == SIGNAL_TYPE
    assert EELSGPSpectrum._lazy is False
    assert LazyEELSGPSpectrum._lazy is True
    # The mixin is a plain class, not a HyperSpy signal.
    assert GPReconstructionMixin.__mro__ == (GPReconstructionMixin, object)


# --------------------------------------------------------------------------
# Loading and set_signal_type
# --------------------------------------------------------------------------


def test_load_with_signal_type(eels_si_path, s_gp):
    _assert_is_eels_gp(s_gp)
    assert isinstance(s_gp, EELSSpectrum)
    am = s_gp.axes_manager
    assert am.navigation_dimension == 2
    assert am.signal_dimension == 1
    for ax in am.navigation_axes:
        assert ax.units == "µm"
    e = am.signal_axes[0]
    assert e.units == "eV"
    assert e.offset == pytest.approx(300.0)
    assert e.scale == pytest.approx(1.0)
    assert e.is_binned  # set by EELSSpectrum.__init__

    # Same data, axes and metadata as exspy's class (bar the signal type).
    s_eels = hs.load(eels_si_path)
    assert type(s_eels) is EELSSpectrum
    np.testing.assert_array_equal(s_gp.data, s_eels.data)
    _assert_axes_equal(s_gp, s_eels)
    assert _comparable_metadata(s_gp) == _comparable_metadata(s_eels)
    tem = s_gp.metadata.Acquisition_instrument.TEM
    assert tem.beam_energy == pytest.approx(200.0)
    assert tem.convergence_angle == pytest.approx(21.0)
    assert tem.Detector.EELS.collection_angle == pytest.approx(62.0)


def test_load_lazy(eels_si_path, s_gp):
    s = hs.load(eels_si_path, signal_type=SIGNAL_TYPE, lazy=True)
    _assert_is_eels_gp(s, lazy=True)
    s.compute()
    _assert_is_eels_gp(s)
    np.testing.assert_array_equal(s.data, s_gp.data)


def test_set_signal_type_round_trip(eels_si_path):
    s = hs.load(eels_si_path)
    assert type(s) is EELSSpectrum
    s.set_signal_type(SIGNAL_TYPE)
    _assert_is_eels_gp(s)
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(200.0)
    assert s.axes_manager.signal_axes[0].offset == pytest.approx(300.0)
    s.set_signal_type("EELS")
    assert type(s) is EELSSpectrum
    assert s.metadata.Signal.signal_type == "EELS"


def test_set_signal_type_alias_goes_to_exspy(s_gp):
    # "TEM EELS" is exspy's alias of "EELS", not ours.
    s_gp.set_signal_type("TEM EELS")
    assert type(s_gp) is EELSSpectrum
    assert s_gp.metadata.Signal.signal_type == "EELS"


def test_set_signal_type_lazy(eels_si_path):
    s = hs.load(eels_si_path, lazy=True)
    assert type(s) is LazyEELSSpectrum
    s.set_signal_type(SIGNAL_TYPE)
    _assert_is_eels_gp(s, lazy=True)
    s.set_signal_type("EELS")
    assert type(s) is LazyEELSSpectrum


def test_from_synthetic_signal():
    s = hs.signals.Signal1D(np.arange(24, dtype=float).reshape(2, 3, 4))
    s.set_signal_type(SIGNAL_TYPE)
    _assert_is_eels_gp(s)
    s.set_signal_type("")
    assert type(s) is hs.signals.Signal1D


# --------------------------------------------------------------------------
# Survival through common operations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["copy.deepcopy", "deepcopy", "copy"])
def test_copies(s_gp, how):
    if how == "copy.deepcopy":
        s2 = copy.deepcopy(s_gp)
    else:
        s2 = getattr(s_gp, how)()
    _assert_is_eels_gp(s2)
    np.testing.assert_array_equal(s2.data, s_gp.data)
    _assert_axes_equal(s2, s_gp)


def test_inav_slicing(s_gp):
    row = s_gp.inav[0, :]
    _assert_is_eels_gp(row)
    ny = s_gp.axes_manager.navigation_shape[1]
    assert row.axes_manager.navigation_shape == (ny,)
    np.testing.assert_array_equal(row.data, s_gp.data[:, 0])
    px = s_gp.inav[0, 0]
    _assert_is_eels_gp(px)
    assert px.axes_manager.navigation_dimension == 0
    part = s_gp.isig[400.0:500.0]
    _assert_is_eels_gp(part)
    assert part.axes_manager.signal_axes[0].offset == pytest.approx(400.0)


def test_as_lazy_and_compute(s_gp):
    lazy = s_gp.as_lazy()
    _assert_is_eels_gp(lazy, lazy=True)
    _assert_is_eels_gp(s_gp)  # original untouched
    _assert_axes_equal(lazy, s_gp)
    assert lazy.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(200.0)
    lazy.compute()
    _assert_is_eels_gp(lazy)
    np.testing.assert_array_equal(lazy.data, s_gp.data)


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
@pytest.mark.parametrize("lazy", [False, True])
def test_save_load_round_trip(s_gp, tmp_path, ext, lazy):
    s_gp.metadata.set_item("GP.test", np.arange(3))
    fname = tmp_path / f"eels_gp.{ext}"
    s_gp.save(fname)
    s2 = hs.load(fname, lazy=lazy)
    _assert_is_eels_gp(s2, lazy=lazy)
    if lazy:
        s2.compute()
    np.testing.assert_array_equal(s2.data, s_gp.data)
    _assert_axes_equal(s2, s_gp)
    np.testing.assert_array_equal(s2.metadata.GP.test, np.arange(3))
    assert s2.metadata.Acquisition_instrument.TEM.beam_energy == pytest.approx(200.0)


# --------------------------------------------------------------------------
# gp_reconstruct wrapper
# --------------------------------------------------------------------------


def test_has_gp_reconstruct(s_gp):
    assert callable(s_gp.gp_reconstruct)
    assert callable(s_gp.as_lazy().gp_reconstruct)
    doc = EELSGPSpectrum.gp_reconstruct.__doc__
    assert "hyperspy_gp.gp_reconstruct" in doc


def test_gp_reconstruct_forwards_arguments(s_gp, monkeypatch):
    # Stand-in for the engine module, so this test needs neither torch nor
    # hyperspy_gp.reconstruct.
    calls = []
    fake = types.ModuleType("hyperspy_gp.reconstruct")

    def fake_gp_reconstruct(signal, **kwargs):
        calls.append((signal, kwargs))
        return "result"

    fake.gp_reconstruct = fake_gp_reconstruct
    monkeypatch.setitem(sys.modules, "hyperspy_gp.reconstruct", fake)

    assert s_gp.gp_reconstruct() == "result"
    assert calls[-1][0] is s_gp
    assert calls[-1][1] == dict(
        components=None,
        mode="parallel",
        upsampling=1,
        lengthscale_bounds=None,
        isotropic=False,
    )
    s_gp.gp_reconstruct(
        [0, 2],
        mode="joint",
        upsampling=2,
        lengthscale_bounds=(1, 5),
        isotropic=True,
        extra=3,
    )
    assert calls[-1][1] == dict(
        components=[0, 2],
        mode="joint",
        upsampling=2,
        lengthscale_bounds=(1, 5),
        isotropic=True,
        extra=3,
    )


# --------------------------------------------------------------------------
# No torch at load time
# --------------------------------------------------------------------------


def test_loading_does_not_import_torch(eels_si_path):
    code = textwrap.dedent(
        f"""
        import sys
        import hyperspy.api as hs

        def check(where):
            bad = [m for m in ("torch", "gpytorch") if m in sys.modules]
            assert not bad, f"{{bad}} imported after {{where}}"

        s = hs.load({str(eels_si_path)!r}, signal_type="EELS_GP")
        assert type(s).__name__ == "EELSGPSpectrum", type(s)
        check("hs.load")
        s.set_signal_type("EELS")
        s.set_signal_type("EELS_GP")
        check("set_signal_type")
        lz = s.as_lazy()
        assert type(lz).__name__ == "LazyEELSGPSpectrum", type(lz)
        check("as_lazy")
        lz.compute()
        s.inav[0, 0]
        import hyperspy_gp.signals
        check("compute/inav/import hyperspy_gp.signals")
        print("OK")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")
