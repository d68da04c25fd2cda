"""Propagate statements that SymPy evaluated to constants (paper section 5.3).

A statement whose value is a number (g''_j = 0 from eq. 34, eta_L = 0 for an identity
output with constant v from Appendix B.3, g'_L = 1 for identity) is substituted into every
later statement. K_j, K_j^T, K_j^box and the reductions evaluate to 0 on a zero argument
(`dbpgen.functions`), so a zero cascades exactly as section 5.3 describes:
gamma_{j-1} = K_j^T(theta_j, 0) = 0 (eq. 30), eta_{j-1} = G'_{j-1} gamma_{j-1} = 0 (eq. 34),
and the penalty's bias gradients eta_j vanish (eq. 31).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..program import Program, substitute

# Statements whose vanishing is worth reporting, with the equation that makes it so.
_REPORTED = {"eta": "eq. 28/34", "gamma": "eq. 30", "zeta": "eq. 15", "q": "eq. 21", "h": "eq. 20",
             "xi": "eq. 16", "delta": "eq. 15"}


def _reported(stmt) -> str | None:
    """Why a vanishing statement vanished, in the paper's terms (None: not worth a line)."""
    if stmt.eq.startswith("(29)"):
        return "v held constant, App. B"
    if stmt.eq.startswith("App. B"):
        return stmt.eq
    return _REPORTED.get(stmt.target.name.rstrip("0123456789"))


def propagate_constants(program: Program) -> Program:
    """Substitute constant statements forward until none is left."""
    zeros = []
    while True:
        constant = next((s for s in program.stmts if s.expr.is_Number), None)
        if constant is None:
            break
        rest = tuple(s for s in program.stmts if s is not constant)
        program = substitute(program.with_(stmts=rest), {constant.target: constant.expr})
        if constant.expr == 0 and _reported(constant):
            zeros.append(f"{constant.target.name} [{_reported(constant)}]")
    if not zeros:
        return program
    note = "proven zero and removed: " + ", ".join(zeros)
    if len(zeros) > 1:
        note += " (the cascade of section 5.3)"
    stmts = tuple(replace(s, expr=sp.sympify(s.expr)) for s in program.stmts)
    return program.with_(stmts=stmts, fired=program.fired + (note,))
