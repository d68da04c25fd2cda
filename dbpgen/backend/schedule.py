"""The schedule IR: how a derived program runs, between `Program` and text.

    Module   := Function+                     every program's entry function and the kernels
                                              (fused loops) the entries call
    Function := name params Node* returns decorator
    Node     := Alloc | View | Let | Store | AddTo | For | Call | Free
    Expr     := a SymPy expression over names (Symbols), elements (Indexed), row ranges
                (Rows) and the program vocabulary of `dbpgen.functions`

A lowering (`dbpgen.backend.lanes`, `.fused`, `.arrays`) turns a Program into Functions;
`dbpgen.backend.emit` prints them; `verify` checks them. Whether a statement is array code
or scalar code is the node's business (`For.scalar`: its body computes single elements),
so printers decide nothing. Everything is a frozen dataclass: two identical kernels are
equal values, which is how a module shares one fused loop among its programs and layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union

import sympy as sp

# -- expressions the schedule adds to the program vocabulary -----------------------------


class Rows(sp.Function):
    """a[start:stop]: a block of rows of an array (a view, no copy)."""

    nargs = 3  # (array, start, stop); start or stop None-like: Integer(-1) means open

    def _sympystr(self, printer):
        a, start, stop = self.args
        lo = "" if start == OPEN else printer._print(start)
        hi = "" if stop == OPEN else printer._print(stop)
        return f"{printer._print(a)}[{lo}:{hi}]"


OPEN = sp.Integer(-1)  # an open end of a Rows range


class Int(sp.Function):
    """An integer expression (a count of samples in a chunk): printed in integer arithmetic."""

    nargs = 1


class Shape(sp.Function):
    """a.shape[axis]: a size read at run time."""

    nargs = 2

    def _sympystr(self, printer):
        return f"{printer._print(self.args[0])}.shape[{int(self.args[1])}]"


def elem(name: str, *index) -> sp.Indexed:
    """name[index...], real-valued (so SymPy keeps the algebra it did on real symbols)."""
    return sp.Indexed(sp.IndexedBase(name, real=True), *index)


def name(text: str) -> sp.Symbol:
    return sp.Symbol(text, real=True)


Dim = Union[int, sp.Expr]

# -- nodes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alloc:
    """target = a new array of `shape` in the model's dtype, zero-filled or not."""

    target: str
    shape: tuple[Dim, ...]
    zero: bool = False
    comment: str = ""


@dataclass(frozen=True)
class View:
    """target = rows [start, stop) of `base` (a block of a workspace, no copy)."""

    target: str
    base: str
    start: int
    stop: int
    comment: str = ""


@dataclass(frozen=True)
class Let:
    """target = value: an array (whole-batch code) or a scalar (inside a scalar loop)."""

    target: str
    value: sp.Expr
    comment: str = ""


@dataclass(frozen=True)
class Store:
    """target[...] = value, target an element (Indexed) or a block of rows (Rows)."""

    target: sp.Expr
    value: sp.Expr
    comment: str = ""


@dataclass(frozen=True)
class AddTo:
    """target += value: an accumulation (an element, a scalar, or a whole array)."""

    target: sp.Expr
    value: sp.Expr
    comment: str = ""


@dataclass(frozen=True)
class For:
    """for var in range(start, stop, step): body. With scalar, the body computes single
    elements (printed with scalar functions: math.tanh, a conditional expression)."""

    var: str
    stop: Dim
    body: tuple
    start: Dim = 0
    step: int = 1
    scalar: bool = False
    comment: str = ""


@dataclass(frozen=True)
class Call:
    """targets = function(args), or targets = function(args)[0] for one target (kernels
    return tuples); with plain, the function returns one value (a helper)."""

    targets: tuple[str, ...]
    function: str
    args: tuple[sp.Expr, ...]
    plain: bool = False
    comment: str = ""
    into: tuple[str, ...] = ()  # targets written into given arrays (views: no memory of their own)


@dataclass(frozen=True)
class Free:
    """del names: arrays a Python function no longer reads (a plain Python function keeps
    every local alive to its return otherwise; a jitted one frees at last use by itself)."""

    names: tuple[str, ...]
    comment: str = ""


