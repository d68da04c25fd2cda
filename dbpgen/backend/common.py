"""What every lowering shares: temporaries, hoisting of reductions out of coordinate-wise
expressions, batch-sum terms, element indexing, and freezing built nodes.

A lowering reads a simplified Program and writes schedule nodes; nothing is derived in a
lowering (the statements, their order and their operands are the program's).
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import sympy as sp

from ..functable import ELEMENTWISE_TYPES, TRANSCENDENTAL_TYPES, VECTORIZED_TYPES
from ..functions import Bias, BiasBox, BSum, Dot, K, Kbox, KT, RowSum, linear_terms
from ..ir import Model
from ..printer import CodegenError
from ..program import BATCH, Stmt
from ..shapes import BATCH_AXIS, shape_of
from .schedule import elem, name

# coordinate-wise SymPy node types, and the functions that cost a libm call per element
# (NumPy's ufuncs beat Numba's scalar calls; tanh, exp, log, sigmoid and softplus are not
# among them, they are VECTORIZED): from the one function table
ELEMENTWISE = ELEMENTWISE_TYPES
TRANSCENDENTAL = TRANSCENDENTAL_TYPES
VECTORIZED = VECTORIZED_TYPES  # polynomials in loops (_tanh1, _exp1, ...): cheap enough to fuse
PER_SAMPLE_OPS = (K, KT, Dot, RowSum)  # reductions within a sample
BATCH_OPS = (Kbox, BSum, BiasBox)      # reductions over the batch (eq. 31-33)
LEAVES = (sp.Symbol, sp.Number, sp.NumberSymbol, sp.logic.boolalg.BooleanAtom)

B = name("B")  # the batch size as an integer (BATCH, the program's symbol, prints as a float)


class Unsupported(CodegenError):
    """A program this lowering does not cover: the chooser picks another."""


def coordinatewise(expr: sp.Expr, cheap_only: bool = False) -> bool:
    """Only coordinate-wise nodes (with cheap_only: and no transcendental function)."""
    if not all(isinstance(n, ELEMENTWISE) or n.is_Integer for n in sp.preorder_traversal(expr)):
        return False
    return not (cheap_only and expr.has(*TRANSCENDENTAL))


def without_bias(expr: sp.Expr) -> sp.Expr:
    """Bias(j, b) -> b: inside an element loop the bias is indexed like any 1-d array."""
    return expr.replace(lambda e: isinstance(e, Bias), lambda e: e.args[1])


def batch_terms(expr: sp.Expr) -> list[tuple[sp.Expr, sp.Expr | None]]:
    """expr as sum_t c_t Op_t with Op_t a batch reduction (eq. 31-33); see linear_terms."""
    return linear_terms(expr, BATCH_OPS)


def batch_sum_arg(expr):
    """a for a sum over the batch, BSum(a) or a bias adjoint BiasBox(j, a) (eq. 33), else None."""
    if isinstance(expr, BSum):
        return expr.args[0]
    if isinstance(expr, BiasBox):
        return expr.args[1]
    return None


def columns(shape) -> int | None:
    """n for a whole-batch (B, n) value, else None."""
    return shape[1] if len(shape) == 2 and shape[0] == BATCH_AXIS else None


def is_per_sample(shape) -> bool:
    return len(shape) >= 1 and shape[0] == BATCH_AXIS


def operations(expr: sp.Expr) -> int:
    return sum(1 for n in sp.preorder_traversal(expr) if not isinstance(n, LEAVES + (Bias,)))


def elements(expr: sp.Expr, index) -> sp.Expr:
    """expr with every array symbol replaced by its element: index(symbol) -> the element
    (an Indexed), or None to leave the symbol (a scalar, or a local value)."""
    expr = without_bias(expr)
    mapping = {}
    for sym in expr.free_symbols:
        if sym == BATCH:
            continue
        element = index(sym)
        if element is not None:
            mapping[sym] = element
    return expr.xreplace(mapping)


def _exp_power(e: sp.Expr, made: dict):
    """exp(n a) as made[exp(a)]**n for an integer 2 <= n <= 4, else None."""
    if e.func != sp.exp:
        return None
    coeff, rest = e.args[0].as_coeff_Mul()
    if coeff.is_Integer and 2 <= coeff <= 4 and sp.exp(rest) in made:
        return made[sp.exp(rest)] ** int(coeff)
    return None


def _place(out: list, stmt) -> None:
    """Insert stmt into out right after the last statement that defines a value it reads."""
    reads = {s.name for s in stmt.expr.free_symbols}
    at = 0
    for index, node in enumerate(out):
        if isinstance(node, Stmt) and node.target.name in reads:
            at = index + 1
        elif not isinstance(node, Stmt):
            at = index + 1  # never move a statement above a loop
    out.insert(at, stmt)


class Lowering:
    """Temporaries and hoisting, shared by the lowerings."""

    def __init__(self, model: Model, program, shapes: dict):
        self.model = model
        self.program = program
        self.shapes = dict(shapes)
        self.temps = 0

    def shape(self, expr) -> tuple:
        return shape_of(expr, self.shapes, self.model)

    def new_temp(self, expr: sp.Expr) -> sp.Symbol:
        """A fresh name t<n>_ for the value of expr (its shape recorded)."""
        sym = sp.Symbol(f"t{self.temps}_")
        self.temps += 1
        self.shapes[sym.name] = self.shape(expr)
        return sym

    def share_transcendentals(self, nodes: list) -> list:
        """Each transcendental application f(a) of the statements (a coordinate-wise)
        computed once, as its own statement right after the values it reads, and read from
        there on. SymPy's g, g' and g'' of an activation repeat the same f(z) (mish's g''
        holds log(exp(z) + 1) four times and exp(z) eight); as NumPy expressions each one is
        a ufunc pass over the layer, and what remains of g, g', g'' is arithmetic that one
        fused loop takes. A statement that is one application itself (x1 = sigmoid(z1))
        keeps it and lends its name to the others; exp(n a) for a small
        integer n reads exp(a)**n when exp(a) is made. The vectorized functions are shared
        too: in a loop each is a scalar of its own, in whole arrays a ufunc pass."""
        types = TRANSCENDENTAL + VECTORIZED
        made: dict = {}
        out: list = []
        for node in nodes:
            if not isinstance(node, Stmt) or not node.expr.has(*types):
                out.append(node)
                continue

            def visit(e, top=False):
                if isinstance(e, LEAVES) or not e.args:
                    return e
                args = tuple(visit(a) for a in e.args)
                if args != e.args:
                    e = e.func(*args)
                if not isinstance(e, types) or not coordinatewise(e, False):
                    return e
                if e in made:
                    return made[e]
                power = _exp_power(e, made)
                if power is not None:
                    return power
                if top:
                    made[e] = node.target
                    return e
                sym = self.new_temp(e)
                made[e] = sym
                _place(out, Stmt(sym, e, node.phase, node.eq))
                return sym

            out.append(replace(node, expr=visit(node.expr, top=True)))
        return out

    @staticmethod
    def hoist_out(expr: sp.Expr, take, replace_with, mapping: dict | None = None) -> sp.Expr:
        """expr with each maximal subexpression for which take(e) holds replaced by
        replace_with(e) (which evaluates it first, into a temporary); `mapping` remembers
        what was hoisted, so that a later statement reuses the temporary."""
        mapping = {} if mapping is None else mapping

        def visit(e):
            if e in mapping:
                return
            if take(e):
                mapping[e] = replace_with(e)
                return
            for a in e.args:
                visit(a)

        visit(expr)
        return expr.xreplace(mapping)


def free_dead(body: list, returns, params) -> list:
    """body with `del` after the last top-level read of each array it makes (plain Python
    keeps every local to the return: mnist_cdb's value_and_grad would hold 60 MB at batch
    1024 instead of 41). Returned names and parameters stay; a loop reads what its body reads."""
    from .schedule import Alloc, AddTo, Call, For, Free, Let, Store, View, _reads

    def made(node) -> list[str]:
        if isinstance(node, (Alloc, View, Let)):
            return [node.target]
        if isinstance(node, Call):
            return list(node.targets)
        return []

    def reads(node) -> set[str]:
        if isinstance(node, For):
            return set().union(_reads(node.stop), _reads(node.step), *(reads(n) for n in node.body))
        if isinstance(node, (Let,)):
            return _reads(node.value)
        if isinstance(node, (Store, AddTo)):
            return _reads(node.value) | _reads(node.target)
        if isinstance(node, Call):
            return set().union(*(_reads(a) for a in node.args)) if node.args else set()
        if isinstance(node, View):
            return {node.base}
        if isinstance(node, Alloc):
            return set().union(*(_reads(d) for d in node.shape)) if node.shape else set()
        return set()

    keep = set(params) | {"B"} | set().union(*(_reads(r) for r in returns)) if returns else set(params) | {"B"}
    defined = {n for node in body for n in made(node)}
    last = {}
    for index, node in enumerate(body):
        for n in made(node) + sorted(reads(node)):
            last[n] = index
    out = []
    for index, node in enumerate(body):
        out.append(node)
        dead = sorted(n for n in defined - keep if last.get(n) == index)
        if dead:
            out.append(Free(tuple(dead)))
    return out


def freeze(node):
    """Lists built during lowering -> tuples (schedule nodes are immutable values)."""
    if isinstance(node, list):
        return tuple(freeze(n) for n in node)
    if isinstance(node, tuple):
        return tuple(freeze(n) for n in node)
    if is_dataclass(node):
        changes = {f.name: freeze(getattr(node, f.name)) for f in fields(node)
                   if isinstance(getattr(node, f.name), (list, tuple))}
        return replace(node, **changes) if changes else node
    return node


__all__ = ["B", "BATCH_OPS", "ELEMENTWISE", "LEAVES", "Lowering", "PER_SAMPLE_OPS", "TRANSCENDENTAL", "VECTORIZED",
           "Unsupported", "batch_sum_arg", "batch_terms", "columns", "coordinatewise",
           "elem", "elements", "freeze", "is_per_sample", "operations", "without_bias"]
