"""Tests of the ``hyperspy-gp`` command line tool and of the summary figure."""

import contextlib
import io

import hyperspy.api as hs
import matplotlib.pyplot as plt
import numpy as np
import pytest

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.cli import main
from hyperspy_gp.plotting import plot_reconstruction_summary
from hyperspy_gp.synthetic import atomic_eels_spectrum_image

FAST_DEMO = ["--size", "24", "--channels", "96", "--quiet"]


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the fast demo once; return its output folder, exit status and stdout."""
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", *FAST_DEMO, "-o", str(out)])
    return out, code, stdout.getvalue()


def test_demo_writes_three_files(demo_run):
    out, code, _ = demo_run
    assert code == 0
    for name in ("demo_reconstruction.zspy", "demo_loadings.hspy", "demo_summary.png"):
        assert (out / name).exists(), name


def test_demo_reconstruction_loads_back_upsampled(demo_run):
    out, _, _ = demo_run
    s = hs.load(out / "demo_reconstruction.zspy")
    assert s.axes_manager.navigation_shape == (48, 48)  # 24 px × upsampling 2
    assert s.axes_manager.signal_shape == (96,)
    hyper = s.metadata.GP_reconstruction.hyperparameters
    assert np.asarray(hyper.lengthscale_px).shape == (4, 2)


def test_demo_loadings_carry_variance(demo_run):
    out, _, _ = demo_run
    maps = hs.load(out / "demo_loadings.hspy")
    variance = maps.metadata.Signal.Noise_properties.variance
    assert maps.data.shape == variance.data.shape == (4, 48, 48)
    assert np.all(variance.data >= 0)


def test_demo_prints_what_it_did(demo_run):
    out, _, printed = demo_run
    assert "24 y × 24 x pixels" in printed
    assert "length scale" in printed and " px = " in printed and " nm" in printed
    assert "noise variance" in printed and "iterations" in printed and "Timings" in printed
    assert str(out / "demo_summary.png") in printed
    assert "longer than the scan" not in printed  # atomic maps: a length scale of a few pixels


# --------------------------------------------------------------------------
# reconstruct
# --------------------------------------------------------------------------


def test_reconstruct_eels_spectrum_image(data_file, tmp_path, capsys):
    code = main(["reconstruct", str(data_file("EELS_SI.dm4")), "--components", "2", "--quiet",
                 "-o", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    for name in ("EELS_SI_gp.zspy", "EELS_SI_gp_loadings.hspy", "EELS_SI_gp_summary.png"):
        assert (tmp_path / name).exists(), name
    s = hs.load(tmp_path / "EELS_SI_gp.zspy")
    assert s.axes_manager.navigation_shape == (4, 4)
    assert "negative values" in capsys.readouterr().out  # Poisson normalisation switched off


def test_reconstruct_line_scan(data_file, tmp_path, capsys):
    code = main(["reconstruct", str(data_file("test-MonoCL_spectrum-SI.dm4")), "--components", "2",
                 "--quiet", "-o", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    s = hs.load(tmp_path / "test-MonoCL_spectrum-SI_gp.zspy")
    assert s.axes_manager.navigation_shape == (134,)
    assert (tmp_path / "test-MonoCL_spectrum-SI_gp_summary.png").exists()


def test_reconstruct_integer_file_and_stored_decomposition(tmp_path, capsys):
    s = atomic_eels_spectrum_image((10, 10), n_channels=32, seed=1)
    s.change_dtype("int16")
    raw = tmp_path / "counts.hspy"
    s.save(raw)
    assert main(["reconstruct", str(raw), "--components", "2", "--quiet", "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "int16 converted to float32 (a copy)" in printed
    assert hs.load(raw).data.dtype == np.int16  # the file is untouched

    s.change_dtype("float32")
    s.decomposition(algorithm="NMF", output_dimension=3, print_info=False)
    stored = tmp_path / "decomposed.hspy"
    s.save(stored)
    assert main(["reconstruct", str(stored), "--components", "2", "--quiet", "-o", str(tmp_path)]) == 0
    assert "reusing the one stored in the file (NMF, 3 components" in capsys.readouterr().out
    assert main(["reconstruct", str(stored), "--components", "2", "--redecompose", "--quiet",
                 "-o", str(tmp_path)]) == 0
    assert "Decomposition: SVD" in capsys.readouterr().out


def test_report_flags_a_length_scale_longer_than_the_scan(tmp_path, capsys):
    """A smooth map (a thickness ramp) fitted beyond the scan's size: the report says what that smooths."""
    yy, xx = np.mgrid[:16, :20]
    ramp = 1.0 + 0.05 * xx + 0.02 * yy
    spectrum = np.exp(-0.5 * ((np.arange(40) - 20) / 4.0) ** 2)
    noise = 0.01 * np.random.default_rng(0).standard_normal((16, 20, 40))
    s = hs.signals.Signal1D(ramp[..., None] * spectrum + noise)
    path = tmp_path / "ramp.hspy"
    s.save(path)
    assert main(["reconstruct", str(path), "--components", "1", "--quiet", "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "length scale longer than the scan" in printed, printed
    assert "--lengthscale-bounds auto" in printed


# --------------------------------------------------------------------------
# errors and help
# --------------------------------------------------------------------------


def _assert_clean_error(capsys, code, *words):
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("hyperspy-gp: error: ")
    assert "Traceback" not in captured.err
    for word in words:
        assert word in captured.err
    return captured.err


def test_single_spectrum_is_refused(data_file, tmp_path, capsys):
    code = main(["reconstruct", str(data_file("test-EELS_spectrum.dm3")), "--components", "2",
                 "-o", str(tmp_path)])
    _assert_clean_error(capsys, code, "single spectrum", "navigation")
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path, capsys):
    code = main(["reconstruct", str(tmp_path / "nope.dm4"), "--components", "2"])
    _assert_clean_error(capsys, code, "nope.dm4", "no such file")


def test_gp_value_error_is_reported(data_file, tmp_path, capsys):
    code = main(["reconstruct", str(data_file("EELS_SI.dm4")), "--components", "2",
                 "--lengthscale-bounds", "3", "1", "-o", str(tmp_path)])
    _assert_clean_error(capsys, code, "lower bound must be smaller")


@pytest.mark.parametrize("values", [["3"], ["1", "2", "3"], ["auto", "4"]])
def test_lengthscale_bounds_need_two_numbers_or_auto(values, tmp_path, capsys):
    code = main(["demo", "--size", "12", "--lengthscale-bounds", *values, "-o", str(tmp_path)])
    _assert_clean_error(capsys, code, "--lengthscale-bounds takes two numbers LO HI or the word auto")
    assert not any(tmp_path.iterdir())  # refused before any work


def test_lengthscale_bounds_auto_runs_the_scan_and_reports_the_bounds(tmp_path, capsys):
    code = main(["demo", "--size", "16", "--channels", "64", "--lengthscale-bounds", "auto", "--quiet",
                 "-o", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    import hyperspy.api as hs

    settings = hs.load(tmp_path / "demo_reconstruction.zspy").metadata.GP_reconstruction.settings
    assert settings.lengthscale_bounds_requested == "auto"
    lo, hi = settings.lengthscale_bounds
    assert 0 < lo < hi


def test_usage_error_exit_status(capsys):
    assert main(["reconstruct"]) == 2  # FILE and --components missing
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["reconstruct"]])
def test_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "Example" in capsys.readouterr().out


def _subcommands():
    import argparse

    from hyperspy_gp.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_help_examples_are_valid_command_lines(name):
    """Every example line of a command's help parses into that command."""
    import shlex

    from hyperspy_gp.cli import build_parser

    parser = _subcommands()[name]
    assert parser.description, f"{name} --help says nothing about what it does"
    examples = [line.strip() for line in parser.epilog.splitlines() if line.strip().startswith("hyperspy-gp ")]
    assert examples, f"{name} --help has no example line"
    for line in examples:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command == name, line


# --------------------------------------------------------------------------
# summary figure
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_2d():
    s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0)
    s.decomposition(output_dimension=3, print_info=False)
    return s, gp_reconstruct(s, components=3, upsampling=2)


