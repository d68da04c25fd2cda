"""One backward pass for loss and penalty: the total adjoint eps_j = delta_j + lam eta_j.

When v is not the loss gradient (a node penalty, a given v), the loss needs its own
backpropagation delta_j (eq. 15-16 with v = grad l, section 4.5) next to the penalty's
forward-backward pass eta_j (eq. 28, 30), and the weight gradients only ever use
K^box(x_{j-1}, delta_j + lam eta_j) and delta_j + lam eta_j (eq. 31-33). Both recursions
are linear in their K^T argument and G'_j is coordinate-wise linear, so their sum obeys

    eps_L = delta_L + lam eta_L
    eps_j = lam M(G''_j h_j, xi_j) + G'_j K_{j+1}^T(theta_{j+1}, eps_{j+1})     (28) + (15)-(16)

one K^T per layer instead of two. The pass derives eps_j with SymPy from the statements
themselves (substituting K^T(delta_{j+1}) = K^T(eps_{j+1}) - lam K^T(eta_{j+1}) and checking
that delta_{j+1} and eta_{j+1} cancel) and leaves the program alone if they do not.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..functions import KT
from ..program import LAM, Loop, Program, Role, Stmt, find


def fold_loss_adjoint(program: Program) -> Program:
    if any(isinstance(node, Loop) for node in program.stmts):
        return program
    deltas = find(program.stmts, "delta")
    layers = sorted(deltas)
    if not layers or layers != list(range(1, layers[-1] + 1)):
        return program
    L = layers[-1]
    etas, gammas = find(program.stmts, "eta"), find(program.stmts, "gamma")
    out = find(program.stmts, "eta_out")
    if not etas and not out:
        return program  # no penalty adjoint to fold in
    if out:
        if set(out) != {L}:
            return program
        etas[L] = out[L]

    def value(stmts: dict, j: int):
        """The right-hand side of the quantity at layer j, or 0 where the cascade of
        section 5.3 removed its statement."""
        return stmts[j].expr if j in stmts else sp.S.Zero

    def symbol(stmts: dict, j: int):
        return stmts[j].target if j in stmts else sp.S.Zero

    eps_sym = {j: sp.Symbol(f"eps{j}") for j in layers}
    if {s.target for s in program.stmts} & set(eps_sym.values()) or set(program.inputs) & set(eps_sym.values()):
        return program  # the names are taken
    eps = {L: deltas[L].target + LAM * symbol(etas, L)}
    for j in range(L - 1, 0, -1):
        delta, eta, gamma = value(deltas, j), value(etas, j), value(gammas, j)
        delta_next = deltas[j + 1].target
        back = [n for n in sp.preorder_traversal(delta) if isinstance(n, KT) and n.args[-1] == delta_next]
        if len(back) != 1:
            return program
        eta_next = symbol(etas, j + 1)
        kt = back[0]
        split = KT(*kt.args[:-1], eps_sym[j + 1]) - LAM * KT(*kt.args[:-1], eta_next)
        total = delta.xreplace({kt: split}) + LAM * eta.xreplace({symbol(gammas, j): gamma})
        total = sp.expand(total)
        left = {delta_next, eta_next, symbol(gammas, j)} & total.free_symbols
        if left:
            return program
        eps[j] = sp.collect(total, LAM)
    # eps_j goes in just before the first gradient statement
    stmts, placed = [], False
    mapping = {deltas[j].target: eps_sym[j] - LAM * symbol(etas, j) for j in layers}
    for node in program.stmts:
        if not placed and node.phase == "gradients":
            for j in range(L, 0, -1):
                stmts.append(Stmt(eps_sym[j], eps[j], "forward-backward",
                                  "eps_j = delta_j + lam eta_j: (28) + (15)-(16)", Role("eps", j)))
            placed = True
        if node.phase == "gradients":
            node = replace(node, expr=node.expr.subs(mapping))
        stmts.append(node)
    if not placed:
        return program
    note = f"one backward pass for loss and penalty: eps_j = delta_j + lam eta_j, j = 1..{L}"
    return program.with_(stmts=tuple(stmts), fired=program.fired + (note,))
