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
from ..program import Accum, Loop, Program, Role, Stmt, walk


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


def hoist_invariant_adjoints(program: Program) -> Program:
    """Section 5.4's loop over the vectors v_i, eq. (31) summed over i: a weight adjoint
    K^box_j(a, y_i) whose input-space argument a is the same for every v_i (x_{j-1} beside
    eta_j^(i)) sums to K^box_j(a, sum_i y_i), one application after the loop instead of C.
    The sum is an accumulator the loop already has where one sums y_i (grad_b R, eq. 33),
    else a new one; the rest of the accumulation stays in the loop (theta^1_j of Alg. 4),
    and the reader of the accumulated gradient gets the sum of both, where the loss's
    K^box_j(x_{j-1}, .) can merge with it (merge_weight_adjoints)."""
    taken = {s.name for s in program.inputs} | {item.target.name for item in walk(program.stmts)}
    stmts, replaced, notes = [], {}, []

    def fresh(stem: str) -> sp.Symbol:
        n, name = 0, stem
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        return sp.Symbol(name)

    for node in program.stmts:
        if not isinstance(node, Loop):
            stmts.append(replace(node, expr=node.expr.xreplace(replaced)) if replaced else node)
            continue
        inside = {s.target for s in node.body} | {node.index}
        sums = {acc.expr: acc.target for acc in node.accums}
        accums, extra = [], []
        for acc in node.accums:
            kept, hoisted = [], []
            for coeff, box in linear_terms(acc.expr, (Kbox,)):
                if box is not None and not (box.args[1].free_symbols | coeff.free_symbols) & inside \
                        and box.args[2].free_symbols & inside:
                    hoisted.append((coeff, box))
                else:
                    kept.append(coeff if box is None else coeff * box)
            if not hoisted:
                accums.append(acc)
                continue
            after = []
            for coeff, box in hoisted:
                j, a, y = box.args
                total = sums.get(y)
                if total is None:
                    total = fresh(f"etahat{j}")
                    sums[y] = total
                    extra.append(Accum(total, y, f"{acc.eq}, summed over i", Role("etahat", int(j))))
                after.append(coeff * Kbox(j, a, total))
                notes.append(f"K^□_{j}({a}, {y})")
            rest = sp.S.Zero
            if kept:  # the in-loop part: theta^1_j of Alg. 4 where the accumulator is a layer's
                layer = acc.role.layer if acc.role else None
                rest = fresh(f"thetahat{layer}" if layer else f"{acc.target}_loop")
                accums.append(replace(acc, target=rest, expr=sp.Add(*kept),
                                      role=Role("thetahat", layer) if layer else acc.role))
            replaced[acc.target] = rest + sp.Add(*after)
        stmts.append(replace(node, accums=tuple(accums + extra)))
    if not notes:
        return program
    outputs = tuple((label, sp.sympify(expr).xreplace(replaced)) for label, expr in program.outputs)
    fired = program.fired + ("loop-invariant weight adjoints summed once after the loop over v_i "
                              "(eq. 31, section 5.4): " + "; ".join(notes),)
    return program.with_(stmts=tuple(stmts), outputs=outputs, fired=fired)
