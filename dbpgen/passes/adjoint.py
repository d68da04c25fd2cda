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
With a loop over the vectors v_i (section 5.4), the penalty's adjoint that reaches the
weight gradients is the sum over i, computed after the loop: eta_j where
hoist_linear_recursion moved the recursion out of the naive loop, etahat_j in Algorithm 4;
a loop's accumulation stands as itself (its sum), and a quantity the loop computes per
iteration leaves the program alone.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..functions import KT
from ..program import LAM, Accum, Loop, Program, Role, Stmt, find


def _outside_loops(program: Program, quantity: str) -> dict | None:
    """layer -> the statement computing `quantity` outside any loop, or the accumulation
    that sums it over a loop (section 5.4, hoist_linear_recursion); None where a loop
    computes it per iteration (its value is not one array the pass could fold)."""
    found: dict = {}
    for node in program.stmts:
        if isinstance(node, Loop):
            if find(node.body, quantity):
                return None
            found.update(find(node.accums, quantity))
    found.update(find([n for n in program.stmts if not isinstance(n, Loop)], quantity))
    return found


def fold_loss_adjoint(program: Program) -> Program:
    deltas = _outside_loops(program, "delta")
    layers = sorted(deltas or ())
    if not layers or layers != list(range(1, layers[-1] + 1)) or any(isinstance(d, Accum) for d in deltas.values()):
        return program
    L = layers[-1]
    hats = _outside_loops(program, "gammahat")
    if hats:  # Algorithm 4: the recursion runs after the loop on the sums (eq. 34, summed), eta_L's too
        etas, gammas, out = _outside_loops(program, "etahat"), hats, {}
    else:
        etas, gammas = _outside_loops(program, "eta"), _outside_loops(program, "gamma")
        out = _outside_loops(program, "eta_out")
    if etas is None or gammas is None or out is None or any(isinstance(g, Accum) for g in gammas.values()):
        return program
    if not etas and not out:
        return program  # no penalty adjoint to fold in
    if out:
        if set(out) != {L}:
            return program
        etas[L] = out[L]

    def value(stmts: dict, j: int):
        """The right-hand side of the quantity at layer j; a loop's sum stands as itself;
        0 where the cascade of section 5.3 removed its statement."""
        if j not in stmts:
            return sp.S.Zero
        return stmts[j].target if isinstance(stmts[j], Accum) else stmts[j].expr

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
    # what the weight gradients read of eta must be lam eta_j, all of it now in eps_j (a
    # penalty scaled otherwise, as projections' C/n, would leave eta beside eps: no fold)
    left = {symbol(etas, j) for j in layers} - {sp.S.Zero}
    if any(node.expr.free_symbols & left for node in stmts if node.phase == "gradients"):
        return program
    note = f"one backward pass for loss and penalty: eps_j = delta_j + lam eta_j, j = 1..{L}"
    return program.with_(stmts=tuple(stmts), fired=program.fired + (note,))
