"""Print SymPy expressions as NumPy array code that Numba compiles.

NumbaPrinter prints whole arrays over a batch; ScalarPrinter prints one element of a
coordinate-wise expression, for loops in jitted kernels. The coordinate-wise functions both
know are exactly those of `dbpgen.functable` (each printed with its table form); anything
else (a function outside the table, a DiracDelta that survived, an unevaluated Derivative)
raises a one-line CodegenError, so nothing unsupported slips into a generated module.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from . import functable
from .functions import Kbox
from .program import BATCH
from .shapes import BATCH_AXIS, PER_SAMPLE


class CodegenError(Exception):
    pass


def zeros_code(shape) -> str:
    """np.zeros of a program shape, the batch axis read from x0."""
    dims = ", ".join("x0.shape[0]" if d == BATCH_AXIS else str(d) for d in shape)
    return f"np.zeros(({dims}{',' if len(shape) == 1 else ''}), dtype=DTYPE)"


class NumbaPrinter(NumPyPrinter):
    """Array expressions over a batch; float literals carry the model's dtype."""

    def __init__(self, model, shape_of=None):
        super().__init__({"fully_qualified_modules": True, "inline": True})
        self.model = model
        self.dtype = model.dtype
        self.shape_of = shape_of  # expr -> shape, for rank-dependent printing

    def _module_format(self, fqn, register=True):
        return "np." + fqn.split(".", 1)[1] if fqn.startswith("numpy.") else fqn

    def _literal(self, value: float) -> str:
        text = repr(float(value))
        return f"np.float32({text})" if self.dtype == "float32" else text

    def _print_Float(self, expr):
        return self._literal(expr)

    def _batch_size(self) -> str:
        # B is an integer; in a jitted float32 kernel x / B would promote to float64
        return "np.float32(B)" if self.dtype == "float32" else "B"

    def _print_Symbol(self, expr):
        if expr == BATCH:
            return self._batch_size()
        return super()._print_Symbol(expr)

    def _print_Rational(self, expr):
        return self._literal(expr.p / expr.q)

    def _print_Half(self, expr):
        return self._literal(0.5)

    def _print_Integer(self, expr):
        # in the model's dtype: in a jitted float32 kernel 2*lam would promote to float64
        return self._literal(int(expr)) if self.dtype == "float32" else str(int(expr))

    def _print_Pi(self, expr):
        return self._literal(float(sp.pi))

    def _print_Exp1(self, expr):
        return self._literal(float(sp.E))

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp == sp.S.Half:
            return self._function(functable.SQRT, [base])
        if exp == -sp.S.Half:
            return f"({self._literal(1.0)} / {self._function(functable.SQRT, [base])})"
        if exp.is_Integer and exp > 0:  # an integer power stays in the base's dtype
            return f"{self.parenthesize(base, sp.printing.precedence.PRECEDENCE['Pow'])}**{int(exp)}"
        if exp.is_Integer and exp < 0:
            return f"({self._literal(1.0)} / {self.parenthesize(base ** -exp, sp.printing.precedence.PRECEDENCE['Mul'])})"
        return super()._print_Pow(expr, rational=rational)

    # -- layer operators and reductions: calls of the kernels in the module prelude --

    def _layer_call(self, expr, suffix: str) -> str:
        layer = self.model.layers[expr.layer - 1]
        args = [self._print(a) for a in expr.args[1:]]
        args += [str(a) for a in layer.op.kernel_args(suffix, layer.in_shape)]
        return f"{layer.op.kernel_name(suffix, layer.in_shape)}({', '.join(args)})"

    def _print_Bias(self, expr):
        layer = self.model.layers[int(expr.args[0]) - 1]
        b = self._print(expr.args[1])
        shape = layer.op.bias_shape(layer.out_shape)
        if len(shape) == 1:
            return b
        return f"{b}.reshape(({', '.join(['-1'] + ['1'] * (len(shape) - 1))}))"

    def _print_BiasBox(self, expr):
        layer = self.model.layers[int(expr.args[0]) - 1]
        return f"{layer.op.bias_sum(layer.out_shape)}({self._print(expr.args[1])})"

    def _print_K(self, expr):
        return self._layer_call(expr, "K")

    def _print_KT(self, expr):
        return self._layer_call(expr, "KT")

    def _print_Kbox(self, expr):
        return self._layer_call(expr, "Kbox")

    def _print_Add(self, expr, order=None):
        # the two weight adjoints of a dense layer (eq. 31-32): summed in place
        boxes = [a for a in expr.args if isinstance(a, Kbox)]
        if len(expr.args) == 2 and len(boxes) == 2 and boxes[0].layer == boxes[1].layer \
                and self.model.layers[boxes[0].layer - 1].op.stacked_kbox:
            args = [self._print(a) for box in boxes for a in box.args[1:]]
            return f"_dense_Kbox2({', '.join(args)})"
        return super()._print_Add(expr, order=order)

    def _matrices(self, expr) -> bool:
        """Every argument of a per-sample reduction is a (B, n) array (a dense layer's)."""
        return self.shape_of is not None and all(len(self.shape_of(a)) == 2 for a in expr.args)

    def _print_Dot(self, expr):
        a, b = (self._print(arg) for arg in expr.args)
        return f"_rowdot2({a}, {b})" if self._matrices(expr) else f"_rowdot({a}, {b}).reshape((-1, 1))"

    def _print_Mul(self, expr):
        # a per-sample scalar (B, 1) times an image (B, C, H, W): align it with the batch axis
        shape = self.shape_of(expr) if self.shape_of else ()
        if len(shape) > 2:
            scalars = [f for f in expr.args if self.shape_of(f) == PER_SAMPLE]
            if scalars:
                rest = sp.Mul(*[f for f in expr.args if f not in scalars])
                dims = ", ".join(["-1"] + ["1"] * (len(shape) - 1))
                prec = sp.printing.precedence.PRECEDENCE["Mul"]
                return f"({self._print(sp.Mul(*scalars))}).reshape(({dims})) * {self.parenthesize(rest, prec)}"
        # numbers times one array (lam*thetahat/B): the numbers first, one pass over the array
        if shape and self.shape_of:
            numbers = [f for f in expr.args if self.shape_of(f) == ()]
            if len(numbers) >= 2 and len(numbers) == len(expr.args) - 1:
                array = next(f for f in expr.args if f not in numbers)
                prec = sp.printing.precedence.PRECEDENCE["Mul"]
                return f"({self._print(sp.Mul(*numbers))})*{self.parenthesize(array, prec)}"
        return super()._print_Mul(expr)

    def _call(self, name: str, expr) -> str:
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"

    def _print_RowSum(self, expr):
        return self._call("_rowsum2" if self._matrices(expr) else "_rowsum", expr)

    def _print_BSum(self, expr):
        return self._call("_bsum", expr)

    def _print_Softmax(self, expr):
        return self._call("_softmax", expr)

    def _print_LogSumExp(self, expr):
        return self._call("_logsumexp", expr)

    def _print_Gram(self, expr):
        return f"_gram({self._print(expr.args[1])})"

    def _print_GramMul(self, expr):
        return self._call("_gram_mul", expr)

    def _print_GramBox(self, expr):
        return self._call("_gram_box", expr)

    def _print_GramOut(self, expr):
        return self._call("_gram_out", expr)

    def _print_OneHot(self, expr):
        return f"_onehot(x0, {int(expr.args[1])}, {self._print(expr.args[0])})"

    def _print_Row(self, expr):
        index = expr.args[1]
        return f"{self._print(expr.args[0])}[{int(index) if index.is_Integer else self._print(index)}]"

    # -- coordinate-wise functions: the forms of dbpgen.functable ---------------------

    SCALAR = False  # which form of the table this printer uses (ScalarPrinter: True)

    def _function(self, entry: functable.Function, args) -> str:
        """entry applied to args in this printer's form, folded left over more than two
        arguments for Max and Min."""
        form = entry.form(self.SCALAR)
        fill = {"one": self._literal(1), "zero": self._literal(0)}
        printed = [self._print(a) for a in args]
        if not entry.fold:
            return form.format(*printed, **fill)
        code = printed[0]
        for arg in printed[1:]:
            code = form.format(code, arg, **fill)
        return code

    def _print_table_function(self, expr):
        """Every class of the table prints through this (NumbaPrinter._print_<class> below)."""
        entry = functable.entry_for(expr)
        # Heaviside(x, H0) carries H(0) as a second argument: not printed (H(0) = 0, see the table)
        return self._function(entry, expr.args if entry.fold else expr.args[:entry.max_args])

    def _print(self, expr, **kwargs):
        # a function must be in the table or be one this printer prints itself (K, Dot,
        # Piecewise, ...): NumPyPrinter would print others (acos, floor, ...) without a word
        if isinstance(expr, sp.Function) and functable.entry_for(expr) is None \
                and self._own_method(type(expr)) is None:
            raise CodegenError(f"cannot emit {type(expr).__name__}: not a function of dbpgen.functable ({expr})")
        return super()._print(expr, **kwargs)

    def _own_method(self, cls):
        """The _print_<cls> method a dbpgen printer (this class or a subclass) defines."""
        name = f"_print_{cls.__name__}"
        for klass in type(self).__mro__:
            if issubclass(klass, NumbaPrinter) and name in vars(klass):
                return getattr(self, name)
        return None

    # -- selects and comparisons SymPy produces when differentiating activations -------

    def _select(self, cond: str, value: str, other: str) -> str:
        return f"np.where({cond}, {value}, {other})"

    def _print_Piecewise(self, expr):
        *pieces, (last, cond) = expr.args
        if cond != sp.true:
            raise CodegenError(f"Piecewise without a default branch: {expr}")
        code = self._print(last)
        for value, cond in reversed(pieces):
            code = self._select(self._print(cond), self._print(value), code)
        return code

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_Function(self, expr):
        raise CodegenError(f"cannot emit {type(expr).__name__}: not supported in generated code ({expr})")

    def _print_DiracDelta(self, expr):
        raise CodegenError(f"cannot emit {expr}: a distribution (was G'' not simplified?)")

    def _print_Derivative(self, expr):
        raise CodegenError(f"cannot emit unevaluated derivative {expr}")

    def _print_not_supported(self, expr):
        raise CodegenError(f"cannot emit {expr!r}: not supported in generated code")


