"""The paper's section 6.3 claims, checked on the arrays behind examples/figures (issue 6).

Runs examples/sine_experiment.py's computing part (training included, no matplotlib).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import load_example


@pytest.fixture(scope="module")
def exp():
    module = load_example("sine_experiment")
    # the figures sweep each parameter over 801 points; the claims hold on a coarser grid
    # (the suite runs the emitted code unoptimized, tests/conftest.py)
    module.GRID = 201
    # the three emitted modules imported (and compiled by Numba) once for this file
    module.load_modules = functools.lru_cache(module.load_modules)
    return module


@pytest.fixture(scope="module")
def arrays(exp):
    return exp.compute_all(progress=False)


def jump_intervals(values, tol):
    """Indices t where values[t + 1] - values[t] exceeds tol: a jump inside [grid[t], grid[t + 1]]."""
    return np.flatnonzero(np.abs(np.diff(values)) > tol)


def test_trained_network_fits_the_sine(arrays):
    """Figure 2a: 1500 points, squared loss, seeded Adam."""
    assert arrays["x"].shape == (1500, 1) and np.all(np.abs(arrays["x"]) <= np.pi)
    assert arrays["train"].loss < 1e-3
    inp = arrays["inputs"]
    assert np.max(np.abs(inp["xL"] - np.sin(inp["x"]))) < 0.1


def test_training_is_deterministic(exp, arrays):
    modules = exp.load_modules()
    x, y = exp.make_data()
    again = exp.train_network(modules, x, y, progress=False)
    for k, a in arrays["params"].items():
        np.testing.assert_array_equal(again.params[k], a)


def test_s_is_piecewise_constant_in_x0_with_jumps_only_at_sign_changes(exp, arrays):
    """Figure 2b: s = dz_L/dx_0 from the emitted vjp jumps only where some z_1[k] or z_2[i] = 0."""
    inp = arrays["inputs"]
    x, s = inp["x"], inp["s"]
    jumps = jump_intervals(s, 1e-9)
    assert len(jumps) >= 5, "a fitted sine needs several affine pieces"
    z1, z2 = exp.preactivations(arrays["params"], x.reshape(-1, 1))
    pattern = np.hstack([z1 > 0, z2 > 0])
    for t in jumps:  # a jump: some hidden unit switches between the grid points ...
        assert np.any(pattern[t] != pattern[t + 1]), f"s jumps at x0 = {x[t]:.4f} with no sign change"
        # ... and the located boundaries have one there (they are what Figure 2 draws)
        assert np.any((inp["boundaries"][:, 0] >= x[t]) & (inp["boundaries"][:, 0] <= x[t + 1]))
    same = np.all(pattern[1:] == pattern[:-1], axis=1)
    assert np.max(np.abs(np.diff(s))[same]) == 0.0  # constant, to the last bit, inside a region
    # R_node = s^2 is therefore locally constant too; R_cdb is not (it sees x_L - y) but jumps with s
    assert np.max(np.abs(np.diff(inp["R_node"]))[same]) == 0.0
    assert np.max(np.abs(np.diff(inp["R_cdb"]))[same]) > 0
    assert np.argmax(np.abs(np.diff(inp["R_cdb"]))) in jumps


def _switch_index(grid, where):
    t = np.searchsorted(grid, where) - 1
    assert 0 < t < len(grid) - 2, "the switching point lies inside the sweep"
    return t


def test_s_is_locally_affine_in_w_and_locally_constant_in_b(exp, arrays):
    """Figure 3 at x0 = 1.022: the only jump is where z_2[i] changes sign."""
    c, single = arrays["coords"], arrays["single"]
    i, k = c["i"], c["k"]
    params = arrays["params"]
    for var, tol in (("w", 0.05), ("b", 1e-12)):  # in w, steps of the slope are ~1e-3
        grid, s = c[f"{var}_grid"], single[f"s_over_{var}"]
        t = _switch_index(grid, c[f"{var}_switch"])
        assert list(jump_intervals(s, tol)) == [t]
        # z_2[i] at x0 changes sign exactly across that interval
        signs = []
        for value in grid[t:t + 2]:
            p = {n: a.copy() for n, a in params.items()}
            if var == "w":
                p["W2"][i, k] = value
            else:
                p["b2"][i] = value
            signs.append(np.sign(exp.preactivations(p, np.array([[exp.X0]]))[1][0, i]))
        assert signs[0] != signs[1]
        assert abs(s[t + 1] - s[t]) > 0.05  # a real jump, not a kink
    # in w: affine on both sides, with a slope on the active side and none on the other
    s_w, grid = single["s_over_w"], c["w_grid"]
    t = _switch_index(grid, c["w_switch"])
    left, right = np.diff(s_w[:t + 1]), np.diff(s_w[t + 1:])
    slopes = [np.ptp(left), np.ptp(right)]
    assert max(slopes) < 1e-12 * max(1.0, np.max(np.abs(s_w)))  # equal steps: affine
    assert sorted([np.max(np.abs(left)), np.max(np.abs(right))])[0] == 0.0  # one side constant
    assert sorted([np.max(np.abs(left)), np.max(np.abs(right))])[1] > 1e-4  # the other side is not
    # in b: constant on both sides, to the last bit
    s_b = single["s_over_b"]
    tb = _switch_index(c["b_grid"], c["b_switch"])
    assert np.all(np.diff(s_b[:tb + 1]) == 0) and np.all(np.diff(s_b[tb + 1:]) == 0)


def test_bias_derivative_of_r_node_vanishes_but_not_of_r_cdb(arrays):
    """Figures 4-7: eta_L = 0 for the identity output makes dR_node/db = 0; cdb's eta_L != 0."""
    for data in (arrays["single"], arrays["batch"]):
        assert np.all(data["dR_node_db_over_b"] == 0.0)
        assert np.all(data["dR_node_db_over_w"] == 0.0)
        assert np.max(np.abs(data["dR_cdb_db_over_b"])) > 0.5
    # consistent with R_node itself: locally constant in b (one jump, at the switch)
    r = arrays["single"]["R_node_over_b"]
    assert len(jump_intervals(r, 1e-12)) == 1
    assert len(jump_intervals(arrays["batch"]["R_node_over_b"], 1e-12)) > 1  # one per switching sample


