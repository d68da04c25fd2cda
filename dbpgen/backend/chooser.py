"""The one place that decides how each program runs: `choose` -> (schedule, reason).

Every threshold of the back end is here. The schedules:

    lanes    one jitted pass over chunks of samples, batch-minor   (narrow dense networks)
    jit      one @njit function calling BLAS and fused loops       (small programs, cheap functions)
    fused    Python calling BLAS, coordinate-wise runs jitted      (GEMM-bound or transcendental)
    kernels  Python calling the operators' own kernels             (anything, convolutions)
    count    plain Python counting K, K^T, K^box                   (--count-ops only)

A schedule applies when its static conditions hold (capabilities of the layers, a depth
bound on the lanes kernel, a bound on a jitted program's predicted compile time) and its
lowering accepts the program (a
lowering raises `Unsupported` with the reason otherwise). Of those that apply, the one
with the least predicted time per call at REFERENCE_BATCH (`cost.predict`), weighed by its
predicted compile time (`rank`: a cold start past COLD_BUDGET seconds costs dearly), wins,
and the predictions are the reason printed in the module's header. `dbpgen compile --schedule NAME` forces one; `--tune`
measures them instead (`dbpgen.compiler.tune`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Model
from ..program import Loop, Program, walk
from . import arrays, cost, fused, lanes
from .common import VECTORIZED, Unsupported
from .schedule import Function

SCHEDULES = ("lanes", "jit", "fused", "kernels", "count")

# A GEMM of at most SMALL_GEMM multiply-adds (M N K) runs fastest on BLAS's small-matrix
# kernels: one thread, no packing. OpenBLAS (numpy's and scipy's wheels) has them only in
# its AVX-512 kernels (SMALL_KERNEL_CORES, as `gotoblas_corename` names them), and takes
# them up to 100^3 for C-contiguous @ C-contiguous and for A^T @ B, and for A @ B^T only
# when the product is tiny. Past them it packs and splits the work between threads, and on
# a 2-core machine moving the operands between the cores' caches costs a small product
# more than the second core gains (up to twice its time on a busy machine). The batch is
# known only at run time, so the dense kernels (templates/ops/dense.py.j2) test it there:
# K multiplies by a copy of W^T where the copy pays (a batch of at least COPY_WT_BATCH and
# W of at most COPY_WT_SIZE elements: a larger W's transposed copy, or one for a few
# samples, costs more than the product: 0.26 ms for 512 x 784 at batch 1, against 0.04 for
# the product), and a stacked K^box whose halves are at or below the bound runs as two
# products. The emitted module reads the kernels its BLAS runs at import and sets its
# SMALL_GEMM to 0 elsewhere (AVX2 cores, or OPENBLAS_CORETYPE=Haswell): there the small
# forms run no faster than x @ W.T and the copy is pure cost (docs/performance.md).
SMALL_GEMM = 100 ** 3
SMALL_KERNEL_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")
COPY_WT_BATCH = 32
COPY_WT_SIZE = 2 ** 13

# Past this many predicted seconds of compilation on its first call a jitted program does
# not apply at all (a deep network's: each layer adds its statements to one function).
JIT_MAX_COMPILE = 12.0


@dataclass(frozen=True)
class Lowered:
    """A program's schedule: its kind, why, its entry function and the kernels it adds."""

    kind: str
    reason: str
    entry: Function
    kernels: tuple[Function, ...] = ()


def small_kernels(model: Model) -> bool:
    """No layer brings kernels that run as Python (NumPy over the whole batch), as convolutions do."""
    return all(layer.op.small_kernels for layer in model.layers)


