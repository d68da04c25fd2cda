"""Validate the oracle's image layers (conv2d, avgpool, downsample, flatten).

Against PyTorch (float64, when installed): forward values, loss gradients and
double-backprop objectives with their parameter gradients.  Without PyTorch:
central finite differences of the oracle's own objective.  Never touches dbpgen.
"""

import numpy as np
import pytest

try:
    from oracle import Oracle, central_difference_grad, directional_check
except ImportError:  # tests/ turned into a package
    from tests.oracle import Oracle, central_difference_grad, directional_check

TORCH_RTOL = 1e-10
FD_RTOL, FD_ATOL = 1e-6, 1e-8

# conv(2->3, k3, s2, p1, relu); avgpool 2; conv(k2, d2); downsample 2; flatten; dense 4 softmax
# on a non-square 24x16 input: 12x8 -> 6x4 -> 4x2 -> 2x1 (12 channels) -> 24 -> 4
LENET_INPUT = [2, 24, 16]
LENET_LAYERS = [
    {"conv2d": {"channels": 3, "kernel": 3, "stride": 2, "padding": 1, "dilation": 1},
     "act": "relu"},
    {"avgpool": 2},
    {"conv2d": {"channels": 3, "kernel": 2, "dilation": 2}, "act": "tanh"},
    {"downsample": 2},
    "flatten",
    {"dense": 4, "act": "softmax"},
]


def image_model(layers, input_shape, loss="nll", penalty=None):
    spec = {"name": "img", "input": list(input_shape), "layers": layers, "loss": loss}
    if penalty is not None:
        spec["penalty"] = penalty
    return spec


def image_data(oracle, seed=3, batch=3):
    rng = np.random.default_rng(seed)
    C = oracle.n_out
    x = rng.standard_normal((batch, *oracle.input_shape))
    if oracle.loss_kind == "nll":
        y = np.eye(C)[rng.integers(0, C, batch)]
    else:
        y = rng.standard_normal((batch, C))
    v = rng.standard_normal((batch, C))
    return x, y, v


def assert_rel_close(got, want, rtol=TORCH_RTOL, name=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(np.max(np.abs(want)), 1e-300)
    err = np.max(np.abs(got - want)) / scale if got.size else 0.0
    assert err <= rtol, f"{name}: relative error {err:.3e}"


# --------------------------------------------------------------------------
# shapes, parameter names and init (no torch)
# --------------------------------------------------------------------------

def test_shapes_and_parameter_names():
    oracle = Oracle(image_model(LENET_LAYERS, LENET_INPUT))
    assert [layer["out_shape"] for layer in oracle.layers] == [
        (3, 12, 8), (3, 6, 4), (3, 4, 2), (12, 2, 1), (24,), (4,)]
    params = oracle.init_params(seed=0)
    assert list(params) == ["W1", "b1", "W3", "b3", "W6", "b6"]
    assert params["W1"].shape == (3, 2, 3, 3) and params["b1"].shape == (3,)
    assert params["W3"].shape == (3, 3, 2, 2) and params["W6"].shape == (4, 24)
    x, _, _ = image_data(oracle)
    assert oracle.forward(params, x).shape == (3, 4)


def test_init_params_draw_order_and_fan_in():
    layers = [{"conv2d": {"channels": 2, "kernel": 3}}, {"avgpool": 2},
              {"conv2d": {"channels": 3, "kernel": 1}, "bias": False},
              {"flatten": None}, {"dense": 2}]
    params = Oracle(image_model(layers, [4, 6, 6], "none")).init_params(seed=5)
    rng = np.random.default_rng(5)
    k1, k3, k5 = 1 / np.sqrt(4 * 9), 1 / np.sqrt(2), 1 / np.sqrt(3 * 2 * 2)
    want = {"W1": rng.uniform(-k1, k1, (2, 4, 3, 3)), "b1": rng.uniform(-k1, k1, 2),
            "W3": rng.uniform(-k3, k3, (3, 2, 1, 1)),
            "W5": rng.uniform(-k5, k5, (2, 12)), "b5": rng.uniform(-k5, k5, 2)}
    assert list(params) == list(want)
    for name in want:
        np.testing.assert_array_equal(params[name], want[name], err_msg=name)


def test_brief_example_parameter_names():
    layers = [{"conv2d": {"channels": 2, "kernel": 3}}, {"avgpool": 2},
              {"conv2d": {"channels": 2, "kernel": 1}}, {"flatten": {}}, {"dense": 3}]
    params = Oracle(image_model(layers, [1, 6, 6], "none")).init_params()
    assert list(params) == ["W1", "b1", "W3", "b3", "W5", "b5"]


def test_downsample_channel_order_and_avgpool_by_hand():
    x = np.arange(2 * 4 * 6, dtype=float).reshape(1, 2, 4, 6)
    oracle = Oracle(image_model([{"downsample": 2}, "flatten"], [2, 4, 6], "none"))
    out = oracle.forward({}, x).reshape(1, 8, 2, 3)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(out[0, c * 4 + i * 2 + j], x[0, c, i::2, j::2])
    oracle = Oracle(image_model([{"avgpool": 2, "act": "sin"}, "flatten"], [2, 4, 6], "none"))
    want = np.sin(x.reshape(1, 2, 2, 2, 3, 2).mean(axis=(3, 5))).reshape(1, -1)
    np.testing.assert_allclose(oracle.forward({}, x), want, rtol=1e-15)


def test_conv_by_direct_loops():
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4)
    s, p, d = 2, 1, 2
    layers = [{"conv2d": {"channels": 4, "kernel": 2, "stride": s, "padding": p, "dilation": d}},
              "flatten"]
    out = Oracle(image_model(layers, [3, 7, 6], "none")).forward({"W1": W, "b1": b}, x)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    Ho, Wo = (7 + 2 * p - d - 1) // s + 1, (6 + 2 * p - d - 1) // s + 1
    want = np.zeros((2, 4, Ho, Wo))
    for o in range(4):
        for h in range(Ho):
            for w in range(Wo):
                patch = xp[:, :, h * s: h * s + d + 1: d, w * s: w * s + d + 1: d]
                want[:, o, h, w] = np.sum(patch * W[o], axis=(1, 2, 3)) + b[o]
    np.testing.assert_allclose(out, want.reshape(2, -1), rtol=1e-13)


