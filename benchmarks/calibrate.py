"""Measure the constants of the chooser's cost model (dbpgen/backend/cost.py) on this machine.

    python benchmarks/calibrate.py

Prints a `Machine(...)` to compare with (or paste over) `cost.MACHINE`. Each constant is
the median of repeated timings of the smallest code that exhibits it, float64.
"""
from __future__ import annotations

import math
import time

import numba
import numpy as np

from dbpgen.backend.cost import Machine
from dbpgen.codegen import helpers_source


def seconds(fn, repeat: int = 7, budget: float = 0.2) -> float:
    """Median seconds of one call of fn."""
    fn()
    times = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed > budget / repeat:
                break
        times.append(elapsed / n)
    return float(np.median(times))


@numba.njit(cache=False)
def _madd(a, b, out):
    for i in range(a.shape[0]):
        out[i] = a[i] * b[i] + out[i]


@numba.njit(cache=False)
def _tanh_loop(a, out):
    for i in range(a.shape[0]):
        out[i] = np.tanh(a[i])


def _vector_loop():
    """A jitted loop of the modules' vectorized tanh (templates/helpers.py.j2, float64)."""
    text = helpers_source(["_tanh1"], "float64", jit='@numba.njit(cache=False, error_model="numpy")')
    namespace = {"np": np, "math": math, "numba": numba}
    exec(compile(text, "helpers.py", "exec"), namespace)
    tanh1 = namespace["_tanh1"]

    @numba.njit(cache=False, error_model="numpy")
    def loop(a, out):
        for i in range(a.shape[0]):
            out[i] = tanh1(a[i])
    return loop


@numba.njit(cache=False, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _lane_libm(x, out):
    for i in range(x.shape[0]):
        for b in range(x.shape[1]):
            out[i, b] = np.tanh(x[i, b])  # other functions: cost.LIBM_RELATIVE


@numba.njit(cache=False, fastmath={"reassoc", "contract", "nsz", "arcp"})
def _lane_rows(W, x, out):
    for i in range(W.shape[0]):
        for b in range(x.shape[1]):
            out[i, b] = 0.0
        for k in range(W.shape[1]):
            w = W[i, k]
            for b in range(x.shape[1]):
                out[i, b] += w * x[k, b]


@numba.njit(cache=False)
def _nothing(a, b, c, d, e, f, g, h):
    return (a,)


@numba.njit(cache=False)
def _blas_calls(a, n):
    # n tiny products from inside a jitted function: BLAS's cost beyond its flops there
    acc = 0.0
    for _ in range(n):
        acc += np.dot(a, a)[0, 0]
    return acc


@numba.njit(cache=False)
def _fresh(a):
    out = np.empty((a.shape[0], a.shape[1]))
    out[0, 0] = a[0, 0]
    return (out,)


@numba.njit(cache=False)
def _statements(a, n):
    # n statements of a jitted program: a kernel's call and its fresh output array
    acc = 0.0
    for _ in range(n):
        acc += _fresh(a)[0][0, 0]
    return acc


def main() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(1024, 1024))
    gemm_rate = 2 * 1024 ** 3 / seconds(lambda: big @ big, repeat=5, budget=2.0)
    tiny = rng.normal(size=(2, 2))
    blas_call = seconds(lambda: tiny @ tiny)
    small = rng.normal(size=(64, 64))
    t_small = seconds(lambda: small @ small)
    f_small = 2 * 64 ** 3
    small_rate = Machine().gemm_small_rate
    rate = f_small / (t_small - blas_call)  # rate = small + (large - small) f / (f + knee)
    gemm_knee = f_small * (gemm_rate - small_rate) / max(rate - small_rate, 1.0) - f_small
    one = np.ones(1)
    statement = seconds(lambda: one + one)
    n = 1 << 20
    a, b, out = rng.normal(size=n), rng.normal(size=n), np.zeros(n)
    numpy_element = seconds(lambda: np.multiply(a, b, out=out)) / n
    ufunc_element = seconds(lambda: np.tanh(a, out=out)) / n
    loop_element = seconds(lambda: _madd(a, b, out)) / n / 2  # two operations per element
    libm_element = seconds(lambda: _tanh_loop(a, out)) / n
    vector = _vector_loop()
    vector_element = seconds(lambda: vector(a, out)) / n
    W, x, rows = rng.normal(size=(32, 32)), rng.normal(size=(32, 64)), np.zeros((32, 64))
    lane_flop = seconds(lambda: _lane_rows(W, x, rows)) / (2 * 32 * 32 * 64)
    lane_libm = seconds(lambda: _lane_libm(x, rows)) / (32 * 64)
    call = seconds(lambda: _nothing(a, b, out, W, x, rows, one, tiny))
    jit_blas_call = seconds(lambda: _blas_calls(tiny, 1000)) / 1000
    jit_statement = seconds(lambda: _statements(tiny, 1000)) / 1000
    machine = Machine(gemm_rate=float(f"{gemm_rate:.3g}"), gemm_knee=float(f"{gemm_knee:.3g}"),
                      blas_call=float(f"{blas_call:.3g}"), statement=float(f"{statement:.3g}"),
                      numpy_element=float(f"{numpy_element:.3g}"), ufunc_element=float(f"{ufunc_element:.3g}"),
                      loop_element=float(f"{loop_element:.3g}"), libm_element=float(f"{libm_element:.3g}"),
                      lane_flop=float(f"{lane_flop:.3g}"), lane_libm=float(f"{lane_libm:.3g}"),
                      vector_element=float(f"{vector_element:.3g}"),
                      call=float(f"{call:.3g}"), jit_blas_call=float(f"{jit_blas_call:.3g}"),
                      jit_statement=float(f"{jit_statement:.3g}"))
    print(machine)


if __name__ == "__main__":
    main()
