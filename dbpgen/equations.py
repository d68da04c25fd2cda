"""Readable renderings of a derived program: plain text (code names) and LaTeX."""
from __future__ import annotations

import sympy as sp

from .ir import Model
from .program import PHASES, Program

LEGEND = ("Products are coordinate-wise; <a, b> is a per-sample inner product, Σ_b a batch sum.\n"
          "dg_j = g'_j(z_j), ddg_j = g''_j(z_j) (SymPy); K^□_j(x, y) is the adjoint in theta_j,\n"
          "input-space argument first; lam = penalty weight, B = batch size.")


def _latex_names(program: Program) -> dict:
    names = {}
    symbols = {s.target for s in program.stmts} | set(program.inputs)
    for s in symbols:
        n = s.name
        digits = n[len(n.rstrip("0123456789")):]
        stem = n[: len(n) - len(digits)]
        if stem == "dg":
            names[s] = rf"g'_{{{digits}}}"
        elif stem == "ddg":
            names[s] = rf"g''_{{{digits}}}"
        elif stem in ("dW", "db"):
            names[s] = rf"\nabla_{{{stem[1]}_{{{digits}}}}} J"
    names[sp.Symbol("lam", real=True)] = r"\lambda"
    return names


def equations_text(model: Model, program: Program) -> str:
    pen = model.penalty
    head = f"{model.name}: {program.name}, L = {model.L}, loss = {model.loss}"
    if pen:
        head += f", penalty v = {pen.v}, p(s) = {sp.sstr(pen.p)}, on = {'logits' if pen.on_logits else 'outputs'}"
    lines = [head, LEGEND, ""]
    groups = program.equations()
    for phase in PHASES:
        if phase not in groups:
            continue
        lines.append(f"[{phase}]")
        for stmt in (s for s in program.stmts if s.phase == phase):
            text = f"  {stmt.target} = {sp.sstr(stmt.expr)}"
            lines.append(f"{text:<60}  # {stmt.eq}")
        lines.append("")
    lines.append("[simplifications]")
    lines += [f"  - {note}" for note in program.fired] or ["  (none fired)"]
    return "\n".join(lines) + "\n"


def equations_latex(program: Program) -> str:
    names = _latex_names(program)
    lines = []
    for phase, eqs in program.equations().items():
        lines.append(f"% {phase}")
        lines += [sp.latex(eq, symbol_names=names) + r" \\" for eq in eqs]
    lines.append("% simplifications: " + "; ".join(program.fired))
    return "\n".join(lines) + "\n"
