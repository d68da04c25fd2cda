"""Render simplified programs into a standalone Numba module through Jinja2 templates.

Python decides everything here (argument lists, printed statements, equation comments,
which API pieces a model needs); the templates in `templates/` only print it.
"""
from __future__ import annotations

import hashlib
import pprint
import re
from importlib import resources
from pathlib import Path

import jinja2
import sympy as sp

from . import __version__, fuse, lanes
from .derive import n_vectors, params as param_symbols
from .equations import equations_text
from .functable import TRANSCENDENTAL_TYPES as TRANSCENDENTAL
from .functions import Sigmoid, Softplus
from .ir import Model
from .printer import NumbaPrinter, zeros_code
from .program import BATCH, Loop, Program, walk
from .shapes import program_shapes, shape_of

TEMPLATE = "module.py.j2"


def template_dir() -> Path:
    """templates/ of a source checkout, or the copy installed as dbpgen.templates."""
    local = Path(__file__).resolve().parent.parent / "templates"
    if (local / TEMPLATE).is_file():
        return local
    return Path(str(resources.files("dbpgen.templates")))


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
            specs.append({"name": f"b{j}", "shape": layer.out_shape[:1], "fan_in": fan_in})
    return specs


def _lines(nodes, printer: NumbaPrinter, shapes: dict, indent: str = ""):
    """(code, comment) pairs; loops open an indented block after their accumulators."""
    for node in nodes:
        if isinstance(node, (fuse.Call, fuse.Line)):
            yield f"{indent}{node.code()}", node.comment
        elif isinstance(node, Loop):
            for acc in node.accums:
                yield f"{indent}{acc.target.name} = {zeros_code(shapes[acc.target.name])}", f"sum over {node.index}"
            yield f"{indent}for {node.index} in range({node.count}):", node.eq
            yield from _lines(node.body, printer, shapes, indent + "    ")
            for acc in node.accums:
                yield f"{indent}    {acc.target.name} += {printer.doprint(acc.expr)}", acc.eq
        elif node.expr.is_Number:  # only in unsimplified programs: keep it an array
            zeros = zeros_code(shapes[node.target.name])
            value = printer.doprint(node.expr)
            yield f"{indent}{node.target.name} = {zeros}{'' if node.expr == 0 else f' + {value}'}", node.eq
        else:
            yield f"{indent}{node.target.name} = {printer.doprint(node.expr)}", node.eq


def kernel(program: Program, printer: NumbaPrinter, shapes: dict, nodes=None) -> dict:
    """One function: arguments, commented statements, returned values (nodes: the
    program's statements as scheduled, default program.stmts)."""
    args = program.call_args()
    lines = list(_lines(program.stmts if nodes is None else nodes, printer, shapes))
    exprs = [item.expr for item in walk(program.stmts)] + [e for _, e in program.outputs]
    if any(BATCH in sp.sympify(e).free_symbols for e in exprs) or \
            any(isinstance(node, fuse.Line) for node in nodes or ()):
        lines.insert(0, ("B = x0.shape[0]", "batch size"))
    returns = []
    for label, expr in program.outputs:
        if expr == 0:  # a gradient proven zero (section 5.3): keep the API's shape
            returns.append(zeros_code(shapes[label]))
        else:
            returns.append(printer.doprint(expr))
    return {"name": f"_{program.name}", "args": args, "lines": lines, "returns": returns,
            "labels": [label for label, _ in program.outputs]}


NJIT = "@numba.njit(cache=True)"


def small_kernels(model: Model) -> bool:
    """No layer brings its own large (parallel) kernels, as convolutions do."""
    return all(l.op.small_kernels for l in model.layers)


# A layer with at least this many flops per sample makes a program GEMM-bound: at batch 32
# one K application is >= 1 MFLOP (~10 us of BLAS), against ~1 us of interpreter per statement.
GEMM_BOUND_FLOPS = 1 << 15


def gemm_bound(model: Model) -> bool:
    return any(l.op.has_params and l.op.flops(l.in_shape) >= GEMM_BOUND_FLOPS for l in model.layers)


