"""`dbpgen bench`: the emitted module side by side with PyTorch, JAX and PyTensor.

Same model, parameters, data, dtype and thread count for everyone; warm-up (compilation)
excluded; medians of repeated `value_and_grad` calls. Peers are written as their users
would write them: PyTorch eager with create_graph=True, jax.jit(jax.value_and_grad(...)),
PyTensor's NUMBA mode; per-sample input gradients come from the gradient of the batch sum
(samples are independent). Peers that are not installed are reported and skipped.
"""
from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import sympy as sp

from . import operators
from .backend.blas import blas_core
from .compiler import build, load_generated
from .ir import S, Z, Model
from .errors import ModelError
from .model import load_model

PEERS = ("torch", "jax", "pytensor")
BUILTIN = ("identity", "relu", "tanh", "sigmoid", "softplus", "elu", "silu", "sin", "softmax")


class Unsupported(Exception):
    pass


def interleaved_ms(fns: dict, seconds: float = 1.0, rounds: int = 5, min_runs: int = 5,
                   settle: float = 0.3) -> dict:
    """Median wall time in ms of each fn, measured in turns: every round gives each one a
    burst of seconds / rounds, so slow drift of a shared machine is spread over all
    contenders instead of landing on one. Between bursts everyone sleeps `settle` seconds:
    thread pools (OpenMP, OpenBLAS, Eigen) spin-wait after their work and would otherwise
    steal the cores of whoever runs next."""
    for fn in fns.values():
        fn(), fn()
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            burst = 0
            while burst < min_runs or time.perf_counter() - start < seconds / rounds:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                burst += 1
                if burst >= 200:
                    break
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def with_outputs(path, C: int, directory) -> str:
    """A copy of the model file whose last layer has C outputs (for scaling in C)."""
    import yaml

    with open(path) as f:
        spec = yaml.safe_load(f)
    last = spec["layers"][-1]
    if "dense" not in last:
        raise ModelError(str(path), "--outputs", "the last layer must be dense to vary its width")
    last["dense"] = C
    spec["name"] = f"{spec['name']}_C{C}"
    out = os.path.join(directory, f"{spec['name']}.yaml")
    with open(out, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return out


def problem(model: Model, batch: int, seed: int = 0):
    """Parameters, inputs, targets and a direction v, in the model's dtype."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(model.dtype)
    C = model.n_outputs
    x = rng.standard_normal((batch,) + tuple(model.input_shape)).astype(dtype)
    y = (np.eye(C)[rng.integers(0, C, batch)] if model.loss == "nll" else rng.standard_normal((batch, C)))
    v = rng.standard_normal((batch, C))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return x, y.astype(dtype), v.astype(dtype)


def _activation_name(act) -> str:
    name = act.name.split("(")[0]
    if name not in BUILTIN + ("leaky_relu",):
        _expression_fn(act.expr, {})  # raises Unsupported for functions no peer has
        return "expression"
    return name


# SymPy function -> the name a peer's namespace gives it (the peers' `expr_ns`)
EXPR_FUNCTIONS = {"exp": "exp", "log": "log", "tanh": "tanh", "Abs": "abs", "sin": "sin",
                  "cos": "cos", "sqrt": "sqrt", "erf": "erf", "atan": "atan", "sinh": "sinh",
                  "cosh": "cosh"}


def _expression_fn(expr, ns: dict):
    """An activation given as a SymPy expression in z, as a function of the peer's tensors
    built from its namespace ns (name -> function); an empty ns only checks the expression."""
    def build(e):
        if e == Z:
            return lambda z: z
        if e.is_number:
            c = float(e)
            return lambda z: c
        if e.is_Add or e.is_Mul:
            parts = [build(a) for a in e.args]
            if e.is_Add:
                return lambda z: sum(f(z) for f in parts[1:]) + parts[0](z)
            return lambda z: _product(f(z) for f in parts)
        if e.is_Pow and e.exp.is_number:
            base, k = build(e.base), e.exp
            k = int(k) if k.is_integer else float(k)
            return lambda z: base(z) ** k
        name = EXPR_FUNCTIONS.get(type(e).__name__)
        if name is None or len(e.args) != 1:
            raise Unsupported(f"activation expression {e} (no peer translation of {type(e).__name__})")
        inner = build(e.args[0])
        if not ns:
            return inner
        fn = ns[name]
        return lambda z: fn(inner(z))

    return build(expr)


def _product(values):
    it = iter(values)
    out = next(it)
    for v in it:
        out = out * v
    return out


def _activation_fn(act, acts: dict, ns: dict, leaky):
    """The peer's function for a layer's activation: built in, leaky_relu or an expression."""
    name = _activation_name(act)
    if name == "leaky_relu":
        return lambda z, a=_alpha(act): leaky(z, a)
    if name == "expression":
        return _expression_fn(act.expr, ns)
    return acts[name]


def _alpha(act) -> float:
    return float(act.name[len("leaky_relu("):-1]) if "(" in act.name else 0.01


def _p_function(model: Model, sqrt):
    p = model.penalty.p
    if p == S:
        return lambda s: s
    if p == sp.sqrt(S):
        return sqrt
    if p == (sp.sqrt(S) - 1) ** 2:
        return lambda s: (sqrt(s) - 1) ** 2
    raise Unsupported(f"p = {p}")


def _check_penalty(model: Model):
    pen = model.penalty
    if pen and pen.v not in ("loss_gradient", "output", "given", "random", "jacobian"):
        raise Unsupported(f"v: {pen.v}")
    if pen and pen.v == "random" and pen.iterations:  # the peers take v as given: less work
        raise Unsupported(f"v: random with {pen.iterations} power iterations (the peers hold v as given)")


# -- dbpgen ------------------------------------------------------------------------


_modules: dict = {}


def dbpgen_module(model: Model, naive: bool = False):
    """The emitted (or, with naive, the unsimplified) module, jitted; one per model and
    variant in a process, so that a sweep over batch sizes compiles once."""
    key = (model, naive)
    if key not in _modules:
        _modules[key] = _compile_module(model, naive)
    return _modules[key]


def _compile_module(model: Model, naive: bool):
    tmp = tempfile.mkdtemp(prefix="dbpgen-bench-")
    path = os.path.join(tmp, f"{model.name}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(build(model, simplified=not naive).source())
    return load_generated(path)


def dbpgen_runner(model: Model, module, params, x, y, v):
    yy = y if model.loss != "none" else None
    vv = v if model.penalty and model.penalty.v in ("given", "random") else None
    return lambda: module.value_and_grad(params, x, yy, v=vv)


# -- PyTorch -----------------------------------------------------------------------


def torch_runner(model: Model, params, x, y, v):
    import torch

    F = torch.nn.functional
    acts = {"identity": lambda z: z, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "softplus": F.softplus, "elu": F.elu, "silu": F.silu, "sin": torch.sin,
            "softmax": lambda z: torch.softmax(z, dim=1)}
    _check_penalty(model)
    ns = {name: getattr(torch, name) for name in EXPR_FUNCTIONS.values()}
    fns = [_activation_fn(layer.act, acts, ns, F.leaky_relu) for layer in model.layers]
    tp = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    tx, ty, tv = torch.tensor(x), torch.tensor(y), torch.tensor(v)
    pen = model.penalty
    p = _p_function(model, torch.sqrt) if pen else None
    lam = pen.weight if pen else 0.0

    def value_and_grad():
        x0 = tx.clone().requires_grad_(True)
        h = x0
        for layer, g in zip(model.layers, fns):
            z = _torch_layer(torch, layer, tp, h)
            h = g(z)
        out = z if pen and pen.on_logits else h
        if model.loss == "mse":
            loss = ((h - ty) ** 2).sum(1)
        elif model.loss == "nll":
            loss = -(ty * torch.log_softmax(z, dim=1)).sum(1)
        else:
            loss = torch.zeros(x0.shape[0], dtype=x0.dtype)
        J = loss
        if pen:
            J = J + lam * _torch_penalty(torch, pen, out, loss, x0, tv, p, model.n_outputs)
        J = J.mean()
        # with loss: none, parameters that only shift the output (the last bias) do not
        # reach the penalty: their gradient is zero, as dbpgen returns it
        grads = torch.autograd.grad(J, list(tp.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(tp.values(), grads)]
        return J.item(), grads

    return value_and_grad


def _torch_layer(torch, layer, prm, h):
    """The layer in PyTorch, as its operator module writes it (dbpgen.operators)."""
    j = layer.index
    return operators.get(layer.op.kind).torch_layer(torch, layer.op, h, prm.get(f"W{j}"), prm.get(f"b{j}"))


def _jax_layer(jax, layer, prm, h):
    j = layer.index
    return operators.get(layer.op.kind).jax_layer(jax, layer.op, h, prm.get(f"W{j}"), prm.get(f"b{j}"))


def _torch_penalty(torch, pen, out, loss, x0, tv, p, C):
    def sq(v_out):
        g = torch.autograd.grad(v_out, x0, create_graph=True)[0]
        return p((g * g).flatten(1).sum(1))

    if pen.v == "loss_gradient":
        return sq(loss.sum())
    if pen.v == "output":
        return sq(out[:, pen.index].sum())
    if pen.v == "jacobian":
        return sum(sq(out[:, i].sum()) for i in range(C))
    return sq((out * tv).sum())


# -- JAX ---------------------------------------------------------------------------


def jax_runner(model: Model, params, x, y, v):
    import jax
    import jax.numpy as jnp

    if model.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    nn = jax.nn
    acts = {"identity": lambda z: z, "relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
            "softplus": nn.softplus, "elu": nn.elu, "silu": nn.silu, "sin": jnp.sin,
            "softmax": lambda z: nn.softmax(z, axis=-1)}
    _check_penalty(model)
    ns = {name: getattr(jnp, name) for name in EXPR_FUNCTIONS.values() if name != "erf"}
    ns["erf"] = jax.scipy.special.erf
    fns = [_activation_fn(layer.act, acts, ns, nn.leaky_relu) for layer in model.layers]
    pen = model.penalty
    p = _p_function(model, jnp.sqrt) if pen else None
    lam = pen.weight if pen else 0.0

    def net(prm, x0):
        h = x0
        for layer, g in zip(model.layers, fns):
            z = _jax_layer(jax, layer, prm, h)
            h = g(z)
        return z, h

    def loss_of(prm, x0, yy):
        z, h = net(prm, x0)
        if model.loss == "mse":
            return ((h - yy) ** 2).sum(1)
        if model.loss == "nll":
            return -(yy * nn.log_softmax(z, axis=1)).sum(1)
        return jnp.zeros(x0.shape[0], dtype=x0.dtype)

    def out_of(prm, x0):
        z, h = net(prm, x0)
        return z if pen and pen.on_logits else h

    def objective(prm, x0, yy, vv):
        J = loss_of(prm, x0, yy)
        if pen:
            def sq(f):
                g = jax.grad(lambda xx: f(xx).sum())(x0)
                return p((g * g).reshape(g.shape[0], -1).sum(1))

            if pen.v == "loss_gradient":
                R = sq(lambda xx: loss_of(prm, xx, yy))
            elif pen.v == "output":
                R = sq(lambda xx: out_of(prm, xx)[:, pen.index])
            elif pen.v == "jacobian":
                jac = jax.vmap(jax.jacrev(lambda xi: out_of(prm, xi[None])[0]))(x0)  # (B, C, *input)
                jac = jac.reshape(jac.shape[0], jac.shape[1], -1)
                R = p((jac * jac).sum(2)).sum(1)
            else:
                R = sq(lambda xx: (out_of(prm, xx) * vv).sum(1))
            J = J + lam * R
        return J.mean()

    f = jax.jit(jax.value_and_grad(objective))
    jp = {k: jnp.asarray(a) for k, a in params.items()}
    jx, jy, jv = jnp.asarray(x), jnp.asarray(y), jnp.asarray(v)

    def value_and_grad():
        value, grads = f(jp, jx, jy, jv)
        jax.block_until_ready(grads)
        return value, grads

    return value_and_grad


# -- PyTensor ----------------------------------------------------------------------


def pytensor_runner(model: Model, params, x, y, v):
    import pytensor
    import pytensor.tensor as pt

    _check_penalty(model)
    if any(not hasattr(operators.get(layer.op.kind), "pytensor_layer") for layer in model.layers):
        raise Unsupported("image layers (not wired up for PyTensor)")
    acts = {"identity": lambda z: z, "relu": lambda z: pt.maximum(z, 0), "tanh": pt.tanh,
            "sigmoid": pt.sigmoid, "softplus": pt.softplus, "sin": pt.sin,
            "elu": lambda z: pt.switch(z > 0, z, pt.expm1(z)), "silu": lambda z: z * pt.sigmoid(z),
            "softmax": lambda z: pt.special.softmax(z, axis=1)}
    names = list(params)
    sym = {k: pt.tensor(k, shape=a.shape, dtype=model.dtype) for k, a in params.items()}
    x0 = pt.matrix("x", dtype=model.dtype)
    yy = pt.matrix("y", dtype=model.dtype)
    vv = pt.matrix("v", dtype=model.dtype)
    h = x0
    # PyTensor 3 spells atan as NumPy does, arctan
    ns = {name: getattr(pt, name, None) or getattr(pt, "arc" + name[1:]) for name in EXPR_FUNCTIONS.values()}
    for layer in model.layers:
        g = _activation_fn(layer.act, acts, ns, lambda z, a: pt.switch(z > 0, z, a * z))
        z = operators.get(layer.op.kind).pytensor_layer(pt, layer.op, h, sym[f"W{layer.index}"],
                                                        sym.get(f"b{layer.index}"))
        h = g(z)
    pen = model.penalty
    out = z if pen and pen.on_logits else h
    if model.loss == "mse":
        loss = ((h - yy) ** 2).sum(1)
    elif model.loss == "nll":
        loss = -(yy * pt.special.log_softmax(z, axis=1)).sum(1)
    else:
        loss = pt.zeros((x0.shape[0],), dtype=model.dtype)
    J = loss
    if pen:
        p = _p_function(model, pt.sqrt)

        def sq(scalar):
            g = pytensor.grad(scalar, x0)
            return p((g * g).sum(1))

        if pen.v == "loss_gradient":
            R = sq(loss.sum())
        elif pen.v == "output":
            R = sq(out[:, pen.index].sum())
        elif pen.v == "jacobian":
            R = sum(sq(out[:, i].sum()) for i in range(model.n_outputs))
        else:
            R = sq((out * vv).sum())
        J = J + pen.weight * R
    J = J.mean()
    grads = pytensor.grad(J, [sym[k] for k in names], disconnected_inputs="ignore")  # zeros, as torch
    f = pytensor.function([sym[k] for k in names] + [x0, yy, vv], [J] + grads, mode="NUMBA",
                          on_unused_input="ignore")
    args = [params[k] for k in names] + [x, y, v]
    return lambda: f(*args)


RUNNERS = {"torch": torch_runner, "jax": jax_runner, "pytensor": pytensor_runner}


def gemm_shape(layer, batch: int) -> tuple[int, int, int]:
    """(M, K, N) of the GEMM that one application of a layer amounts to, over the batch."""
    return operators.get(layer.op.kind).gemm_shape(layer.op, layer.in_shape, batch)


def gemm_runner(model: Model, batch: int):
    """NumPy's own matmul on the model's largest layer, and its flop count."""
    layer = max((l for l in model.layers if l.op.has_params), key=lambda l: l.op.flops(l.in_shape))
    M, K, N = gemm_shape(layer, batch)
    dtype = np.dtype(model.dtype)
    a = np.random.default_rng(0).standard_normal((M, K)).astype(dtype)
    b = np.random.default_rng(1).standard_normal((N, K)).astype(dtype)
    return (lambda: a @ b.T), 2 * M * K * N


def blas_kernels() -> str:
    """'Haswell kernels (OPENBLAS_CORETYPE=Haswell)': blas_core and what forced it, for
    tables and reports; '' where blas_core cannot tell."""
    core = blas_core()
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f"{core} kernels" + (f" (OPENBLAS_CORETYPE={forced})" if forced else "") if core else ""


GEMM_BOUND_FLOPS = 1 << 15  # per sample in one layer: >= 1 MFLOP per GEMM at batch 32


def gemm_bound(model: Model) -> bool:
    """Whether a layer is large enough that BLAS does most of a call's work: only then is
    the GEMM roofline a fair yardstick."""
    return any(layer.op.has_params and layer.op.flops(layer.in_shape) >= GEMM_BOUND_FLOPS
               for layer in model.layers)


def run(path, batch: int, against=PEERS, dtype: str | None = None, naive: bool = False,
        seconds: float = 1.0) -> list[dict]:
    """Rows of {name, ms, ratio, note}; the first row is dbpgen."""
    model = load_model(path)
    if not model.has_objective:
        raise ModelError(str(path), "loss", "no loss and no penalty: J is 0, there is nothing to time")
    if not any(layer.op.has_params for layer in model.layers):
        raise ModelError(str(path), "layers", "no layer has weights: value_and_grad has no gradient to time")
    if dtype:
        model = replace(model, dtype=dtype)
    return measure(model, dbpgen_module(model), batch, against, seconds,
                   dbpgen_module(model, naive=True) if naive else None)


def measure(model: Model, module, batch: int, against=PEERS, seconds: float = 1.0,
            naive_module=None) -> list[dict]:
    """`run` for a model whose module is already imported (the sweep compiles its own)."""
    x, y, v = problem(model, batch)
    # the derivation leaves ~10^5 SymPy objects behind; keep the collector off them while timing
    gc.collect()
    gc.freeze()
    params = module.init_params(seed=0)
    fns = {"dbpgen": dbpgen_runner(model, module, params, x, y, v)}
    notes = {}
    if naive_module is not None:
        fns["dbpgen --naive"] = dbpgen_runner(model, naive_module, params, x, y, v)
    for peer in against:
        try:
            fns[peer] = RUNNERS[peer](model, params, x, y, v)
        except ImportError:
            notes[peer] = "not installed"
        except Unsupported as exc:
            notes[peer] = f"unsupported: {exc}"
    gemm, gemm_flops = gemm_runner(model, batch)
    fns["numpy matmul"] = gemm
    ms = interleaved_ms(fns, seconds)
    flops = module.OPS["emitted"]["flops"] * batch
    rows = [{"name": "dbpgen", "ms": ms["dbpgen"], "gflops": flops / (ms["dbpgen"] * 1e6)}]
    rows += [{"name": name, "ms": ms[name]} for name in fns if name not in ("dbpgen", "numpy matmul")]
    rows += [{"name": peer, "ms": None, "note": note} for peer, note in notes.items()]
    rows[0]["roofline"] = rows[0]["gflops"] / (gemm_flops / (ms["numpy matmul"] * 1e6))
    for row in rows:
        if row["ms"]:
            row["ratio"] = rows[0]["ms"] / row["ms"]
    return rows


def report(path, batch: int, rows: list[dict], dtype: str) -> str:
    lines = [f"{path}  batch={batch}  dtype={dtype}  threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
             f"  openblas={blas_core() or 'none'}",
             f"{'':16}{'median ms':>12}{'dbpgen / peer':>16}"]
    for row in rows:
        if row["ms"] is None:
            lines.append(f"{row['name']:16}{'-':>12}    {row['note']}")
        else:
            lines.append(f"{row['name']:16}{row['ms']:>12.3f}{row.get('ratio', 1.0):>16.2f}")
    top = rows[0]
    lines.append(f"dbpgen achieves {top['gflops']:.2f} GFLOP/s on K, K^T, K^box = "
                 f"{100 * top['roofline']:.0f}% of NumPy's matmul on the largest layer")
    return "\n".join(lines)
