"""Hypothesis properties over random dense architectures (un-jitted modules, float64).

1. The emitted module agrees with the independent autograd oracle (tests/oracle.py):
   forward, value, every gradient, penalty, vjp and jvp, to 1e-9 relative.
2. The naive program (simplified=False) and the simplified one agree to 1e-11 relative,
   i.e. the simplification passes are equivalences.

Configurations that hit a known dbpgen bug are skipped by `known_bug` (with `assume`);
each such bug has a minimal strict-xfail regression test at the end of this file. When
one of those starts passing (XPASS fails the run), delete it from `known_bug` as well.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

from conftest import compile_spec
from dbpgen.errors import ModelError
from oracle import Oracle

ORACLE_RTOL = 1e-9
NAIVE_RTOL = 1e-11
# Absolute floors for references that are zero up to round-off, e.g. d/db_j of a penalty
# that depends on b_j only through a ReLU-like kink (autograd: ~1e-17, dbpgen: exactly 0).
ORACLE_ATOL = 1e-12
NAIVE_ATOL = 1e-14
BATCH = 5
KINK = 1e-6  # a kinked activation this close to its kink makes the comparison ill-posed

# (act field, kinked?) -- "kinked": not twice differentiable at z = 0
HIDDEN_ACTS = [
    ("identity", False),
    ("relu", True),
    ("leaky_relu", True),
    ("tanh", False),
    ("sigmoid", False),
    ("softplus", False),
    ("elu", True),
    ("silu", False),
    ("sin", False),
    ("z*tanh(log(1 + exp(z)))", False),
    ("Max(z, 0.2*z)", True),
    ("Abs(z)", True),
    ("z**3/3 + z", False),
    ("sin(z) + z/2", False),
]
OUTPUT_ACTS = ["identity", "tanh", "sigmoid", "softmax"]
P_FUNCTIONS = ["squared_norm", "norm", "(sqrt(s) - 1)**2", "s**2/2 + s"]
SINGULAR_AT_ZERO = {"norm", "(sqrt(s) - 1)**2"}  # p'(s) blows up at s = ||xi_0||^2 = 0

_names = itertools.count()


def _hidden_act(draw):
    act, kinked = draw(st.sampled_from(HIDDEN_ACTS))
    if act == "leaky_relu" and draw(st.booleans()):
        act = {"leaky_relu": draw(st.floats(0.01, 0.5))}
    return act, kinked


@st.composite
def specs(draw):
    """A random valid dense model spec, plus which of its layers have kinked activations."""
    depth = draw(st.integers(1, 4))
    n_in = draw(st.integers(1, 6))
    C = draw(st.integers(1, 5))
    bias = draw(st.booleans())
    layers, kinked = [], []
    for _ in range(depth - 1):
        act, kink = _hidden_act(draw)
        layers.append({"dense": draw(st.integers(1, 12)), "act": act})
        kinked.append(kink)
    out_act = draw(st.sampled_from(OUTPUT_ACTS))
    last = {"dense": C}
    if out_act != "identity" or draw(st.booleans()):
        last["act"] = out_act
    layers.append(last)
    kinked.append(False)  # output activations are smooth
    if not bias:
        for layer in layers:
            layer["bias"] = False
    losses = ["mse", "none"] + (["nll"] if out_act == "softmax" else [])
    loss = draw(st.sampled_from(losses))
    spec = {"name": f"prop_{next(_names)}", "input": [n_in], "layers": layers, "loss": loss}
    if draw(st.booleans()):
        kinds = ["output", "given"] + (["loss_gradient"] if loss != "none" else [])
        v = draw(st.sampled_from(kinds))
        penalty = {"v": v}
        if v == "output":
            penalty["index"] = draw(st.integers(0, C - 1))
        penalty["p"] = draw(st.sampled_from(P_FUNCTIONS))
        penalty["weight"] = draw(st.floats(0.05, 2.0))
        if draw(st.booleans()):
            penalty["on"] = "logits"
        spec["penalty"] = penalty
    return spec, kinked


def _is_identity(act):
    return act in (None, "identity")


def known_bug(spec):
    """The name of the known dbpgen bug this spec would hit (see the xfail tests), or None.

    Both properties compile the simplified program, so both skip the same configurations.
    """
    del spec
    return None


def _data(spec, seed):
    rng = np.random.default_rng(seed)
    n_in, C = spec["input"][0], spec["layers"][-1]["dense"]
    x = rng.normal(size=(BATCH, n_in))
    if spec["loss"] == "nll":
        y = np.eye(C)[rng.integers(0, C, BATCH)]
    else:
        y = rng.normal(size=(BATCH, C))
    v = rng.normal(size=(BATCH, C))
    u = rng.normal(size=(BATCH, n_in))
    return x, y, v, u


def _well_posed(spec, kinked, oracle, params, x, y, v):
    """False when a kinked activation sits at its kink or p is evaluated at its singularity."""
    h = x
    for layer, kink in zip(oracle.layers, kinked):
        j = layer["j"]
        z = h @ params[f"W{j}"].T + (params[f"b{j}"] if layer["bias"] else 0.0)
        if kink and np.min(np.abs(z)) < KINK:
            return False
        h = layer["act"](z)
    pen = spec.get("penalty")
    if pen and pen["p"] in SINGULAR_AT_ZERO:
        xi0 = oracle.xi0(params, x, y=y, v=v if pen["v"] == "given" else None)
        if np.min(np.sum(xi0**2, axis=1)) < 1e-12:  # e.g. a dead ReLU layer
            return False
    return True


def assert_close(actual, reference, rtol, atol, what):
    """max |a - b| <= rtol * max |b| + atol, over the whole array."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert np.all(np.isfinite(a)), f"{what}: non-finite values {a}"
    scale = float(np.max(np.abs(b), initial=0.0))
    err = float(np.max(np.abs(a - b), initial=0.0))
    assert err <= rtol * scale + atol, f"{what}: max abs err {err:.3e} vs scale {scale:.3e}"