@pytest.mark.parametrize("layers,input_shape", [
    ([{"dense": 2}], [1, 4, 4]),                                      # dense on an image
    ([{"conv2d": {"channels": 2, "kernel": 5}}, "flatten"], [1, 4, 4]),  # kernel too big
    ([{"conv2d": {"channels": 2, "kernel": 2, "dilation": 4}}, "flatten"], [1, 4, 4]),
    ([{"avgpool": 3}, "flatten"], [1, 4, 4]),                         # not divisible
    ([{"downsample": 3}, "flatten"], [1, 6, 4]),
    ([{"conv2d": {"channels": 2, "kernel": 2}}], [1, 4, 4]),          # image output
    ([{"conv2d": {"channels": 2, "kernel": 2, "strides": 1}}, "flatten"], [1, 4, 4]),
    ([{"avgpool": 2, "bias": False}, "flatten"], [1, 4, 4]),
    (["flatten", {"avgpool": 2}], [1, 4, 4]),                          # pool on a vector
])
def test_invalid_image_models_rejected(layers, input_shape):
    with pytest.raises(ValueError):
        Oracle(image_model(layers, input_shape, "none"))


# --------------------------------------------------------------------------
# finite differences (no torch): smooth conv models
# --------------------------------------------------------------------------

# 2x16x8 -> conv(k3 s2 p1) 2x8x4 -> avgpool 2x4x2 -> conv(k2 d2 p1) 2x4x2
#        -> downsample 8x2x1 -> flatten 16 -> dense 3
SMOOTH_INPUT = [2, 16, 8]
SMOOTH_LAYERS = [
    {"conv2d": {"channels": 2, "kernel": 3, "stride": 2, "padding": 1}, "act": "tanh"},
    {"avgpool": 2, "act": "z + 0.1*sin(z)"},
    {"conv2d": {"channels": 2, "kernel": 2, "dilation": 2, "padding": 1},
     "act": "softplus", "bias": False},
    {"downsample": 2},
    {"flatten": None},
    {"dense": 3, "act": "sigmoid"},
]