Node = Union[Alloc, View, Let, Store, AddTo, For, Call, Free]


@dataclass(frozen=True)
class Function:
    """One emitted function. decorator names an entry of emit.DECORATORS ("" = plain Python)."""

    name: str
    params: tuple[str, ...]
    body: tuple
    returns: tuple[sp.Expr, ...]
    labels: tuple[str, ...] = ()
    decorator: str = ""
    shapes: tuple = field(default=(), compare=False)  # (name, shape) of arrays, for memory

    def array_shapes(self) -> dict:
        return dict(self.shapes)


@dataclass(frozen=True)
class Schedule:
    """How one program runs: its entry function, the kernels it calls, and why."""

    kind: str  # lanes | jit | fused | kernels | count
    entry: Function
    kernels: tuple[Function, ...] = ()
    reason: str = ""


def walk(nodes) -> Iterator[Node]:
    """Every node, loop bodies included, in order."""
    for node in nodes:
        yield node
        if isinstance(node, For):
            yield from walk(node.body)


class ScheduleError(AssertionError):
    pass


# names a function may read without defining them: the module's globals
GLOBALS = {"np", "math", "numba", "DTYPE", "COUNTS"}


def _reads(expr) -> set[str]:
    expr = sp.sympify(expr)
    names = {s.name for s in expr.free_symbols if isinstance(s, sp.Symbol)}
    names |= {str(b.label) for b in expr.atoms(sp.IndexedBase)}
    for idx in expr.atoms(sp.Indexed):
        names -= {str(idx)}
    return names


# helpers called for what they write into an argument (a Call with no targets)
PROCEDURES = frozenset({"_copy_into", "_row_K", "_row_KT", "_box_add", "_blocksum_add"})


def verify(fn: Function, callable_names: set[str]) -> Function:
    """Every name is a parameter, a global or defined before it is read, in scope; loops
    have bodies; stores and accumulations go to arrays that exist; calls name known
    functions (helpers, operator kernels, this module's kernels)."""

    def check(expr, where, scope):
        missing = _reads(expr) - scope - GLOBALS
        if missing:
            raise ScheduleError(f"{fn.name}: {where} reads undefined {sorted(missing)}")

    def visit(nodes, scope):
        for node in nodes:
            if isinstance(node, Alloc):
                for d in node.shape:
                    check(d, node.target, scope)
                scope.add(node.target)
            elif isinstance(node, View):
                if node.base not in scope:
                    raise ScheduleError(f"{fn.name}: view {node.target} of unknown {node.base}")
                scope.add(node.target)
            elif isinstance(node, Let):
                check(node.value, node.target, scope)
                scope.add(node.target)
            elif isinstance(node, (Store, AddTo)):
                check(node.value, str(node.target), scope)
                check(node.target, str(node.target), scope)
            elif isinstance(node, Call):
                if node.function not in callable_names:
                    raise ScheduleError(f"{fn.name}: call of unknown function {node.function}")
                if not node.targets and node.function not in PROCEDURES:
                    raise ScheduleError(f"{fn.name}: call of {node.function} assigns nothing")
                for a in node.args:
                    check(a, node.function, scope)
                scope.update(node.targets)
            elif isinstance(node, Free):
                missing = set(node.names) - scope
                if missing:
                    raise ScheduleError(f"{fn.name}: frees undefined {sorted(missing)}")
                scope -= set(node.names)
            elif isinstance(node, For):
                if not node.body:
                    raise ScheduleError(f"{fn.name}: empty loop over {node.var}")
                check(node.stop, f"range of {node.var}", scope)
                check(node.start, f"range of {node.var}", scope)
                visit(node.body, set(scope) | {node.var})  # loop locals stay inside
            else:
                raise ScheduleError(f"{fn.name}: unknown node {node!r}")

    if not fn.returns:
        raise ScheduleError(f"{fn.name}: returns nothing")
    scope = set(fn.params)
    visit(fn.body, scope)
    for value in fn.returns:
        check(value, "return", scope)
    return fn
