"""Nothing lost, nothing half done: interrupts, failing dask tasks, determinism, round trips."""

import re

import hyperspy.api as hs
import numpy as np
import pytest

from hyperspy_gp import gp_reconstruct
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import ChunkPredictionError, GridPosterior
from hyperspy_gp.gp.training import ConvergenceWarning
from hyperspy_gp.synthetic import atomic_eels_spectrum_image


@pytest.fixture(scope="module")
def decomposed():
    s = atomic_eels_spectrum_image(shape=(14, 12), n_channels=40, seed=5)
    s.decomposition(output_dimension=3, print_info=False)
    return s


def _interrupt_after(monkeypatch, n_calls):
    """Make the n-th likelihood evaluation raise KeyboardInterrupt (Ctrl-C), once."""
    real = GridICMModel.log_likelihood
    calls = {"n": 0}

    def log_likelihood(self, targets):
        calls["n"] += 1
        if calls["n"] == n_calls:
            raise KeyboardInterrupt
        return real(self, targets)

    monkeypatch.setattr(GridICMModel, "log_likelihood", log_likelihood)
    return calls


# ---------------------------------------------------------------- interrupts


def test_ctrl_c_in_training_returns_the_best_parameters_with_a_warning(decomposed, monkeypatch, unchanged):
    calls = _interrupt_after(monkeypatch, 12)
    with unchanged(decomposed), pytest.warns(ConvergenceWarning, match="interrupted.*best hyperparameters"):
        rec = gp_reconstruct(decomposed, components=2, upsampling=2)
    assert calls["n"] == 12  # training stopped there; the result reuses the best iterate's likelihood
    hp, history = rec.hyperparameters, rec.history
    assert not hp["converged"] and hp["optimizer_message"] == "interrupted by the user"
    best = int(np.argmax(history["log_likelihood"].sum(-1)))
    np.testing.assert_allclose(hp["lengthscale_px"][0], history["lengthscale"][best][0], rtol=1e-12)
    assert np.isfinite(rec.signal.data).all() and rec.loadings.data.shape == (2, 28, 24)


def test_ctrl_c_before_the_first_step_keeps_the_start(decomposed, monkeypatch):
    _interrupt_after(monkeypatch, 2)  # 1: the start, 2: the first trial step
    with pytest.warns(ConvergenceWarning, match="after 0 iterations"):
        rec = gp_reconstruct(decomposed, components=2)
    np.testing.assert_array_equal(rec.history["lengthscale"][-1], rec.history["lengthscale"][0])


def test_ctrl_c_in_prediction_propagates_and_leaves_the_input(decomposed, monkeypatch, unchanged):
    def predict(self, test_coords):
        raise KeyboardInterrupt

    monkeypatch.setattr(GridPosterior, "predict", predict)
    with unchanged(decomposed), pytest.raises(KeyboardInterrupt):
        gp_reconstruct(decomposed, components=2)


def test_a_failing_prediction_chunk_is_named(decomposed, monkeypatch, unchanged):
    real = GridPosterior.predict

    def predict(self, test_coords):
        if float(test_coords[0][0]) == 5.0:  # the chunk starting at output row 10
            raise RuntimeError("simulated worker failure")
        return real(self, test_coords)

    monkeypatch.setattr(GridPosterior, "predict", predict)
    with unchanged(decomposed), pytest.raises(ChunkPredictionError, match=r"rows 10:15 \(of 28\).*simulated worker failure") as info:
        gp_reconstruct(decomposed, components=2, upsampling=2, chunks=5)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_failing_chunk_is_named_on_a_distributed_cluster(decomposed, monkeypatch):
    distributed = pytest.importorskip("distributed")
    real = GridPosterior.predict

    def predict(self, test_coords):
        if float(test_coords[0][0]) == 0.0:
            raise RuntimeError("simulated worker failure")
        return real(self, test_coords)

    monkeypatch.setattr(GridPosterior, "predict", predict)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        with pytest.raises(ChunkPredictionError, match=r"rows 0:7 \(of 14\)"):
            gp_reconstruct(decomposed, components=2, chunks=7)


def test_non_convergence_warns_with_the_recorded_gradient_norm(decomposed):
    pattern = r"did not converge in 2 iterations.*gradient norm ([0-9.e+-]+?)\. Increase `max_iter`"
    with pytest.warns(ConvergenceWarning, match=pattern) as info:
        rec = gp_reconstruct(decomposed, components=2, max_iter=2)
    reported = float(re.search(pattern, str(info[0].message)).group(1))
    assert not rec.hyperparameters["converged"]
    assert rec.hyperparameters["gradient_norm"] == pytest.approx(reported, rel=1e-2)


# --------------------------------------------------------------- determinism


def test_two_runs_are_bit_identical_on_cpu(decomposed):
    first = gp_reconstruct(decomposed, components=3, upsampling=2, chunks=4)
    second = gp_reconstruct(decomposed, components=3, upsampling=2, chunks=4)
    np.testing.assert_array_equal(first.signal.data, second.signal.data)
    np.testing.assert_array_equal(first.variance.data, second.variance.data)
    for key, value in first.hyperparameters.items():
        np.testing.assert_array_equal(second.hyperparameters[key], value, err_msg=key)
    for key, value in first.history.items():
        np.testing.assert_array_equal(second.history[key], value, err_msg=key)


# --------------------------------------------------------------- round trips


def _assert_tree_equal(before, after, path="GP_reconstruction"):
    if isinstance(before, dict):
        assert set(after) == set(before), path
        for key in before:
            _assert_tree_equal(before[key], after[key], f"{path}.{key}")
    elif isinstance(before, np.ndarray) or isinstance(after, np.ndarray):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=path)
    else:
        assert after == before, path


@pytest.mark.parametrize("ext", ["hspy", "zspy"])
@pytest.mark.parametrize("mode", ["parallel", "independent"])
def test_save_load_keeps_data_variance_every_hyperparameter_and_history(decomposed, tmp_path, ext, mode):
    rec = gp_reconstruct(decomposed, components=2, upsampling=2, mode=mode, lazy_output=True)
    rec.signal.save(tmp_path / f"rec.{ext}")
    rec.loadings.save(tmp_path / f"maps.{ext}")
    back = hs.load(tmp_path / f"rec.{ext}")
    maps = hs.load(tmp_path / f"maps.{ext}")

    np.testing.assert_array_equal(back.data, rec.signal.data.compute())
    np.testing.assert_array_equal(maps.data, rec.loadings.data)
    np.testing.assert_array_equal(maps.metadata.Signal.Noise_properties.variance.data, rec.variance.data)
    for loaded, saved in ((back, rec.signal), (maps, rec.loadings)):
        md = loaded.metadata.GP_reconstruction.as_dictionary()
        _assert_tree_equal(saved.metadata.GP_reconstruction.as_dictionary(), md)
        _assert_tree_equal(rec.hyperparameters, md["hyperparameters"])
        _assert_tree_equal(rec.history, md["history"])
    np.testing.assert_array_equal(back.learning_results.loadings, rec.signal.learning_results.loadings)
    np.testing.assert_array_equal(back.learning_results.factors, rec.signal.learning_results.factors)
