"""Dead-code elimination: drop statements no output depends on.

After section 5.3's cascade the forward-backward pass (Alg. 3) is often unused, and
q_L (eq. 21) is only needed when v depends on the network (Appendix B).
"""
from __future__ import annotations

import sympy as sp

from ..program import Program


def eliminate_dead_code(program: Program) -> Program:
    live: set[sp.Symbol] = set()
    for _, expr in program.outputs:
        live |= sp.sympify(expr).free_symbols
    kept = []
    for stmt in reversed(program.stmts):
        if stmt.target in live:
            kept.append(stmt)
            live |= stmt.expr.free_symbols
    kept.reverse()
    dropped = [s.target.name for s in program.stmts if s not in kept]
    if not dropped:
        return program
    return program.with_(stmts=tuple(kept), fired=program.fired + ("dead code removed: " + ", ".join(dropped),))
