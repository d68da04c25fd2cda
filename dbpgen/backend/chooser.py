"""The one place that decides how each program runs: `choose` -> (schedule, reason).

Every threshold of the back end is here. The candidates, in order of preference:

    lanes    one jitted pass over chunks of samples, batch-minor   (narrow dense networks)
    jit      one @njit function over whole-batch arrays            (small, cheap programs)
    fused    Python calling BLAS, coordinate-wise runs jitted      (GEMM-bound or transcendental)
    kernels  Python calling the operators' own parallel kernels    (anything, convolutions)
    count    plain Python counting K, K^T, K^box                   (--count-ops only)

A schedule applies when its static conditions hold and its lowering accepts the program
(a lowering raises `Unsupported` with the reason otherwise). Without a forced name the
first that applies wins; `dbpgen compile --schedule NAME` forces one.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Model
from ..program import Program, walk
from . import arrays, fused, lanes
from .common import TRANSCENDENTAL, Unsupported
from .schedule import Function

SCHEDULES = ("lanes", "jit", "fused", "kernels", "count")

# A layer with at least this many flops per sample makes a program GEMM-bound: at batch 32
# one K application is >= 1 MFLOP (~10 us of BLAS), against ~1 us of interpreter per statement.
GEMM_BOUND_FLOPS = 1 << 15
JIT_MAX_DEPTH = lanes.MAX_DEPTH  # one jitted function unrolls every layer: LLVM time grows with depth


@dataclass(frozen=True)
class Lowered:
    """A program's schedule: its kind, why, its entry function and the kernels it adds."""

    kind: str
    reason: str
    entry: Function
    kernels: tuple[Function, ...] = ()


def small_kernels(model: Model) -> bool:
    """No layer brings its own large (parallel) kernels, as convolutions do."""
    return all(layer.op.small_kernels for layer in model.layers)


def _gemm_layer(model: Model):
    """The first layer with a GEMM-bound operator, or None."""
    return next((layer for layer in model.layers if layer.op.has_params
                 and layer.op.flops(layer.in_shape) >= GEMM_BOUND_FLOPS), None)


def _transcendental(program: Program) -> bool:
    return any(item.expr.has(*TRANSCENDENTAL) for item in walk(program.stmts))


def _static(kind: str, model: Model, program: Program, shapes: dict, count_ops: bool) -> str | None:
    """Why `kind` cannot run the program (None: it can), from the model alone."""
    if count_ops != (kind == "count"):
        return "--count-ops builds the counting schedule only" if count_ops else "only with --count-ops"
    if kind == "lanes":
        return lanes.applies(model, program, shapes)
    if kind == "jit" and not small_kernels(model):
        big = next(layer.op.kind for layer in model.layers if not layer.op.small_kernels)
        return f"{big} kernels are too large to inline into one jitted function (minutes of LLVM)"
    return None


def _preferred(kind: str, model: Model, program: Program) -> str | None:
    """Why `kind`, though it applies, is not the best choice (None: it is)."""
    if kind == "jit":
        layer = _gemm_layer(model)
        if layer is not None:
            return (f"GEMM-bound (layer {layer.index}: {layer.op.flops(layer.in_shape):,} flops per sample "
                    f">= {GEMM_BOUND_FLOPS:,}): BLAS does the work either way, jitting the glue only costs LLVM time")
        if len(model.layers) > JIT_MAX_DEPTH:
            return f"more than {JIT_MAX_DEPTH} layers: LLVM time grows with the unrolled depth"
        if _transcendental(program):
            return "transcendental functions: NumPy's SIMD ufuncs beat Numba's scalar libm calls"
    if kind == "fused" and not small_kernels(model):
        return "its operators bring their own kernels; Python calls them"
    return None


REASONS = {
    "lanes": f"dense layers at most {lanes.MAX_WIDTH} wide and {lanes.MAX_DEPTH} deep: one jitted pass over "
             f"chunks of {lanes.CHUNK} samples beats a GEMM call per operator",
    "jit": "small layers and cheap functions: one jitted function, no interpreter between statements",
    "fused": "Python calls BLAS; runs of coordinate-wise statements are fused into jitted loops",
    "kernels": "Python calls the operators' own parallel kernels",
    "count": "built with --count-ops: plain Python counting K, K^T and K^box",
}


def lower(kind: str, model: Model, program: Program, shapes: dict, registry: dict) -> tuple[Function, tuple]:
    """The program lowered as `kind` (raises Unsupported when the lowering cannot)."""
    if kind == "lanes":
        return lanes.lower(model, program, shapes), ()
    if kind == "fused":
        entry, kernels = fused.lower(model, program, shapes, registry)
        return entry, tuple(kernels)
    return arrays.lower(model, program, shapes, "njit" if kind == "jit" else ""), ()


def choose(model: Model, program: Program, shapes: dict, forced: str | None = None,
           count_ops: bool = False, registry: dict | None = None) -> Lowered:
    """The schedule of one program and why: the first that applies and is preferred, or
    `forced` (a ScheduleChoiceError names the ones that apply when it does not)."""
    registry = {} if registry is None else registry
    why_not: dict[str, str] = {}
    for kind in SCHEDULES:
        if forced is not None and kind != forced:
            continue
        reason = _static(kind, model, program, shapes, count_ops)
        if reason is None and forced is None:
            reason = _preferred(kind, model, program)
        if reason is not None:
            why_not[kind] = reason
            continue
        try:
            snapshot = dict(registry)
            entry, kernels = lower(kind, model, program, shapes, registry)
        except Unsupported as exc:
            registry.clear()
            registry.update(snapshot)
            why_not[kind] = str(exc)
            continue
        skipped = "; ".join(f"not {k}: {r}" for k, r in why_not.items() if k != "count")
        text = "forced (--schedule)" if forced else REASONS[kind]
        return Lowered(kind, text + (f" ({skipped})" if skipped and not forced else ""), entry, kernels)
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


class ScheduleChoiceError(ValueError):
    pass
