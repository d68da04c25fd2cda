"""Move a constant factor of q_0 into its users by linearity (Alg. 2, eq. 20 and 32).

Algorithm 2 starts the backward-backward pass at q_0 = grad p(xi_0) = 2 p'(s) xi_0; for the
squared norm p(s) = s that is q_0 = 2 xi_0, a scaled copy of xi_0 with the width of the input
(784 for MNIST), and it feeds only linear slots: h_1 = K_1(theta_1, q_0) (eq. 20) and the
weight adjoint K^box_1(q_0, ·) (eq. 32). Since

    K_j(theta, c x) = c K_j(theta, x),    K^box_j(c x, y) = K^box_j(x, c y),

the factor joins the coordinate-wise pass that forms h_1's users (q_1 = G'_1 h_1, eq. 21)
and the narrow output-space argument of K^box, and the pass over the wide input is gone.
Only constant factors (numbers, lam, B) move; a statement whose value is used in any other
way, or returned, stays.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..functions import K, Kbox
from ..program import SCALARS, Loop, Program, Stmt, walk


def _scaled_copy(stmt: Stmt):
    """(c, x) when stmt is q = c x with x a symbol and c a constant other than 1."""
    if not isinstance(stmt, Stmt) or not stmt.expr.is_Mul:
        return None
    c, x = stmt.expr.as_independent(*stmt.expr.free_symbols - set(SCALARS), as_Add=False)
    if not isinstance(x, sp.Symbol) or c == 1 or not c.free_symbols <= set(SCALARS):
        return None
    return c, x


def _moved(expr: sp.Expr, q: sp.Symbol, c: sp.Expr, x: sp.Symbol) -> sp.Expr | None:
    """expr with every K_j(., q) -> c K_j(., x) and K^box_j(q, y) -> K^box_j(x, c y), or None
    if q is used in any other way."""
    mapping = {}
    for node in sp.preorder_traversal(expr):
        if isinstance(node, K) and node.args[-1] == q and q not in node.args[-2].free_symbols:
            mapping[node] = c * node.func(*node.args[:-1], x)
        elif isinstance(node, Kbox) and node.args[1] == q and q not in node.args[2].free_symbols:
            mapping[node] = Kbox(node.args[0], x, c * node.args[2])
    new = expr.xreplace(mapping)
    return None if q in new.free_symbols else new


def _fold(items: list, outputs: list) -> tuple[list, list[str]]:
    """items: statements and accumulations of one scope, in order; outputs: expressions
    read after it (a statement they read stays)."""
    notes = []
    index = 0
    while index < len(items):
        stmt = items[index]
        found = _scaled_copy(stmt)
        if found is None or any(stmt.target in sp.sympify(e).free_symbols for e in outputs):
            index += 1
            continue
        c, x = found
        rest = []
        for item in items[index + 1:]:
            new = _moved(item.expr, stmt.target, c, x) if stmt.target in item.expr.free_symbols \
                else item.expr
            if new is None:
                break
            rest.append(replace(item, expr=new))
        if len(rest) != len(items) - index - 1:
            index += 1
            continue
        notes.append(f"{stmt.target} = {sp.sstr(stmt.expr)}: the factor {sp.sstr(c)} moved into "
                     f"K and K^□ by linearity (eq. 20, 32), {stmt.target} is not formed")
        items = items[:index] + rest
    return items, notes


def fold_constant_scale(program: Program) -> Program:
    outputs = [e for _, e in program.outputs]
    nodes, notes = list(program.stmts), []
    # loop bodies first: their accumulations are read after the loop, not their statements
    for n, node in enumerate(nodes):
        if isinstance(node, Loop):
            later = [item.expr for item in walk(nodes[n + 1:])] + outputs
            items, found = _fold(list(node.body) + list(node.accums), later)
            body = tuple(i for i in items if isinstance(i, Stmt))
            accums = tuple(i for i in items if not isinstance(i, Stmt))
            if found:
                nodes[n] = replace(node, body=body, accums=accums)
                notes += found
    top = [node for node in nodes if isinstance(node, Stmt)]
    if len(top) == len(nodes):  # straight-line programs (with loops: only their bodies)
        nodes, found = _fold(nodes, outputs)
        notes += found
    if not notes:
        return program
    return program.with_(stmts=tuple(nodes), fired=program.fired + tuple(notes))

