"""Validate the autograd reference oracle itself (float64 finite differences, closed forms).

These tests never touch dbpgen: they establish that tests/oracle.py is trustworthy
before it is used to judge generated code.
"""

import itertools

import numpy as np
import pytest

try:
    from oracle import Oracle, central_difference_grad, compile_expression, directional_check
except ImportError:  # tests/ turned into a package
    from tests.oracle import (Oracle, central_difference_grad, compile_expression,
                              directional_check)

RTOL, ATOL = 1e-6, 1e-8
N_IN, BATCH = 3, 4


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def model(layers, loss="mse", penalty=None, n_in=N_IN):
    spec = {"name": "t", "input": [n_in], "layers": layers, "loss": loss}
    if penalty is not None:
        spec["penalty"] = penalty
    return spec


def make_data(oracle, seed=1, batch=BATCH, soft_labels=False):
    rng = np.random.default_rng(seed)
    C = oracle.n_out
    x = rng.standard_normal((batch, *oracle.input_shape))
    if oracle.loss_kind == "nll":
        y = rng.dirichlet(np.ones(C), batch) if soft_labels else np.eye(C)[rng.integers(0, C, batch)]
    else:
        y = rng.standard_normal((batch, C))
    v = rng.standard_normal((batch, C))
    return x, y, v


def assert_grads_close(grads, reference):
    assert grads.keys() == reference.keys()
    for name in grads:
        np.testing.assert_allclose(grads[name], reference[name], rtol=RTOL, atol=ATOL,
                                   err_msg=name)


def check_against_fd(spec, seed=1, soft_labels=False):
    """value_and_grad of the objective vs central differences; returns the pieces."""
    oracle = Oracle(spec)
    params = oracle.init_params(seed=0)
    x, y, v = make_data(oracle, seed, soft_labels=soft_labels)
    objective = lambda p: oracle.objective(p, x, y, v)
    value, grads = oracle.value_and_grad(params, x, y, v)
    assert np.isclose(value, float(objective(params)), rtol=1e-12)
    assert_grads_close(grads, central_difference_grad(objective, params))
    analytic, numeric = directional_check(objective, grads, params, np.random.default_rng(7))
    assert np.isclose(analytic, numeric, rtol=RTOL, atol=ATOL)
    return oracle, params, x, y, v


