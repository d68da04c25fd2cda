"""Jacobian, projection and random-vector penalties (paper section 5.4, Algorithm 4)."""
from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from conftest import batch_for, compile_spec, write_model
from dbpgen import derive
from dbpgen.errors import ModelError
from oracle import Oracle
from test_gradients import assert_close, mlp

JAC = {"v": "jacobian", "p": "squared_norm", "weight": 0.4}
RTOL = 1e-10


def compare(spec, module, rng, v=None, batch=4, seed=None):
    oracle = Oracle(spec)
    params = module.init_params(seed=5)
    x, y, _ = batch_for(spec, rng, batch)
    yy = y if spec.get("loss", "none") != "none" else None
    value, grads = module.value_and_grad(params, x, yy, v=v, seed=seed)
    ref_value, ref_grads = oracle.value_and_grad(params, x, yy, v=v)
    assert_close(value, ref_value, RTOL)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], RTOL)
    assert_close(module.penalty(params, x, yy, v=v, seed=seed), oracle.penalty(params, x, yy, v=v), RTOL)
    return module, params, x, yy


GRID = [
    mlp("jac_relu_softmax", ["relu", "relu"], "softmax", "none", JAC, C=3),
    mlp("jac_relu_softmax_nll", ["relu", {"leaky_relu": 0.1}], "softmax", "nll", JAC, C=3),
    mlp("jac_relu_identity", ["relu", "relu"], None, "mse", JAC, C=3),
    mlp("jac_relu_sigmoid", ["Abs(z)", "relu"], "sigmoid", "mse", dict(JAC, p="norm"), C=3),
    mlp("jac_relu_logits", ["relu", "relu"], "softmax", "nll", dict(JAC, on="logits"), C=3),
    mlp("jac_relu_general_p", ["relu"], "softmax", "none", dict(JAC, p="(sqrt(s) - 1)**2"), widths=(5,), C=4),
    mlp("jac_tanh_softmax", ["tanh", "relu"], "softmax", "nll", JAC, C=3),
    mlp("jac_smooth_identity", ["softplus", "sin"], None, "none", JAC, C=2),
    mlp("jac_relu_naive", ["relu", "relu"], "softmax", "nll", dict(JAC, algorithm="naive"), C=3),
]


@pytest.mark.parametrize("spec", GRID, ids=[s["name"] for s in GRID])
def test_jacobian_matches_oracle(spec, tmp_path, rng):
    compare(spec, compile_spec(spec, tmp_path, jit=False), rng)


@pytest.mark.parametrize("spec", GRID[:5], ids=[s["name"] for s in GRID[:5]])
def test_naive_and_optimized_agree(spec, tmp_path, rng):
    opt = compile_spec(dict(spec, name=spec["name"] + "_opt"), tmp_path, jit=False)
    naive = compile_spec(dict(spec, name=spec["name"] + "_naive",
                              penalty=dict(spec["penalty"], algorithm="naive")), tmp_path, jit=False)
    assert "Algorithm 4" in opt.EQUATIONS and "Algorithm 4" not in naive.EQUATIONS
    params = opt.init_params(seed=1)
    x, y, _ = batch_for(spec, rng)
    yy = y if spec["loss"] != "none" else None
    a, ga = opt.value_and_grad(params, x, yy)
    b, gb = naive.value_and_grad(params, x, yy)
    assert_close(a, b, 1e-12)
    for k in ga:
        assert_close(ga[k], gb[k], 1e-12)


def test_optimized_on_a_smooth_network_names_the_activation(tmp_path):
    spec = mlp("bad_opt", ["relu", "tanh"], "softmax", "none", dict(JAC, algorithm="optimized"))
    with pytest.raises(ModelError) as err:
        derive(write_model(spec, tmp_path))
    assert "penalty.algorithm" in str(err.value) and "layers[1].act 'tanh'" in str(err.value)


def test_auto_picks_optimized_only_when_valid(tmp_path):
    relu = derive(write_model(mlp("a1", ["relu"], "softmax", "none", JAC, widths=(4,)), tmp_path))
    tanh = derive(write_model(mlp("a2", ["tanh"], "softmax", "none", JAC, widths=(4,)), tmp_path))
    assert any("Algorithm 4" in n for n in relu.simplifications)
    assert not any("Algorithm 4" in n for n in tanh.simplifications)


