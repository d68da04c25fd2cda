"""Merge weight adjoints that share an argument (bilinearity of K^box, eq. 31-32).

K_j^box(x_{j-1}, zeta_j) + lam K_j^box(x_{j-1}, eta_j) = K_j^box(x_{j-1}, zeta_j + lam eta_j):
one application instead of two. Terms are grouped by the input-space argument, and the
scalar coefficient (lam/B, 1/B) moves onto the per-sample argument, c K^box(x, y) =
K^box(x, c y): it joins the coordinate-wise pass that forms that argument instead of costing
passes over the n_j x n_{j-1} weight gradient.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..functions import Kbox, linear_terms
from ..program import Program, Stmt


def _merge(expr: sp.Expr) -> tuple[sp.Expr, list[str]]:
    groups: dict = {}
    others = []
    for coeff, box in linear_terms(expr, (Kbox,)):
        if box is None:
            others.append(coeff)
        else:
            groups.setdefault((box.args[0], box.args[1]), []).append((coeff, box.args[2]))
    merged, notes = [], []
    for (j, a), members in groups.items():
        # factor out the simplest coefficient (1/B rather than lam/B)
        members.sort(key=lambda m: (len(m[0].free_symbols), sp.default_sort_key(m[0])))
        c0 = members[0][0]
        if len(members) > 1:
            notes.append(f"K^□_{j}({a}, ·): " + " + ".join(sp.sstr(c / c0 * y) for c, y in members))
        y = sp.Add(*[sp.simplify(c / c0) * y for c, y in members])
        merged.append(Kbox(j, a, c0 * y))
    return sp.Add(*merged, *others), notes


def merge_weight_adjoints(program: Program) -> Program:
    stmts, notes = [], []
    for stmt in program.stmts:
        if isinstance(stmt, Stmt) and stmt.phase == "gradients":
            expr, found = _merge(stmt.expr)
            if expr != stmt.expr:
                stmt = replace(stmt, expr=expr)
            notes += found
        stmts.append(stmt)
    fired = program.fired
    if notes:
        fired += ("merged by bilinearity (eq. 31-32): " + "; ".join(notes),)
    return program.with_(stmts=tuple(stmts), fired=fired)
