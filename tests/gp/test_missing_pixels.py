"""Missing pixels: the dense path is exact on the observed set and predicts them."""

import numpy as np
import pytest
import torch

from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.prediction import make_posterior
from hyperspy_gp.gp.training import fit_model

from .dense_reference import dense_icm

RTOL = 1e-6


def _model(kind, shape, n_tasks, rank, observed, seed=0, kernel=None, n_models=1):
    gen = torch.Generator().manual_seed(seed)
    kernel = GridKernel(shape, kind) if kernel is None else kernel
    model = GridICMModel(kernel, n_models, n_tasks, rank=rank, observed=observed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    targets = torch.randn(n_models, *shape, n_tasks, generator=gen, dtype=torch.float64)
    return model, targets


def _holes(shape, seed=0, fraction=0.2):
    rng = np.random.default_rng(seed)
    observed = rng.random(shape) > fraction
    observed.flat[0] = True
    return observed


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind,shape", [("separable", (7, 9)), ("matern", (6, 8)), ("separable", (14,))])
@pytest.mark.parametrize("n_tasks,rank", [(1, 0), (3, 1)])
def test_masked_mll_mean_variance_equal_dense_reference(kind, shape, n_tasks, rank):
    observed = _holes(shape)
    model, targets = _model(kind, shape, n_tasks, rank, observed)
    s = model.state()
    ref = dense_icm(targets[0], s["lengthscale"][0], s["task_covariance"][0], s["noise"][0], kind,
                    upsampling=2, observed=observed)
    with torch.no_grad():
        mll = model.log_likelihood(targets)[0]
    post = make_posterior(model, targets)
    mean, var = post.predict([model.kernel.axis_coordinates(n, 2) for n in shape])
    assert _rel(mll, ref[0]) < RTOL
    assert _rel(mean[0], ref[1]) < RTOL
    assert _rel(var[0], ref[2]) < RTOL


@pytest.mark.parametrize("kind,shape,n_models,n_tasks,rank",
                         [("separable", (7, 9), 1, 3, 1), ("matern", (6, 8), 2, 1, 0), ("matern", (8, 7), 1, 2, 2)])
def test_masked_gradient_equals_autograd_through_the_dense_reference(kind, shape, n_models, n_tasks, rank):
    """The closed-form gradient ½(ααᵀ − Σ⁻¹) against autograd through the reference's Cholesky factor."""
    observed = _holes(shape, seed=3)
    model, targets = _model(kind, shape, n_tasks, rank, observed, seed=7, n_models=n_models)
    grads, mlls = [], []
    for path in ("engine", "reference"):
        model.zero_grad()
        if path == "engine":
            mll = model.log_likelihood(targets).sum()
        else:
            mll = sum(dense_icm(targets[p], model.lengthscale[p], model.task_covariance[p], model.noise[p], kind,
                                observed=observed)[0] for p in range(n_models))
        mll.backward()
        mlls.append(mll.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert _rel(mlls[0], mlls[1]) < RTOL
    for name in grads[1]:
        assert torch.isfinite(grads[0][name]).all(), name
        assert _rel(grads[0][name], grads[1][name]) < RTOL, name


def test_masked_values_are_ignored():
    observed = _holes((8, 8), seed=1)
    model, targets = _model("separable", (8, 8), 2, 1, observed)
    changed = targets.clone()
    changed[0][torch.as_tensor(~observed)] = 1e6
    with torch.no_grad():
        assert model.log_likelihood(targets) == model.log_likelihood(changed)


@pytest.mark.parametrize("kind,options", [("separable", {"masked_solver": "dense"}),
                                          ("separable", {"masked_solver": "schur-cg"}),
                                          ("matern", {"iterative": True})])
def test_a_mask_with_every_pixel_measured_is_the_complete_grid(kind, options):
    """The complete grid's paths, likelihood and posterior (the iterative posterior failed on such a mask)."""
    shape = (9, 7)
    reference, targets = _model(kind, shape, 3, 1, None, seed=4)  # random hyperparameters
    masked = GridICMModel(GridKernel(shape, kind), 1, 3, rank=1, observed=np.ones(shape, bool), **options)
    complete = GridICMModel(GridKernel(shape, kind), 1, 3, rank=1, iterative=options.get("iterative", False))
    for model in (masked, complete):
        model.load_state_dict(reference.state_dict())
    assert masked.observed is None
    with torch.no_grad():
        torch.testing.assert_close(masked.log_likelihood(targets), complete.log_likelihood(targets))
    coords = [masked.kernel.axis_coordinates(n, 3) for n in shape]
    for got, expected in zip(make_posterior(masked, targets).predict(coords),
                             make_posterior(complete, targets).predict(coords)):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="observed mask shape"):
        GridICMModel(GridKernel(shape, kind), 1, 3, observed=np.ones((7, 9), bool), **options)


def test_fit_with_holes_fills_them_from_the_neighbours():
    yy, xx = np.mgrid[:16, :16]
    truth = np.sin(2 * np.pi * xx / 8) * np.sin(2 * np.pi * yy / 8)
    observed = _holes((16, 16), seed=2, fraction=0.15)
    targets = torch.tensor(((truth + 0.05 * np.random.default_rng(0).standard_normal(truth.shape)) / truth.std())[None, ..., None])
    model = GridICMModel(GridKernel((16, 16)), 1, 1, rank=0, observed=observed)
    result = fit_model(model, targets)
    assert result.converged
    mean, var = make_posterior(model, targets).predict([model.kernel.axis_coordinates(16)] * 2)
    pred = mean[0, ..., 0].numpy() * truth.std()
    holes = ~observed
    assert np.abs(pred[holes] - truth[holes]).max() < 0.15
    # The uncertainty is larger where no data was measured.
    v = var[0, ..., 0].numpy()
    assert v[holes].mean() > 2 * v[observed].mean()


def _skipped_lines_and_hole(shape, hole):
    """Measured pixels of a scan missing its first row, its fifth row and its last two columns."""
    observed = np.ones(shape, dtype=bool)
    observed[0], observed[4], observed[:, -2:] = False, False, False
    if hole:
        observed[3, 2] = False
    return observed


@pytest.mark.parametrize("kind", ["separable", "matern"])
@pytest.mark.parametrize("n_tasks,rank", [(1, 0), (3, 1)])
@pytest.mark.parametrize("hole", [False, True])
def test_fit_on_the_measured_scan_lines_is_exact_on_the_whole_scan(kind, n_tasks, rank, hole):
    # Scan lines without data are left out (request.choose_solver): the model on the
    # grid of the kept lines has the likelihood of the observed pixels, and predicts
    # the whole scan (skipped lines included) as the dense reference on the full grid.
    from hyperspy_gp.request import measured_lines

    shape, upsampling = (9, 8), 2
    observed = _skipped_lines_and_hole(shape, hole)
    lines = measured_lines(observed)
    assert [kept.tolist() for kept in lines] == [[1, 2, 3, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]]
    inner = observed[np.ix_(*lines)]
    origin = [int(kept[0]) for kept in lines]
    kernel = GridKernel(inner.shape, kind, points=[kept - o for kept, o in zip(lines, origin)])
    assert not kernel.uniform
    model, targets = _model(kind, inner.shape, n_tasks, rank, None if inner.all() else inner, kernel=kernel)
    full_targets = torch.zeros(1, *shape, n_tasks, dtype=torch.float64)
    full_targets[(slice(None), *np.ix_(*lines))] = targets
    s = model.state()
    ref = dense_icm(full_targets[0], s["lengthscale"][0], s["task_covariance"][0], s["noise"][0], kind,
                    upsampling=upsampling, observed=observed)
    with torch.no_grad():
        mll = model.log_likelihood(targets)[0]
    coords = [model.kernel.axis_coordinates(n, upsampling) - o for n, o in zip(shape, origin)]
    mean, var = make_posterior(model, targets).predict(coords)
    assert _rel(mll, ref[0]) < RTOL
    assert _rel(mean[0], ref[1]) < RTOL
    assert _rel(var[0], ref[2]) < RTOL