@pytest.mark.parametrize("penalty", [
    {"v": "loss_gradient", "p": "squared_norm", "weight": 0.7},
    {"v": "output", "index": 1, "p": "norm", "weight": 0.3, "on": "logits"},
    {"v": "given", "p": "(sqrt(s) - 1)**2", "weight": 0.5},
], ids=["loss_gradient", "output_logits", "given"])
def test_smooth_conv_objective_matches_finite_differences(penalty):
    oracle = Oracle(image_model(SMOOTH_LAYERS, SMOOTH_INPUT, "mse", penalty))
    assert [layer["out_shape"] for layer in oracle.layers] == [
        (2, 8, 4), (2, 4, 2), (2, 4, 2), (8, 2, 1), (16,), (3,)]
    params = oracle.init_params(seed=0)
    x, y, v = image_data(oracle, batch=2)
    objective = lambda p: oracle.objective(p, x, y, v)
    value, grads = oracle.value_and_grad(params, x, y, v)
    assert np.isclose(value, float(objective(params)), rtol=1e-12)
    numeric = central_difference_grad(objective, params)
    for name in params:
        np.testing.assert_allclose(grads[name], numeric[name], rtol=FD_RTOL, atol=FD_ATOL,
                                   err_msg=name)
    analytic, along = directional_check(objective, grads, params, np.random.default_rng(7))
    assert np.isclose(analytic, along, rtol=FD_RTOL, atol=FD_ATOL)


def test_image_vjp_jvp_and_xi0_match_finite_differences():
    penalty = {"v": "loss_gradient", "weight": 0.2}
    oracle = Oracle(image_model(SMOOTH_LAYERS, SMOOTH_INPUT, "mse", penalty))
    params = oracle.init_params(seed=1)
    x, y, v = image_data(oracle, batch=2)
    rng = np.random.default_rng(11)
    u = rng.standard_normal(x.shape)
    eps = 1e-6
    jvp_fd = (oracle.forward(params, x + eps * u) - oracle.forward(params, x - eps * u)) / (2 * eps)
    Ju = oracle.jvp(params, x, u)
    assert Ju.shape == (2, 3)
    np.testing.assert_allclose(Ju, jvp_fd, rtol=FD_RTOL, atol=FD_ATOL)
    xi = oracle.vjp(params, x, v)
    assert xi.shape == x.shape
    # adjoint identity <J^T v, u> = <v, J u>
    assert np.isclose(np.sum(xi * u), np.sum(v * Ju), rtol=1e-12)
    # xi_0 of loss_gradient is the input gradient of the per-sample loss, and
    # the penalty is its squared norm summed over channels, rows and columns
    xi0 = oracle.xi0(params, x, y)
    loss_fd = (oracle.loss(params, x + eps * u, y) - oracle.loss(params, x - eps * u, y)) / (2 * eps)
    np.testing.assert_allclose(np.sum(xi0 * u, axis=(1, 2, 3)), loss_fd, rtol=FD_RTOL, atol=FD_ATOL)
    np.testing.assert_allclose(oracle.penalty(params, x, y), np.sum(xi0 ** 2, axis=(1, 2, 3)),
                               rtol=1e-14)


# --------------------------------------------------------------------------
# against PyTorch (float64)
# --------------------------------------------------------------------------

