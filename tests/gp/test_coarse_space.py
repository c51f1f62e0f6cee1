"""The coarse-space correction of the Schur complement by CG: large masked regions."""

import numpy as np
import pytest
import torch

from hyperspy_gp.gp import coarse_space, schur_iterative
from hyperspy_gp.gp.coarse_space import COARSE_MIN_SNR, CoarseCorrection, CoarseLattice, coarse_maps, coarse_points
from hyperspy_gp.gp.iterative import CGConvergenceError
from hyperspy_gp.gp.kernels import GridKernel
from hyperspy_gp.gp.likelihood import solve_grid_icm
from hyperspy_gp.gp.model import GridICMModel
from hyperspy_gp.gp.schur_iterative import MaskedOperator

from .test_schur_iterative import (
    MLL_RTOL_PROBES,
    _dense,
    _fitted_states,
    _masked_disc_model,
    _pair,
    _rel,
    _two_sine_maps,
    _value_and_gradient,
)


def _block_mask(shape, block, seed=0):
    """A masked rectangle ``block`` (slices) plus 10 % scattered missing pixels."""
    observed = np.random.default_rng(seed).random(shape) > 0.1
    observed[block] = False
    observed.flat[0] = True
    return observed


def _matrix(v):
    """``(P, R, T, m)`` columns → ``(P, m·T, R)`` (value order m, T, as :func:`_dense`)."""
    p, r, t, m = v.shape
    return v.permute(0, 3, 2, 1).reshape(p, m * t, r)


def test_coarse_points_lie_on_a_lattice_deep_inside_masked_regions():
    observed = _block_mask((20, 18), np.s_[4:15, 3:12])
    chosen = coarse_points(observed, 1, 2)
    missing = np.argwhere(~observed)
    points = missing[chosen]
    assert len(points) == 16  # interior rows 5…13 and columns 4…10, even ones: 4 × 4
    assert (points % 2 == 0).all()
    for y, x in points:  # all neighbours missing
        assert not observed[y - 1 : y + 2, x - 1 : x + 2].any()
    assert not coarse_points(_block_mask((20, 18), np.s_[0:0, 0:0]), 1, 2).any()  # scattered only


def test_coarse_lattice_widens_to_fit_the_memory_cap(monkeypatch):
    observed = _block_mask((40, 40), np.s_[2:38, 2:38])
    dense_count = int(coarse_points(observed, 1, 3).sum())
    cap = 3 * dense_count**2 // 4  # the matrices are T = 3 blocks of c × c, one per whitened map
    monkeypatch.setattr(coarse_space, "COARSE_MATRIX_VALUES", cap)
    capped = int(coarse_points(observed, 1, 3).sum())
    assert 0 < capped < dense_count and 3 * capped**2 <= cap
    assert (3 * capped) ** 2 > cap  # more than one cT × cT matrix would allow
    monkeypatch.setattr(coarse_space, "COARSE_MATRIX_VALUES", 0)
    assert not coarse_points(observed, 1, 3).any()


def test_coarse_lattice_is_finer_for_fewer_maps(monkeypatch):
    observed = _block_mask((40, 40), np.s_[2:38, 2:38])
    missing = torch.nonzero(torch.as_tensor(~observed))
    every_other = int(coarse_points(observed, 1, 1).sum())
    monkeypatch.setattr(coarse_space, "COARSE_MATRIX_VALUES", every_other**2)  # one map: every other pixel
    lattice = CoarseLattice(observed, 1, missing)
    one, three = lattice.points(1), lattice.points(3)
    assert len(one) == int(coarse_points(observed, 1, 1).sum()) > len(three) == int(coarse_points(observed, 1, 3).sum())
    assert lattice.points(1) is one  # cached
    np.testing.assert_array_equal(one.numpy(), missing[torch.as_tensor(coarse_points(observed, 1, 1))].numpy())


def _diagonal_operator(shape, observed, ratios):
    """A masked operator whose whitened maps are the maps themselves, with ``λ_max γ_k`` = ``ratios``.

    ``B = diag(γ)`` and unit noise; also returns the kernel factors.
    """
    ratios = torch.tensor(ratios, dtype=torch.float64)
    n_models, n_tasks = ratios.shape
    model = GridICMModel(GridKernel(shape), n_models, n_tasks, rank=0, observed=observed, masked_solver="schur-cg")
    factors = model.kernel.factors(model.lengthscale.detach())
    lam_max = torch.stack([torch.linalg.eigvalsh(f)[:, -1] for f in factors]).prod(0)  # (P,)
    b, noise = torch.diag_embed(ratios / lam_max[:, None]), torch.ones_like(ratios)
    targets = torch.zeros(n_models, *shape, n_tasks, dtype=torch.float64)
    return MaskedOperator(solve_grid_icm(targets, b, noise, factors), model.missing_index), factors


