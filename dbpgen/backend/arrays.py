"""Lowering over whole-batch arrays: each statement is one array expression.

The program prints as it is: a statement `t = expr` becomes `t = <NumPy expression>`, in
which K, K^T and K^box are calls of the operators' kernels (`templates/ops/`), and
Algorithm 4's loop over Jacobian rows (section 5.4) becomes a Python loop whose
accumulators are zeroed before it. Two schedules use it: `kernels` (plain Python calling
jitted kernels) and `count` (plain Python whose kernels count their applications); both
compute each distinct transcendental application once (`Lowering.share_transcendentals`).
`fused` and `jit` start from it too (`dbpgen.backend.fused`).
"""
from __future__ import annotations

import sympy as sp

from dataclasses import fields

from ..program import BATCH, Loop, Program, Stmt
from .common import B, Lowering, free_dead, freeze
from .schedule import AddTo, Alloc, For, Function, Let, Shape, name


def batch_dims(shape) -> tuple:
    """A program shape with the batch axis as the run-time size B."""
    return tuple(B if d == "B" else d for d in shape)


def statements(nodes, shapes: dict) -> list:
    """Schedule nodes of program nodes (statements and Algorithm 4's loops)."""
    out = []
    for node in nodes:
        if not isinstance(node, (Stmt, Loop)):  # already a schedule node (a lowering's own)
            out.append(node)
        elif isinstance(node, Loop):
            for acc in node.accums:
                out.append(Alloc(acc.target.name, batch_dims(shapes[acc.target.name]), zero=True,
                                 comment=f"sum over {node.index}"))
            body = statements(node.body, shapes)
            body += [AddTo(name(acc.target.name), acc.expr, acc.eq) for acc in node.accums]
            out.append(For(node.index.name, node.count, body, comment=node.eq))
        elif node.expr.is_Number:  # only in unsimplified programs: keep it an array
            out.append(Alloc(node.target.name, batch_dims(shapes[node.target.name]), zero=True, comment=node.eq))
            if node.expr != 0:
                out.append(AddTo(name(node.target.name), node.expr))
        else:
            out.append(Let(node.target.name, node.expr, node.eq))
    return out


def returns(program: Program, shapes: dict) -> tuple[list, list]:
    """(allocations of outputs proven zero, returned values)."""
    zeros, values = [], []
    for label, expr in program.outputs:
        if expr == 0:  # a gradient proven zero (section 5.3): keep the API's shape
            zeros.append(Alloc(f"{label}_out", batch_dims(shapes[label]), zero=True, comment=f"{label} = 0"))
            values.append(name(f"{label}_out"))
        else:
            values.append(sp.sympify(expr))
    return zeros, values


def _exprs(node):
    """Every SymPy expression in a schedule node, loop bodies included."""
    for f in fields(node):
        value = getattr(node, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, sp.Basic):
                yield item
            elif isinstance(item, (For, Let, Alloc, AddTo)) or hasattr(item, "__dataclass_fields__"):
                yield from _exprs(item)


def uses_batch(nodes, values) -> bool:
    """Whether the batch size is read (the program's B, or the size of an array)."""
    exprs = [e for node in nodes for e in _exprs(node)] + [sp.sympify(v) for v in values]
    return any(e.has(BATCH) or e.has(B) for e in exprs)


def function(program: Program, body: list, shapes: dict, decorator: str, zeros=(), values=()) -> Function:
    body = freeze(list(body) + list(zeros))
    head = [Let("B", Shape(name("x0"), 0), "batch size")] if uses_batch(body, values) else []
    if not decorator:  # plain Python holds every local to the return: free them at last use
        body = free_dead(list(body), values, program.call_args())
    return freeze(Function(f"_{program.name}", tuple(program.call_args()), head + list(body),
                           tuple(values), tuple(label for label, _ in program.outputs), decorator,
                           shapes=tuple(shapes.items())))


def lower(model, program: Program, shapes: dict) -> Function:
    """The program as plain Python over whole arrays (kernels, count): NumPy evaluates what
    it is given, so each distinct transcendental application (tanh included) is computed once."""
    lowering = Lowering(model, program, shapes)
    stmts, shapes = lowering.share_transcendentals(program.stmts), lowering.shapes
    zeros, values = returns(program, shapes)
    return function(program, statements(stmts, shapes), shapes, "", zeros, values)