def _static(kind: str, model: Model, program: Program, shapes: dict, count_ops: bool) -> str | None:
    """Why `kind` cannot run the program (None: it can), from the model alone."""
    if count_ops != (kind == "count"):
        return "--count-ops builds the counting schedule only" if count_ops else "only with --count-ops"
    if kind == "lanes":
        return lanes.applies(model, program, shapes)
    if kind == "jit" and not small_kernels(model):
        big = next(layer.op.kind for layer in model.layers if not layer.op.small_kernels)
        return f"{big} kernels run as Python (NumPy GEMMs over the whole batch), not inside a jitted function"
    if kind == "jit" and compile_seconds(kind, model, program) > JIT_MAX_COMPILE:
        return (f"{sum(1 for _ in walk(program.stmts))} statements: more than {JIT_MAX_COMPILE:g} s of "
                f"compilation on the first call (it grows with the statements)")
    return None


# The chooser ranks by predicted time per call at a typical batch, weighed by what the first
# call costs to compile. Each predicted second counts as COMPILE_WEIGHT more: of two schedules
# within a few percent, the one that compiles faster wins. Past the cold-start budget (dbpgen
# compile, import and the first call within COLD_BUDGET seconds) each second counts as
# OVER_BUDGET_WEIGHT more: a schedule that misses the budget wins only where it is clearly
# faster per call: two seconds over the budget cost as much as 50% more time per call.
REFERENCE_BATCH = 128
COMPILE_WEIGHT = 0.015
COLD_BUDGET = 10.0
FRONT_SECONDS = 1.9  # dbpgen compile (1.1-2.0 s measured) and importing the module (0.4 s)
OVER_BUDGET_WEIGHT = 0.25


def compile_seconds(kind: str, model: Model, program: Program) -> float:
    """Predicted seconds Numba takes to compile a program's schedule on its first call, from
    first calls measured on this kind of machine (2 cores, AVX2; docs/performance.md):
    - fused: about 0.2-0.4 s per loop and helper, and layers of one shape share their loops:
      4-5.5 s for a dense value_and_grad of any depth, 6.5-10 s with convolutions;
    - kernels: the operators' kernels and whole-array helpers, 2.7-6.8 s;
    - jit: the loops printed in one function, plus the dense kernels and the loops that
      call a vectorized helper (_tanh1, ...) on their own: 7.0 s for a 3-layer ReLU
      value_and_grad of 47 statements, 8.9 s for tanh; a statement in a loop over
      Jacobian rows (Algorithm 4) is printed as loops of its own (fused.array_loops),
      not as an array expression: 10-12.5 s for a 3-layer tanh Jacobian penalty whose loop holds 25;
    - lanes: one function whose length grows with every statement (the rows of K and K^T
      and the K^box of a chunk are calls of shared helpers): 8.3-8.8 s for 50."""
    n = sum(1 for _ in walk(program.stmts))
    in_loops = sum(len(node.body) + len(node.accums) for node in program.stmts if isinstance(node, Loop))
    shapes = len({(layer.in_shape, layer.out_shape) for layer in model.layers})
    helpers = any(stmt.expr.has(*VECTORIZED) for stmt in walk(program.stmts) if hasattr(stmt, "expr"))
    return {"lanes": 0.17 * n, "jit": 5.0 + 0.04 * n + 0.1 * in_loops + 1.5 * helpers, "fused": 1.5 + 0.6 * shapes + 0.03 * min(n, 50),
            "kernels": 1.5 + 0.6 * shapes}.get(kind, 0.0)


def score(kind: str, model: Model, program: Program) -> tuple[float, float]:
    """(predicted seconds per call at REFERENCE_BATCH, predicted compile seconds)."""
    return cost.predict(kind, model, program, REFERENCE_BATCH), compile_seconds(kind, model, program)


def rank(score: tuple[float, float]) -> float:
    """What the chooser minimises: time per call, weighed by compile time (see above)."""
    call, build = score
    over = max(0.0, FRONT_SECONDS + build - COLD_BUDGET)
    return call * (1 + COMPILE_WEIGHT * build + OVER_BUDGET_WEIGHT * over)