@pytest.mark.parametrize("L", [1, 2, 3, 4])
@pytest.mark.parametrize("C", [1, 2, 5, 10])
def test_operation_counts_match_the_paper(L, C, tmp_path):
    spec = mlp(f"ops_{L}_{C}", ["relu"] * (L - 1), "softmax", "none", JAC, widths=(4,) * (L - 1), C=C)
    d = derive(write_model(spec, tmp_path))
    naive, emitted = d.ops["naive"], d.ops["emitted"]
    assert naive["K"] + naive["KT"] == L + 3 * C * L - C
    assert naive["Kbox"] == 2 * C * L
    # Algorithm 4: 2CL + 2L - 1; where the Gram contraction fires (N_1 < 1.5 n_0 here), it
    # saves xi_0 = K_1^T and h_1 = K_1 per class and turns K^box_1 into one M W_1
    gram = any("Gram contraction" in n for n in d.simplifications)
    assert emitted["K"] + emitted["KT"] == 2 * C * L + 2 * L - 1 - (2 * C if gram else 0)
    assert emitted["Kbox"] == C * L + L - (C if gram else 0)


def test_projections_match_oracle_with_given_vectors(tmp_path, rng):
    spec = mlp("proj", ["relu", "tanh"], "softmax", "nll", {"v": "projections", "count": 3, "weight": 0.5}, C=4)
    m = compile_spec(spec, tmp_path, jit=False)
    v = rng.normal(size=(4, 3, 4))
    compare(spec, m, rng, v=v)


def test_projections_take_an_algorithm_naive_and_optimized_agree(tmp_path, rng):
    """algorithm: picks Algorithm 4 or n full double backpropagations for projections too."""
    pen = {"v": "projections", "count": 3, "weight": 0.5}
    spec = mlp("proj_opt", ["relu", "relu"], "softmax", "nll", dict(pen, algorithm="optimized"), C=4)
    (tmp_path / "optimized").mkdir()
    (tmp_path / "naive").mkdir()
    optimized = compile_spec(spec, tmp_path / "optimized", jit=False)
    naive = compile_spec(dict(spec, name="proj_naive", penalty=dict(pen, algorithm="naive")), tmp_path / "naive",
                         jit=False)
    assert optimized.OPS["emitted"]["K"] + optimized.OPS["emitted"]["KT"] \
        < naive.OPS["emitted"]["K"] + naive.OPS["emitted"]["KT"]
    v = rng.normal(size=(4, 3, 4))
    compare(spec, optimized, rng, v=v)
    compare(dict(spec, penalty=dict(pen, algorithm="naive")), naive, rng, v=v)


def test_projections_are_an_unbiased_frobenius_estimate(tmp_path, rng):
    spec = mlp("proj_unbiased", ["relu"], None, "none", {"v": "projections", "count": 2, "weight": 1.0},
               widths=(6,), n_in=5, C=4)
    m = compile_spec(spec, tmp_path, jit=False)
    params = m.init_params(seed=0)
    x = rng.normal(size=(1, 5))
    J = np.stack([m.jvp(params, x, e[None]) [0] for e in np.eye(5)], axis=1)  # (C, n)
    exact = np.sum(J ** 2)
    draws = np.array([m.penalty(params, x, seed=s)[0] for s in range(2000)])
    mean, se = draws.mean(), draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(mean - exact) <= 3 * se, (mean, exact, se)


def test_random_is_reproducible_and_matches_oracle(tmp_path, rng):
    pen = {"v": "random", "iterations": 3, "p": "norm", "weight": 0.3, "seed": 7}
    spec = mlp("rand", ["relu", "tanh"], "softmax", "nll", pen, C=3)
    m = compile_spec(spec, tmp_path, jit=False)
    v0 = rng.normal(size=(4, 3))
    compare(spec, m, rng, v=v0)
    params = m.init_params()
    x = rng.normal(size=(4, 3))
    y = np.eye(3)[[0, 1, 2, 0]]
    assert m.value_and_grad(params, x, y)[0] == m.value_and_grad(params, x, y)[0]
    assert m.value_and_grad(params, x, y, seed=1)[0] != m.value_and_grad(params, x, y, seed=2)[0]


