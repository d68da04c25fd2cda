"""Dead-code elimination: drop statements no output depends on.

After section 5.3's cascade the forward-backward pass (Alg. 3) is often unused, and
q_L (eq. 21) is only needed when v depends on the network (Appendix B). A loop whose
accumulators are all dead goes entirely; inside a loop, liveness flows from the live
accumulators.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..program import Loop, Program, walk


def _live_body(node: Loop, live: set) -> tuple[Loop | None, set]:
    accums = tuple(a for a in node.accums if a.target in live)
    if not accums:
        return None, set()
    inner = set().union(*(a.expr.free_symbols for a in accums))
    body = []
    for stmt in reversed(node.body):
        if stmt.target in inner:
            body.append(stmt)
            inner |= stmt.expr.free_symbols
    body.reverse()
    local = {s.target for s in node.body} | {node.index}
    return replace(node, body=tuple(body), accums=accums), inner - local


def eliminate_dead_code(program: Program) -> Program:
    live: set[sp.Symbol] = set()
    for _, expr in program.outputs:
        live |= sp.sympify(expr).free_symbols
    kept = []
    for node in reversed(program.stmts):
        if isinstance(node, Loop):
            loop, uses = _live_body(node, live)
            if loop is not None:
                kept.append(loop)
                live |= uses
        elif node.target in live:
            kept.append(node)
            live |= node.expr.free_symbols
    kept.reverse()
    before = [s.target.name for s in walk(program.stmts)]
    after = {s.target.name for s in walk(kept)}
    dropped = [n for n in before if n not in after]
    if not dropped:
        return program
    return program.with_(stmts=tuple(kept), fired=program.fired + ("dead code removed: " + ", ".join(dropped),))

