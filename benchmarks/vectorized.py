"""Nanoseconds per element of each vectorized scalar helper (templates/helpers.py.j2) in a
jitted loop over 65 536 numbers, beside NumPy's whole-array ufunc, in float64 and float32.

    python benchmarks/vectorized.py
"""
import math, time, numpy as np, numba
from dbpgen.codegen import helpers_source
from dbpgen import functable
for dt in ("float64", "float32"):
    names = [functable.TABLE[n].scalar_helper for n in ("exp", "log", "tanh", "sigmoid", "softplus")]
    text = helpers_source(names, dt, '@numba.njit(error_model="numpy")', "", '@numba.njit(error_model="numpy", inline="always")')
    ns = {"np": np, "math": math, "numba": numba}; exec(text, ns)
    x = (np.random.default_rng(0).standard_normal(1 << 16) * 3).astype(dt)
    row = []
    for n in names:
        exec(f"def each_{n}(a, out):\n    for i in range(a.shape[0]):\n        out[i] = {n}(a[i])\n", ns)
        f = numba.njit(error_model="numpy")(ns["each_" + n]); o = np.empty_like(x); a = np.abs(x) if n == "_log1" else x; f(a, o)
        t = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(20): f(a, o)
            t.append((time.perf_counter() - t0) / 20 / x.size * 1e9)
        row.append(f"{n} {min(t):.2f}")
    for u in ("exp", "log", "tanh"):
        a = np.abs(x) if u == "log" else x; g = getattr(np, u); t = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(20): g(a)
            t.append((time.perf_counter() - t0) / 20 / x.size * 1e9)
        row.append(f"np.{u} {min(t):.2f}")
    print(dt, ", ".join(row))
