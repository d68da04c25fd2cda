"""A safe parser for the user's SymPy expressions (activations in z, penalties in s).

User text is never given to eval, exec, sympify or parse_expr (all of which evaluate
Python). It is parsed with `ast.parse` and the tree is walked here, building SymPy
objects directly from an allow-list:

    expr := number | variable | pi | E | expr (+ - * / **) expr | (+ -) expr
          | function(expr, ...)          function from dbpgen.functable, positional only
"""
from __future__ import annotations

import ast
import math
import warnings

import sympy as sp

from . import functable
from .budget import BudgetExceeded, deadline
from .errors import ModelError

MAX_LENGTH = 500
MAX_DEPTH = 50
MAX_EXPONENT = 64
MAX_INTEGER_BITS = 4096  # well below Python's 4300-digit int printing limit
TIME_LIMIT = 5.0  # seconds of SymPy work per expression; legitimate ones need < 0.5

# name -> (SymPy callable, minimum and maximum number of arguments; None: unbounded),
# aliases included: read from the one table of functions (dbpgen.functable)
FUNCTIONS = {name: (entry.sympy, entry.min_args, entry.max_args)
             for name, entry in functable.FUNCTIONS.items()}
CONSTANTS = dict(functable.CONSTANTS)
BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
# SymPy flattens a + b + c and a * b / c, so such chains are not nesting.
_CHAIN = {ast.Add: "+", ast.Sub: "+", ast.Mult: "*", ast.Div: "*"}
_FORBIDDEN = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripting",
    ast.Lambda: "lambda",
    ast.Compare: "comparison",
    ast.BoolOp: "'and'/'or'",
    ast.IfExp: "'if'/'else'",
    ast.NamedExpr: "assignment",
    ast.Starred: "'*' unpacking",
    ast.JoinedStr: "a string",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
}


def _symbol(op: ast.AST) -> str:
    """The source text of an operator node, e.g. '//' for ast.FloorDiv."""
    names = {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
             ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&",
             ast.Not: "not", ast.Invert: "~"}
    return names.get(type(op), type(op).__name__)


def _too_large(number: sp.Number) -> bool:
    """Whether a constant would not survive printing as a Python literal or a double."""
    if number.is_Rational:
        return max(abs(number.p).bit_length(), number.q.bit_length()) > MAX_INTEGER_BITS
    return number.is_Float and not math.isfinite(float(number))


def parse_expression(text: str, variable: sp.Symbol, source: str, field: str) -> sp.Expr:
    """Parse `text` as an expression in `variable`; raise ModelError at `field` if bad.

    The result is checked to be twice differentiable by SymPy in `variable`.
    """
    parser = _Parser(variable, source, field)
    tree = parser.parse(text)
    try:
        with deadline(TIME_LIMIT):
            expr = parser.build(tree.body, 1)
            parser.check(expr)
    except ModelError:
        raise
    except BudgetExceeded:
        raise parser.error(f"SymPy needs more than {TIME_LIMIT:g} s for this expression; "
                           "simplify it") from None
    except RecursionError:
        raise parser.error("expression is nested too deeply") from None
    except Exception as exc:  # SymPy may raise anything while evaluating
        raise parser.error(f"SymPy cannot build the expression: {exc}") from None
    return expr


