"""Emitted gradients against the independent autograd oracle (float64, 1e-10 relative)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import batch_for, compile_spec
from oracle import Oracle

RTOL = 1e-10


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(np.max(np.abs(b)), 1e-300)
    assert np.max(np.abs(a - b)) <= rtol * scale, f"max abs err {np.max(np.abs(a - b))} vs scale {scale}"


def check_against_oracle(spec, module, rng, batch=5, input_grad=True):
    """Every API function of `module` against the oracle; input_grad=False skips input_grad
    (for jitted modules whose schedule another test checks it in: its LLVM time)."""
    oracle = Oracle(spec)
    params = module.init_params(seed=3)
    ref_params = oracle.init_params(seed=3)
    for k in ref_params:
        assert_close(params[k], ref_params[k], 1e-15)
    x, y, v = batch_for(spec, rng, batch)
    pen = spec.get("penalty")
    kind = pen["v"] if pen else None
    vv = v if kind == "given" else None
    yy = y if (spec.get("loss", "none") != "none") else None
    assert_close(module.forward(params, x), oracle.forward(params, x))
    value, grads = module.value_and_grad(params, x, y=yy, v=vv)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y=yy, v=vv)
    assert_close(value, ref_value)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k])
    if pen:
        assert_close(module.penalty(params, x, y=yy, v=vv), oracle.penalty(params, x, y=yy, v=vv))
    assert_close(module.vjp(params, x, v), oracle.vjp(params, x, v))
    u = rng.normal(size=x.shape)
    assert_close(module.jvp(params, x, u), oracle.jvp(params, x, u))
    if not input_grad:
        return
    if yy is None:
        with pytest.raises(ValueError, match="no loss"):
            module.input_grad(params, x, y)
    else:  # grad_x of each sample's own loss
        assert_close(module.input_grad(params, x, yy), oracle.input_grad(ref_params, x, yy))


def mlp(name, acts, out_act=None, loss="mse", penalty=None, widths=(4, 3), n_in=3, C=2, bias=True):
    layers = [{"dense": w, "act": a} for w, a in zip(widths, acts)]
    last = {"dense": C}
    if out_act:
        last["act"] = out_act
    layers.append(last)
    if not bias:
        for layer in layers:
            layer["bias"] = False
    spec = {"name": name, "input": [n_in], "layers": layers, "loss": loss}
    if penalty:
        spec["penalty"] = penalty
    return spec


CDB = {"v": "loss_gradient", "p": "squared_norm", "weight": 0.3}
NODE = {"v": "output", "index": 1, "p": "squared_norm", "weight": 0.7}
GIVEN = {"v": "given", "p": "norm", "weight": 0.2}
WGAN = {"v": "given", "p": "(sqrt(s) - 1)**2", "weight": 1.5}

GRID = [
    mlp("relu_id_cdb", ["relu", "relu"], None, "mse", CDB),
    mlp("relu_id_node", ["relu", "relu"], None, "mse", NODE),
    mlp("relu_id_node_noloss", ["relu", "relu"], None, "none", NODE),
    mlp("tanh_id_node", ["tanh", "tanh"], None, "mse", NODE),
    mlp("tanh_id_cdb", ["tanh", "sigmoid"], None, "mse", CDB),
    mlp("relu_softmax_nll_cdb", ["relu", "relu"], "softmax", "nll", CDB),
    mlp("tanh_softmax_nll_cdb", ["tanh", "softplus"], "softmax", "nll", CDB),
    mlp("softmax_given", ["elu", "silu"], "softmax", "nll", GIVEN),
    mlp("softmax_node", ["tanh", "relu"], "softmax", "none", NODE),
    mlp("softmax_mse_cdb", ["tanh", "sin"], "softmax", "mse", CDB),
    mlp("sigmoid_out_cdb", ["tanh", "relu"], "sigmoid", "mse", CDB),
    mlp("sigmoid_out_given", [{"leaky_relu": 0.2}, "tanh"], "sigmoid", "mse", WGAN),
    mlp("expr_acts", ["z*tanh(log(1 + exp(z)))", "Max(z, 0.2*z)"], "tanh", "mse", CDB),
    mlp("abs_act", ["Abs(z)", "leaky_relu"], None, "mse", NODE),
    mlp("logits_cdb_softmax", ["tanh", "relu"], "softmax", "nll", dict(CDB, on="logits")),
    mlp("logits_cdb_softmax_mse", ["tanh", "tanh"], "softmax", "mse", dict(CDB, on="logits")),
    mlp("logits_cdb_sigmoid", ["tanh", "tanh"], "sigmoid", "mse", dict(CDB, on="logits")),
    mlp("logits_node_softmax", ["relu", "tanh"], "softmax", "nll", dict(NODE, on="logits")),
    mlp("nobias", ["tanh", "relu"], None, "mse", CDB, bias=False),
    mlp("deep1", [], "tanh", "mse", CDB, widths=()),
    mlp("noloss_given", ["sigmoid", "softplus"], None, "none", GIVEN),
    mlp("nopenalty", ["tanh", "relu"], "softmax", "nll", None),
    # a step in p: its DiracDelta term in p' is dropped, as for activations
    mlp("step_penalty", ["tanh", "tanh"], None, "mse",
        {"v": "loss_gradient", "p": "Heaviside(s - 0.001)*s + sign(s)*Abs(s - 0.002)", "weight": 0.5}),
]


@pytest.mark.parametrize("spec", GRID, ids=[s["name"] for s in GRID])
def test_unjitted_matches_oracle(spec, tmp_path, rng):
    module = compile_spec(spec, tmp_path, jit=False)
    check_against_oracle(spec, module, rng)


@pytest.mark.parametrize("pen", [GIVEN, WGAN], ids=["norm", "wgan"])
def test_a_zero_direction_is_finite_and_silent_in_every_schedule(pen, tmp_path, rng):
    """v = 0 for a sample makes s = 0, where p'(s) divides by sqrt(s) and the module takes
    the subgradient 0: no NaN, and no NumPy warning from the branch np.where does not take."""
    spec = mlp(f"zero_v_{pen['p'][:4].strip('(')}", ["tanh"], None, "mse", pen, widths=(4,))
    x, y, v = batch_for(spec, rng)
    v[1] = 0.0
    results = []
    for schedule in ("kernels", "fused", "jit"):
        (tmp_path / schedule).mkdir()
        module = compile_spec(spec, tmp_path / schedule, jit=False, schedule=schedule)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            results.append(module.value_and_grad(module.init_params(seed=3), x, y, v=v))
    for value, grads in results:
        assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())
        assert_close(value, results[0][0])
        for k in grads:
            assert_close(grads[k], results[0][1][k])
