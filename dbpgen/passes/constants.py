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
_REPORTED = {"eta": "(28)/App. B", "gamma": "(30)", "zeta": "(15)", "q": "(21)", "h": "(20)", "xi": "(16)"}


def _reported(name: str) -> str | None:
    prefix = name.rstrip("0123456789")
    return _REPORTED.get(prefix)


def propagate_constants(program: Program) -> Program:
    """Substitute constant statements forward until none is left."""
    zeros = []
    while True:
        constant = next((s for s in program.stmts if s.expr.is_Number), None)
        if constant is None:
            break
        rest = tuple(s for s in program.stmts if s is not constant)
        program = substitute(program.with_(stmts=rest), {constant.target: constant.expr})
        if constant.expr == 0 and _reported(constant.target.name):
            zeros.append(constant.target.name)
    if not zeros:
        return program
    note = ("proven zero and removed: " + ", ".join(zeros) +
            " (eta_L = 0 cascades through eq. 28 and 30, section 5.3)")
    stmts = tuple(replace(s, expr=sp.sympify(s.expr)) for s in program.stmts)
    return program.with_(stmts=stmts, fired=program.fired + (note,))
