"""Derived programs: SSA code over batches of arrays, with accumulating loops.

    Program := name inputs Node* outputs fired
    Node    := Stmt | Loop
    Stmt    := target = expr                         # phase, paper equation
    Loop    := for index in range(count): Stmt*      # body targets are loop-local
               then target += expr for each Accum     # sums over the iterations

`expr` is a SymPy expression over earlier targets and the inputs, built from the vocabulary
in `dbpgen.functions`. Loops carry the C double backpropagations of Jacobian penalties
(paper section 5.4, Algorithm 4): only the accumulators outlive an iteration, so memory
does not grow with C. Passes are pure functions Program -> Program; `verify` checks the
SSA and scoping invariants after each of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Union

import sympy as sp

from .functions import Gram, GramBox, GramMul, GramOut, K, KT, Kbox

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
class Accum:
    """target = sum over the loop's iterations of expr (expr is evaluated in the body)."""

    target: sp.Symbol
    expr: sp.Expr
    eq: str


@dataclass(frozen=True)
class Loop:
    index: sp.Symbol
    count: int
    body: tuple[Stmt, ...]
    accums: tuple[Accum, ...]
    eq: str

    @property
    def phase(self) -> str:
        return self.body[0].phase if self.body else "backward"

    @property
    def target(self) -> sp.Symbol:  # for messages
        return self.index


Node = Union[Stmt, Loop]


def walk(nodes: Iterable[Node]) -> Iterator[Stmt | Accum]:
    """Every statement and accumulation, loop bodies included, in program order."""
    for node in nodes:
        if isinstance(node, Loop):
            yield from node.body
            yield from node.accums
        else:
            yield node


def trips(nodes: Iterable[Node]) -> Iterator[tuple[Stmt | Accum, int]]:
    """Like walk, with how many times each one runs per call."""
    for node in nodes:
        if isinstance(node, Loop):
            for item in node.body + node.accums:
                yield item, node.count
        else:
            yield node, 1


@dataclass(frozen=True)
class Program:
    name: str
    inputs: tuple[sp.Symbol, ...]  # in calling order; parameters first
    stmts: tuple[Node, ...]
    outputs: tuple[tuple[str, sp.Expr], ...]
    fired: tuple[str, ...] = ()

    def with_(self, **changes) -> "Program":
        return replace(self, **changes)

    def used_inputs(self) -> tuple[sp.Symbol, ...]:
        used: set[sp.Symbol] = set()
        for item in walk(self.stmts):
            used |= item.expr.free_symbols
        for _, expr in self.outputs:
            used |= sp.sympify(expr).free_symbols
        return tuple(s for s in self.inputs if s in used)

    def call_args(self) -> list[str]:
        """Argument names of the program's kernel: the inputs it uses, in calling order.
        x0 always comes along: it is where the batch size is read (an affine network with
        a constant v may otherwise not need it)."""
        used = self.used_inputs()
        return [s.name for s in self.inputs if s in used or s.name == "x0"]

    def equations(self) -> dict[str, list[sp.Eq]]:
        """SymPy equations in execution order, grouped by phase; accumulations as a += b."""
        groups: dict[str, list[sp.Eq]] = {}
        for node in self.stmts:
            for item in node.body if isinstance(node, Loop) else (node,):
                groups.setdefault(item.phase, []).append(sp.Eq(item.target, item.expr, evaluate=False))
            if isinstance(node, Loop):
                last = node.body[-1].phase if node.body else node.phase
                for acc in node.accums:
                    groups.setdefault(last, []).append(
                        sp.Eq(acc.target, sp.Add(acc.target, acc.expr, evaluate=False), evaluate=False))
        return groups


def map_exprs(program: Program, fn) -> Program:
    """Apply fn to every expression (statements, loop bodies, accumulations, outputs)."""
    nodes = []
    for node in program.stmts:
        if isinstance(node, Loop):
            node = replace(node, body=tuple(replace(s, expr=fn(s.expr)) for s in node.body),
                           accums=tuple(replace(a, expr=fn(a.expr)) for a in node.accums))
        else:
            node = replace(node, expr=fn(node.expr))
        nodes.append(node)
    outputs = tuple((label, fn(sp.sympify(e))) for label, e in program.outputs)
    return program.with_(stmts=tuple(nodes), outputs=outputs)


def substitute(program: Program, mapping: dict) -> Program:
    """Replace symbols by expressions everywhere."""
    return map_exprs(program, lambda e: sp.sympify(e).xreplace(mapping))


def count_ops(program: Program) -> dict[str, list[int]]:
    """Layer index of every K, K^T and K^box application in one call (loops unrolled)."""
    counts = {"K": [], "KT": [], "Kbox": [], "gram_sample": 0, "gram_call": 0}
    names = {K: "K", KT: "KT", Kbox: "Kbox"}
    items = list(trips(program.stmts)) + [(sp.sympify(e), 1) for _, e in program.outputs]
    for item, times in items:
        expr = item if isinstance(item, sp.Basic) else item.expr
        for node in sp.preorder_traversal(expr):
            kind = names.get(type(node))
            if kind:
                counts[kind].extend([node.layer] * times)
            elif isinstance(node, (GramMul, GramBox)):
                counts["gram_sample"] += times
            elif isinstance(node, (Gram, GramOut)):
                counts["gram_call"] += times
    return counts


def _check_uses(where: str, expr, known: set) -> None:
    missing = sp.sympify(expr).free_symbols - known
    if missing:
        raise AssertionError(f"{where} uses undefined {sorted(map(str, missing))}")


def verify(program: Program) -> Program:
    """SSA and scoping: every symbol is an input, a scalar or an earlier target in scope."""
    known = set(program.inputs) | set(SCALARS)

    def define(target, scope):
        if target in scope:
            raise AssertionError(f"{program.name}: {target} assigned twice")
        scope.add(target)

    for node in program.stmts:
        if isinstance(node, Loop):
            local = known | {node.index}
            for stmt in node.body:
                _check_uses(f"{program.name}: {stmt.target}", stmt.expr, local)
                define(stmt.target, local)
            for acc in node.accums:
                _check_uses(f"{program.name}: {acc.target} +=", acc.expr, local)
            for acc in node.accums:
                define(acc.target, known)
        else:
            _check_uses(f"{program.name}: {node.target}", node.expr, known)
            define(node.target, known)
    for label, expr in program.outputs:
        _check_uses(f"{program.name}: output {label}", expr, known)
    return program