def fd_input_grad(f, x, eps=1e-6):
    """Central-difference gradient of a scalar f(x) w.r.t. the array x."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        g[idx] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
    return g


# --------------------------------------------------------------------------
# gradients of the full objective: outputs x losses x v kinds x on
# --------------------------------------------------------------------------

OUTPUT_ACTS = ["identity", "sigmoid", "softmax"]
LOSSES = ["mse", "nll", "none"]
V_KINDS = ["loss_gradient", "output", "given"]
P_KINDS = ["squared_norm", "norm", "(sqrt(s) - 1)**2"]
ONS = ["output", "logits"]


def _grid():
    cases = []
    combos = itertools.product(OUTPUT_ACTS, LOSSES, V_KINDS, ONS)
    for n, (out_act, loss, v, on) in enumerate(combos):
        if loss == "nll" and out_act != "softmax":
            continue
        if loss == "none" and v == "loss_gradient":
            continue  # xi_0 = 0: R = p(0) is constant (and sqrt is not differentiable there)
        cases.append((out_act, loss, v, on, P_KINDS[n % len(P_KINDS)]))
    return cases


@pytest.mark.parametrize("out_act,loss,v,on,p", _grid(),
                         ids=lambda c: str(c).replace(" ", ""))
def test_objective_gradient_grid(out_act, loss, v, on, p):
    penalty = {"v": v, "p": p, "weight": 0.7, "on": on}
    if v == "output":
        penalty["index"] = 2
    spec = model([{"dense": 4, "act": "tanh"}, {"dense": 3, "act": out_act}], loss, penalty)
    check_against_fd(spec)


HIDDEN_CASES = {
    "softplus_sin": [{"dense": 5, "act": "softplus"}, {"dense": 4, "act": "sin"}, {"dense": 2}],
    "sigmoid_nobias": [{"dense": 4, "act": "sigmoid", "bias": False},
                       {"dense": 2, "bias": False}],
    "mish_expr": [{"dense": 4, "act": "z*tanh(log(1 + exp(z)))"}, {"dense": 2, "act": "tanh"}],
    "silu_elu_leaky": [{"dense": 4, "act": "silu"}, {"dense": 4, "act": "elu"},
                       {"dense": 3, "act": {"leaky_relu": 0.2}}, {"dense": 2}],
    "erf_atan_expr": [{"dense": 4, "act": "erf(z) + 0.1*atan(z)"},
                      {"dense": 2, "act": "sigmoid(z)*z + cosh(z)/3"}],
    "mixed_bias": [{"dense": 4, "act": "tanh", "bias": False}, {"dense": 3, "act": "sin"},
                   {"dense": 2, "bias": False}],
}


@pytest.mark.parametrize("name", sorted(HIDDEN_CASES))
@pytest.mark.parametrize("v", V_KINDS)
def test_hidden_activations(name, v):
    spec = model(HIDDEN_CASES[name], "mse", {"v": v, "p": "norm", "weight": 0.5})
    check_against_fd(spec)


def test_nll_soft_labels():
    spec = model([{"dense": 4, "act": "tanh"}, {"dense": 3, "act": "softmax"}], "nll",
                 {"v": "loss_gradient", "p": "log(1 + s)", "weight": 2.0})
    check_against_fd(spec, soft_labels=True)


def test_no_penalty_is_plain_mean_loss():
    spec = model([{"dense": 4, "act": "tanh"}, {"dense": 2}], "mse")
    oracle, params, x, y, _ = check_against_fd(spec)
    assert np.allclose(oracle.penalty(params, x, y), 0.0)
    value, _ = oracle.value_and_grad(params, x, y)
    assert np.isclose(value, np.mean(np.sum((oracle.forward(params, x) - y) ** 2, axis=1)))


def _min_abs_preactivation(oracle, params, x):
    h, smallest = x, np.inf
    for layer in oracle.layers:
        z = h @ params[f"W{layer['j']}"].T + params.get(f"b{layer['j']}", 0.0)
        smallest = min(smallest, np.min(np.abs(z)))
        h = layer["act"](z)
    return smallest


@pytest.mark.parametrize("v", V_KINDS)
def test_relu_net_away_from_kinks(v):
    spec = model([{"dense": 6, "act": "relu"}, {"dense": 5, "act": "relu"}, {"dense": 2}],
                 "mse", {"v": v, "weight": 0.3})
    oracle, params, x, _, _ = check_against_fd(spec)
    assert _min_abs_preactivation(oracle, params, x) > 1e-3  # FD steps never cross a kink


def test_relu_penalty_gradient_has_no_second_derivative_term():
    """ReLU + linear output + v = e_i: xi_0 is piecewise constant in x, but dR/dW != 0."""
    spec = model([{"dense": 5, "act": "relu"}, {"dense": 2}], "none", {"v": "output"})
    oracle, params, x, _, _ = check_against_fd(spec)
    assert any(np.abs(g).max() > 1e-3 for g in oracle.value_and_grad(params, x)[1].values())


@pytest.mark.parametrize("kind", ["jacobian", "projections", "random"])
def test_extra_v_kinds(kind):
    penalty = {"v": kind, "weight": 0.4, "iterations": 0}
    spec = model([{"dense": 4, "act": "tanh"}, {"dense": 3, "act": "softmax"}], "nll", penalty)
    oracle = Oracle(spec)
    params = oracle.init_params()
    x, y, v = make_data(oracle)
    if kind == "projections":
        v = np.random.default_rng(3).standard_normal((BATCH, 2, 3))
    if kind == "jacobian":
        v = None
    objective = lambda p: oracle.objective(p, x, y, v)
    _, grads = oracle.value_and_grad(params, x, y, v)
    assert_grads_close(grads, central_difference_grad(objective, params))


def _per_sample_jacobians(oracle, params, x):
    C = oracle.n_out
    rows = [oracle.vjp(params, x, np.tile(np.eye(C)[i], (len(x), 1))) for i in range(C)]
    return np.stack(rows, axis=1)  # (B, C, n)


def test_random_power_iteration_is_constant_and_converges():
    layers = [{"dense": 4, "act": "tanh"}, {"dense": 3}]
    pen = {"v": "random", "iterations": 60, "p": "norm"}
    oracle = Oracle(model(layers, "mse", pen))
    params = oracle.init_params()
    x, y, v = make_data(oracle)
    # R -> spectral norm of each per-sample Jacobian
    sigma = np.linalg.norm(_per_sample_jacobians(oracle, params, x), ord=2, axis=(1, 2))
    np.testing.assert_allclose(oracle.penalty(params, x, y, v), sigma, rtol=1e-9)
    # gradient: v held constant, i.e. equal to `given` with the iterated v
    oracle.iterations = 2
    frozen_v = oracle._power_iterated(params, x, v)
    given = Oracle(model(layers, "mse", {"v": "given", "p": "norm"}))
    _, grads = oracle.value_and_grad(params, x, y, v)
    _, expected = given.value_and_grad(params, x, y, frozen_v)
    assert_grads_close(grads, expected)


def test_jacobian_penalty_is_squared_frobenius_norm():
    layers = [{"dense": 4, "act": "sin"}, {"dense": 3, "act": "softmax"}]
    oracle = Oracle(model(layers, "none", {"v": "jacobian"}))
    params = oracle.init_params()
    x, _, _ = make_data(oracle)
    frob = np.sum(_per_sample_jacobians(oracle, params, x) ** 2, axis=(1, 2))
    np.testing.assert_allclose(oracle.penalty(params, x), frob, rtol=1e-12)


# --------------------------------------------------------------------------
# xi_0 itself, vjp and jvp vs finite differences in x
# --------------------------------------------------------------------------

@pytest.mark.parametrize("on", ONS)
@pytest.mark.parametrize("loss,out_act", [("mse", "sigmoid"), ("nll", "softmax"),
                                          ("mse", "identity")])
def test_loss_gradient_xi0_is_input_gradient_of_loss(loss, out_act, on):
    spec = model([{"dense": 4, "act": "tanh"}, {"dense": 3, "act": out_act}], loss,
                 {"v": "loss_gradient", "on": on})
    oracle = Oracle(spec)
    params = oracle.init_params()
    x, y, _ = make_data(oracle)
    xi0 = oracle.xi0(params, x, y)
    expected = fd_input_grad(lambda xx: np.sum(oracle.loss(params, xx, y)), x)
    np.testing.assert_allclose(xi0, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("on", ONS)
def test_output_and_given_xi0(on):
    spec = model([{"dense": 4, "act": "sin"}, {"dense": 3, "act": "softmax"}], "none",
                 {"v": "output", "index": 1, "on": on})
    oracle = Oracle(spec)
    params = oracle.init_params()
    x, _, v = make_data(oracle)
    out = lambda xx: oracle._forward_both(params, xx)[0 if on == "logits" else 1]
    expected = fd_input_grad(lambda xx: np.sum(out(xx)[:, 1]), x)
    np.testing.assert_allclose(oracle.xi0(params, x), expected, rtol=RTOL, atol=ATOL)
    oracle.v_kind = "given"
    expected = fd_input_grad(lambda xx: np.sum(out(xx) * v), x)
    np.testing.assert_allclose(oracle.xi0(params, x, v=v), expected, rtol=RTOL, atol=ATOL)


def test_vjp_and_jvp():
    spec = model([{"dense": 5, "act": "softplus"}, {"dense": 3, "act": "softmax"}], "none")
    oracle = Oracle(spec)
    params = oracle.init_params()
    x, _, v = make_data(oracle)
    u = np.random.default_rng(5).standard_normal(x.shape)
    Ju, JTv = oracle.jvp(params, x, u), oracle.vjp(params, x, v)
    assert Ju.shape == (BATCH, 3) and JTv.shape == (BATCH, N_IN)
    eps = 1e-6
    fd = (oracle.forward(params, x + eps * u) - oracle.forward(params, x - eps * u)) / (2 * eps)
    np.testing.assert_allclose(Ju, fd, rtol=RTOL, atol=ATOL)
    # per-sample adjointness <J u, v> = <u, J^T v>
    np.testing.assert_allclose(np.sum(Ju * v, axis=1), np.sum(u * JTv, axis=1), rtol=1e-12)


def test_vjp_ignores_on_logits():
    layers = [{"dense": 4, "act": "tanh"}, {"dense": 3, "act": "softmax"}]
    a = Oracle(model(layers, "none", {"v": "given", "on": "logits"}))
    b = Oracle(model(layers, "none", {"v": "given"}))
    params = a.init_params()
    x, _, v = make_data(a)
    np.testing.assert_array_equal(a.vjp(params, x, v), b.vjp(params, x, v))
    assert not np.allclose(a.xi0(params, x, v=v), b.xi0(params, x, v=v))


# --------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------

def test_linear_net_output_penalty_closed_form():
    C, i = 3, 2
    spec = model([{"dense": C, "bias": False}], "none",
                 {"v": "output", "index": i, "p": "squared_norm", "weight": 1.0})
    oracle = Oracle(spec)
    params = oracle.init_params(seed=4)
    W = params["W1"]
    x, _, _ = make_data(oracle)
    R = oracle.penalty(params, x)
    np.testing.assert_allclose(R, np.full(BATCH, np.sum(W[i] ** 2)), rtol=1e-14)
    value, grads = oracle.value_and_grad(params, x)
    expected = np.zeros_like(W)
    expected[i] = 2 * W[i]
    assert np.isclose(value, np.sum(W[i] ** 2), rtol=1e-14)
    np.testing.assert_allclose(grads["W1"], expected, rtol=1e-14, atol=1e-15)


def test_linear_mse_loss_gradient_closed_form():
    spec = model([{"dense": 2}], "mse", {"v": "loss_gradient"})
    oracle = Oracle(spec)
    params = oracle.init_params(seed=2)
    W, b = params["W1"], params["b1"]
    x, y, _ = make_data(oracle)
    expected = 2 * (x @ W.T + b - y) @ W  # rows: 2 W^T (W x + b - y)
    np.testing.assert_allclose(oracle.xi0(params, x, y), expected, rtol=1e-13)
    np.testing.assert_allclose(oracle.penalty(params, x, y), np.sum(expected ** 2, axis=1),
                               rtol=1e-13)


def test_softmax_nll_on_logits_closed_form():
    """Appendix B.2: for one-hot y, grad_{z_L} l = x_L - y, so xi_0 = W^T (x_L - y)."""
    spec = model([{"dense": 3, "act": "softmax"}], "nll", {"v": "loss_gradient", "on": "logits"})
    oracle = Oracle(spec)
    params = oracle.init_params(seed=3)
    x, y, _ = make_data(oracle)
    x_L = oracle.forward(params, x)
    np.testing.assert_allclose(oracle._loss_gradient_v(params, x, y), x_L - y, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(oracle.xi0(params, x, y), (x_L - y) @ params["W1"],
                               rtol=1e-12, atol=1e-15)


def test_loss_gradient_xi0_independent_of_on():
    layers = [{"dense": 4, "act": "tanh"}, {"dense": 3, "act": "softmax"}]
    a = Oracle(model(layers, "nll", {"v": "loss_gradient", "on": "logits"}))
    b = Oracle(model(layers, "nll", {"v": "loss_gradient"}))
    params = a.init_params()
    x, y, _ = make_data(a)
    np.testing.assert_allclose(a.penalty(params, x, y), b.penalty(params, x, y), rtol=1e-12)


def test_loss_gradient_v_is_not_held_constant():
    """Same value as `given` with v frozen at grad_out l, but a different parameter gradient."""
    layers = [{"dense": 4, "act": "tanh"}, {"dense": 2}]
    dbp = Oracle(model(layers, "mse", {"v": "loss_gradient"}))
    frozen = Oracle(model(layers, "mse", {"v": "given"}))
    params = dbp.init_params()
    x, y, _ = make_data(dbp)
    v = 2 * (dbp.forward(params, x) - y)
    value_a, grads_a = dbp.value_and_grad(params, x, y)
    value_b, grads_b = frozen.value_and_grad(params, x, y, v)
    assert np.isclose(value_a, value_b, rtol=1e-13)
    assert not np.allclose(grads_a["W2"], grads_b["W2"], rtol=1e-3)


def test_p_kinds_relation():
    layers = [{"dense": 4, "act": "tanh"}, {"dense": 2}]
    pens = {p: Oracle(model(layers, "mse", {"v": "output", "p": p}))
            for p in ["squared_norm", "norm", "(sqrt(s) - 1)**2"]}
    params = pens["norm"].init_params()
    x, _, _ = make_data(pens["norm"])
    s = pens["squared_norm"].penalty(params, x)
    np.testing.assert_allclose(pens["norm"].penalty(params, x), np.sqrt(s), rtol=1e-14)
    np.testing.assert_allclose(pens["(sqrt(s) - 1)**2"].penalty(params, x),
                               (np.sqrt(s) - 1) ** 2, rtol=1e-12)


# --------------------------------------------------------------------------
# parameters, activations, expression evaluator
# --------------------------------------------------------------------------

def test_init_params_matches_torch_linear_draw_order():
    spec = model([{"dense": 4, "bias": False}, {"dense": 2}], "none")
    params = Oracle(spec).init_params(seed=11)
    rng = np.random.default_rng(11)
    W1 = rng.uniform(-1 / np.sqrt(3), 1 / np.sqrt(3), (4, 3))
    W2 = rng.uniform(-0.5, 0.5, (2, 4))
    b2 = rng.uniform(-0.5, 0.5, 2)
    assert sorted(params) == ["W1", "W2", "b2"]
    for got, want in zip([params["W1"], params["W2"], params["b2"]], [W1, W2, b2]):
        np.testing.assert_array_equal(got, want)


def test_from_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: m\ninput: [2]\nlayers:\n  - {dense: 3, act: relu}\n  - {dense: 1}\n"
                    "loss: mse\npenalty: {v: loss_gradient, weight: 0.1}\n")
    oracle = Oracle.from_yaml(path)
    assert oracle.weight == 0.1 and oracle.n_out == 1
    assert oracle.forward(oracle.init_params(), np.ones((2, 2))).shape == (2, 1)


ACT_VALUES = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "elu": lambda z: np.where(z > 0, z, np.expm1(z)),
    "silu": lambda z: z / (1 + np.exp(-z)),
    "sin": np.sin,
    "Max(z, 0.2*z)": lambda z: np.where(z > 0, z, 0.2 * z),
    "Abs(z)": np.abs,
    "z^2/2 - pi*E": lambda z: z ** 2 / 2 - np.pi * np.e,
    "Heaviside(z)": lambda z: (z > 0).astype(float),
    "erf(z)": lambda z: np.vectorize(__import__("math").erf)(z),
    "-asinh(z) + Min(z, 1, 2)": lambda z: -np.arcsinh(z) + np.minimum(z, 1),
}


@pytest.mark.parametrize("act", sorted(ACT_VALUES))
def test_activation_values(act):
    spec = model([{"dense": 3, "act": act}], "none", n_in=3)
    oracle = Oracle(spec)
    z = np.array([[-2.5, -0.3, 0.7], [1.9, 3.0, -1.1]])
    np.testing.assert_allclose(oracle.layers[0]["act"](z), ACT_VALUES[act](z), rtol=1e-13)


def test_softmax_is_stable_and_leaky_alpha():
    soft = Oracle(model([{"dense": 3, "act": "softmax"}], "nll")).layers[0]["act"]
    out = soft(np.array([[1000.0, 1001.0, -1000.0]]))
    assert np.all(np.isfinite(out)) and np.isclose(out.sum(), 1.0)
    leaky = Oracle(model([{"dense": 3, "act": {"leaky_relu": 0.3}}], "none")).layers[0]["act"]
    np.testing.assert_allclose(leaky(np.array([-2.0, 2.0])), [-0.6, 2.0])


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "z.real", "lambda: 1",
                                 "[z]", "exp(z, base=2)", "foo(z)", "y + 1", "'z'", "z if z else 1",
                                 "(lambda q: q)(z)", "exp.__class__"])
def test_expression_evaluator_rejects(bad):
    with pytest.raises((ValueError, SyntaxError)):
        compile_expression(bad, "z")


def test_invalid_models_rejected():
    with pytest.raises(ValueError):
        Oracle(model([{"dense": 3, "act": "tanh"}], "nll"))
    with pytest.raises(ValueError):
        Oracle(model([{"dense": 3, "act": "softmax"}, {"dense": 2}], "mse"))
    with pytest.raises(ValueError):
        Oracle(model([{"dense": 3, "act": "relux(z)"}], "mse"))