def test_only_the_well_determined_whitened_maps_get_the_coarse_space():
    """``λ_max γ_k`` over :data:`COARSE_MIN_SNR`; models of a batch share ``T'``, each taking its best maps."""
    shape = (16, 14)
    observed = _block_mask(shape, np.s_[3:13, 3:11])
    ratios = [[0.5 * COARSE_MIN_SNR, 40 * COARSE_MIN_SNR, 2 * COARSE_MIN_SNR], [0.3, 0.1, 0.2]]
    op = _diagonal_operator(shape, observed, ratios)[0]
    # The whitened maps are B's eigenvectors, by increasing γ; their ratios are λ_max γ.
    whitened_ratios = 1.0 / op.whitened_weights.flatten(1, -2).amin(1) - 1.0
    torch.testing.assert_close(whitened_ratios, torch.tensor(ratios, dtype=torch.float64).sort(-1).values, rtol=1e-6,
                               atol=0)
    maps = coarse_maps(op)
    assert maps.shape == (2, 2)  # the first model needs two, so both models take two
    assert set(maps[0].tolist()) == {1, 2}  # 20 and 400 times COARSE_MIN_SNR
    assert set(maps[1].tolist()) == {1, 2}  # the second model's two best-determined maps, though none needs it
    assert coarse_maps(_diagonal_operator(shape, observed, ratios[1:])[0]).shape == (1, 0)  # tiles alone


def test_one_well_determined_map_gets_a_finer_lattice_and_fewer_iterations(monkeypatch):
    """Maps that share one structure: one whitened map needs the coarse space, and gets the lattice for one map.

    The cap is lowered so that the lattice for all three maps is coarser (as on large
    grids); the other maps keep their tiles and cost no iterations.
    """
    shape = (48, 48)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    observed = (yy - 47) ** 2 + (xx - 47) ** 2 > 32**2
    monkeypatch.setattr(coarse_space, "COARSE_MATRIX_VALUES", 3 * 120**2)
    op, factors = _diagonal_operator(shape, observed, [[0.5, 2.0, 1e4]])
    lattice = CoarseLattice(observed, 1, op.index)
    maps = coarse_maps(op)
    assert maps.tolist() == [[2]] and len(lattice.points(1)) > len(lattice.points(3))
    rhs = torch.randn(1, 4, 3, op.index.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        iterations = {name: op.whitened_cg(rhs, pre).iterations.amax(dim=(0, 1)) for name, pre in (
            ("tiles", op),
            ("all maps", CoarseCorrection(op, factors, lattice.points(3))),
            ("one map", CoarseCorrection(op, factors, lattice.points(1), maps)),
        )}
    worst = {name: int(its.max()) for name, its in iterations.items()}  # the map that needs the coarse space
    assert worst["one map"] < worst["all maps"] < worst["tiles"], iterations
    # Each whitened map converges on its own: the others, with low ratios, in a few iterations.
    assert (iterations["one map"][:2] < iterations["one map"][2] / 4).all(), iterations


@pytest.mark.parametrize("kind,shape,block,n_models,n_tasks,maps", [
    ("separable", (14, 12), np.s_[3:11, 2:10], 1, 2, None),
    ("separable", (14, 12), np.s_[3:11, 2:10], 2, 1, None),
    ("separable", (14, 12), np.s_[3:11, 2:10], 1, 3, [[2, 0]]),  # two of three whitened maps
    ("matern", (10, 9), np.s_[2:8, 2:8], 1, 2, None),  # one factor over all pixels
])
def test_two_level_preconditioner_is_exact_in_dense_algebra(kind, shape, block, n_models, n_tasks, maps):
    """``P⁻¹ = J⁻¹ + Z E⁻¹ Zᵀ``, its factor, the factor's inverse transpose and ``log det P``.

    ``Z`` in the original coordinates is the whitened coarse space ``basis ⊗ E_S`` mapped
    back (``E = Zᵀ C Z`` keeps its meaning); with all maps it spans the kernel columns
    at the coarse points for every map.
    """
    observed = _block_mask(shape, block)
    model = GridICMModel(GridKernel(shape, kind), n_models, n_tasks, rank=min(1, n_tasks - 1), observed=observed,
                         masked_solver="schur-cg")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(4), dtype=param.dtype))
        factors = model.kernel.factors(model.lengthscale)
        targets = torch.zeros(n_models, *model.kernel.factor_shape, n_tasks, dtype=torch.float64)
        op = MaskedOperator(solve_grid_icm(targets, model.task_covariance, model.noise, factors), model.missing_index)
        assert model.coarse_lattice is not None
        points = model.coarse_lattice.points(n_tasks if maps is None else len(maps[0]))
        coarse = CoarseCorrection(op, factors, points, None if maps is None else torch.tensor(maps))
    m = model.missing_index.shape[0]
    size, shape3 = m * n_tasks, (n_models, n_tasks, m)
    c, jacobi_inverse = _dense(op, size, shape3), _dense(op.precondition, size, shape3)
    unit = torch.eye(coarse.n_values, dtype=torch.float64).expand(n_models, -1, -1)
    whitened = _matrix(coarse.lift(unit))
    torch.testing.assert_close(whitened.transpose(-1, -2) @ whitened, unit)  # orthonormal
    z = _matrix(op.unwhiten_t(coarse.lift(unit)))
    if maps is None:
        columns = torch.stack([  # the kernel columns at the coarse points, per map
            torch.prod(torch.stack([f[p][model.missing_index[:, a]][:, points[:, a]]
                                    for a, f in enumerate(factors)]), 0) for p in range(n_models)])
        columns = torch.kron(columns, torch.eye(n_tasks, dtype=torch.float64)[None])
        projection = z @ torch.linalg.solve(z.transpose(-1, -2) @ z, z.transpose(-1, -2) @ columns)
        assert _rel(projection, columns) < 1e-10  # in the span of Z
    else:  # zero on the whitened map without a coarse space
        assert not coarse.lift(unit)[:, :, 1].any()
    e = z.transpose(-1, -2) @ c @ z
    expected = jacobi_inverse + z @ torch.linalg.inv(e) @ z.transpose(-1, -2)  # P⁻¹
    scale = float(expected.abs().max())
    torch.testing.assert_close(_dense(coarse.precondition, size, shape3), expected, rtol=1e-8, atol=1e-9 * scale)
    factor = _dense(coarse.factor, size, shape3)
    precond = torch.linalg.inv(expected)
    torch.testing.assert_close(factor @ factor.transpose(-1, -2), precond, rtol=1e-7,
                               atol=1e-8 * float(precond.abs().max()))
    inv_t = _dense(coarse.factor_inv_t, size, shape3)
    torch.testing.assert_close(inv_t, torch.linalg.inv(factor).transpose(-1, -2), rtol=1e-7,
                               atol=1e-8 * float(inv_t.abs().max()))
    torch.testing.assert_close(coarse.logdet_preconditioner(), -torch.linalg.slogdet(expected)[1])

    def condition(inverse_preconditioner):
        eig = torch.linalg.eigvals(inverse_preconditioner @ c).real
        return eig.max(-1).values / eig.min(-1).values

    assert (condition(expected) < condition(jacobi_inverse)).all()