def test_summary_figure_2d(scan_2d):
    s, rec = scan_2d
    fig = plot_reconstruction_summary(s, rec, max_components=2)
    try:
        assert len(_image_axes(fig)) == 2 * 3  # original, GP mean, GP std per component
        titles = [ax.get_title() for ax in _image_axes(fig)]
        assert titles[0] == "Component 0: original" and titles[1].startswith("GP mean, ℓ = ")
        assert _image_axes(fig)[0].get_xlabel() == "" and _image_axes(fig)[-1].get_xlabel() == "x (nm)"
        assert sum(1 for ax in fig.axes if ax.get_xlabel() == "Energy loss (eV)") == 2
    finally:
        plt.close(fig)


def test_summary_figure_chosen_components(scan_2d):
    s, rec = scan_2d
    fig = plot_reconstruction_summary(s, rec, components=[2], pixel=(0, 11))
    try:
        assert len(_image_axes(fig)) == 3
        assert _image_axes(fig)[0].get_title() == "Component 2: original"
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="not reconstructed"):
        plot_reconstruction_summary(s, rec, components=[5])
    with pytest.raises(ValueError, match="outside the scan"):
        plot_reconstruction_summary(s, rec, pixel=(12, 0))


def test_summary_figure_line_scan():
    s = atomic_eels_spectrum_image((12, 12), n_channels=32, seed=0).inav[:, 3]
    s.decomposition(output_dimension=2, print_info=False)
    rec = gp_reconstruct(s, components=2, upsampling=3)
    fig = plot_reconstruction_summary(s, rec)
    try:
        assert not _image_axes(fig)
        curves = [ax for ax in fig.axes if ax.get_title().startswith("Component")]
        assert len(curves) == 2
        assert curves[-1].get_xlabel() == "x (nm)"
        assert len(curves[0].collections) == 1  # the ±2σ band
    finally:
        plt.close(fig)