def test_emitted_derivatives_are_the_slopes_of_the_swept_penalties(arrays):
    """Away from the switch, central differences of R over the grid agree with the emitted dR."""
    c, single = arrays["coords"], arrays["single"]
    for var in ("w", "b"):
        grid = c[f"{var}_grid"]
        h = grid[1] - grid[0]
        t = _switch_index(grid, c[f"{var}_switch"])
        interior = np.r_[1:t - 1, t + 3:len(grid) - 1]
        for r in ("node", "cdb"):
            values, slope = single[f"R_{r}_over_{var}"], single[f"dR_{r}_d{var}_over_{var}"]
            fd = (values[interior + 1] - values[interior - 1]) / (2 * h)
            scale = max(1.0, np.max(np.abs(slope)))
            np.testing.assert_allclose(fd, slope[interior], atol=1e-4 * scale, err_msg=f"dR_{r}/d{var}")


def test_batch_values_are_means_of_single_sample_values(exp, arrays):
    modules = exp.load_modules()
    x, y = exp.pick_batch(arrays["x"], arrays["y"])
    assert x.shape == (exp.BATCH, 1)
    c = arrays["coords"]
    mean = exp._penalty_gradients(modules, arrays["params"], x, y, c["i"], c["k"])
    each = [exp._penalty_gradients(modules, arrays["params"], x[m:m + 1], y[m:m + 1], c["i"], c["k"])
            for m in range(0, exp.BATCH, 8)]
    sub = exp._penalty_gradients(modules, arrays["params"], x[::8], y[::8], c["i"], c["k"])
    for key in mean:
        assert sub[key] == pytest.approx(np.mean([e[key] for e in each]), rel=1e-10, abs=1e-14)


def test_batch_averaging_reduces_the_largest_jump(exp, arrays):
    """Figures 6-7 vs 4-5: the largest jump of dR/dw shrinks (ratio printed for the README)."""
    ratios = exp.jump_ratios(arrays)
    print(f"largest jump of dR/dw, batch (M={exp.BATCH}) / single: {ratios}")
    for r, ratio in ratios.items():
        assert ratio < 0.05, (r, ratio)
    # the single-sample jump is the discontinuity at the switch (not a steep slope)
    c, single = arrays["coords"], arrays["single"]
    t = _switch_index(c["w_grid"], c["w_switch"])
    for r in ("node", "cdb"):
        d = np.abs(np.diff(single[f"dR_{r}_dw_over_w"]))
        assert np.argmax(d) == t and d[t] > 20 * np.median(d)
    # the batch curves jump at many places (one per sample whose z_2[i] switches in the sweep) ...
    w_sw = arrays["batch_switch_w"]
    inside = np.sum((w_sw > c["w_grid"][0]) & (w_sw < c["w_grid"][-1]))
    assert inside > 10
    # ... each about 1/M of a single sample's
    assert np.sum(np.abs(np.diff(arrays["batch"]["s_over_w"], 2)) > 1e-9) > 10
