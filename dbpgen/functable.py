"""The coordinate-wise functions of activation and penalty expressions: one table.

Everything that needs to know the vocabulary reads it from here: the expression parser
(`dbpgen.expr`: which names a model file may call, with how many arguments), the printers
(`dbpgen.printer`: NumbaPrinter prints whole arrays with `array`, ScalarPrinter one element
inside a jitted loop with `scalar`) and the back end's schedules (`ELEMENTWISE_TYPES`: what
may be evaluated one coordinate at a time; `TRANSCENDENTAL_TYPES`: what costs a libm call
per coordinate; `VECTORIZED_TYPES`: what costs a polynomial in a vectorized loop).

A form is a `str.format` template: `{0}`, `{1}`, ... are the printed arguments, `{one}` and
`{zero}` the literals 1 and 0 in the model's dtype. A function taking any number of
arguments (Max, Min) has a two-argument form, folded left over the arguments.

Scalar forms are the NumPy ufuncs, not `math`: Numba compiles both to the same call and
keeps float32, but under NUMBA_DISABLE_JIT (plain Python) math.log(0), math.sqrt(-1) and
math.exp(1000) raise where NumPy returns -inf, NaN and inf, as the array forms do. erf has
no NumPy ufunc: math.erf, which returns a number for every input (NaN for NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .functions import Bias, Sigmoid, Softplus


@dataclass(frozen=True)
class Function:
    """One coordinate-wise function of the expression language.

    name          the name a model file calls it by (aliases: ALIASES)
    sympy         the SymPy class of its values (sp.tanh, Sigmoid, ...); for sqrt, whose
                  values are Pow(x, 1/2), the callable sp.sqrt (see `is_class`)
    min_args, max_args   arity; max_args None: any number (folded left, see `fold`)
    array         how it prints on whole arrays, e.g. "np.tanh({0})", "_sigmoid({0})"
    scalar        how it prints on one element inside a jitted loop, e.g. "_sigmoid1({0})"
    array_helper, scalar_helper   the module-level helper (templates/helpers.py.j2) a form
                  calls, or None for NumPy / math / builtins
    transcendental  a libm call per coordinate in a loop (sin, cos, erf, sinh, ...):
                  NumPy's ufuncs beat a scalar loop; cheap ones (Abs, sign, Heaviside,
                  Max, Min, sqrt: one or two instructions) fuse into loops
    vectorized    its scalar form is arithmetic only, no libm call (tanh: `_tanh1`, a
                  polynomial, selects and bit casts; exp, log, sigmoid, softplus alike,
                  dbpgen/backend/polynomials.py): LLVM vectorizes the loop around it, so it fuses
                  into loops like the cheap ones, at its own price per coordinate
                  (`backend.cost.Machine.vector_element`); not transcendental
    """

    name: str
    sympy: object
    min_args: int
    max_args: int | None
    array: str
    scalar: str
    array_helper: str | None = None
    scalar_helper: str | None = None
    transcendental: bool = False
    vectorized: bool = False

    @property
    def is_class(self) -> bool:
        """Whether SymPy keeps applications of it as instances of `sympy` (all but sqrt)."""
        return isinstance(self.sympy, type)

    @property
    def fold(self) -> bool:
        """Whether it takes any number of arguments, printed as nested two-argument forms."""
        return self.max_args is None

    def form(self, scalar: bool) -> str:
        return self.scalar if scalar else self.array

    def helper(self, scalar: bool) -> str | None:
        return self.scalar_helper if scalar else self.array_helper


def _ufunc(name: str, sympy, numpy: str | None = None) -> Function:
    """A transcendental function NumPy has as a ufunc: the same call on arrays and scalars."""
    code = f"np.{numpy or name}({{0}})"
    return Function(name, sympy, 1, 1, code, code, transcendental=True)


def _vectorized(name: str, sympy, numpy: str | None = None) -> Function:
    """A function NumPy has as a SIMD ufunc on whole arrays, and that a loop computes as a
    vectorized polynomial (`_<name>1`, templates/helpers.py.j2)."""
    return Function(name, sympy, 1, 1, f"np.{numpy or name}({{0}})", f"_{name}1({{0}})",
                    scalar_helper=f"_{name}1", vectorized=True)


_ENTRIES = (
    _vectorized("exp", sp.exp),
    _vectorized("log", sp.log),
    _vectorized("tanh", sp.tanh),
    _ufunc("sinh", sp.sinh),
    _ufunc("cosh", sp.cosh),
    _ufunc("sin", sp.sin),
    _ufunc("cos", sp.cos),
    _ufunc("tan", sp.tan),
    _ufunc("atan", sp.atan, "arctan"),
    _ufunc("asinh", sp.asinh, "arcsinh"),
    # NumPy has no erf: a jitted loop of math.erf on arrays, math.erf itself on scalars
    Function("erf", sp.erf, 1, 1, "_erf({0})", "math.erf({0})", array_helper="_erf",
             transcendental=True),
    # numerically stable kernels: exp of -|z| only, never an overflow; in loops, from the
    # vectorized _exp1 (and _log1p01)
    Function("sigmoid", Sigmoid, 1, 1, "_sigmoid({0})", "_sigmoid1({0})",
             array_helper="_sigmoid", scalar_helper="_sigmoid1", vectorized=True),
    Function("softplus", Softplus, 1, 1, "_softplus({0})", "_softplus1({0})",
             array_helper="_softplus", scalar_helper="_softplus1", vectorized=True),
    # sqrt(x) is Pow(x, 1/2) in SymPy: the printers' _print_Pow uses these forms
    Function("sqrt", sp.sqrt, 1, 1, "np.sqrt({0})", "np.sqrt({0})"),
    Function("Abs", sp.Abs, 1, 1, "np.abs({0})", "abs({0})"),
    Function("sign", sp.sign, 1, 1, "np.sign({0})", "np.sign({0})"),
    # H(0) = 0: the subgradient PyTorch uses at relu's kink, and never NaN (a comparison
    # times 1 compiles much faster in Numba than np.where); SymPy's second argument, H(0),
    # is not printed
    Function("Heaviside", sp.Heaviside, 1, 1, "(({0}) > 0) * {one}", "({one} if {0} > 0 else {zero})"),
    # np.maximum (also on scalars in Numba) propagates NaN, as torch.relu does; max() does not
    Function("Max", sp.Max, 2, None, "np.maximum({0}, {1})", "np.maximum({0}, {1})"),
    Function("Min", sp.Min, 2, None, "np.minimum({0}, {1})", "np.minimum({0}, {1})"),
)

# name -> entry: the functions a model file may call (aliases in FUNCTIONS below)
TABLE: dict[str, Function] = {entry.name: entry for entry in _ENTRIES}
# other names for the same functions (Python's builtins)
ALIASES: dict[str, str] = {"abs": "Abs", "max": "Max", "min": "Min"}
# every callable name, aliases included -> its entry
FUNCTIONS: dict[str, Function] = {**TABLE, **{alias: TABLE[name] for alias, name in ALIASES.items()}}
# the named constants of the expression language
CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "E": sp.E}

# SymPy class -> entry, for the printers (sqrt is not a class: it prints as a Pow)
BY_CLASS: dict[type, Function] = {entry.sympy: entry for entry in _ENTRIES if entry.is_class}
SQRT = TABLE["sqrt"]


def entry_for(expr: sp.Basic) -> Function | None:
    """The table's entry for an applied function (tanh(z) -> TABLE['tanh']), else None."""
    return BY_CLASS.get(type(expr))