def jit_program(model: Model, program: Program) -> bool:
    """Whether a whole-batch program is one @njit function or Python calling jitted kernels.

    Python when a layer has large kernels (convolutions call their own parallel kernels),
    when the program evaluates transcendental functions coordinate-wise (NumPy's SIMD
    ufuncs beat Numba's scalar libm calls by more than the interpreter costs per statement),
    or when it is GEMM-bound: BLAS does the work either way, and jitting the glue costs
    seconds of LLVM on the first call (6 s for mnist_cdb's value_and_grad) and buys nothing.
    """
    if not small_kernels(model) or gemm_bound(model) or len(model.layers) > lanes.MAX_DEPTH:
        return False
    return not any(item.expr.has(*TRANSCENDENTAL) for item in walk(program.stmts))


def _unpack_line(names: list[str]) -> str:
    if not names:
        return "_unpack(params)  # a model without parameters"
    return f"{', '.join(names)}{',' if len(names) == 1 else ''} = _unpack(params)"


def render(model: Model, programs: dict[str, Program], ops: dict, peak_bytes: dict,
           count_ops: bool = False) -> str:
    kernels = {}
    schedules = {}  # program -> the name of the schedule that runs it
    fused_loops: dict = {}  # one kernel per distinct fused loop of the module
    for name, program in programs.items():
        shapes = program_shapes(model, program, n_vectors(model))
        program_jit = "" if count_ops or not jit_program(model, program) else NJIT
        if not count_ops and lanes.eligible(model, program, shapes):
            try:
                kernels[name] = lanes.kernel(model, program, shapes)
                schedules[name] = "lanes"
                continue
            except lanes.Unsupported:
                pass  # printed with whole-batch arrays below
        nodes = None
        schedules[name] = "count" if count_ops else "jit" if program_jit else "kernels"
        if not count_ops and not program_jit and small_kernels(model):
            # Python over whole-batch arrays: runs of coordinate-wise statements in jitted loops
            nodes, fused, shapes = fuse.schedule(model, program, shapes, TRANSCENDENTAL, fused_loops)
            kernels.update((k["name"], dict(k, jit=NJIT)) for k in fused)
            schedules[name] = "fused"
        printer = NumbaPrinter(model, lambda e, shapes=shapes: shape_of(e, shapes, model))
        kernels[name] = dict(kernel(program, printer, shapes, nodes), jit=program_jit)
    pen = model.penalty
    # only the helper kernels some program calls are printed (no dead code in the module)
    calls = {name: {c for line in [l for l, _ in k["lines"]] + k["returns"]
                    for c in re.findall(r"\b(_[A-Za-z0-9_]+)\(", line)} for name, k in kernels.items()}
    called = set().union(*calls.values())
    jitted_calls = set().union(*(calls[name] for name, k in kernels.items() if k["jit"]))
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
        "schedules": pprint.pformat(schedules, sort_dicts=False, width=88),
        "op_kinds": sorted({l.op.kind for l in model.layers}),
        "equations": equations_text(model, programs["value_and_grad"]),
        "ops": pprint.pformat(ops, sort_dicts=True, width=88),
        "peak_bytes": pprint.pformat(peak_bytes, sort_dicts=True, width=88),
        "count_ops": count_ops,
        "helpers": sorted(called),
        "jit": "" if count_ops else NJIT,
        # a helper that is one array expression (a BLAS call, a ufunc) gains nothing from
        # @njit when only Python calls it, and would cost seconds of LLVM on the first call
        "array_jit": NJIT if jitted_calls else "",
        "weight": repr(float(pen.weight)) if pen else "0.0",
        "v_kind": pen.v if pen else None,
        "v_index": pen.index if pen else None,
        "seed": pen.seed if pen else 0,
        "iterations": pen.iterations if pen else 0,
        "n_vectors": n_vectors(model),
        "n_outputs": model.n_outputs,
        "input_shape": tuple(model.input_shape),
        "labels_ok": model.loss == "nll",
    }
    # the module's fixed name for Numba's cache: a digest of the code itself, so that two
    # different modules never share it and identical ones may
    template = environment().get_template(TEMPLATE)
    draft = template.render(**context, cache_name="")
    digest = hashlib.sha256(draft.encode()).hexdigest()[:16]
    return template.render(**context, cache_name=f"_dbpgen_{model.name}_{digest}")