REASONS = {
    "lanes": f"dense layers at most {lanes.MAX_WIDTH} wide and {lanes.MAX_DEPTH} deep: one jitted pass over "
             f"chunks of {lanes.CHUNK} samples beats a GEMM call per operator",
    "jit": "small layers and cheap functions: one jitted function calling BLAS and fused loops, "
           "no interpreter between statements",
    "fused": "Python calls BLAS; runs of coordinate-wise statements are fused into jitted loops",
    "kernels": "Python calls the operators' own kernels",
    "count": "built with --count-ops: plain Python counting K, K^T and K^box",
}


def lower(kind: str, model: Model, program: Program, shapes: dict, registry: dict) -> tuple[Function, tuple]:
    """The program lowered as `kind` (raises Unsupported when the lowering cannot)."""
    if kind == "lanes":
        return lanes.lower(model, program, shapes), ()
    if kind in ("fused", "jit"):
        entry, kernels = fused.lower(model, program, shapes, registry, jit=kind == "jit")
        return entry, tuple(kernels)
    return arrays.lower(model, program, shapes), ()


def choose(model: Model, program: Program, shapes: dict, forced: str | None = None,
           count_ops: bool = False, registry: dict | None = None, why: str = "forced (--schedule)") -> Lowered:
    """The schedule of one program and why: the first that applies and is preferred, or
    `forced` (a ScheduleChoiceError names the ones that apply when it does not)."""
    registry = {} if registry is None else registry
    why_not: dict[str, str] = {}
    candidates = []
    for kind in SCHEDULES:
        if forced is not None and kind != forced:
            continue
        reason = _static(kind, model, program, shapes, count_ops)
        if reason is not None:
            why_not[kind] = reason
        else:
            candidates.append(kind)
    scores = {kind: score(kind, model, program) for kind in candidates} if forced is None and not count_ops else {}
    if scores:  # cheapest first: time per call, weighed by compile time
        candidates.sort(key=lambda k: rank(scores[k]))
    for kind in candidates:
        try:
            snapshot = dict(registry)
            entry, kernels = lower(kind, model, program, shapes, registry)
        except Unsupported as exc:
            registry.clear()
            registry.update(snapshot)
            why_not[kind] = str(exc)
            continue
        if forced:
            return Lowered(kind, why, entry, kernels)
        if not scores:
            return Lowered(kind, REASONS[kind], entry, kernels)
        others = [f"{k} {_ms(scores[k])}" for k in candidates if k != kind and k not in why_not]
        skipped = [f"not {k}: {r}" for k, r in why_not.items() if k != "count"]
        text = (f"predicted per call at batch {REFERENCE_BATCH}: {kind} {_ms(scores[kind])}"
                + (f"; {', '.join(others)}" if others else "") + (f" ({'; '.join(skipped)})" if skipped else ""))
        return Lowered(kind, text, entry, kernels)
    if forced is not None:
        ok = applicable(model, program, shapes, count_ops)
        raise ScheduleChoiceError(f"schedule {forced!r} does not apply to {program.name}: {why_not.get(forced, 'unknown schedule')}; "
                                  f"applicable: {', '.join(ok)}")
    raise Unsupported(f"no schedule applies to {program.name}: {why_not}")  # kernels always applies


def applicable(model: Model, program: Program, shapes: dict, count_ops: bool = False) -> list[str]:
    """The schedules that can run the program."""
    out = []
    for kind in SCHEDULES:
        if _static(kind, model, program, shapes, count_ops) is not None:
            continue
        try:
            lower(kind, model, program, shapes, {})
        except Unsupported:
            continue
        out.append(kind)
    return out


def _ms(score: tuple[float, float]) -> str:
    call, build = score
    return f"{1e3 * call:.3g} ms" + (f" (+{build:.2g} s to compile)" if build >= 0.05 else "")


class ScheduleChoiceError(ValueError):
    pass
