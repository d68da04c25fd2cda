"""Render simplified programs into a standalone Numba module through Jinja2 templates.

Python decides everything here (argument lists, printed statements, equation comments,
which API pieces a model needs); the templates in `templates/` only print it.
"""
from __future__ import annotations

import pprint
from importlib import resources
from pathlib import Path

import jinja2
import sympy as sp

from . import __version__
from .derive import params as param_symbols
from .equations import equations_text
from .ir import Model
from .printer import NumbaPrinter
from .program import BATCH, Program

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
        j, fan_in = layer.index, layer.in_shape[0]
        specs.append({"name": f"W{j}", "shape": layer.op.weight_shape(layer.in_shape), "fan_in": fan_in})
        if layer.op.bias:
            specs.append({"name": f"b{j}", "shape": layer.out_shape, "fan_in": fan_in})
    return specs


def kernel(program: Program, printer: NumbaPrinter, shapes: dict[str, tuple]) -> dict:
    """One @njit function: arguments, commented statements, returned values."""
    args = [s.name for s in program.used_inputs()]
    lines = [(f"{s.target.name} = {printer.doprint(s.expr)}", s.eq) for s in program.stmts]
    exprs = [s.expr for s in program.stmts] + [e for _, e in program.outputs]
    if any(BATCH in sp.sympify(e).free_symbols for e in exprs):
        lines.insert(0, ("B = x0.shape[0]", "batch size"))
    returns = []
    for label, expr in program.outputs:
        if expr == 0:  # a gradient proven zero (section 5.3): keep the API's shape
            returns.append(f"np.zeros({shapes[label]}, dtype=DTYPE)")
        else:
            returns.append(printer.doprint(expr))
    return {"name": f"_{program.name}", "args": args, "lines": lines, "returns": returns,
            "labels": [label for label, _ in program.outputs]}


def render(model: Model, programs: dict[str, Program], naive: dict[str, Program], ops: dict) -> str:
    printer = NumbaPrinter(model.dtype, {l.index: l.op.kind for l in model.layers})
    shapes = {p["name"]: p["shape"] for p in param_specs(model)}
    kernels = {name: kernel(p, printer, shapes) for name, p in programs.items()}
    pen = model.penalty
    context = {
        "version": __version__,
        "model": model,
        "source": Path(model.source).name,
        "template": TEMPLATE,
        "params": param_specs(model),
        "param_names": [s.name for s in param_symbols(model)],
        "kernels": kernels,
        "op_kinds": sorted({l.op.kind for l in model.layers}),
        "equations": equations_text(model, programs["value_and_grad"]),
        "ops": pprint.pformat(ops, sort_dicts=True, width=88),
        "weight": repr(float(pen.weight)) if pen else "0.0",
        "v_kind": pen.v if pen else None,
        "v_index": pen.index if pen else None,
        "n_outputs": model.n_outputs,
        "input_shape": tuple(model.input_shape),
        "labels_ok": model.loss == "nll",
    }
    return environment().get_template(TEMPLATE).render(**context)