def _outputs(module, spec, params, x, y, v, u):
    """Everything the module computes for one batch, keyed by a readable name."""
    pen = spec.get("penalty")
    yy = y if spec["loss"] != "none" else None
    vv = v if pen and pen["v"] == "given" else None
    value, grads = module.value_and_grad(params, x, y=yy, v=vv)
    out = {"forward": module.forward(params, x), "value": value}
    out.update({f"grad {k}": g for k, g in grads.items()})
    if pen:
        out["penalty"] = module.penalty(params, x, y=yy, v=vv)
    out["vjp"] = module.vjp(params, x, v)
    out["jvp"] = module.jvp(params, x, u)
    return out


# No explain phase: on a failure it re-runs the (slow-to-compile) example ~100 times.
SETTINGS = settings(max_examples=40, deadline=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target,
                            Phase.shrink],
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(case=specs(), seed=st.integers(0, 2**32 - 1))
def test_matches_oracle(case, seed, tmp_path_factory):
    spec, kinked = case
    bug = known_bug(spec)
    event(f"skipped: known bug {bug}" if bug else "no known bug")
    assume(bug is None)
    oracle = Oracle(spec)
    params = oracle.init_params(seed=3)
    x, y, v, u = _data(spec, seed)
    posed = _well_posed(spec, kinked, oracle, params, x, y, v)
    event("well posed" if posed else "skipped: kink or singular p")
    assume(posed)

    module = compile_spec(spec, tmp_path_factory.mktemp("prop"), jit=False)
    mparams = module.init_params(seed=3)
    assert set(mparams) == set(params)
    for k in params:
        # same distribution and draws as the oracle; -k + 2k*u vs. k*(2u - 1) may round
        # differently, hence not bit-identical
        assert_close(mparams[k], params[k], 1e-13, 1e-15, f"init_params {k}")

    got = _outputs(module, spec, params, x, y, v, u)
    pen = spec.get("penalty")
    yy = y if spec["loss"] != "none" else None
    vv = v if pen and pen["v"] == "given" else None
    ref_value, ref_grads = oracle.value_and_grad(params, x, y=yy, v=vv)
    ref = {"forward": oracle.forward(params, x), "value": ref_value}
    ref.update({f"grad {k}": g for k, g in ref_grads.items()})
    if pen:
        ref["penalty"] = oracle.penalty(params, x, y=yy, v=vv)
    ref["vjp"] = oracle.vjp(params, x, v)
    ref["jvp"] = oracle.jvp(params, x, u)

    assert set(got) == set(ref)
    for key in ref:
        assert_close(got[key], ref[key], ORACLE_RTOL, ORACLE_ATOL, key)


@SETTINGS
@given(case=specs(), seed=st.integers(0, 2**32 - 1))
def test_naive_equals_simplified(case, seed, tmp_path_factory):
    spec, kinked = case
    bug = known_bug(spec)
    event(f"skipped: known bug {bug}" if bug else "no known bug")
    assume(bug is None)
    oracle = Oracle(spec)
    params = oracle.init_params(seed=3)
    x, y, v, u = _data(spec, seed)
    posed = _well_posed(spec, kinked, oracle, params, x, y, v)
    event("well posed" if posed else "skipped: kink or singular p")
    assume(posed)

    simplified = compile_spec(spec, tmp_path_factory.mktemp("simplified"), jit=False)
    naive = compile_spec(spec, tmp_path_factory.mktemp("naive"), jit=False, simplified=False)

    got = _outputs(simplified, spec, params, x, y, v, u)
    ref = _outputs(naive, spec, params, x, y, v, u)
    assert set(got) == set(ref)
    for key in ref:
        assert_close(got[key], ref[key], NAIVE_RTOL, NAIVE_ATOL, key)