@pytest.mark.parametrize("kind,shape,block", [("separable", (12, 11), np.s_[2:10, 3:10]),
                                              ("matern", (9, 8), np.s_[2:8, 1:7])])
@pytest.mark.parametrize("n_models,n_tasks,rank", [(2, 1, 0), (1, 3, 1)])
def test_exact_probes_with_a_coarse_space_give_the_dense_likelihood_and_gradient(kind, shape, block, n_models,
                                                                                 n_tasks, rank):
    (cg, dense), targets = _pair(kind, shape, n_tasks, rank, _block_mask(shape, block), n_probes="exact",
                                 n_models=n_models)
    assert cg.coarse_lattice is not None
    value, grad = _value_and_gradient(cg, targets)
    value_ref, grad_ref = _value_and_gradient(dense, targets)
    assert _rel(value, value_ref) < 1e-6
    for name in grad_ref:
        assert _rel(grad[name], grad_ref[name]) < 1e-6, name


def test_coarse_space_lets_cg_converge_on_a_large_masked_region(monkeypatch):
    """1633 masked pixels, ℓ = 6 px, noise 1e-6: tiles alone stop after 1000 iterations."""
    model, targets = _masked_disc_model(40, 6.0, 1e-6)
    assert model.coarse_lattice is not None
    with torch.no_grad():
        value = model.log_likelihood(targets)
    factorised = GridICMModel(GridKernel((48, 48)), 1, 1, rank=0, observed=model.observed, masked_solver="schur")
    factorised.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert abs(float(value - factorised.log_likelihood(targets))) < MLL_RTOL_PROBES * abs(float(value))
    monkeypatch.setattr(GridICMModel, "coarse_lattice", None)
    model, targets = _masked_disc_model(40, 6.0, 1e-6)
    with pytest.raises(CGConvergenceError), torch.no_grad():
        model.log_likelihood(targets)


def test_fit_with_a_masked_region_agrees_with_the_factorised_fit():
    shape = (26, 24)
    observed = _block_mask(shape, np.s_[6:20, 5:17], seed=6)
    model = GridICMModel(GridKernel(shape), 1, 2, rank=1, observed=observed, masked_solver="schur-cg")
    assert model.coarse_lattice is not None
    states = _fitted_states(_two_sine_maps(shape, 0.05, seed=5), observed, ("schur-cg", "schur"))
    for name in ("lengthscale", "noise"):
        np.testing.assert_allclose(states[0][name], states[1][name], rtol=0.02, err_msg=name)


def test_cg_failure_still_names_the_way_out(monkeypatch):
    monkeypatch.setattr(schur_iterative, "MAX_CG_ITERATIONS", 5)
    model, targets = _masked_disc_model(22, 3.0, 1e-3)
    with pytest.raises(CGConvergenceError, match="Crop such regions away"):
        model.log_likelihood(targets)
