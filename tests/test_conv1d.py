"""conv1d networks on sequences (C, T) end to end, against references nobody here wrote.

Each model (conv1d, avgpool, conv1d without bias, flatten, dense) is compiled once per
test process and checked against
  * the HIPS-autograd oracle (tests/oracle.py): value, every parameter gradient, penalty,
    vjp, jvp, forward, init_params, for every kind of penalty (SPEC section 1);
  * PyTorch (torch.nn.functional.conv1d / avg_pool1d, torch.autograd.grad with
    create_graph=True), float64;
  * central finite differences of the emitted module's own value.
The kernels of templates/ops/conv1d.py.j2 (and the (C, T) variants of avgpool and flatten)
are checked on their own against torch and their adjoint identities (as plain Python; the
float32 model runs them jitted).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jinja2
import numba
import numpy as np
import pytest

from conftest import compile_spec, wider_intermediates
from oracle import Oracle, directional_check
from test_gradients import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional

T_IN, C_IN, C_OUT, BATCH = 12, 2, 3, 4
# conv1d k3 s2 p2 d2: (12 + 4 - 4 - 1) // 2 + 1 = 6; avgpool 2: 3; conv1d k2 p1: 4; flatten: 16
FIRST = {"channels": 3, "kernel": 3, "stride": 2, "padding": 2, "dilation": 2}
SECOND = {"channels": 4, "kernel": 2, "padding": 1}


def seq_model(name, penalty, loss="nll", out_act="softmax", acts=("tanh", "relu"), dtype="float64"):
    layers = [
        {"conv1d": dict(FIRST), "act": acts[0]},
        {"avgpool": 2},
        {"conv1d": dict(SECOND), "act": acts[1], "bias": False},
        "flatten",
        {"dense": C_OUT, **({"act": out_act} if out_act else {})},
    ]
    spec = {"name": name, "dtype": dtype, "input": [C_IN, T_IN], "layers": layers, "loss": loss}
    if penalty:
        spec["penalty"] = penalty
    return spec


CASES = {s["name"]: s for s in [
    seq_model("c1_cdb", {"v": "loss_gradient", "weight": 0.3}),
    seq_model("c1_output", {"v": "output", "index": 2, "weight": 0.5}, loss="mse", out_act=None),
    seq_model("c1_given", {"v": "given", "p": "norm"}, loss="mse", out_act="sigmoid", acts=("softplus", "elu")),
    seq_model("c1_jac_naive", {"v": "jacobian", "algorithm": "naive", "weight": 0.2}),
    seq_model("c1_jac_opt", {"v": "jacobian", "algorithm": "optimized", "weight": 0.2},
              acts=("relu", "leaky_relu")),
    seq_model("c1_random", {"v": "random", "iterations": 2, "p": "norm"}),
    seq_model("c1_projections", {"v": "projections", "count": 2, "weight": 0.7}),
]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> module, each compiled at most once per test process (plain Python kernels)."""
    cache = {}

    def get(name, jit=False):
        if (name, jit) not in cache:
            spec = CASES[name] if name in CASES else FLOAT32
            cache[name, jit] = compile_spec(spec, tmp_path_factory.mktemp(name), jit=jit)
        return cache[name, jit]

    return get


def data(spec, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, C_IN, T_IN))
    y = np.eye(C_OUT)[rng.integers(0, C_OUT, BATCH)] if spec["loss"] == "nll" else rng.normal(size=(BATCH, C_OUT))
    kind = (spec.get("penalty") or {}).get("v")
    v = {"given": rng.normal(size=(BATCH, C_OUT)), "random": rng.normal(size=(BATCH, C_OUT)),
         "projections": rng.normal(size=(BATCH, 2, C_OUT))}.get(kind)
    return x, y, v


# -- (a) the autograd oracle ---------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_conv1d_network_matches_oracle(name, compiled):
    spec, m = CASES[name], compiled(name)
    oracle = Oracle(spec)
    params = m.init_params(seed=4)
    ref_params = oracle.init_params(seed=4)
    assert list(params) == list(ref_params) == ["W1", "b1", "W3", "W5", "b5"]
    for k in ref_params:  # torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * k for conv1d
        assert_close(params[k], ref_params[k], 1e-14)
    assert params["W1"].shape == (3, C_IN, 3) and params["W3"].shape == (4, 3, 2)
    x, y, v = data(spec)
    value, grads = m.value_and_grad(params, x, y, v=v)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y, v=v)
    assert_close(value, ref_value)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert grads[k].shape == params[k].shape
        assert_close(grads[k], ref_grads[k])
    assert_close(m.penalty(params, x, y, v=v), oracle.penalty(params, x, y, v=v))
    w = np.random.default_rng(1).normal(size=(BATCH, C_OUT))
    assert_close(m.vjp(params, x, w), oracle.vjp(params, x, w))
    u = np.random.default_rng(2).normal(size=x.shape)
    assert_close(m.jvp(params, x, u), oracle.jvp(params, x, u))
    assert_close(m.forward(params, x), oracle.forward(params, x))