@pytest.mark.parametrize("pen", [{"v": "random", "iterations": 2, "p": "norm", "seed": 11},
                                 {"v": "projections", "count": 3}], ids=["random", "projections"])
def test_directions_of_a_sample_do_not_depend_on_how_the_batch_is_split(pen, tmp_path, rng):
    spec = mlp("split_" + pen["v"], ["tanh"], None, "none", pen, widths=(6,), n_in=5, C=4)
    m = compile_spec(spec, tmp_path, jit=False)
    whole = m.directions(9, seed=3)
    assert whole.shape == ((9, 3, 4) if pen["v"] == "projections" else (9, 4))
    parts = [m.directions(n, seed=3, first=start) for start, n in ((0, 2), (2, 1), (3, 6))]
    assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(m.directions(9, seed=4), whole)
    # the penalty of samples 2..4 alone, given their part of the directions, is theirs in the whole batch
    params, x = m.init_params(seed=1), rng.normal(size=(9, 5))
    R = m.penalty(params, x, seed=3)
    np.testing.assert_array_equal(m.penalty(params, x[2:5], v=m.directions(3, seed=3, first=2)), R[2:5])
    with pytest.raises(ValueError, match="first must be a non-negative integer"):
        m.directions(2, first=-1)
    last = 2 ** 64 // (2 * 4 * (3 if pen["v"] == "projections" else 1))  # first + batch: each sample's counters < 2^64
    far = m.directions(3, seed=3, first=last - 3)
    assert np.isfinite(far).all() and np.array_equal(m.directions(1, seed=3, first=last - 1), far[2:])
    assert not np.array_equal(far[:1], whole[:1])
    with pytest.raises(ValueError, match=f"first \\+ batch must be at most {last}"):
        m.directions(3, seed=3, first=last - 2)


def test_drawn_directions_are_uniform_on_the_sphere(tmp_path):
    spec = mlp("sphere", ["tanh"], None, "none", {"v": "random", "iterations": 1}, widths=(3,), n_in=2, C=4)
    m = compile_spec(spec, tmp_path, jit=False)
    n = 40000
    d = m.directions(n, seed=0)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-13)
    # uniform on S^3: mean 0, second moment I/4, each coordinate's sd 1/2; 5 standard errors
    se = 0.5 / np.sqrt(n)
    assert np.all(np.abs(d.mean(axis=0)) < 5 * se)
    assert np.all(np.abs(d.T @ d / n - np.eye(4) / 4) < 5 * se)
    # neighbouring samples and neighbouring seeds are uncorrelated (a product's sd is 1/4)
    other = m.directions(n, seed=1)
    for a, b in ((d[1:], d[:-1]), (d, other)):
        assert np.all(np.abs(np.mean(a * b, axis=0)) < 5 * 0.25 / np.sqrt(n))
    # a coordinate of a uniform point on S^3, (x+1)/2, is Beta(3/2, 3/2)
    from scipy import stats
    assert stats.kstest((d[:, 0] + 1) / 2, stats.beta(1.5, 1.5).cdf).pvalue > 1e-3


def test_power_iterations_reach_the_spectral_norm(tmp_path, rng):
    pen = {"v": "random", "iterations": 200, "p": "norm"}
    spec = mlp("spectral", ["relu"], None, "none", pen, widths=(7,), n_in=5, C=3)
    m = compile_spec(spec, tmp_path, jit=False)
    params = m.init_params(seed=3)
    x = rng.normal(size=(2, 5))
    R = m.penalty(params, x, seed=0)
    for b in range(2):
        J = np.stack([m.jvp(params, x[b:b + 1], e[None])[0] for e in np.eye(5)], axis=1)
        assert R[b] == pytest.approx(np.linalg.norm(J, 2), rel=1e-8)


def _count_module(spec, tmp_path, naive=False):
    from conftest import import_module
    from dbpgen.compiler import compile_file

    out = compile_file(write_model(spec, tmp_path), tmp_path / ("naive" if naive else "emitted"),
                       simplified=not naive, count_ops=True)
    return import_module(out, jit=False)


