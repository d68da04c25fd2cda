"""Calls every API function of a generated module with wrong inputs; each must raise a
ValueError or TypeError that names the offending argument before any kernel runs.

Run as a script in a subprocess (`python wrong_inputs.py MODULE.py`), so that a kernel
that reads or writes out of bounds kills that process, not the test session. Prints the
number of cases and exits 0 when every case gave a clean error; otherwise the first silent
acceptance or unclear error ends it with exit status 1.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np


def load(path: str):
    spec = importlib.util.spec_from_file_location("module_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrong_shapes(shape: tuple) -> list[tuple]:
    """Shapes near `shape` that are not it: each axis one longer or shorter, one axis more
    or fewer, transposed, 0-d."""
    out = [(), (1,) + shape, shape + (1,)]
    for k, n in enumerate(shape):
        for m in (n + 1, n - 1, 5 * n + 3):
            if m >= 0 and m != n:
                out.append(shape[:k] + (m,) + shape[k + 1:])
    if len(shape) > 1:
        out.append(shape[:-1])
        out.append((int(np.prod(shape)),))
        if shape[::-1] != shape:
            out.append(shape[::-1])
    return [s for s in dict.fromkeys(out) if s != shape]


def calls(m, batch: int = 3):
    """(label, function) of every API entry point, each taking params, with valid data."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + m.INPUT_SHAPE)
    y = np.abs(rng.standard_normal((batch, m.N_OUTPUTS)))
    y /= y.sum(axis=1, keepdims=True)
    v = rng.standard_normal((batch, m.N_OUTPUTS))
    return [
        ("forward", lambda p, **kw: m.forward(p, kw.get("x", x))),
        ("penalty", lambda p, **kw: m.penalty(p, kw.get("x", x), kw.get("y", y), kw.get("v"))),
        ("value_and_grad", lambda p, **kw: m.value_and_grad(
            p, kw.get("x", x), kw.get("y", y), kw.get("v"), weight=kw.get("weight"))),
        ("vjp", lambda p, **kw: m.vjp(p, kw.get("x", x), kw.get("v", v))),
        ("jvp", lambda p, **kw: m.jvp(p, kw.get("x", x), kw.get("u", x))),
    ] + ([("input_grad", lambda p, **kw: m.input_grad(p, kw.get("x", x), kw.get("y", y)))]
         if "input_grad" in m.SCHEDULES else [])  # a model with a loss


def expect_error(label: str, name: str, run) -> None:
    try:
        run()
    except (ValueError, TypeError) as exc:
        if name not in str(exc):
            raise SystemExit(f"{label}: the error does not name {name}: {exc}")
        return
    raise SystemExit(f"{label}: accepted silently")


def main(path: str) -> int:
    m = load(path)
    good = m.init_params(seed=1)
    entry = calls(m)
    for label, call in entry:  # the valid call works
        call(good)
    cases = 0
    for name, shape in m.PARAM_SHAPES.items():
        for wrong in wrong_shapes(shape):
            bad = dict(good, **{name: np.ones(wrong)})
            for label, call in entry:
                expect_error(f"{label} with {name} of shape {wrong}", name, lambda: call(bad))
                cases += 1
        missing = {k: a for k, a in good.items() if k != name}
        for bad, what in ((missing, "missing"), (dict(good, **{name: np.full(shape, 1 + 1j)}), "complex"),
                          (dict(good, **{name: np.full(shape, "a")}), "text")):
            for label, call in entry:
                expect_error(f"{label} with {name} {what}", name, lambda: call(bad))
                cases += 1
    batch_shape = (3,) + m.INPUT_SHAPE
    wrong_x = [(3,) + s for s in wrong_shapes(m.INPUT_SHAPE)] + [m.INPUT_SHAPE, (0,) + m.INPUT_SHAPE]
    for wrong in wrong_x:
        for label, call in entry:
            expect_error(f"{label} with x of shape {wrong}", "x", lambda: call(good, x=np.ones(wrong)))
            cases += 1
    for wrong in wrong_x + [(4,) + m.INPUT_SHAPE]:  # u has the shape of x
        expect_error(f"jvp with u of shape {wrong}", "u", lambda: m.jvp(good, np.ones(batch_shape), np.ones(wrong)))
        cases += 1
    for wrong in [(3,) + s for s in wrong_shapes((m.N_OUTPUTS,))] + [(4, m.N_OUTPUTS)]:
        expect_error(f"vjp with v of shape {wrong}", "v", lambda: entry[3][1](good, v=np.ones(wrong)))
        cases += 1
    for weight in (float("nan"), float("inf"), "0.1", [0.1, 0.2]):
        expect_error(f"value_and_grad with weight={weight!r}", "weight",
                     lambda: entry[2][1](good, weight=weight))
        cases += 1
    for label, call in entry:  # a key the model does not have: strict, as load_state_dict
        expect_error(f"{label} with an extra parameter", "'W99'", lambda: call(dict(good, W99=np.ones(3))))
        cases += 1
    for seed in (-1, 1.5, "a"):
        expect_error(f"init_params(seed={seed!r})", "seed", lambda: m.init_params(seed=seed))
        cases += 1
    expect_error("params not a dict", "params", lambda: m.forward([1, 2], np.ones(batch_shape)))
    print(f"{cases} wrong inputs refused cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