def test_jacobian_algorithms_differ(compiled):
    """naive (C double backprops, G'' != 0) and optimized (Alg. 4, G'' = 0) are two different
    programs; the naive one runs its forward-backward recursion once after the loop on
    summed sources (hoist_linear_recursion), as Alg. 4 does, and both fold it into the
    loss's backward pass (fold_loss_adjoint): as many K and K^T, fewer than the
    unsimplified program."""
    naive, optimized = compiled("c1_jac_naive"), compiled("c1_jac_opt")
    assert "(section 5.4, naive)" in naive.EQUATIONS and "Alg. 4 (section 5.4)" in optimized.EQUATIONS

    def ops(m, which="emitted"):
        return m.OPS[which]["K"] + m.OPS[which]["KT"]

    assert ops(naive) == ops(optimized) < ops(naive, "naive")


def test_random_and_projections_draw_from_seed(compiled):
    """Without v, random and projections draw their directions from the seed: the value
    is then a deterministic function of (seed, sample) and equal to the oracle's for that v."""
    for name in ("c1_random", "c1_projections"):
        m = compiled(name)
        params = m.init_params()
        x, y, _ = data(CASES[name])
        a = m.value_and_grad(params, x, y, seed=3)
        b = m.value_and_grad(params, x, y, seed=3)
        c = m.value_and_grad(params, x, y, seed=4)
        assert a[0] == b[0] and a[0] != c[0]
        # the first two samples alone: the same per-sample penalties
        assert_close(m.penalty(params, x[:2], y[:2], seed=3), m.penalty(params, x, y, seed=3)[:2])


# -- (b) PyTorch -----------------------------------------------------------------------------


def torch_objective(spec, params, x, y, v):
    """J = mean(loss + weight R) in torch, R from torch.autograd.grad(create_graph=True)."""
    tp = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    x0 = torch.tensor(x, requires_grad=True)
    acts = {"tanh": torch.tanh, "relu": F.relu, "softplus": F.softplus, "elu": F.elu,
            "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "sigmoid": torch.sigmoid,
            "softmax": lambda z: torch.softmax(z, dim=1), None: lambda z: z}
    layers = spec["layers"]

    def net(x0, detach=False):
        p = {k: (t.detach() if detach else t) for k, t in tp.items()}
        first, second = layers[0]["conv1d"], layers[2]["conv1d"]
        h = acts[layers[0]["act"]](F.conv1d(x0, p["W1"], p["b1"], stride=first["stride"],
                                             padding=first["padding"], dilation=first["dilation"]))
        h = F.avg_pool1d(h, 2)
        h = acts[layers[2]["act"]](F.conv1d(h, p["W3"], None, padding=second["padding"]))
        z = h.flatten(1) @ p["W5"].T + p["b5"]
        return z, acts[layers[4].get("act")](z)

    z, out = net(x0)
    ty = torch.tensor(y)
    loss = -(ty * torch.log_softmax(z, 1)).sum(1) if spec["loss"] == "nll" else ((out - ty) ** 2).sum(1)
    pen = spec["penalty"]
    p = torch.sqrt if pen.get("p") == "norm" else (lambda s: s)

    def sq(scalar):
        xi0 = torch.autograd.grad(scalar, x0, create_graph=True)[0]
        return p((xi0 ** 2).flatten(1).sum(1))

    kind = pen["v"]
    if kind == "loss_gradient":
        R = sq(loss.sum())
    elif kind == "output":
        R = sq(out[:, pen["index"]].sum())
    elif kind == "jacobian":
        R = sum(sq(out[:, i].sum()) for i in range(C_OUT))
    elif kind == "given":
        R = sq((out * torch.tensor(v)).sum())
    elif kind == "projections":
        n = v.shape[1]
        R = sum(sq((out * torch.tensor(v[:, k])).sum()) for k in range(n)) * (C_OUT / n)
    else:  # random with a given start: normalised, power-iterated on J J^T, held constant
        w = torch.tensor(v)
        w = w / w.norm(dim=1, keepdim=True)
        xd = x0.detach()
        for _ in range(pen["iterations"]):
            _, vjp_fn = torch.func.vjp(lambda a: net(a, detach=True)[1], xd)
            _, Ju = torch.func.jvp(lambda a: net(a, detach=True)[1], (xd,), vjp_fn(w))
            w = Ju / Ju.norm(dim=1, keepdim=True)
        R = sq((out * w).sum())
    J = (loss + pen.get("weight", 1.0) * R).mean()
    grads = torch.autograd.grad(J, list(tp.values()))
    return J.item(), {k: g.numpy() for k, g in zip(tp, grads)}