# the table's functions print through its forms; a subclass may still override one
for _cls in functable.BY_CLASS:
    setattr(NumbaPrinter, f"_print_{_cls.__name__}", NumbaPrinter._print_table_function)
del _cls


class ScalarPrinter(NumbaPrinter):
    """One element of a coordinate-wise expression, as scalar code inside a jitted loop.

    Functions print in their scalar form from `dbpgen.functable` (_tanh1(a), _exp1(a), np.sin(a), math.erf(a),
    _sigmoid1(a), abs(a), np.maximum(a, b): NaN propagates as in torch), selects as
    `(a if c else b)`, Heaviside as a select, integer powers as `a**n` (NumbaPrinter's
    rule: Numba multiplies small ones out and keeps the dtype). Subclasses say
    where a symbol's element lives by overriding `element` (default: the symbol's name, a
    scalar). Anything not coordinate-wise (K, Dot, a batch sum, ...) is a CodegenError.
    """

    SCALAR = True
    COORDINATEWISE = functable.ELEMENTWISE_TYPES

    def element(self, symbol: sp.Symbol) -> str:
        """The code of symbol's element at the loop's current position."""
        return symbol.name

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Basic) and not isinstance(expr, self.COORDINATEWISE):
            raise CodegenError(f"cannot emit {expr} one element at a time: not coordinate-wise")
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr):
        if expr == BATCH:
            return self._batch_size()
        return self.element(expr)

    def _print_Bias(self, expr):
        # coordinate i of the bias broadcast over the batch is b[i]: element() of b
        return self._print(expr.args[1])

    def _select(self, cond: str, value: str, other: str) -> str:
        return f"({value} if {cond} else {other})"
