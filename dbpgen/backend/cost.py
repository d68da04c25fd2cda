"""The chooser's cost model: predicted seconds per call of a program in each schedule.

A program's work is read off the program itself (`Work`): the GEMMs its K, K^T and K^box
applications amount to at a batch size, its coordinate-wise statements (elements times
operations, how many of them libm functions or vectorized polynomials such as tanh), its
per-sample reductions and its number
of statements. A schedule's time is that work priced by what it costs there (`MACHINE`):

    lanes    call + every flop in vectorized scalar loops + every element in the same loops
    jit      call + BLAS per GEMM + coordinate-wise runs in jitted loops, all in one jitted
             function (no interpreter between statements; a scalar libm call per
             transcendental element, since NumPy's SIMD ufuncs are not at hand there;
             a vectorized polynomial per tanh, exp, log, sigmoid, softplus)
    fused    interpreter per statement + BLAS per GEMM + cheap coordinate-wise runs in jitted
             loops (the vectorized polynomials among them) + transcendental ones as NumPy's
             SIMD ufuncs
    kernels  interpreter per statement + BLAS per GEMM + a NumPy pass per operation, each
             distinct function application in its whole-array form (NumPy's ufunc, or the
             passes of _sigmoid and _softplus)

The constants are measured on this kind of machine by `benchmarks/calibrate.py`;
docs/performance.md sets the predictions beside measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..functable import entry_for
from ..functions import BSum, Dot, Gram, GramBox, GramMul, GramOut, K, Kbox, KT, RowSum
from ..ir import Model
from ..program import Program, trips
from ..shapes import program_shapes
from .common import TRANSCENDENTAL, VECTORIZED, coordinatewise, is_per_sample, operations


@dataclass(frozen=True)
class Machine:
    """Seconds (or flop/s) of the elementary costs, float64; float32 halves the per-element
    and per-flop costs of vectorized work. Measured on this kind of machine (2 cores of an
    AMD EPYC with AVX2, no AVX-512: NumPy's float64 tanh is not SIMD there, 17 ns per
    element) with `python benchmarks/calibrate.py` (medians of six runs)."""

    gemm_rate: float = 6.7e10      # flop/s of a large GEMM on all cores (NumPy's BLAS)
    gemm_small_rate: float = 1.0e10  # flop/s of a tiny GEMM (one core, no blocking)
    gemm_knee: float = 8.6e5       # flops of one GEMM half way from the small rate to the large
    blas_call: float = 2.9e-6      # s of one BLAS call beyond its flops, from Python
    jit_blas_call: float = 1.8e-7  # the same from inside a jitted function (no interpreter)
    statement: float = 8.7e-7      # s of one Python statement of the glue (dispatch, allocation)
    numpy_element: float = 5.9e-10 # s per element of one NumPy operation (a pass over memory)
    ufunc_element: float = 1.7e-8  # s per element of a transcendental NumPy ufunc (tanh, float64)
    loop_element: float = 3.0e-10  # s per element per operation in a jitted loop
    libm_element: float = 2.7e-8   # s per element of a scalar libm tanh in a jitted loop over a long array
    lane_libm: float = 1.9e-8      # the same in loops over a layer (the lanes kernel, a jitted program's loops)
    vector_element: float = 4.9e-9 # s per element of a vectorized polynomial (tanh's _tanh1) in a jitted loop
    lane_flop: float = 8.8e-11     # s per flop of K, K^T, K^box in the lanes kernel's loops
    call: float = 2.6e-6           # s of calling a jitted function (argument unboxing)
    jit_statement: float = 4.0e-8  # s of one statement inside a jitted program (a call, an allocation)
    api: float = 8.0e-6            # s of the module's API around a program (argument checks)
    im2col_fraction: float = 0.3   # of the GEMM rate reached by im2col + GEMM kernels (conv)


MACHINE = Machine()

# One scalar libm evaluation in a jitted loop, relative to libm's tanh (which `libm_element`
# and `lane_libm` price): by the function table's name, measured in the lanes kernel's loops
# in float64 and float32 (their mean), where libm's tanh cost 9.6 ns per element, exp 4.4,
# log 3.6. tanh, exp, log, sigmoid and softplus are vectorized polynomials in loops
# (`vector_element`), not libm calls: their entries are the scale, and what a loop saves.
LIBM_RELATIVE = {"tanh": 1.0, "sinh": 1.0, "tan": 1.0, "asinh": 1.25, "softplus": 1.4, "erf": 0.75,
                 "atan": 0.67, "cos": 0.6, "cosh": 0.6, "sin": 0.55, "sigmoid": 0.5, "exp": 0.42,
                 "log": 0.36}
# The functions whose whole-array form (fused, kernels) is not one NumPy ufunc: passes over
# the array (NumPy operations, each a call) and how many of them are transcendental ufuncs
# (templates/helpers.py.j2: _sigmoid 1 / (1 + exp(-z)), _softplus max(z, 0) +
# log1p(exp(-|z|))); erf is a jitted loop of libm calls (ARRAY_PASSES None). Priced as one
# ufunc, softplus was predicted at a third of its measured time.
ARRAY_PASSES = {"sigmoid": (4, 1), "softplus": (6, 2), "erf": None}


@dataclass(frozen=True)
class Work:
    """What one call of a program does at a batch size."""

    gemms: tuple[int, ...]         # flops of each K, K^T, K^box application (and Gram product)
    im2col: tuple[int, ...]        # flops of each application of an operator with its own kernels
    elements: int                  # sum over coordinate-wise statements of elements x operations
    transcendental: int            # elements of transcendental function evaluations, as printed
    vectorized: int                # elements of vectorized polynomial evaluations (tanh), as printed
    distinct: tuple[tuple[str, int, int], ...]  # (function, elements, trips) of each distinct
                                   # transcendental call in the program, once (LLVM computes
                                   # sin(z1) once for g, g' and g'' in one loop; fused and
                                   # kernels share a NumPy statement)
    vector_distinct: tuple[tuple[str, int, int], ...]  # the same for the vectorized functions
                                   # (kernels: each one whole-array form, shared)
    reductions: int                # elements read by per-sample reductions (<a, b>, sums)
    statements: int                # statements (a loop body counted per iteration)

    @property
    def flops(self) -> int:
        return sum(self.gemms) + sum(self.im2col)


def work(model: Model, program: Program, batch: int) -> Work:
    """The work of one call at `batch` (shapes from the program; loops unrolled)."""
    from ..derive import n_vectors

    shapes = program_shapes(model, program, n_vectors(model))
    gemms, im2col, elements, transcendental, distinct, reductions, statements = [], [], 0, 0, [], 0, 0
    vectorized, vector_distinct = 0, []
    seen: set = set()

    def size(expr_shape) -> int:
        return int(np.prod([batch if d == "B" else d for d in expr_shape], dtype=np.int64))

    for item, times in trips(program.stmts):
        statements += times
        expr = item.expr
        for node in sp.preorder_traversal(expr):
            if isinstance(node, (K, KT, Kbox)):
                layer = model.layers[node.layer - 1]
                flops = [layer.op.flops(layer.in_shape) * batch] * times
                if layer.op.small_kernels:
                    gemms += flops
                else:
                    im2col += flops
            elif isinstance(node, (GramMul, GramBox, Gram, GramOut)):
                n1, n0 = model.layers[0].op.out, model.layers[0].in_shape[0]
                per = n1 * n1 * (batch if isinstance(node, (GramMul, GramBox)) else n0)
                gemms += [2 * per] * times
            elif isinstance(node, (Dot, RowSum, BSum)):
                arg = node.args[0]
                reductions += times * size(_shape(arg, shapes, model))
        target = getattr(item, "target", None)
        shape = shapes.get(target.name, ()) if target is not None else ()
        if is_per_sample(shape) and coordinatewise(expr):
            n = size(shape)
            elements += times * n * max(1, operations(expr))
            calls = [f for f in sp.preorder_traversal(expr) if isinstance(f, TRANSCENDENTAL)]
            polynomials = {f for f in sp.preorder_traversal(expr) if isinstance(f, VECTORIZED)}
            transcendental += times * n * len(calls)
            vectorized += times * n * len(polynomials)
            distinct += [(entry_for(f).name, times * n, times)
                         for f in sorted(set(calls) - seen, key=sp.default_sort_key)]
            vector_distinct += [(entry_for(f).name, times * n, times)
                                for f in sorted(polynomials - seen, key=sp.default_sort_key)]
            seen |= set(calls) | polynomials
    return Work(tuple(gemms), tuple(im2col), elements, transcendental, vectorized, tuple(distinct),
                tuple(vector_distinct), reductions, statements)


def _shape(expr, shapes, model):
    from ..shapes import shape_of
    try:
        return shape_of(expr, shapes, model)
    except AssertionError:
        return ()


def gemm_seconds(flops: int, m: Machine, speedup: float = 1.0, jitted: bool = False) -> float:
    """One BLAS call: its flops at a rate that grows with its size from gemm_small_rate to
    gemm_rate (times `speedup`: 2 in float32), called from Python or from a jitted function."""
    rate = m.gemm_small_rate + (m.gemm_rate - m.gemm_small_rate) * flops / (flops + m.gemm_knee)
    return (m.jit_blas_call if jitted else m.blas_call) + flops / (rate * speedup)


def predict(kind: str, model: Model, program: Program, batch: int, m: Machine = MACHINE) -> float:
    """Predicted seconds of one call of `program` in schedule `kind` at `batch`."""
    w = work(model, program, batch)
    scale = 0.5 if model.dtype == "float32" else 1.0  # twice the lanes of SIMD and BLAS
    blas = sum(gemm_seconds(f, m, 1 / scale, kind == "jit") for f in w.gemms)  # float32: twice the rate
    blas += sum(gemm_seconds(f, m, m.im2col_fraction / scale) for f in w.im2col)
    return m.api + _seconds(kind, w, m, scale, blas)


def _seconds(kind: str, w: Work, m: Machine, scale: float, blas: float) -> float:
    cheap = w.elements - w.transcendental - w.vectorized
    # in the loops of jit and fused each distinct application once (the lowering shares them:
    # Lowering.share_transcendentals); the lanes kernel evaluates them as printed
    polynomials = scale * sum(n for _, n, _ in w.vector_distinct) * m.vector_element
    if kind == "lanes":
        return m.call + scale * (w.flops * m.lane_flop + (w.elements - w.vectorized) * m.loop_element
                                 + w.reductions * m.loop_element) + _libm(w) * m.lane_libm \
            + scale * w.vectorized * m.vector_element
    if kind == "jit":
        return m.call + w.statements * m.jit_statement + blas \
            + scale * (cheap + w.reductions) * m.loop_element + _libm(w) * m.lane_libm + polynomials
    # fused and kernels evaluate each distinct transcendental application once, in its
    # whole-array form (Lowering.share_transcendentals)
    if kind == "fused":
        return w.statements * m.statement + blas + scale * (cheap * m.loop_element + w.reductions * m.loop_element) \
            + _arrays(w, m, scale) + polynomials
    # kernels, count: NumPy statements over whole arrays (the vectorized functions too, in
    # their whole-array forms: tanh as NumPy's ufunc, softplus as six passes)
    return w.statements * m.statement + blas + scale * (cheap + w.reductions) * m.numpy_element \
        + _arrays(w, m, scale) + _arrays(w, m, scale, w.vector_distinct)


def _libm(w: Work) -> float:
    """The distinct transcendental evaluations as scalar libm calls, in tanh evaluations."""
    return sum(n * LIBM_RELATIVE.get(f, 1.0) for f, n, _ in w.distinct)


def _arrays(w: Work, m: Machine, scale: float, distinct=None) -> float:
    """Seconds of the distinct transcendental evaluations (or of `distinct`) in their
    whole-array forms."""
    total = 0.0
    for f, n, trips in w.distinct if distinct is None else distinct:
        passes = ARRAY_PASSES.get(f, (1, 1))
        if passes is None:  # a jitted loop of libm calls (no fastmath), called from Python
            total += trips * m.call + n * LIBM_RELATIVE.get(f, 1.0) * m.libm_element
            continue
        count, ufuncs = passes
        total += trips * (count - 1) * m.statement + scale * n * ((count - ufuncs) * m.numpy_element + ufuncs * m.ufunc_element)
    return total