# SymPy types whose values are computed one coordinate at a time from the coordinates of
# their arguments: arithmetic, the table's functions, selects and their conditions, leaves.
# Bias(j, b) is the per-unit bias broadcast over the batch: coordinate i of it is b[i].
ELEMENTWISE_TYPES: tuple[type, ...] = (
    sp.Add, sp.Mul, sp.Pow,
    *BY_CLASS,
    sp.Piecewise, sp.functions.elementary.piecewise.ExprCondPair,
    sp.core.relational.Relational, sp.logic.boolalg.BooleanAtom,
    sp.Symbol, sp.Number, sp.NumberSymbol,
    Bias,
)

# the table's functions that cost a libm call per coordinate (see Function.transcendental)
TRANSCENDENTAL_TYPES: tuple[type, ...] = tuple(
    entry.sympy for entry in _ENTRIES if entry.transcendental and entry.is_class)
# the ones whose scalar form is a vectorized polynomial (see Function.vectorized)
VECTORIZED_TYPES: tuple[type, ...] = tuple(entry.sympy for entry in _ENTRIES if entry.vectorized)


def helpers_needed(expr: sp.Basic, scalar: bool) -> set[str]:
    """The module helpers printing expr in the array (scalar=False) or scalar form calls."""
    found = set()
    for node in sp.preorder_traversal(expr):
        entry = entry_for(node)
        if entry is not None and entry.helper(scalar):
            found.add(entry.helper(scalar))
    return found
