"""Propagate statements that SymPy evaluated to constants (paper section 5.3).

A statement whose value is a number (g''_j = 0 from eq. 34, eta_L = 0 for an identity
output with constant v from Appendix B.3, g'_L = 1 for identity) is substituted into every
later statement. K_j, K_j^T, K_j^box and the reductions evaluate to 0 on a zero argument
(`dbpgen.functions`), so a zero cascades exactly as section 5.3 describes:
gamma_{j-1} = K_j^T(theta_j, 0) = 0 (eq. 30), eta_{j-1} = G'_{j-1} gamma_{j-1} = 0 (eq. 34),
and the penalty's bias gradients eta_j vanish (eq. 31). Inside a loop the same happens per
iteration; an accumulator of zeros is zero.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..program import Loop, Program

# Quantities whose vanishing is worth reporting, with the equation that makes it so.
_REPORTED = {"eta": "eq. 28/34", "gamma": "eq. 30", "zeta": "eq. 15", "q": "eq. 21", "h": "eq. 20",
             "xi": "eq. 16", "delta": "eq. 15", "etahat": "eq. 34", "gammahat": "eq. 30",
             "gamma_out": "v held constant, App. B"}


def _reported(stmt) -> str | None:
    """Why a vanishing statement vanished, in the paper's terms (None: not worth a line)."""
    if stmt.role.quantity == "eta_out":  # the case of Appendix B its label names (B.1, B.3, ...)
        return stmt.eq
    return _REPORTED.get(stmt.role.quantity)


def _sweep(stmts, mapping: dict, zeros: list) -> list:
    """Substitute known constants forward; statements that become numbers join the mapping."""
    kept = []
    for stmt in stmts:
        expr = sp.sympify(stmt.expr).xreplace(mapping)
        if expr.is_Number:
            mapping[stmt.target] = expr
            if expr == 0 and _reported(stmt):
                zeros.append(f"{stmt.target.name} [{_reported(stmt)}]")
            continue
        kept.append(replace(stmt, expr=expr))
    return kept


def propagate_constants(program: Program) -> Program:
    mapping: dict = {}
    zeros: list[str] = []
    nodes = []
    for node in program.stmts:
        if not isinstance(node, Loop):
            nodes += _sweep([node], mapping, zeros)
            continue
        local = dict(mapping)
        body = _sweep(node.body, local, zeros)
        accums = []
        for acc in node.accums:
            expr = sp.sympify(acc.expr).xreplace(local)
            if expr.is_Number:
                mapping[acc.target] = expr * node.count
                if expr == 0:
                    zeros.append(f"{acc.target.name} [sum of zeros]")
            else:
                accums.append(replace(acc, expr=expr))
        if accums:
            nodes.append(replace(node, body=tuple(body), accums=tuple(accums)))
    outputs = tuple((label, sp.sympify(e).xreplace(mapping)) for label, e in program.outputs)
    program = program.with_(stmts=tuple(nodes), outputs=outputs)
    if not zeros:
        return program
    note = "proven zero and removed: " + ", ".join(zeros)
    if len(zeros) > 1:
        note += " (the cascade of section 5.3)"
    return program.with_(fired=program.fired + (note,))
