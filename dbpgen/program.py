"""Derived programs: straight-line SSA code over batches of arrays.

    Program := name inputs Stmt* outputs fired
    Stmt    := target = expr     # phase, paper equation

`expr` is a SymPy expression over earlier targets and the inputs, built from the vocabulary
in `dbpgen.functions`. Passes are pure functions Program -> Program; `verify` checks the
SSA invariants after each of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import sympy as sp

from .functions import BSum, K, KT, Kbox

PHASES = ("forward", "backward", "backward-backward", "forward-backward", "loss", "gradients")

# Scalars that are not arrays: the batch size and the penalty weight lambda.
BATCH = sp.Symbol("B", positive=True)
LAM = sp.Symbol("lam", real=True)
SCALARS = (BATCH, LAM)


@dataclass(frozen=True)
class Stmt:
    target: sp.Symbol
    expr: sp.Expr
    phase: str
    eq: str  # the paper's equation or algorithm line this statement implements

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")


@dataclass(frozen=True)
class Program:
    name: str
    inputs: tuple[sp.Symbol, ...]  # in calling order; parameters first
    stmts: tuple[Stmt, ...]
    outputs: tuple[tuple[str, sp.Expr], ...]
    fired: tuple[str, ...] = ()

    def with_(self, **changes) -> "Program":
        return replace(self, **changes)

    def used_inputs(self) -> tuple[sp.Symbol, ...]:
        used: set[sp.Symbol] = set()
        for stmt in self.stmts:
            used |= stmt.expr.free_symbols
        for _, expr in self.outputs:
            used |= expr.free_symbols
        return tuple(s for s in self.inputs if s in used)

    def equations(self) -> dict[str, list[sp.Eq]]:
        """SymPy equations in execution order, grouped by phase."""
        groups: dict[str, list[sp.Eq]] = {}
        for stmt in self.stmts:
            groups.setdefault(stmt.phase, []).append(sp.Eq(stmt.target, stmt.expr, evaluate=False))
        return groups


def substitute(program: Program, mapping: dict) -> Program:
    """Replace symbols by expressions in every statement and output."""
    stmts = tuple(replace(s, expr=sp.sympify(s.expr).xreplace(mapping)) for s in program.stmts)
    outputs = tuple((label, sp.sympify(e).xreplace(mapping)) for label, e in program.outputs)
    return program.with_(stmts=stmts, outputs=outputs)


def count_ops(exprs: Iterable[sp.Expr]) -> dict[str, list[int]]:
    """Layer indices of every K, K^T and K^box application, one entry per application."""
    counts = {"K": [], "KT": [], "Kbox": []}
    names = {K: "K", KT: "KT", Kbox: "Kbox"}
    for expr in exprs:
        for node in sp.preorder_traversal(expr):
            kind = names.get(type(node))
            if kind:
                counts[kind].append(node.layer)
    return counts


def verify(program: Program) -> Program:
    """SSA: every symbol is an input, a scalar or an earlier target; targets are unique."""
    known = set(program.inputs) | set(SCALARS)
    for stmt in program.stmts:
        missing = stmt.expr.free_symbols - known
        if missing:
            raise AssertionError(f"{program.name}: {stmt.target} uses undefined {sorted(map(str, missing))}")
        if stmt.target in known:
            raise AssertionError(f"{program.name}: {stmt.target} assigned twice")
        known.add(stmt.target)
    for label, expr in program.outputs:
        missing = sp.sympify(expr).free_symbols - known
        if missing:
            raise AssertionError(f"{program.name}: output {label} uses undefined {sorted(map(str, missing))}")
    return program


def is_batch_reduced(expr: sp.Expr) -> bool:
    """Whether an expression is already summed over the batch (a gradient-shaped value)."""
    return any(isinstance(n, (Kbox, BSum)) for n in sp.preorder_traversal(expr))
