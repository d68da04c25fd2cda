"""Print a schedule (`dbpgen.backend.schedule`) as the lines of Python functions.

Nothing is decided here: every node prints one way. Array expressions print with
`printer.NumbaPrinter`, the bodies of scalar loops (`For.scalar`) with the scalar printer;
decorators come from DECORATORS by the name a Function carries. The printers record the
helpers they call, which is how the module knows which helpers to print.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Kbox
from ..printer import NumbaPrinter, ScalarPrinter
from .schedule import OPEN, Alloc, AddTo, Call, For, Free, Function, Int, Let, Store, View

FASTMATH_LANES = '{"reassoc", "contract", "nsz", "arcp"}'  # sums vectorize; NaN and inf kept
# error_model="numpy": x / 0 is inf or nan, as in NumPy, instead of Python's ZeroDivisionError.
# Python's model tests every divisor, and that branch keeps LLVM from vectorizing any loop
# with a division (softsign's fused loop: 3.5x slower).
DECORATORS = {
    "": "",
    "njit": '@numba.njit(cache=True, error_model="numpy")',
    "reassoc": '@numba.njit(cache=True, error_model="numpy", fastmath={"reassoc"})',
    "lanes": f'@numba.njit(cache=True, error_model="numpy", fastmath={FASTMATH_LANES})',
    # a scalar helper that calls others (_softplus1): Numba inlines its IR at every call, so
    # that LLVM sees the calls it makes in the loop and inlines them there (their sum is over
    # LLVM's inlining threshold, each alone is not), and vectorizes the loop
    "inline": '@numba.njit(cache=True, error_model="numpy", inline="always")',
    # plain NumPy with an np.where: both branches are evaluated, so the one not taken may
    # divide by zero (p'(s) = 1 / (2 sqrt(s)) where s = 0 selects 0); jitted code never warns
    "masked": '@np.errstate(divide="ignore", invalid="ignore")',
}


# helpers the lowerings call by name (Call nodes); the printers name the others
SCHEDULE_HELPERS = ("_dense_Kbox", "_dense_K_into", "_dense_KT_into", "_copy_into", "_row_K", "_row_KT", "_box_add",
                    "_onehots", "_stack_rows", "_tile", "_blocks", "_blocksum_add")
# helpers that call other helpers
DEPENDS = {"_dense_Kbox2": {"_dense_Kbox"}, "_sigmoid1": {"_exp1"}, "_softplus1": {"_exp1", "_log1p01"}}


def with_dependencies(helpers) -> set[str]:
    """The named helpers and every helper they call, directly or not."""
    found, todo = set(), list(helpers)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += DEPENDS.get(name, ())
    return found


class _ScheduleNames(NumbaPrinter):
    """Printing of the schedule's own expressions (elements, row blocks, run-time sizes),
    and a record of every helper the printed code calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helpers: set[str] = set()
        self.integers = 0  # > 0 while printing sizes, indices and bounds: integers stay ints

    def index(self, expr) -> str:
        """An integer expression (a size, an index, a bound): never in the model's dtype."""
        self.integers += 1
        try:
            return self._print(sp.sympify(expr))
        finally:
            self.integers -= 1

    def _print_Integer(self, expr):
        return str(int(expr)) if self.integers else super()._print_Integer(expr)

    def _print_Int(self, expr):
        return self.index(expr.args[0])

    def _print_Min(self, expr):
        if self.integers:  # Python's min of integers: an integer, as range() needs
            return f"min({', '.join(self._print(a) for a in expr.args)})"
        return super()._print_Min(expr)

    def _use(self, code: str, name: str) -> str:
        self.helpers |= with_dependencies({name})
        return code

    def _print_Indexed(self, expr):
        index = ", ".join(self.index(i) for i in expr.indices)
        return f"{expr.base.label}[{index}]"

    def _print_Rows(self, expr):
        a, start, stop = expr.args
        lo = "" if start == OPEN else self.index(start)
        hi = "" if stop == OPEN else self.index(stop)
        return f"{self._print(a)}[{lo}:{hi}]"

    def _print_Shape(self, expr):
        return f"{self._print(expr.args[0])}.shape[{int(expr.args[1])}]"

    # the printer's helper calls, recorded
    def _call(self, name, expr):
        return self._use(super()._call(name, expr), name)

    def _layer_call(self, expr, suffix):
        layer = self.model.layers[expr.layer - 1]
        return self._use(super()._layer_call(expr, suffix), layer.op.kernel_name(suffix, layer.in_shape))

    def _print_BiasBox(self, expr):
        layer = self.model.layers[int(expr.args[0]) - 1]
        return self._use(super()._print_BiasBox(expr), layer.op.bias_sum(layer.out_shape))

    def _print_Add(self, expr, order=None):
        boxes = [a for a in expr.args if isinstance(a, Kbox)]
        if len(expr.args) == 2 and len(boxes) == 2 and boxes[0].layer == boxes[1].layer \
                and self.model.layers[boxes[0].layer - 1].op.stacked_kbox:
            self._use("", "_dense_Kbox2")  # the printer sums them in place (eq. 31-32)
        return super()._print_Add(expr, order=order)

    def _function(self, entry, args):
        helper = entry.helper(self.SCALAR)
        code = super()._function(entry, args)
        return self._use(code, helper) if helper else code

    def _print_Dot(self, expr):
        return self._use(super()._print_Dot(expr), "_rowdot2" if self._matrices(expr) else "_rowdot")

    def _print_Gram(self, expr):
        return self._use(super()._print_Gram(expr), "_gram")

    def _print_OneHot(self, expr):
        return self._use(super()._print_OneHot(expr), "_onehot")


