"""Render simplified programs into a standalone Numba module through Jinja2 templates.

Python decides everything here (argument lists, printed statements, equation comments,
which API pieces a model needs); the templates in `templates/` only print it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
import pprint
from importlib import resources
from pathlib import Path

import jinja2

from . import __version__
from .backend import blas, chooser, emit, polynomials
from .backend.memory import peak_bytes
from .backend.schedule import verify
from .derive import n_vectors, params as param_symbols
from .equations import equations_text
from .ir import Model
from .memory import peak_live_bytes
from .program import Program
from .shapes import ShapeError, program_shapes, shape_of

MEMORY_BATCH = 128  # batch size at which modules report PEAK_BYTES

TEMPLATE = "module.py.j2"


def template_dir() -> Path:
    """templates/ of a source checkout, or the copy installed as dbpgen.templates."""
    local = Path(__file__).resolve().parent.parent / "templates"
    if (local / TEMPLATE).is_file():
        return local
    return Path(str(resources.files("dbpgen.templates")))


def helpers_source(helpers, dtype: str, jit: str, array_jit: str = "", inline: str | None = None) -> str:
    """templates/helpers.py.j2 alone, for the named helpers (and the ones they call) in
    `dtype`, each scalar helper under decorator `jit`, the ones the module inlines under
    `inline` (default: `jit`): how tests and benchmarks run the helpers outside a module."""
    return environment().get_template("helpers.py.j2").render(
        helpers=sorted(emit.with_dependencies(helpers)), jit=jit, array_jit=array_jit,
        inline=jit if inline is None else inline, **polynomials.forms(dtype))


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def param_specs(model: Model) -> list[dict]:
    specs = []
    for layer in model.layers:
        if not layer.op.has_params:
            continue
        j, fan_in = layer.index, layer.op.fan_in(layer.in_shape)
        specs.append({"name": f"W{j}", "shape": layer.op.weight_shape(layer.in_shape), "fan_in": fan_in})
        if layer.op.bias:
            specs.append({"name": f"b{j}", "shape": layer.op.bias_param_shape(layer.out_shape), "fan_in": fan_in})
    return specs


def _unpack_line(names: list[str]) -> str:
    if not names:
        return "_unpack(params)  # a model without parameters"
    return f"{', '.join(names)}{',' if len(names) == 1 else ''} = _unpack(params)"


def render(model: Model, programs: dict[str, Program], ops: dict, naive: Program, count_ops: bool = False,
           schedule: str | None = None, batch: int = MEMORY_BATCH) -> tuple[str, dict]:
    """(module text, peak bytes of value_and_grad as it runs, at `batch`)."""
    schedules = lower_programs(model, programs, count_ops, schedule)
    kernels, helpers, jitted_calls = {}, set(), set()
    for name, lowered in schedules.items():
        for fn in lowered.kernels + (lowered.entry,):
            shapes = fn.array_shapes()
            view, array_calls, scalar_calls = emit.function(fn, model, _shape_of(model, shapes))
            kernels[name if fn is lowered.entry else fn.name] = view
            helpers |= array_calls | scalar_calls
            if fn.decorator:  # scalar helpers (_tanh1, ...) are jitted anyway
                jitted_calls |= array_calls
    peak = {"batch": batch, "emitted": peak_bytes(model, schedules["value_and_grad"], batch),
            "naive": peak_live_bytes(model, naive, batch)}
    pen = model.penalty
    context = {
        "version": __version__,
        "model": model,
        "source": Path(model.source).name,
        "template": TEMPLATE,
        "params": param_specs(model),
        "param_names": [s.name for s in param_symbols(model)],
        "param_shapes": "{" + ", ".join(f"{s['name']!r}: {tuple(s['shape'])!r}" for s in param_specs(model)) + "}",
        "unpack": _unpack_line([s.name for s in param_symbols(model)]),
        "kernels": kernels,
        "schedules": pprint.pformat({n: s.kind for n, s in schedules.items()}, sort_dicts=False, width=88),
        "reasons": _reasons(schedules),
        "op_kinds": sorted({l.op.kind for l in model.layers}),
        "equations": equations_text(model, programs["value_and_grad"]),
        "ops": pprint.pformat(ops, sort_dicts=True, width=88),
        "peak_bytes": pprint.pformat(peak, sort_dicts=True, width=88),
        "count_ops": count_ops,
        "helpers": sorted(helpers),
        **polynomials.forms(model.dtype),  # the vectorized helpers' constants in the model's dtype
        "jit": "" if count_ops else emit.DECORATORS["njit"],
        "inline": "" if count_ops else emit.DECORATORS["inline"],
        "decorators": {k: ("" if count_ops else v) for k, v in emit.DECORATORS.items()},
        # a helper that is one array expression (a BLAS call, a ufunc) gains nothing from
        # @njit when only Python calls it, and would cost LLVM time on the first call; where
        # a jitted program calls them, all are jitted, the ones only Python calls included,
        # so that every product goes to one BLAS (Numba's; NumPy's is another library)
        "array_jit": emit.DECORATORS["njit"] if jitted_calls else "",
        "small_gemm": chooser.SMALL_GEMM,
        "small_kernel_cores": chooser.SMALL_KERNEL_CORES,
        "blas_core": blas.SOURCE,
        "copy_wt": (chooser.COPY_WT_BATCH, chooser.COPY_WT_SIZE),
        "weight": repr(float(pen.weight)) if pen else "0.0",
        "v_kind": pen.v if pen else None,
        "v_index": pen.index if pen else None,
        "seed": pen.seed if pen else 0,
        "iterations": pen.iterations if pen else 0,
        "n_vectors": n_vectors(model),
        # the per-sample shape of the drawn directions: one v (random) or n of them (projections)
        "direction_shape": (f"(batch, {n_vectors(model)}, N_OUTPUTS)" if pen and pen.v == "projections"
                            else "(batch, N_OUTPUTS)"),
        "direction_width": n_vectors(model) if pen and pen.v == "projections" else 1,
        "n_outputs": model.n_outputs,
        "input_shape": tuple(model.input_shape),
        "labels_ok": model.loss == "nll",
    }
    # the module's fixed name for Numba's cache: a digest of the code itself, so that two
    # different modules never share it and identical ones may
    template = environment().get_template(TEMPLATE)
    draft = template.render(**context, cache_name="")
    digest = hashlib.sha256(draft.encode()).hexdigest()[:16]
    return template.render(**context, cache_name=f"_dbpgen_{model.name}_{digest}"), peak


def lower_programs(model: Model, programs: dict[str, Program], count_ops: bool = False,
                   schedule=None) -> dict[str, chooser.Lowered]:
    """Every program's schedule, chosen or forced, lowered, then verified; the fused
    kernels are shared by the module's programs. schedule: one name for every program, or
    a Forced (some programs' schedules, and why)."""
    registry: dict = {}
    out = {}
    for name, program in programs.items():
        shapes = program_shapes(model, program, n_vectors(model))
        if isinstance(schedule, Forced):
            forced, why = schedule.kinds.get(name), schedule.why.get(name, "")
        else:
            forced, why = schedule, "forced (--schedule)"
        out[name] = chooser.choose(model, program, shapes, forced, count_ops, registry, why)
    known = {fn.name for s in out.values() for fn in s.kernels} | set(emit.SCHEDULE_HELPERS)
    for lowered in out.values():
        for fn in lowered.kernels + (lowered.entry,):
            verify(fn, known)
    return out


@dataclass(frozen=True)
class Forced:
    """Schedules forced for some programs (name -> kind), with the reason to print."""

    kinds: dict
    why: dict


def _shape_of(model: Model, shapes: dict):
    """expr -> its program shape, () for the schedule's own scalars (indices, sizes)."""
    def shape(expr):
        try:
            return shape_of(expr, shapes, model)
        except ShapeError:
            return ()
    return shape


def _reasons(schedules: dict) -> list[str]:
    """One line per distinct schedule and reason, naming the programs it holds for."""
    groups: dict[tuple, list] = {}
    for name, s in schedules.items():
        groups.setdefault((s.kind, s.reason), []).append(name)
    return [f"{', '.join(names)}: {kind}, {reason}" for (kind, reason), names in groups.items()]