def _torch_model(oracle, params):
    """(pre-activation module, activation module) per layer, weights copied from params."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    acts = {None: nn.Identity, "identity": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU,
            "softmax": lambda: nn.Softmax(dim=-1)}
    stages, ordered = [], []
    for layer, raw in zip(oracle.layers, oracle.spec["layers"]):
        act = raw.get("act") if isinstance(raw, dict) else None
        kind, j = layer["kind"], layer["j"]
        if kind == "conv2d":
            out_ch, in_ch, k, _ = layer["W_shape"]
            module = nn.Conv2d(in_ch, out_ch, k, bias=layer["bias"], dtype=torch.float64,
                               **layer["conv"])
        elif kind == "dense":
            out_f, in_f = layer["W_shape"]
            module = nn.Linear(in_f, out_f, bias=layer["bias"], dtype=torch.float64)
        elif kind == "avgpool":
            module = nn.AvgPool2d(layer["k"])
        elif kind == "downsample":
            module = nn.PixelUnshuffle(layer["k"])
        else:
            module = nn.Flatten()
        if layer["params"]:
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(params[f"W{j}"]))
                ordered.append((f"W{j}", module.weight))
                if layer["bias"]:
                    module.bias.copy_(torch.from_numpy(params[f"b{j}"]))
                    ordered.append((f"b{j}", module.bias))
        stages.append((module, acts[act]()))
    return stages, dict(ordered)


def _torch_forward_both(stages, x):
    h = x
    for module, act in stages:
        z = module(h)
        h = act(z)
    return z, h


def _torch_objective(oracle, stages, x, y, v=None):
    """J = mean(nll + weight * R) with R built by torch.autograd.grad(create_graph=True)."""
    torch = pytest.importorskip("torch")
    x = x.clone().requires_grad_(True)
    z_L, x_L = _torch_forward_both(stages, x)
    loss = -(y * torch.log(x_L)).sum(-1)
    if not oracle.has_penalty:
        return loss.mean(), loss, x
    out = z_L if oracle.on_logits else x_L
    C = out.shape[-1]
    if oracle.v_kind == "loss_gradient":
        # xi_0 = (d out/d x)^T grad_out l = grad_x l (whether or not `on: logits`)
        vs = [None]
    elif oracle.v_kind == "output":
        vs = [torch.nn.functional.one_hot(torch.full((x.shape[0],), oracle.v_index),
                                          C).to(x.dtype)]
    elif oracle.v_kind == "jacobian":
        vs = list(torch.eye(C, dtype=x.dtype).unsqueeze(1).expand(C, x.shape[0], C))
    else:
        vs = [v]
    R = 0.0
    for vec in vs:
        scalar = loss.sum() if vec is None else (out * vec).sum()
        xi0 = torch.autograd.grad(scalar, x, create_graph=True)[0]
        s = (xi0 ** 2).flatten(1).sum(1)
        R = R + (s if oracle.spec["penalty"].get("p", "squared_norm") == "squared_norm"
                 else torch.sqrt(s) if oracle.spec["penalty"]["p"] == "norm"
                 else (torch.sqrt(s) - 1) ** 2)
    return (loss + oracle.weight * R).mean(), loss, x


def _lenet(penalty=None):
    oracle = Oracle(image_model(LENET_LAYERS, LENET_INPUT, "nll", penalty))
    params = oracle.init_params(seed=0)
    params = {k: 2.0 * p for k, p in params.items()}  # livelier activations
    x, y, v = image_data(oracle, seed=4, batch=3)
    return oracle, params, x, y, v


def test_lenet_forward_matches_torch():
    torch = pytest.importorskip("torch")
    oracle, params, x, _, _ = _lenet()
    stages, _ = _torch_model(oracle, params)
    with torch.no_grad():
        z_L, x_L = _torch_forward_both(stages, torch.from_numpy(x))
    got = oracle.forward(params, x)
    assert got.shape == (3, 4)
    assert_rel_close(got, x_L.numpy(), name="x_L")
    # also the same as one nn.Sequential of the torch modules
    seq = torch.nn.Sequential(*[m for stage in stages for m in stage])
    with torch.no_grad():
        assert_rel_close(got, seq(torch.from_numpy(x)).numpy(), name="sequential")


def test_lenet_loss_gradients_match_torch():
    torch = pytest.importorskip("torch")
    oracle, params, x, y, _ = _lenet()
    stages, tparams = _torch_model(oracle, params)
    J, loss, xt = _torch_objective(oracle, stages, torch.from_numpy(x), torch.from_numpy(y))
    value, grads = oracle.value_and_grad(params, x, y)
    assert_rel_close(value, J.item(), name="J")
    tgrads = torch.autograd.grad(J, list(tparams.values()), retain_graph=True)
    assert list(grads) == list(tparams)
    for name, tg in zip(tparams, tgrads):
        assert_rel_close(grads[name], tg.numpy(), name=name)
    # input gradient of the per-sample loss = xi_0 of the loss_gradient penalty
    x_grad = torch.autograd.grad(loss.sum(), xt)[0]
    xi0 = Oracle(image_model(LENET_LAYERS, LENET_INPUT, "nll",
                             {"v": "loss_gradient"})).xi0(params, x, y)
    assert xi0.shape == x.shape
    assert_rel_close(xi0, x_grad.numpy(), name="xi0")


TORCH_PENALTIES = {
    "double_backprop": {"v": "loss_gradient", "p": "squared_norm", "weight": 0.3},
    "double_backprop_logits": {"v": "loss_gradient", "p": "norm", "weight": 0.3, "on": "logits"},
    "output_node": {"v": "output", "index": 2, "p": "squared_norm", "weight": 0.8},
    "output_node_logits": {"v": "output", "index": 1, "p": "norm", "weight": 0.5,
                           "on": "logits"},
    "jacobian": {"v": "jacobian", "p": "squared_norm", "weight": 0.1},
    "given": {"v": "given", "p": "(sqrt(s) - 1)**2", "weight": 0.4},
}


@pytest.mark.parametrize("name", sorted(TORCH_PENALTIES))
def test_lenet_double_backprop_matches_torch(name):
    torch = pytest.importorskip("torch")
    oracle, params, x, y, v = _lenet(TORCH_PENALTIES[name])
    stages, tparams = _torch_model(oracle, params)
    J, _, _ = _torch_objective(oracle, stages, torch.from_numpy(x), torch.from_numpy(y),
                               torch.from_numpy(v))
    value, grads = oracle.value_and_grad(params, x, y, v)
    assert_rel_close(value, J.item(), name="J")
    tgrads = torch.autograd.grad(J, list(tparams.values()))
    assert list(grads) == list(tparams)
    for pname, tg in zip(tparams, tgrads):
        assert np.any(tg.numpy() != 0), pname
        assert_rel_close(grads[pname], tg.numpy(), name=pname)


def test_lenet_vjp_jvp_match_torch():
    torch = pytest.importorskip("torch")
    oracle, params, x, _, v = _lenet()
    stages, _ = _torch_model(oracle, params)
    u = np.random.default_rng(9).standard_normal(x.shape)
    f = lambda xx: _torch_forward_both(stages, xx)[1]
    xt = torch.from_numpy(x).requires_grad_(True)
    t_vjp = torch.autograd.grad((f(xt) * torch.from_numpy(v)).sum(), xt)[0]
    # double-vjp trick (no forward-mode AD, which drags in TorchScript decompositions)
    _, t_jvp = torch.autograd.functional.jvp(f, torch.from_numpy(x), torch.from_numpy(u))
    assert_rel_close(oracle.vjp(params, x, v), t_vjp.numpy(), name="vjp")
    assert_rel_close(oracle.jvp(params, x, u), t_jvp.detach().numpy(), name="jvp")


@pytest.mark.parametrize("conv,input_shape", [
    ({"channels": 3, "kernel": 3, "stride": 2, "padding": 2, "dilation": 2}, [2, 9, 7]),
    ({"channels": 2, "kernel": 1}, [3, 4, 5]),
    ({"channels": 4, "kernel": 4, "stride": 3, "padding": 1}, [1, 10, 8]),
    ({"channels": 2, "kernel": 2, "stride": 1, "padding": 3, "dilation": 3}, [2, 3, 2]),
])
@pytest.mark.parametrize("bias", [True, False])
def test_single_conv_matches_torch(conv, input_shape, bias):
    torch = pytest.importorskip("torch")
    layers = [{"conv2d": conv, "bias": bias, "act": "softplus"}, "flatten", {"dense": 2}]
    oracle = Oracle(image_model(layers, input_shape, "none", {"v": "output", "index": 0}))
    params = oracle.init_params(seed=2)
    x, _, _ = image_data(oracle, batch=2)
    stages, tparams = _torch_model(oracle, params)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = _torch_forward_both(stages, xt)[1]
    assert_rel_close(oracle.forward(params, x), out.detach().numpy(), name="forward")
    xi0 = torch.autograd.grad(out[:, 0].sum(), xt, create_graph=True)[0]
    J = (xi0 ** 2).flatten(1).sum(1).mean()
    _, grads = oracle.value_and_grad(params, x)
    tgrads = torch.autograd.grad(J, list(tparams.values()), allow_unused=True)
    for name, tg in zip(tparams, tgrads):
        if tg is None:  # the last bias does not move d out / d x
            assert name == "b3" and np.all(grads[name] == 0)
            continue
        assert_rel_close(grads[name], tg.numpy(), name=name)