@pytest.mark.parametrize("name", CASES)
def test_conv1d_network_matches_torch_double_backprop(name, compiled):
    spec, m = CASES[name], compiled(name)
    params = m.init_params(seed=9)
    x, y, v = data(spec, seed=11)
    value, grads = m.value_and_grad(params, x, y, v=v)
    ref_value, ref_grads = torch_objective(spec, params, x, y, v)
    assert_close(value, ref_value, 1e-10)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], 1e-10)


def test_conv1d_forward_matches_torch(compiled):
    m = compiled("c1_output")
    params = m.init_params(seed=2)
    x, _, _ = data(CASES["c1_output"])
    tp = {k: torch.tensor(a) for k, a in params.items()}
    h = torch.tanh(F.conv1d(torch.tensor(x), tp["W1"], tp["b1"], stride=2, padding=2, dilation=2))
    h = F.relu(F.conv1d(F.avg_pool1d(h, 2), tp["W3"], padding=1))
    want = (h.flatten(1) @ tp["W5"].T + tp["b5"]).numpy()
    assert_close(m.forward(params, x), want, 1e-12)


# -- (c) finite differences ------------------------------------------------------------------


def test_conv1d_gradients_match_finite_differences(compiled):
    """The smooth model: <grad J, d> against (J(p + e d) - J(p - e d)) / 2e, and
    <vjp, u> against the central difference of forward along u."""
    name = "c1_given"
    m = compiled(name)
    params = m.init_params(seed=5)
    x, y, v = data(CASES[name], seed=6)
    _, grads = m.value_and_grad(params, x, y, v=v)
    rng = np.random.default_rng(0)
    for _ in range(3):
        analytic, numeric = directional_check(lambda p: m.value_and_grad(p, x, y, v=v)[0], grads, params,
                                              rng, eps=1e-5)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(analytic)), (analytic, numeric)
    u = rng.normal(size=x.shape)
    w = rng.normal(size=(BATCH, C_OUT))
    eps = 1e-6
    numeric = (m.forward(params, x + eps * u) - m.forward(params, x - eps * u)) / (2 * eps)
    assert_close(m.jvp(params, x, u), numeric, 1e-6)
    assert abs(np.sum(m.vjp(params, x, w) * u) - np.sum(w * numeric)) <= 1e-6 * np.abs(w * numeric).sum()


# -- float32, jitted -------------------------------------------------------------------------

FLOAT32 = seq_model("c1_cdb32", CASES["c1_cdb"]["penalty"], dtype="float32")


def test_conv1d_float32_jitted(compiled):
    m64, m32 = compiled("c1_cdb"), compiled("c1_cdb32", jit=True)
    params = m64.init_params(seed=1)
    x, y, _ = data(CASES["c1_cdb"])
    value, grads = m64.value_and_grad(params, x, y)
    p32 = {k: a.astype(np.float32) for k, a in params.items()}
    value32, grads32 = m32.value_and_grad(p32, x.astype(np.float32), y.astype(np.float32))
    assert abs(value32 - value) <= 1e-4 * max(1, abs(value))
    for k in grads:
        assert grads32[k].dtype == np.float32
        assert_close(grads32[k], grads[k], 1e-4)
    out = m32.forward(p32, x.astype(np.float32))
    assert out.dtype == np.float32
    assert_close(out, m64.forward(params, x), 1e-5)
    assert m32.SCHEDULES["value_and_grad"] in ("fused", "kernels")  # Python calling the kernels
    # no float64 intermediate anywhere: every array of every Python-level function of the module
    for fn in (lambda: m32.value_and_grad(p32, x.astype(np.float32), y.astype(np.float32)),
               lambda: m32.vjp(p32, x.astype(np.float32), np.ones((len(x), C_OUT), np.float32))):
        assert wider_intermediates(m32, fn) == []


