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

from ..functions import K, Kbox, KT, linear_terms
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
        y = sp.Add(*[sp.cancel(c / c0) * y for c, y in members])  # ratios of monomials (lam/B over 1/B)
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


def _namer(program: Program):
    """fresh(stem) -> a symbol named stem (stem_1, stem_2, ... where taken) new to the program."""
    taken = {s.name for s in program.inputs} | {item.target.name for item in walk(program.stmts)}

    def fresh(stem: str) -> sp.Symbol:
        n, name = 0, stem
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        return sp.Symbol(name)

    return fresh


def _substituted(node, replaced: dict):
    """A statement or loop (its body and accumulations) with the names a hoist replaced."""
    if not replaced:
        return node
    if isinstance(node, Loop):
        return replace(node, body=tuple(replace(s, expr=s.expr.xreplace(replaced)) for s in node.body),
                       accums=tuple(replace(a, expr=a.expr.xreplace(replaced)) for a in node.accums))
    return replace(node, expr=node.expr.xreplace(replaced))


def _finished(program: Program, stmts: list, replaced: dict, notes: list, note: str) -> Program:
    """The program with a hoist's statements, its replacements in the outputs, and its note."""
    if not notes:
        return program
    outputs = tuple((label, sp.sympify(expr).xreplace(replaced)) for label, expr in program.outputs)
    return program.with_(stmts=tuple(stmts), outputs=outputs, fired=program.fired + (note,))


def hoist_invariant_adjoints(program: Program) -> Program:
    """Section 5.4's loop over the vectors v_i, eq. (31) summed over i: a weight adjoint
    K^box_j(a, y_i) whose input-space argument a is the same for every v_i (x_{j-1} beside
    eta_j^(i)) sums to K^box_j(a, sum_i y_i), one application after the loop instead of C.
    The sum is an accumulator the loop already has where one sums y_i (grad_b R, eq. 33),
    else a new one; the rest of the accumulation stays in the loop (theta^1_j of Alg. 4),
    and the reader of the accumulated gradient gets the sum of both, where the loss's
    K^box_j(x_{j-1}, .) can merge with it (merge_weight_adjoints)."""
    fresh = _namer(program)
    stmts, replaced, notes = [], {}, []

    for node in program.stmts:
        node = _substituted(node, replaced)
        if not isinstance(node, Loop):
            stmts.append(node)
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
    return _finished(program, stmts, replaced, notes, "loop-invariant weight adjoints summed once after the "
                     "loop over v_i (eq. 31, section 5.4): " + "; ".join(notes))


def hoist_linear_recursion(program: Program) -> Program:
    """Section 5.4's loop over the vectors v_i, eq. (28) and (30) summed over i: the
    forward-backward recursion gamma_j = K^T_{j+1}(eta_{j+1}), eta_j = G''_j h_j xi_j +
    G'_j gamma_j is linear in eta with operators that do not change with v_i, and the loop
    only sums its eta_j (grad_b R, eq. 33, and the weight adjoints hoisted beside it). So
    sum_i eta_j^(i) is the same recursion run once after the loop on the summed sources
    sum_i G''_j h_j xi_j: the loop accumulates the sources, and the K^T of each layer is
    applied once instead of once per vector. In general: the loop's statements that are
    read only linearly (by statements of the set, with coefficients and operators the loop
    does not change, or by an accumulator that sums them as they are) and that reach a
    K or K^T move after the loop."""
    out, replaced, notes = [], {}, []
    fresh = _namer(program)

    for index, node in enumerate(program.stmts):
        node = _substituted(node, replaced)
        if not isinstance(node, Loop):
            out.append(node)
            continue
        later = {sym for item in walk(program.stmts[index + 1:]) for sym in item.expr.free_symbols}
        later |= {sym for _, expr in program.outputs for sym in sp.sympify(expr).free_symbols}
        moved = _linear_part(node, later)
        if not moved:
            out.append(node)
            continue
        body, accums, after = [], [], []
        summed = {}  # accumulator target -> the moved value it sums
        for acc in node.accums:
            if acc.expr in moved:
                summed[acc.target] = acc.expr
            else:
                accums.append(acc)
        for stmt in node.body:
            if stmt.target not in moved:
                body.append(stmt)
                continue
            source, linear = moved[stmt.target]
            notes.append(str(stmt.target))
            if linear == 0:  # a source alone: the loop sums it into the value itself
                accums.append(Accum(stmt.target, source, f"{stmt.eq}, summed over i", stmt.role))
                continue
            expr = linear
            if source != 0:
                layer = stmt.role.layer if stmt.role else None
                total = fresh(f"{stmt.role.quantity}src{layer}" if layer is not None else f"{stmt.target}src")
                accums.append(Accum(total, source, f"{stmt.eq}, its source summed over i", Role("source", layer)))
                expr = total + linear
            after.append(replace(stmt, expr=expr, eq=f"{stmt.eq}, summed over i by linearity"))
        out.append(replace(node, body=tuple(body), accums=tuple(accums)))
        out += after
        replaced.update(summed)
    return _finished(program, out, replaced, notes, "linear recursion run once after the loop over v_i on its "
                     "summed sources (eq. 28, 30, section 5.4): " + ", ".join(notes))


def _split_linear(expr: sp.Expr, values: set, varying: set) -> tuple[sp.Expr, sp.Expr, set]:
    """expr as (source, linear, bad): linear the terms c * f or c * K(theta, f) /
    K^T(theta, f) (K(f), K^T(f) of a layer without parameters) with f in values and c, theta
    free of what the loop changes (varying), source the terms that read no value, bad the
    values that other terms read."""
    source, linear, bad = [], [], set()
    for term in sp.Add.make_args(expr):
        read = term.free_symbols & values
        if not read:
            source.append(term)
            continue
        f = next(iter(read))
        factors = sp.Mul.make_args(term)
        ops = [a for a in factors if a.has(f)]
        coeff = sp.Mul(*[a for a in factors if not a.has(f)])
        if len(read) == 1 and len(ops) == 1 and not coeff.free_symbols & varying and (
                ops[0] == f or isinstance(ops[0], (K, KT)) and ops[0].args[-1] == f
                and not any(a.free_symbols & varying for a in ops[0].args[1:-1])):
            linear.append(term)
        else:
            bad |= read
    return sp.Add(*source), sp.Add(*linear), bad


def _linear_part(loop: Loop, later: set) -> dict:
    """target -> (source, linear) of the loop's statements that move after it: the largest set
    read only linearly (by its own statements, or summed as they are by an accumulator,
    never after the loop), restricted to its parts that apply a K or K^T."""
    varying = {s.target for s in loop.body} | {loop.index}
    values = {s.target for s in loop.body} - later
    while True:
        drop = set()
        for stmt in loop.body:
            read = stmt.expr.free_symbols & values
            if read:
                drop |= _split_linear(stmt.expr, values, varying)[2] if stmt.target in values else read
        for acc in loop.accums:
            read = acc.expr.free_symbols & values
            if read and acc.expr not in values:
                drop |= read
        if not drop:
            break
        values -= drop
    parts = {s.target: _split_linear(s.expr, values, varying)[:2] for s in loop.body if s.target in values}
    # connected parts (a statement with the values it reads): those with a K or K^T move
    group = {t: {t} for t in parts}
    for t, (_, linear) in parts.items():
        for f in linear.free_symbols & values:
            merged = group[t] | group[f]
            for member in merged:
                group[member] = merged
    return {t: parts[t] for t in parts
            if any(parts[m][1].has(K, KT) for m in group[t])}
