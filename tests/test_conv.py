"""Convolutional networks end to end: every penalty kind against the autograd oracle."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import compile_spec, import_module, wider_intermediates
from oracle import Oracle
from test_gradients import assert_close


def lenet(name, penalty, loss="nll", out_act="softmax", acts=("relu", "tanh"), dtype="float64"):
    layers = [
        {"conv2d": {"channels": 3, "kernel": 3, "padding": 1}, "act": acts[0]},
        {"avgpool": 2},
        {"conv2d": {"channels": 4, "kernel": 2, "stride": 2, "dilation": 1}, "act": acts[1]},
        {"downsample": 1},
        {"conv2d": {"channels": 2, "kernel": 1}, "bias": False},
        "flatten",
        {"dense": 3, **({"act": out_act} if out_act else {})},
    ]
    spec = {"name": name, "dtype": dtype, "input": [2, 8, 8], "layers": layers, "loss": loss}
    if penalty:
        spec["penalty"] = penalty
    return spec


CASES = [
    lenet("conv_cdb", {"v": "loss_gradient", "weight": 0.3}),
    lenet("conv_node", {"v": "output", "index": 2, "weight": 0.5}, loss="mse", out_act=None),
    lenet("conv_given_norm", {"v": "given", "p": "norm"}, loss="mse", out_act="sigmoid",
          acts=("softplus", "elu")),
    lenet("conv_wgan", {"v": "given", "p": "(sqrt(s) - 1)**2", "on": "logits"}),
    lenet("conv_jacobian", {"v": "jacobian", "weight": 0.2}, acts=("relu", "leaky_relu")),
    lenet("conv_jacobian_smooth", {"v": "jacobian", "weight": 0.2}, acts=("tanh", "relu")),
    lenet("conv_projections", {"v": "projections", "count": 2}),
    lenet("conv_random", {"v": "random", "iterations": 2, "p": "norm"}),
    lenet("conv_nopenalty", None),
]


def data(spec, rng, batch=3):
    x = rng.normal(size=(batch, 2, 8, 8))
    y = np.eye(3)[rng.integers(0, 3, batch)] if spec["loss"] == "nll" else rng.normal(size=(batch, 3))
    kind = (spec.get("penalty") or {}).get("v")
    v = {"given": rng.normal(size=(batch, 3)), "random": rng.normal(size=(batch, 3)),
         "projections": rng.normal(size=(batch, 2, 3))}.get(kind)
    return x, y, v


def check(spec, m, rng):
    oracle = Oracle(spec)
    params = m.init_params(seed=4)
    for k, a in oracle.init_params(seed=4).items():
        assert_close(params[k], a, 1e-14)
    x, y, v = data(spec, rng)
    value, grads = m.value_and_grad(params, x, y, v=v)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y, v=v)
    assert_close(value, ref_value)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert grads[k].shape == params[k].shape, k
        assert_close(grads[k], ref_grads[k])
    w = rng.normal(size=(3, 3))
    assert_close(m.vjp(params, x, w), oracle.vjp(params, x, w))
    u = rng.normal(size=x.shape)
    assert_close(m.jvp(params, x, u), oracle.jvp(params, x, u))
    assert_close(m.forward(params, x), oracle.forward(params, x))
    g = m.input_grad(params, x, y)
    assert g.shape == x.shape
    assert_close(g, oracle.input_grad(params, x, y))


@pytest.mark.parametrize("spec", CASES, ids=[s["name"] for s in CASES])
def test_conv_network_matches_oracle(spec, tmp_path, rng):
    check(spec, compile_spec(spec, tmp_path, jit=False), rng)


def test_conv_network_jitted_and_float32(tmp_path, rng):
    """Jitted float64 against the oracle, and float32 within 1e-4 of it (float32 jitted:
    the kernels in test_operators.py, a conv1d network in test_conv1d.py)."""
    spec = CASES[0]
    m = compile_spec(spec, tmp_path, jit=True)
    check(spec, m, rng)
    m32 = compile_spec(lenet("conv_cdb32", spec["penalty"], dtype="float32"), tmp_path, jit=False)
    params = m.init_params(seed=1)
    x, y, _ = data(spec, rng)
    value, grads = m.value_and_grad(params, x, y)
    p32, x32, y32 = {k: a.astype(np.float32) for k, a in params.items()}, x.astype(np.float32), y.astype(np.float32)
    value32, grads32 = m32.value_and_grad(p32, x32, y32)
    assert abs(value32 - value) <= 1e-4 * max(1, abs(value))
    for k in grads:
        assert grads32[k].dtype == np.float32
        assert_close(grads32[k], grads[k], 1e-4)
    # no float64 array anywhere: the program, and (run as plain Python here) every conv, pool
    # and fused kernel it calls
    assert wider_intermediates(m32, lambda: m32.value_and_grad(p32, x32, y32)) == []
    assert wider_intermediates(m32, lambda: m32.input_grad(p32, x32, y32)) == []


def test_naive_and_simplified_conv_programs_agree(tmp_path, rng):
    spec = CASES[4]
    (tmp_path / "s").mkdir()
    (tmp_path / "n").mkdir()
    a = compile_spec(spec, tmp_path / "s", jit=False)
    b = compile_spec(spec, tmp_path / "n", jit=False, simplified=False)
    params = a.init_params()
    x, y, _ = data(spec, rng)
    va, ga = a.value_and_grad(params, x, y)
    vb, gb = b.value_and_grad(params, x, y)
    assert_close(va, vb, 1e-12)
    for k in ga:
        assert_close(ga[k], gb[k], 1e-12)


def test_lenet_benchmark_model_compiles_and_runs(rng, tmp_path):
    from dbpgen.compiler import compile_file

    root = Path(__file__).resolve().parent.parent
    out = compile_file(root / "examples" / "lenet_cdb.yaml", tmp_path)
    m = import_module(out, jit=False)
    params = m.init_params()
    x = rng.normal(size=(2, 1, 28, 28))
    value, grads = m.value_and_grad(params, x, np.array([3, 7]))
    assert np.isfinite(value) and set(grads) == {"W1", "b1", "W3", "b3", "W6", "b6"}


@pytest.mark.parametrize("kind", ["fused", "kernels"])
def test_gradients_proven_zero_have_the_parameters_shapes(kind, tmp_path, rng):
    """Without a loss, a ReLU network's penalty does not reach the conv biases (G'' = 0,
    section 5.3): their gradients are zeros of each bias's own shape, one per channel, not
    of the layer's output shape."""
    spec = lenet(f"conv_zero_{kind}", {"v": "output", "index": 0, "weight": 0.5}, loss="none",
                 out_act=None, acts=("relu", "relu"))
    m = compile_spec(spec, tmp_path, jit=False, schedule=kind)
    assert "b1_out = np.zeros((3,)" in Path(m.__file__).read_text()  # proven zero, not computed
    params = m.init_params(seed=4)
    x = rng.normal(size=(3, 2, 8, 8))
    value, grads = m.value_and_grad(params, x)
    ref_value, ref_grads = Oracle(spec).value_and_grad(params, x)
    assert_close(value, ref_value)
    for k in ref_grads:
        assert grads[k].shape == params[k].shape == np.shape(ref_grads[k]), k
        assert_close(grads[k], ref_grads[k])


@pytest.mark.parametrize("kind", ["fused", "kernels"])
def test_conv_schedules_match_oracle(kind, tmp_path, rng):
    """Both schedules that run image layers; in `fused`, the coordinate-wise statements of
    an image (bias, g, g', the M_j products, the K^box operands) run as one jitted loop
    over (sample, channel, row, column), the bias indexed per channel."""
    spec = dict(CASES[1], name=f"conv_node_{kind}")
    m = compile_spec(spec, tmp_path, jit=True, schedule=kind)
    assert m.SCHEDULES["value_and_grad"] == kind
    check(spec, m, rng)
    source = Path(m.__file__).read_text()
    image_loops = re.findall(r"def (_fused\d+)\(.*\n(?:    .*\n)*?\s+for c in range\(.*# channels\n"
                             r"\s+for h in range.*\n\s+for w in range", source)
    if kind == "fused":
        assert image_loops, "no loop over (sample, channel, row, column)"
        body = source.split("def _value_and_grad(", 1)[1].split("\ndef ", 1)[0]
        assert re.search(r"x1, dg1 = _fused\d+\(b1, t\d+_\)", body)  # z1 = b1 + K(W1, x0), g, g'
        assert "b[c]" in source
    else:
        assert not image_loops