# -- the kernels on their own ----------------------------------------------------------------

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
JIT = "@numba.njit(cache=False)"


def decorators(jit: str) -> dict:
    """The module's decorator table (dbpgen.backend.emit.DECORATORS), uncached for tests."""
    from dbpgen.backend.emit import DECORATORS

    return {k: v.replace("cache=True", "cache=False") if jit else "" for k, v in DECORATORS.items()}


@functools.lru_cache(maxsize=None)
def kernels(mode: str) -> dict:
    """templates/ops/{conv1d,avgpool,flatten}.py.j2 rendered without a model and exec'd."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    jit = JIT if mode == "jit" else ""
    source = "\n\n".join(env.get_template(f"ops/{op}.py.j2").render(jit=jit, array_jit=jit, count_ops=False,
                                                                  decorators=decorators(jit))
                         for op in ("conv1d", "avgpool", "flatten"))
    namespace = {"np": np, "numba": numba}
    exec(compile(source, f"<conv1d kernels {mode}>", "exec"), namespace)
    return namespace


GEOMETRIES = [  # (B, Cin, Cout, T, k, stride, padding, dilation, samples per chunk)
    (3, 2, 3, 11, 3, 1, 0, 1, 3),
    (2, 3, 2, 13, 3, 2, 1, 1, 1),
    (1, 1, 4, 9, 2, 3, 2, 2, 4),
    (5, 2, 2, 10, 4, 1, 3, 3, 2),   # an uneven last chunk
    (17, 2, 1, 6, 1, 1, 0, 1, 5),
]


# The conv1d kernels are plain Python (NumPy GEMMs) in every rendering.
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv1d_kernels_match_torch_and_are_adjoint(geometry, mode="plain"):
    B, Cin, Cout, T, k, s, p, d, chunk = geometry
    ns = kernels(mode)
    rng = np.random.default_rng(sum(geometry))
    To = (T + 2 * p - d * (k - 1) - 1) // s + 1
    W, x, y = rng.normal(size=(Cout, Cin, k)), rng.normal(size=(B, Cin, T)), rng.normal(size=(B, Cout, To))
    Kx = ns["_conv1d_K"](W, x, s, p, d, chunk)
    KTy = ns["_conv1d_KT"](W, y, s, p, d, T, chunk)
    Kbox = ns["_conv1d_Kbox"](x, y, s, p, d, k, chunk)
    tW, tx, ty = torch.tensor(W), torch.tensor(x), torch.tensor(y)
    geo = dict(stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(Kx, F.conv1d(tx, tW, **geo).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(KTy, torch.nn.grad.conv1d_input(x.shape, tW, ty, **geo).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Kbox, torch.nn.grad.conv1d_weight(tx, W.shape, ty, **geo).numpy(),
                               rtol=1e-12, atol=1e-12)
    # <K(W, x), y> = <x, K^T(W, y)> = <W, K^box(x, y)>
    scale = np.abs(Kx).sum() * np.abs(y).max() + 1
    assert abs(np.vdot(Kx, y) - np.vdot(x, KTy)) <= 1e-12 * scale
    assert abs(np.vdot(Kx, y) - np.vdot(W, Kbox)) <= 1e-12 * scale
    assert Kx.flags.c_contiguous and KTy.flags.c_contiguous and Kbox.flags.c_contiguous


def test_sequence_avgpool_and_flatten_kernels(mode="plain"):
    ns = kernels(mode)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3, 2, 12)), rng.normal(size=(3, 2, 4))
    Kx = ns["_avgpool1d_K"](x, 3)
    np.testing.assert_allclose(Kx, F.avg_pool1d(torch.tensor(x), 3).numpy(), rtol=1e-14)
    KTy = ns["_avgpool1d_KT"](y, 3)
    assert abs(np.vdot(Kx, y) - np.vdot(x, KTy)) <= 1e-12 * (np.abs(x).sum() + 1)
    flat = ns["_flatten1d_K"](x)
    np.testing.assert_array_equal(flat, torch.tensor(x).flatten(1).numpy())
    np.testing.assert_array_equal(ns["_flatten1d_KT"](flat, 2, 12), x)