class _Parser:
    """Builds SymPy from an `ast` tree, refusing every node outside the grammar."""

    def __init__(self, variable: sp.Symbol, source: str, field: str) -> None:
        self.variable = variable
        self.source = source
        self.field = field

    def error(self, message: str) -> ModelError:
        return ModelError(self.source, self.field, message)

    def parse(self, text: str) -> ast.Expression:
        if len(text) > MAX_LENGTH:
            raise self.error(f"expression is longer than {MAX_LENGTH} characters")
        try:
            with warnings.catch_warnings():
                # e.g. "invalid decimal literal": the error raised below says enough
                warnings.simplefilter("ignore", SyntaxWarning)
                return ast.parse(text, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            reason = getattr(exc, "msg", None) or "invalid syntax"
            raise self.error(f"cannot parse expression: {reason}") from None

    def build(self, node: ast.AST, depth: int) -> sp.Expr:
        if depth > MAX_DEPTH:
            raise self.error(f"expression is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Constant):
            return self.constant(node.value)
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.BinOp):
            return self.binary(node, depth)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        what = _FORBIDDEN.get(type(node), f"'{type(node).__name__}' syntax")
        raise self.error(f"{what} is not allowed in expressions")

    def constant(self, value: object) -> sp.Expr:
        # bool is a subclass of int, hence the exact type test
        if type(value) is int:
            return sp.Integer(value)
        if type(value) is float:
            if not math.isfinite(value):
                raise self.error("number is too large")
            return sp.Float(value)
        if isinstance(value, (str, bytes)):
            raise self.error("strings are not allowed in expressions")
        raise self.error(f"constant {value!r} is not allowed in expressions (numbers only)")

    def name(self, name: str) -> sp.Expr:
        if name == self.variable.name:
            return self.variable
        if name in CONSTANTS:
            return CONSTANTS[name]
        if name in FUNCTIONS:
            raise self.error(f"function '{name}' must be called, e.g. {name}({self.variable})")
        raise self.error(
            f"unknown name '{name}' in expression (the variable is {self.variable})")

    def binary(self, node: ast.BinOp, depth: int) -> sp.Expr:
        op = BINARY_OPS.get(type(node.op))
        if op is None:
            raise self.error(f"operator '{_symbol(node.op)}' is not allowed")
        chained = (isinstance(node.left, ast.BinOp) and type(node.op) in _CHAIN
                   and _CHAIN.get(type(node.left.op)) == _CHAIN[type(node.op)])
        left = self.build(node.left, depth if chained else depth + 1)
        right = self.build(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            self.check_power(left, right)
        return op(left, right)

    def unary(self, node: ast.UnaryOp, depth: int) -> sp.Expr:
        operand = self.build(node.operand, depth + 1)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return operand
        raise self.error(f"operator '{_symbol(node.op)}' is not allowed")

    def call(self, node: ast.Call, depth: int) -> sp.Expr:
        if not isinstance(node.func, ast.Name):
            what = _FORBIDDEN.get(type(node.func))
            if what is not None:
                raise self.error(f"{what} is not allowed in expressions")
            raise self.error("only named functions may be called, e.g. exp(z)")
        name = node.func.id
        if name == "Piecewise":  # conditions are not expressions of the allow-list
            raise self.error("Piecewise is not supported: write the pieces with Heaviside, sign, Max "
                             "or Min, e.g. Max(z, 0.2*z) or z*Heaviside(z) + 0.2*z*Heaviside(-z)")
        if name not in FUNCTIONS:
            raise self.error(f"unknown function '{name}' in expression")
        if node.keywords:
            raise self.error(f"{name}() takes no keyword arguments")
        function, least, most = FUNCTIONS[name]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            count = f"{least} or more" if most is None else str(least)
            raise self.error(f"{name}() takes {count} argument(s), got {len(node.args)}")
        return function(*(self.build(arg, depth + 1) for arg in node.args))

    def check_power(self, base: sp.Expr, exponent: sp.Expr) -> None:
        """Refuse powers whose exact value would take unbounded time and memory."""
        if exponent.is_Number and abs(exponent) > MAX_EXPONENT:
            raise self.error(f"constant exponent larger than {MAX_EXPONENT} in magnitude")
        if base.is_Rational and exponent.is_Number:
            bits = max(abs(base.p).bit_length(), base.q.bit_length())
            if bits * abs(float(exponent)) > MAX_INTEGER_BITS:
                raise self.error("constant power is too large")

    def check(self, expr: sp.Expr) -> None:
        """Checks on the whole result: variables, finiteness, sizes, second derivative."""
        if not isinstance(expr, sp.Expr):
            raise self.error("not a scalar expression")
        unknown = expr.free_symbols - {self.variable}
        if unknown:
            names = ", ".join(sorted(str(s) for s in unknown))
            raise self.error(f"unknown name(s) {names} in expression")
        if expr.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            raise self.error("expression is not finite (division by zero?)")
        if expr.has(sp.I):
            raise self.error("expression is complex-valued")
        if any(_too_large(number) for number in expr.atoms(sp.Number)):
            raise self.error("constant is too large")
        # SymPy merges powers: (z**64)**64 is z**4096, which a later expand would explode
        if any(power.exp.is_Number and abs(power.exp) > MAX_EXPONENT
               for power in expr.atoms(sp.Pow)):
            raise self.error(f"constant exponent larger than {MAX_EXPONENT} in magnitude")
        self.check_differentiable(expr)

    def check_differentiable(self, expr: sp.Expr) -> None:
        message = f"SymPy cannot differentiate the expression twice in {self.variable}"
        try:
            second = sp.diff(expr, self.variable, 2)
        except Exception:  # SymPy may raise anything here
            raise self.error(message) from None
        if second.has(sp.Derivative, sp.Subs):
            raise self.error(message)
