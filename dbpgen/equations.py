"""Readable renderings of a derived program: plain text (code names) and LaTeX."""
from __future__ import annotations

import sympy as sp

from .ir import Model
from .program import Loop, Program, walk

LEGEND = ("Products are coordinate-wise; <a, b> is a per-sample inner product, Σ_b a batch sum.\n"
          "dg_j = g'_j(z_j), ddg_j = g''_j(z_j) (SymPy); K^□_j(x, y) is the adjoint in theta_j,\n"
          "input-space argument first; lam = penalty weight, B = batch size.")


def _latex_names(program: Program) -> dict:
    names = {}
    symbols = {s.target for s in walk(program.stmts)} | set(program.inputs)
    for s in symbols:
        n = s.name
        digits = n[len(n.rstrip("0123456789")):]
        stem = n[: len(n) - len(digits)]
        if stem == "dg":
            names[s] = rf"g'_{{{digits}}}"
        elif stem == "ddg":
            names[s] = rf"g''_{{{digits}}}"
        elif stem == "eps":
            names[s] = rf"\varepsilon_{{{digits}}}"
        elif stem in ("dW", "db"):
            names[s] = rf"\nabla_{{{stem[1]}_{{{digits}}}}} J"
    names[sp.Symbol("lam", real=True)] = r"\lambda"
    return names


def _statement_lines(nodes, indent: str = "  "):
    """Execution order, a [phase] header where the phase changes; loops as indented blocks."""
    phase = None
    for node in nodes:
        if isinstance(node, Loop):
            yield ""
            yield f"{indent}[for {node.index} in range({node.count})]  # {node.eq}"
            yield from _statement_lines(node.body, indent + "    ")
            for acc in node.accums:
                text = f"{indent}    {acc.target} += {sp.sstr(acc.expr)}"
                yield f"{text:<60}  # {acc.eq}"
            yield ""
            phase = None
            continue
        if node.phase != phase:
            phase = node.phase
            yield f"{indent[:-2]}[{phase}]"
        text = f"{indent}{node.target} = {sp.sstr(node.expr)}"
        yield f"{text:<60}  # {node.eq}"


def equations_text(model: Model, program: Program) -> str:
    pen = model.penalty
    head = f"{model.name}: {program.name}, L = {model.L}, loss = {model.loss}"
    if pen:
        head += f", penalty v = {pen.v}, p(s) = {sp.sstr(pen.p)}, on = {'logits' if pen.on_logits else 'outputs'}"
    elif not model.has_objective:
        head += ", no penalty: J = 0 (the module is the net's forward, vjp and jvp)"
    lines = [head, LEGEND, ""]
    lines += list(_statement_lines(program.stmts))
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


def equations_markdown(model: Model, program: Program) -> str:
    """The equations as Markdown with LaTeX, a section per pass and the simplifications that
    fired (how a Derivation shows itself in Jupyter)."""
    names = _latex_names(program)
    lines = [f"**{model.name}**: {program.name}, L = {model.L}, loss = {model.loss}"
             + (f", penalty v = {model.penalty.v}" if model.penalty else "")]
    for phase, eqs in program.equations().items():
        lines += ["", f"*{phase}*", "", "$$", "\\begin{aligned}"]
        lines += [sp.latex(eq.lhs, symbol_names=names) + " &= " + sp.latex(eq.rhs, symbol_names=names) + r" \\"
                  for eq in eqs]
        lines += ["\\end{aligned}", "$$"]
    lines += ["", "*simplifications*", ""]
    lines += [f"- {note}" for note in program.fired] or ["- (none fired)"]
    return "\n".join(lines) + "\n"
