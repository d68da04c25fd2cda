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

Every statement and accumulation has a `Role`: which quantity of the paper it computes and
for which layer j (None: not per layer). Passes find statements by role, never by parsing
target names or equation labels: a target's name and `eq` are for printing only, and a
renamed symbol (`rename`) does not turn a pass off. The derivation (`dbpgen.derive`) sets
the roles, passes keep them (`dataclasses.replace` copies the field) and give the
statements they create roles of their own. The quantities (QUANTITIES):

    forward (eq. 8-9)           z, x          z_j = K_j(theta_j, x_{j-1}) + b_j, x_j = g_j(z_j)
                                dg, ddg       g'_j(z_j), g''_j(z_j) (SymPy)
    backward (Alg. 1)           xi, zeta      xi_j (j = L..0, xi_L = v), zeta_j = G'_j xi_j (15-16)
    penalty (eq. 10)            s, R          s = ||xi_0||^2, R = p(s); R_i: one vector's R in a loop
    backward-backward (Alg. 2)  q, h          q_j (j = 0..L, q_0 = grad p), h_j = K_j(q_{j-1}) (20-21)
    forward-backward (Alg. 3)   gamma_out     gamma_L = (dv/d out)^* q_L (29, App. B)
                                eta_out       eta_L = grad_{z_L} R (App. B, or eq. 44)
                                eta, gamma    eta_j (j < L, eq. 28), gamma_{j-1} = K_j^T(eta_j) (30)
    Algorithm 4 (section 5.4)   thetahat      theta^1_j summed over the vectors (an accumulation)
                                etahat, gammahat   eta_j, gamma_j summed over the vectors
    loss backpropagation        delta         delta_j = grad_{z_j} l (eq. 15-16 with v = grad l, 33)
    objective                   loss          J = (1/B) sum_b [l + lam R]
    gradients (eq. 31-33)       grad_W, grad_b      dJ/dW_j, dJ/db_j
                                grad_W_R, grad_b_R  grad R summed over a loop's vectors
    made by passes              eps           eps_j = delta_j + lam eta_j (passes/adjoint.py)
                                source        the part of eta_j a loop sums when the rest of the
                                              recursion runs after it (passes/merge.py)
                                gram, gram_zeta, gram_M   G_1 = W_1 W_1^T, u_1 = G_1 zeta_1 and
                                              M_1 = sum c zeta_1 zeta_1^T (passes/gram.py)
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


QUANTITIES = frozenset({
    "z", "x", "dg", "ddg", "xi", "zeta", "s", "R", "R_i", "q", "h", "gamma_out", "eta_out",
    "eta", "gamma", "thetahat", "etahat", "gammahat", "delta", "loss", "grad_W", "grad_b",
    "grad_W_R", "grad_b_R", "eps", "source", "gram", "gram_zeta", "gram_M"})


@dataclass(frozen=True)
class Role:
    """What a statement computes: a quantity of the paper (QUANTITIES, see the module
    docstring) and its layer j, or None for quantities that are not per layer."""

    quantity: str
    layer: int | None = None

    def __post_init__(self):
        if self.quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {self.quantity!r}")

    def __str__(self) -> str:
        return self.quantity if self.layer is None else f"{self.quantity}_{self.layer}"


@dataclass(frozen=True)
class Stmt:
    target: sp.Symbol
    expr: sp.Expr
    phase: str
    eq: str  # the paper's equation or algorithm line this statement implements (printing only)
    role: Role | None = None  # what it computes; set on every statement of a derived program

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")


@dataclass(frozen=True)
class Accum:
    """target = sum over the loop's iterations of expr (expr is evaluated in the body)."""

    target: sp.Symbol
    expr: sp.Expr
    eq: str
    role: Role | None = None


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


def rename(program: Program, mapping: dict[sp.Symbol, sp.Symbol]) -> Program:
    """Rename symbols everywhere, assigned targets included; roles stay as they were."""
    program = substitute(program, mapping)

    def target(item):
        return replace(item, target=mapping.get(item.target, item.target))

    nodes = tuple(replace(n, body=tuple(map(target, n.body)), accums=tuple(map(target, n.accums)))
                  if isinstance(n, Loop) else target(n) for n in program.stmts)
    inputs = tuple(mapping.get(s, s) for s in program.inputs)
    return program.with_(stmts=nodes, inputs=inputs)


def find(nodes: Iterable[Node], quantity: str) -> dict[int | None, Stmt | Accum]:
    """layer -> the statement or accumulation computing `quantity` (loop bodies included)."""
    return {item.role.layer: item for item in walk(nodes)
            if item.role is not None and item.role.quantity == quantity}


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
    """SSA and scoping: every symbol is an input, a scalar or an earlier target in scope;
    every statement and accumulation has a role."""
    known = set(program.inputs) | set(SCALARS)

    def define(target, scope):
        if target in scope:
            raise AssertionError(f"{program.name}: {target} assigned twice")
        scope.add(target)

    for item in walk(program.stmts):
        if item.role is None:
            raise AssertionError(f"{program.name}: {item.target} has no role")
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