# --- known dbpgen bugs (minimal reproductions; strict: an XPASS means "fixed") ----------

def _tiny(name, layers, loss="mse", penalty=None):
    spec = {"name": name, "input": [3], "layers": layers, "loss": loss}
    if penalty:
        spec["penalty"] = penalty
    return spec


def _compare_with_oracle(spec, module, seed=0):
    oracle = Oracle(spec)
    params = oracle.init_params(seed=3)
    x, y, v, u = _data(spec, seed)
    pen = spec.get("penalty")
    yy = y if spec["loss"] != "none" else None
    vv = v if pen and pen["v"] == "given" else None
    got = _outputs(module, spec, params, x, y, v, u)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y=yy, v=vv)
    ref = {"forward": oracle.forward(params, x), "value": ref_value,
           "vjp": oracle.vjp(params, x, v), "jvp": oracle.jvp(params, x, u)}
    ref.update({f"grad {k}": g for k, g in ref_grads.items()})
    if pen:
        ref["penalty"] = oracle.penalty(params, x, y=yy, v=vv)
    assert set(got) == set(ref)
    for key in ref:
        assert_close(got[key], ref[key], ORACLE_RTOL, ORACLE_ATOL, key)


def _compare_naive(spec, tmp_path):
    params = Oracle(spec).init_params(seed=3)
    x, y, v, u = _data(spec, 0)
    (tmp_path / "simplified").mkdir()
    (tmp_path / "naive").mkdir()
    simplified = compile_spec(spec, tmp_path / "simplified", jit=False)
    naive = compile_spec(spec, tmp_path / "naive", jit=False, simplified=False)
    got = _outputs(simplified, spec, params, x, y, v, u)
    ref = _outputs(naive, spec, params, x, y, v, u)
    for key in ref:
        assert_close(got[key], ref[key], NAIVE_RTOL, NAIVE_ATOL, key)


# Fixed bugs, kept as regression tests: loss none without a penalty (what from_torch's
# defaults give) once failed to compile; an affine network with a constant v used to emit
# kernels that read the batch size from an x0 they did not receive.
@pytest.mark.parametrize("simplified", [True, False], ids=["simplified", "naive"])
def test_no_objective_gives_forward_vjp_jvp_and_a_zero_value(tmp_path, simplified):
    spec = _tiny("no_objective", [{"dense": 4, "act": "tanh"}, {"dense": 2}], loss="none")
    module = compile_spec(spec, tmp_path, jit=False, simplified=simplified)
    _compare_with_oracle(spec, module)
    value, grads = module.value_and_grad(module.init_params(seed=3), np.ones((5, 3)))
    assert value == 0.0 and all(not g.any() for g in grads.values())
    assert "no penalty: J = 0" in module.EQUATIONS.splitlines()[0]


@pytest.mark.parametrize("penalty", [{"v": "given"}, {"v": "output", "index": 1}],
                         ids=["given", "output"])
def test_kernel_without_x0(tmp_path, penalty):
    spec = _tiny("kernel_without_x0", [{"dense": 2}], loss="none", penalty=penalty)
    _compare_with_oracle(spec, compile_spec(spec, tmp_path, jit=False))


# Fixed bugs, kept as regression tests: the naive program used to emit gamma_L = 0 as a
# Python int and apply K^T / _rowdot / K^box to it, and could not emit G'' = DiracDelta.
@pytest.mark.parametrize("spec", [
    _tiny("naive_gamma_softmax", [{"dense": 2, "act": "softmax"}], penalty={"v": "given"}),
    _tiny("naive_gamma_logits", [{"dense": 4, "act": "tanh"}, {"dense": 2}],
          penalty={"v": "given", "on": "logits"}),
], ids=["softmax", "logits"])
def test_naive_constant_v_softmax_or_logits(tmp_path, spec):
    _compare_naive(spec, tmp_path)


@pytest.mark.parametrize("act", ["relu", "Abs(z)", "Max(z, 0.2*z)"])
def test_naive_piecewise_linear(tmp_path, act):
    spec = _tiny("naive_dirac", [{"dense": 4, "act": act}, {"dense": 2}])
    _compare_naive(spec, tmp_path)
