"""`dbpgen check`: the emitted gradients against central differences in float64.

Compiles a float64 copy of the model into a temporary folder, then compares
value_and_grad's gradients with central differences of the value (every entry of small
tensors, random directions for large ones), and vjp/jvp with differences of forward.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace

import numpy as np

from .compiler import build, load_generated
from .errors import ModelError
from .model import load_model

EPS = 1e-6
# A central difference of float64 values of J is off by about eps |J| / EPS from rounding
# alone: a derivative smaller than that over rtol is compared in absolute terms, so that a
# tiny gradient entry of a large objective is not reported as a mismatch (see _agree).
ROUNDOFF = 4 * np.finfo(np.float64).eps
MIN_FLOOR = 1e-8  # the smallest magnitude a relative error is taken of
FULL_LIMIT = 64  # tensors up to this size are checked entry by entry
DIRECTIONS = 6


def _inputs(model, rng, batch):
    C = model.n_outputs
    x = rng.normal(size=(batch,) + tuple(model.input_shape))
    y = np.eye(C)[rng.integers(0, C, batch)] if model.loss == "nll" else rng.normal(size=(batch, C))
    v = rng.normal(size=(batch, C))
    return x, y, v


def _directions(shape, rng):
    size = int(np.prod(shape))
    if size <= FULL_LIMIT:
        return list(np.eye(size).reshape((size,) + tuple(shape)))
    return [rng.normal(size=shape) for _ in range(DIRECTIONS)]


def _agree(analytic: float, numeric: float, rtol: float, floor: float = MIN_FLOOR) -> tuple[bool, float]:
    """Relative error, of magnitudes no smaller than `floor` (what the differences resolve)."""
    err = abs(analytic - numeric) / max(abs(analytic), abs(numeric), floor)
    return bool(err <= rtol), err


def _judge(analytic: float, center: float, plus: float, minus: float, rtol: float,
           floor: float = MIN_FLOOR) -> tuple[bool, float, bool]:
    """(agrees, relative error, by a one-sided difference) of `analytic` against the
    differences of f(-EPS) = minus, f(0) = center, f(+EPS) = plus. Where a piecewise-linear
    activation (relu, Max, Abs, a clamp) has a kink within EPS of the point, the central
    difference averages the slopes of its two sides, while the emitted derivative is the
    slope of the side the point is on, which one of the one-sided differences measures.
    Smooth derivatives match those too (they are off by EPS f''), so a wrong gradient, which
    matches neither, is still reported."""
    good, err = _agree(analytic, (plus - minus) / (2 * EPS), rtol, floor)
    if good:
        return True, err, False
    # one-sided differences round twice as coarsely as the central one
    one = min(_agree(analytic, (plus - center) / EPS, rtol, 2 * floor)[1],
              _agree(analytic, (center - minus) / EPS, rtol, 2 * floor)[1])
    return (True, one, True) if one <= rtol else (False, err, False)


def _floor(value: float, rtol: float) -> float:
    """The smallest derivative central differences of `value` resolve to rtol."""
    return max(ROUNDOFF * abs(value) / (EPS * rtol), MIN_FLOOR)


def check_model(path, batch: int = 4, seed: int = 0, rtol: float = 1e-5) -> tuple[bool, str]:
    """(every check passed, the report). A module that fails to import or to run is a
    ModelError of one line (a compiler bug: the parser accepted what it cannot emit)."""
    model = replace(load_model(path), dtype="float64")
    with tempfile.TemporaryDirectory() as tmp:
        target = f"{tmp}/{model.name}.py"
        with open(target, "w", encoding="utf-8") as f:
            f.write(build(model).source())
        try:
            return _check_module(path, model, load_generated(target), batch, seed, rtol)
        except Exception as exc:  # anything the emitted code raises
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(str(path), "check", f"the emitted module fails at run time: "
                                                 f"{type(exc).__name__}: {first}") from None


def _check_module(path, model, m, batch: int, seed: int, rtol: float) -> tuple[bool, str]:
    rng = np.random.default_rng(seed)
    params = m.init_params(seed)
    x, y, v = _inputs(model, rng, batch)
    vv = v if model.penalty and model.penalty.v == "given" else None

    def value(p):
        return m.value_and_grad(p, x, y=y, v=vv)[0]

    if model.penalty and model.penalty.v == "random" and model.penalty.iterations:
        # v after its power iterations is held constant in J's gradient (SPEC): in the
        # differences too, or they would differentiate the iterations as well
        held = m._direction(params, x, None, None)
        m._direction = lambda *args: held
    J, grads = m.value_and_grad(params, x, y=y, v=vv)
    floor = _floor(J, rtol)
    lines, ok, kinks = [], True, 0

    def judged(label: str, results: list) -> None:
        nonlocal ok, kinks
        ok = ok and all(good for good, _, _ in results)
        kinks += sum(side for _, _, side in results)
        lines.append(f"  {label} {max(err for _, err, _ in results):.2e}")

    for name, g in grads.items():
        results = []
        for d in _directions(g.shape, rng):
            plus = dict(params, **{name: params[name] + EPS * d})
            minus = dict(params, **{name: params[name] - EPS * d})
            results.append(_judge(float(np.sum(g * d)), J, value(plus), value(minus), rtol, floor))
        judged(f"d/d{name:<6} max relative error", results)
    u = rng.normal(size=x.shape)
    out = [float(np.sum(m.forward(params, x + s * EPS * u) * v)) for s in (0, 1, -1)]
    judged("jvp        relative error", [_judge(float(np.sum(m.jvp(params, x, u) * v)), *out, rtol)])
    judged("vjp        relative error", [_judge(float(np.sum(m.vjp(params, x, v) * u)), *out, rtol)])
    if model.loss != "none":  # grad_x of each sample's loss: differences of B * J at weight 0
        def total(x0):
            return batch * m.value_and_grad(params, x0, y=y, v=vv, weight=0.0)[0]

        center = total(x)
        judged("input_grad relative error", [_judge(float(np.sum(m.input_grad(params, x, y) * u)), center,
                                                    total(x + EPS * u), total(x - EPS * u), rtol,
                                                    _floor(center, rtol))])
    verdict = "OK" if ok else "MISMATCH"
    head = f"{path}: {verdict}: gradients vs central differences (float64, eps={EPS}, rtol={rtol})"
    if kinks:
        lines.append(f"  ({kinks} agreed with a one-sided difference only: a kink of a piecewise-linear "
                     "activation within eps)")
    return ok, "\n".join([head] + lines)