def assert_measured_counts_equal_reported(spec, tmp_path, naive, rng):
    m = _count_module(spec, tmp_path, naive)
    x, y, _ = batch_for(spec, rng, 3)
    m.reset_counts()
    m.value_and_grad(m.init_params(), x, y)
    column = m.OPS["naive" if naive else "emitted"]
    assert m.COUNTS == {k: column[k] for k in ("K", "KT", "Kbox")}


@pytest.mark.parametrize("L,C", [(1, 1), (2, 3), (3, 5), (4, 10)])
@pytest.mark.parametrize("naive", [False, True], ids=["emitted", "naive"])
def test_measured_operation_counts_equal_reported(L, C, naive, tmp_path, rng):
    """`dbpgen compile --count-ops`: the kernels count their own calls."""
    spec = mlp(f"cnt_{L}_{C}", ["relu"] * (L - 1), "softmax", "nll", JAC, widths=(3,) * (L - 1), C=C)
    assert_measured_counts_equal_reported(spec, tmp_path, naive, rng)


@pytest.mark.parametrize("spec", [
    mlp("cnt_cdb", ["relu", "relu"], "softmax", "nll", {"v": "loss_gradient"}),
    mlp("cnt_node", ["relu", "relu"], None, "mse", {"v": "output"}),
    mlp("cnt_tanh", ["tanh", "tanh"], None, "mse", {"v": "output"}),
    # the power iterations run before the program in every call, and count with it
    mlp("cnt_random", ["tanh"], None, "mse", {"v": "random", "iterations": 2, "p": "norm"}),
], ids=lambda s: s["name"])
def test_measured_counts_for_single_vector_penalties(spec, tmp_path, rng):
    for naive in (False, True):
        assert_measured_counts_equal_reported(spec, tmp_path, naive, rng)


@pytest.mark.parametrize("vectorized", [True, False], ids=["stacked_rows", "loop"])
@pytest.mark.parametrize("pen", [JAC, {"v": "projections", "count": 3, "p": "norm"}], ids=["jacobian", "projections"])
def test_the_loop_over_outputs_in_the_fused_schedule(pen, vectorized, tmp_path, rng, monkeypatch):
    """C double backpropagations (smooth hidden layers) in the fused schedule. Vectorized
    (fused._Fuser.vectorize_loop): a loop over blocks of vectors, each block one pass over the
    batch stacked c times, its sums the sums of c blocks of rows. Where that does not apply
    (here: forced), the loop over the vectors writes the
    operands of each weight adjoint it sums into blocks of stacked buffers and multiplies
    once after it (stack_loop), and its coordinate-wise sums add values of fused loops
    (accumulated_values). Batches 1 and 6 (and 300, 1100: blocks of 3 and 1, of 1) match
    the oracle, plain Python and jitted."""
    from dbpgen.backend import fused

    if not vectorized:
        monkeypatch.setattr(fused._Fuser, "vectorize_loop", lambda self, loop, after: None)
    spec = mlp(f"stacked_{pen['v']}", ["tanh", "sigmoid"], "softmax", "nll", pen, widths=(6, 5), C=4)
    v = None
    for jit in (False, True):
        (tmp_path / str(jit)).mkdir()
        m = compile_spec(spec, tmp_path / str(jit), jit=jit, schedule="fused")
        program = inspect.getsource(getattr(m._value_and_grad, "py_func", m._value_and_grad))
        if vectorized:  # blocks of c_ vectors, c_ = 1024 // B: here all in one block
            assert "for i in range" not in program and re.search(r"for i0_ in range\(0, [34], c_\)", program)
            assert program.count("_blocksum_add(") >= 3 and program.count("_tile(") >= 3
            products = [line for line in program.splitlines() if "+= _dense_Kbox(" in line and "block's rows" in line]
            assert len(products) == 3  # one per layer and block
        else:
            products = [line for line in program.splitlines() if "= _dense_Kbox(" in line and "stacked i" in line]
            assert len(products) == 3 and "+= _dense_Kbox" not in program  # one per layer, after the loop
            sums = [line.split("#")[0].strip() for line in program.splitlines() if "+=" in line and "summed over i" in line]
            etas = [line for line in sums if line.startswith("eta")]  # eta_L (App. B.1), the sources of eq. 28
            assert etas and all(re.fullmatch(r"\w+ \+= t\d+_", line) for line in etas), sums  # values of fused loops
        for batch in (1, 6, 300, 1100) if vectorized else (1, 6):  # blocks of 3 and 1 vectors, of 1
            if pen["v"] == "projections":
                v = rng.normal(size=(batch, 3, 4))
            compare(spec, m, rng, v=v, batch=batch)


