"""Peak live bytes of a program's schedule (paper section 5.4, point 7).

Every named intermediate (not the inputs) is live from its definition to its last use.
A loop is laid out once: its body's values die at the end of an iteration, values from
outside that the body uses stay live to the end of the loop, and accumulators live from
the loop's start to their last use. The peak over all program points, at a given batch
size, is what the emitted schedule needs at least (unnamed temporaries inside one
expression come on top).
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .ir import Model
from .program import Loop, Program
from .shapes import nbytes, program_shapes


def _events(program: Program):
    """(position, defined symbols, used symbols) in execution order, loops laid out once."""
    pos = 0
    events = []
    for node in program.stmts:
        if isinstance(node, Loop):
            events.append((pos, {a.target for a in node.accums}, set()))
            pos += 1
            local = {s.target for s in node.body} | {node.index}
            outer_uses = set()
            for stmt in node.body:
                uses = stmt.expr.free_symbols
                events.append((pos, {stmt.target}, uses & local))
                outer_uses |= uses - local
                pos += 1
            for acc in node.accums:
                uses = acc.expr.free_symbols
                events.append((pos, set(), uses & local))
                outer_uses |= uses - local
                pos += 1
            events.append((pos, set(), outer_uses))  # live for the whole loop
            pos += 1
        else:
            events.append((pos, {node.target}, node.expr.free_symbols))
            pos += 1
    outputs = set().union(*(sp.sympify(e).free_symbols for _, e in program.outputs)) if program.outputs else set()
    events.append((pos, set(), outputs))
    return events


def peak_live_bytes(model: Model, program: Program, batch: int) -> int:
    """The largest total size of simultaneously live intermediates, in bytes."""
    from .derive import n_vectors

    shapes = program_shapes(model, program, n_vectors(model))
    itemsize = np.dtype(model.dtype).itemsize
    inputs = set(program.inputs)
    first, last = {}, {}
    for pos, defined, used in _events(program):
        for s in defined:
            first.setdefault(s, pos)
        for s in used:
            last[s] = pos
    live_at = {}
    for s, start in first.items():
        if s in inputs:
            continue
        size = nbytes(shapes[s.name], batch, itemsize)
        for pos in range(start, last.get(s, start) + 1):
            live_at[pos] = live_at.get(pos, 0) + size
    return max(live_at.values(), default=0)