class ArrayCode(_ScheduleNames, NumbaPrinter):
    """Whole-array statements."""

    selects = False  # printed an np.where, which evaluates both branches

    def _select(self, cond: str, value: str, other: str) -> str:
        self.selects = True
        return super()._select(cond, value, other)


class ScalarCode(_ScheduleNames, ScalarPrinter):
    """One element per statement, inside scalar loops (the lowerings index every array)."""

    COORDINATEWISE = ScalarPrinter.COORDINATEWISE + (sp.Indexed, sp.IndexedBase, Int)


def _dims(shape, printer) -> str:
    dims = [printer.index(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


class Printer:
    """Lines of one function: (code, comment) pairs."""

    def __init__(self, model, shape_of=None):
        self.array = ArrayCode(model, shape_of)
        self.scalar = ScalarCode(model)
        self.lines: list[tuple[str, str]] = []

    @property
    def helpers(self) -> set[str]:
        return self.array.helpers | self.scalar.helpers

    def nodes(self, nodes, depth: int = 0, scalar: bool = False) -> None:
        p = self.scalar if scalar else self.array
        pad = "    " * depth
        for node in nodes:
            if isinstance(node, Alloc):
                fill = "zeros" if node.zero else "empty"
                code = f"{node.target} = np.{fill}({_dims(node.shape, self.array)}, dtype=DTYPE)"
            elif isinstance(node, View):
                code = f"{node.target} = {node.base}[{node.start}:{node.stop}]"
            elif isinstance(node, Let):
                code = f"{node.target} = {p.doprint(node.value)}"
            elif isinstance(node, Store):
                code = f"{p.doprint(node.target)} = {p.doprint(node.value)}"
            elif isinstance(node, AddTo):
                code = f"{p.doprint(node.target)} += {p.doprint(node.value)}"
            elif isinstance(node, Call):
                call = f"{node.function}({', '.join(self.array.doprint(a) for a in node.args)})"
                if not node.targets:
                    code = call
                elif node.plain:
                    code = f"{', '.join(node.targets)} = {call}"
                elif len(node.targets) == 1:
                    code = f"{node.targets[0]} = {call}[0]"
                else:
                    code = f"{', '.join(node.targets)} = {call}"
            elif isinstance(node, Free):
                code = f"del {', '.join(node.names)}"
            elif isinstance(node, For):
                stop = self.array.index(node.stop)
                if node.start == 0 and node.step == 1:
                    bounds = stop
                else:
                    start = self.array.index(node.start)
                    bounds = f"{start}, {stop}" + (f", {node.step}" if node.step != 1 else "")
                self.lines.append((f"{pad}for {node.var} in range({bounds}):", node.comment))
                self.nodes(node.body, depth + 1, scalar or node.scalar)
                continue
            else:
                raise TypeError(f"cannot print {node!r}")
            self.lines.append((pad + code, node.comment))


def function(fn: Function, model, shape_of=None) -> tuple[dict, set[str], set[str]]:
    """The template's view of one function; the helpers its whole-array statements call
    (operator kernels, array helpers); the ones its scalar loops call (_tanh1, ...)."""
    printer = Printer(model, shape_of)
    printer.nodes(fn.body)
    returns = [printer.array.doprint(r) for r in fn.returns]
    calls = {node.function for node in _calls(fn.body)}
    decorator = "masked" if fn.decorator == "" and printer.array.selects else fn.decorator
    return ({"name": fn.name, "args": list(fn.params), "lines": printer.lines, "returns": returns,
             "labels": list(fn.labels), "jit": DECORATORS[decorator]},
            printer.array.helpers | calls, printer.scalar.helpers)


def _calls(nodes):
    for node in nodes:
        if isinstance(node, Call):
            yield node
        elif isinstance(node, For):
            yield from _calls(node.body)
