"""Contract K_1 K_1^T through a wide dense input layer with its Gram matrix (beyond the paper).

Inside the per-vector loop of a Jacobian or projection penalty (section 5.4), xi_0 =
K_1^T(W_1, zeta_1) (eq. 16) feeds only s = ||xi_0||^2 (eq. 10) and q_0 = c(s) xi_0 (Alg. 2),
and q_0 feeds only h_1 = K_1(W_1, q_0) (eq. 20) and theta^1_1 += K^box_1(q_0, zeta_1) (Alg. 4).
With G = W_1 W_1^T, computed once per call:

    s = <zeta_1, G zeta_1>,   h_1 = c(s) G zeta_1,
    sum_i K^box_1(q_0, zeta_1) = (sum_i sum_b c zeta_1 zeta_1^T) W_1.

Per iteration three (B x N_1 x n_0) products become two (B x N_1 x N_1) ones. The rewrite
applies only where that saves flops at batch REFERENCE_BATCH (a named cost threshold).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..functions import K, KT, Kbox, Dot, Gram, GramBox, GramMul, GramOut
from ..program import Accum, Loop, Program, Role, Stmt

REFERENCE_BATCH = 128


def _profitable(loop: Loop, n1: int, n0: int) -> bool:
    old = 3 * loop.count * REFERENCE_BATCH * n1 * n0
    new = 2 * loop.count * REFERENCE_BATCH * n1 * n1 + 2 * n1 * n1 * n0
    return new < old


def _users(loop: Loop, symbol):
    return [item for item in loop.body + loop.accums if symbol in item.expr.free_symbols]


def _match(loop: Loop):
    """(xi0 stmt, s stmt, q0 stmt, c, h1 stmt, accum) if the loop has the pattern, else None."""
    xi0 = next((s for s in loop.body if isinstance(s.expr, KT) and s.expr.layer == 1
                and len(s.expr.args) == 3), None)
    if xi0 is None:
        return None
    users = _users(loop, xi0.target)
    s_stmt = next((u for u in users if u.expr == Dot(xi0.target, xi0.target)), None)
    rest = [u for u in users if u is not s_stmt]
    if s_stmt is None or len(rest) != 1 or not isinstance(rest[0], Stmt):
        return None
    q0 = rest[0]
    c, factor = q0.expr.as_independent(xi0.target, as_Add=False)
    if factor != xi0.target:
        return None
    W1, zeta1 = xi0.expr.args[1], xi0.expr.args[2]
    q_users = _users(loop, q0.target)
    h1 = next((u for u in q_users if u.expr == K(1, W1, q0.target)), None)
    acc = next((u for u in q_users if u.expr == Kbox(1, q0.target, zeta1)), None)
    if h1 is None or acc is None or len(q_users) != 2 or not isinstance(acc, Accum):
        return None
    return xi0, s_stmt, q0, c, h1, acc


def _rewrite(loop: Loop, found, G, M):
    xi0, s_stmt, q0, c, h1, acc = found
    W1, zeta1 = xi0.expr.args[1], xi0.expr.args[2]
    u1 = sp.Symbol("u1")
    body = []
    for stmt in loop.body:
        if stmt is xi0:
            body.append(Stmt(u1, GramMul(zeta1, G), stmt.phase, "(16)+(20): K_1 K_1^T = W_1 W_1^T",
                              Role("gram_zeta", 1)))
        elif stmt is s_stmt:
            body.append(replace(stmt, expr=Dot(zeta1, u1), eq="s = <zeta_1, G zeta_1>"))
        elif stmt is h1:
            body.append(replace(stmt, expr=c * u1, eq="(20): h_1 = c(s) G zeta_1"))
        elif stmt is not q0:
            body.append(stmt)
    accums = tuple(Accum(M, GramBox(zeta1, c * zeta1), "Alg. 4: theta^1_1 before W_1", Role("gram_M", 1))
                   if a is acc else a for a in loop.accums)
    after = Stmt(acc.target, GramOut(M, W1), "forward-backward", "Alg. 4: theta^1_1 = M W_1", acc.role)
    return replace(loop, body=tuple(body), accums=accums), after, W1


def contract_input_gram(program: Program, model=None) -> Program:
    """Rewrite each qualifying loop; needs the model for the layer sizes."""
    if model is None or not model.layers[0].op.gram:
        return program
    n1, n0 = model.layers[0].op.out, model.layers[0].in_shape[0]
    nodes, notes = [], []
    for node in program.stmts:
        found = _match(node) if isinstance(node, Loop) else None
        if found is None or not _profitable(node, n1, n0):
            nodes.append(node)
            continue
        G, M = sp.Symbol("G1"), sp.Symbol("M1")
        loop, after, W1 = _rewrite(node, found, G, M)
        nodes += [Stmt(G, Gram(1, W1), "forward", "G_1 = W_1 W_1^T, once per call", Role("gram", 1)),
                  loop, after]
        notes.append(f"Gram contraction of layer 1 (N_1 = {n1} < n_0 = {n0}): per vector, xi_0, "
                     "h_1 and K^box_1 go through G_1 = W_1 W_1^T instead of W_1 (beyond the paper)")
    if not notes:
        return program
    return program.with_(stmts=tuple(nodes), fired=program.fired + tuple(notes))