CONV_LOOPS = [
    {"name": "loop_conv2d", "dtype": "float64", "input": [2, 8, 8], "layers": [
        {"conv2d": {"channels": 3, "kernel": 3, "padding": 1}, "act": "tanh"}, {"avgpool": 2},
        {"conv2d": {"channels": 4, "kernel": 3}, "act": "softplus"}, "flatten",
        {"dense": 5, "act": "sigmoid"}, {"dense": 3, "act": "softmax"}], "loss": "nll", "penalty": JAC},
    {"name": "loop_conv1d", "dtype": "float64", "input": [2, 17], "layers": [
        {"conv1d": {"channels": 3, "kernel": 3, "stride": 2}, "act": "elu"}, {"avgpool": 2}, "flatten",
        {"dense": 4, "act": "tanh"}, {"dense": 3}], "loss": "mse",
     "penalty": {"v": "projections", "count": 2, "p": "norm"}},
]


@pytest.mark.parametrize("spec", CONV_LOOPS, ids=[s["name"] for s in CONV_LOOPS])
def test_the_loop_over_outputs_of_an_image_model_as_stacked_rows(spec, tmp_path, rng):
    """Convolutions, pooling and flatten take the batch stacked C times as any batch: the
    vectorized loop (tiled images, stacked one-hots or directions) matches the oracle."""
    m = compile_spec(spec, tmp_path, schedule="fused")
    assert "_blocksum_add(" in inspect.getsource(m._value_and_grad)
    for batch in (1, 3):
        v = rng.normal(size=(batch, 2, 3)) if spec["penalty"]["v"] == "projections" else None
        compare(spec, m, rng, v=v, batch=batch)


def _jacobian_net(C):
    return mlp(f"mem_{C}", ["relu", "relu"], "softmax", "none", JAC, widths=(1024, 1024), n_in=256, C=C)


def test_reported_peak_memory_is_flat_in_C(tmp_path):
    small = derive(write_model(_jacobian_net(10), tmp_path)).compiled.peak_bytes(8)
    large = derive(write_model(_jacobian_net(100), tmp_path)).compiled.peak_bytes(8)
    assert large["emitted"] <= 1.10 * small["emitted"]


def test_measured_peak_memory_is_flat_in_C(tmp_path, rng):
    """Peak traced allocation of the emitted program (run as Python, which NumPy reports to
    tracemalloc), less the returned gradients, for C = 10 and C = 100."""
    import tracemalloc

    peaks = {}
    for C in (10, 100):
        m = compile_spec(_jacobian_net(C), tmp_path, jit=False)
        params = m.init_params()
        x = rng.normal(size=(8, 256))
        tracemalloc.start()
        _, grads = m.value_and_grad(params, x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[C] = peak - sum(g.nbytes for g in grads.values())
    assert peaks[100] <= 1.10 * peaks[10], peaks


@pytest.mark.parametrize("pen", [JAC, dict(JAC, p="(sqrt(s) - 1)**2"), {"v": "projections", "count": 4}],
                         ids=["jacobian", "general_p", "projections"])
def test_gram_contraction_of_a_wide_input_layer(pen, tmp_path, rng):
    """Beyond the paper: xi_0, h_1 and K^box_1 through W_1 W_1^T when N_1 << n_0."""
    spec = mlp("gram_" + pen["v"], ["leaky_relu", "leaky_relu"], "softmax", "nll", pen, widths=(4, 3), n_in=40, C=3)
    m = compile_spec(spec, tmp_path, jit=False)
    assert "Gram contraction" in m.EQUATIONS
    assert m.OPS["emitted"]["K"] + m.OPS["emitted"]["KT"] < 2 * 3 * 3 + 2 * 3 - 1 + 2
    v = rng.normal(size=(4, 4, 3)) if pen["v"] == "projections" else None
    compare(spec, m, rng, v=v)
    narrow = derive(write_model(mlp("narrow", ["relu"], "softmax", "nll", JAC, widths=(8,), n_in=3), tmp_path))
    assert not any("Gram" in n for n in narrow.simplifications)
