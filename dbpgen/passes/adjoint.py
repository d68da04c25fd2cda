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

import sympy as sp

from ..functions import KT
from ..program import LAM, Loop, Program, Stmt


def _sym(name: str, j: int) -> sp.Symbol:
    return sp.Symbol(f"{name}{j}")


def fold_loss_adjoint(program: Program) -> Program:
    if any(isinstance(node, Loop) for node in program.stmts):
        return program
    defs = {s.target.name: s for s in program.stmts}
    layers = sorted(int(name[5:]) for name in defs if name.startswith("delta") and name[5:].isdigit())
    if not layers or layers != list(range(1, layers[-1] + 1)):
        return program
    L = layers[-1]
    if not any(name.startswith("eta") for name in defs):
        return program  # no penalty adjoint to fold in
    used = set().union(*(sp.sympify(s.expr).free_symbols for s in program.stmts))

    def value(name: str, j: int):
        """The right-hand side of name_j, or 0 where the cascade of section 5.3 removed it."""
        if f"{name}{j}" in defs:
            return defs[f"{name}{j}"].expr
        return None if _sym(name, j) in used else sp.S.Zero

    eps = {L: _sym("delta", L) + LAM * (_sym("eta", L) if f"eta{L}" in defs else sp.S.Zero)}
    for j in range(L - 1, 0, -1):
        delta, eta, gamma = value("delta", j), value("eta", j), value("gamma", j)
        if delta is None or eta is None or gamma is None:
            return program
        back = [n for n in sp.preorder_traversal(delta) if isinstance(n, KT) and n.args[-1] == _sym("delta", j + 1)]
        if len(back) != 1:
            return program
        eta_next = _sym("eta", j + 1) if f"eta{j + 1}" in defs else sp.S.Zero
        kt = back[0]
        split = KT(*kt.args[:-1], _sym("eps", j + 1)) - LAM * KT(*kt.args[:-1], eta_next)
        total = delta.xreplace({kt: split}) + LAM * eta.xreplace({_sym("gamma", j): gamma})
        total = sp.expand(total)
        left = {_sym("delta", j + 1), _sym("eta", j + 1), _sym("gamma", j)} & total.free_symbols
        if left:
            return program
        eps[j] = sp.collect(total, LAM)
    # eps_j goes in just before the first gradient statement
    stmts, placed = [], False
    for node in program.stmts:
        if not placed and node.phase == "gradients":
            for j in range(L, 0, -1):
                stmts.append(Stmt(_sym("eps", j), eps[j], "forward-backward",
                                  "eps_j = delta_j + lam eta_j: (28) + (15)-(16)"))
            placed = True
        if node.phase == "gradients":
            mapping = {_sym("delta", j): _sym("eps", j) - LAM * (_sym("eta", j) if f"eta{j}" in defs else 0)
                       for j in range(1, L + 1)}
            node = Stmt(node.target, node.expr.subs(mapping), node.phase, node.eq)
        stmts.append(node)
    if not placed:
        return program
    note = f"one backward pass for loss and penalty: eps_j = delta_j + lam eta_j, j = 1..{L}"
    return program.with_(stmts=tuple(stmts), fired=program.fired + (note,))
