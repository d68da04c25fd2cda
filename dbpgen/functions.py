"""SymPy vocabulary of the derived programs.

Every quantity of the paper (z_j, x_j, xi_j, zeta_j, q_j, h_j, eta_j, gamma_j, ...) is a
SymPy symbol standing for a batch of arrays; products of symbols are coordinate-wise
(Hadamard) products, which are commutative, so ordinary commutative SymPy algebra is
exact for them. The functions below are the non-coordinate-wise pieces:

    K(j, theta, x)      K_j(theta_j, x)          the layer's bilinear operator (eq. 2)
    KT(j, theta, y)     K_j^T(theta_j, y)        its adjoint in x               (eq. 5)
    Kbox(j, x, y)       K_j^box(x, y)            its adjoint in theta, summed over the batch (eq. 6)
    Dot(a, b)           <a, b>                   per-sample inner product
    RowSum(a)           sum_i a_i                per-sample sum
    BSum(a)             sum over the batch
    Softmax(z), LogSumExp(z)                     per-sample, max-shifted in the emitted code
    Sigmoid(z), Softplus(z)                      coordinate-wise, printed as stable kernels

The linear ones evaluate to zero when an argument is zero; this is how the
simplification passes propagate a proven zero (paper section 5.3) through the program.
"""
from __future__ import annotations

import sympy as sp


def _power(latex: str, exp: str | None) -> str:
    """A function's LaTeX, raised to exp where SymPy prints it as a power's base (sigma^2)."""
    return latex if exp is None else rf"\left({latex}\right)^{{{exp}}}"


def _is_zero(arg: sp.Basic) -> bool:
    return arg.is_zero is True


def linear_terms(expr: sp.Expr, kinds: tuple) -> list[tuple[sp.Expr, sp.Expr | None]]:
    """expr as a sum of coefficient * op with op one of `kinds` (linear functions such as
    K^box or a batch sum); products are distributed over sums without entering function
    arguments. A term without exactly one such op comes back as (term, None)."""
    def distribute(e):
        if e.is_Add:
            return [t for arg in e.args for t in distribute(arg)]
        if e.is_Mul:
            result = [sp.S.One]
            for factor in e.args:
                result = [r * t for r in result for t in distribute(factor)]
            return result
        return [e]

    pairs = []
    for term in distribute(expr):
        ops = [f for f in sp.Mul.make_args(term) if isinstance(f, kinds)]
        if len(ops) == 1:
            pairs.append((sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not ops[0]]), ops[0]))
        else:
            pairs.append((term, None))
    return pairs


class _Linear(sp.Function):
    """A function linear in each of its array arguments: zero in, zero out."""

    zero_args: tuple[int, ...] = ()

    @classmethod
    def eval(cls, *args):
        if any(_is_zero(args[i]) for i in cls.zero_args):
            return sp.S.Zero
        return None


class _LayerOp(sp.Function):
    """K_j, K_j^T or K_j^box; the first argument is the layer index j.

    Parametrised layers take (j, theta_j, array), parameter-free ones (avgpool,
    downsample, flatten) just (j, array). Linear in every array argument: zero in, zero out.
    """

    nargs = (2, 3)
    label = ""
    latex_label = ""

    @classmethod
    def eval(cls, *args):
        if any(_is_zero(a) for a in args[1:]):
            return sp.S.Zero
        return None

    @property
    def layer(self) -> int:
        return int(self.args[0])

    def _sympystr(self, printer):
        j, *rest = self.args
        return f"{self.label}_{j}({', '.join(printer._print(a) for a in rest)})"

    def _latex(self, printer, exp=None):
        j, *rest = self.args
        inner = ", ".join(printer._print(a) for a in rest)
        return _power(rf"{self.latex_label}_{{{j}}}\left({inner}\right)", exp)


class K(_LayerOp):
    """K_j(theta_j, x): forward operator of layer j (paper eq. 8)."""

    label = "K"
    latex_label = "K"


class KT(_LayerOp):
    """K_j^T(theta_j, y): adjoint of K_j in x (paper eq. 5)."""

    label = "K^T"
    latex_label = "K^{T}"


class Kbox(_LayerOp):
    """K_j^box(x, y), x in layer j's input space, y in its output space (paper eq. 6).

    Summed over the batch, so its value has the shape of theta_j. Note the paper writes
    K^box(eta_j, x_{j-1}) in eq. (25), (31) with the arguments swapped; here the input-space
    argument always comes first.
    """

    nargs = 3
    label = "K^□"
    latex_label = r"K^{\square}"


class Bias(sp.Function):
    """b_j broadcast to layer j's output space (per channel for conv2d)."""

    nargs = 2  # (j, b_j)

    def _sympystr(self, printer):
        return printer._print(self.args[1])

    def _latex(self, printer, exp=None):
        return _power(printer._print(self.args[1]), exp)


class BiasBox(_Linear):
    """The adjoint of Bias: sum over the batch (and, for conv2d, over space), eq. (22)."""

    nargs = 2  # (j, array)
    zero_args = (1,)

    def _sympystr(self, printer):
        return f"Σ_b({printer._print(self.args[1])})"

    def _latex(self, printer, exp=None):
        return _power(rf"\sum_{{b}} {printer._print(self.args[1])}", exp)


class Dot(_Linear):
    """<a, b>: per-sample inner product, symmetric (arguments kept in canonical order)."""

    nargs = 2
    zero_args = (0, 1)

    @classmethod
    def eval(cls, a, b):
        if _is_zero(a) or _is_zero(b):
            return sp.S.Zero
        if sp.default_sort_key(b) < sp.default_sort_key(a):
            return cls(b, a)
        return None

    def _sympystr(self, printer):
        a, b = self.args
        return f"<{printer._print(a)}, {printer._print(b)}>"

    def _latex(self, printer, exp=None):
        a, b = self.args
        return _power(rf"\left\langle {printer._print(a)}, {printer._print(b)} \right\rangle", exp)


class RowSum(_Linear):
    """sum_i a_i per sample."""

    nargs = 1
    zero_args = (0,)

    def _latex(self, printer, exp=None):
        return _power(rf"\mathbf{{1}}^{{T}} {printer._print(self.args[0])}", exp)


class BSum(_Linear):
    """Sum over the batch (bias gradients, the objective)."""

    nargs = 1
    zero_args = (0,)

    def _sympystr(self, printer):
        return f"Σ_b({printer._print(self.args[0])})"

    def _latex(self, printer, exp=None):
        return _power(rf"\sum_{{b}} {printer._print(self.args[0])}", exp)


class Softmax(sp.Function):
    """Per-sample softmax (not coordinate-wise; paper Appendix B.1)."""

    nargs = 1


class LogSumExp(sp.Function):
    """Per-sample log(sum(exp(z))), used for nll through log-softmax."""

    nargs = 1


class Sigmoid(sp.Function):
    """1 / (1 + exp(-z)), with its derivative in closed form."""

    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0]) * (1 - Sigmoid(self.args[0]))

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return 1 / (1 + sp.exp(-arg))
        return None

    def _eval_is_real(self):
        return self.args[0].is_real

    def _latex(self, printer, exp=None):
        return _power(rf"\sigma\left({printer._print(self.args[0])}\right)", exp)


class Softplus(sp.Function):
    """log(1 + exp(z)), with derivative Sigmoid(z)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return sp.log(1 + sp.exp(arg))
        return None

    def _eval_is_real(self):
        return self.args[0].is_real


class OneHot(sp.Function):
    """e_i for every sample: the i-th standard unit vector of R^C (Jacobian penalties, 5.4)."""

    nargs = 2  # (i, C)

    def _latex(self, printer, exp=None):
        return _power(rf"e^{{({printer._print(self.args[0])})}}", exp)


class Row(sp.Function):
    """V[i]: the i-th of several given directions v_i, one per sample (projections)."""

    nargs = 2  # (V, i)

    def _latex(self, printer, exp=None):
        return _power(rf"{printer._print(self.args[0])}^{{({printer._print(self.args[1])})}}", exp)


class Gram(sp.Function):
    """G_j = W_j W_j^T of a dense layer: K_j(W_j, K_j^T(W_j, .)) as one matrix (per call)."""

    nargs = 2  # (j, W_j)

    def _latex(self, printer, exp=None):
        w = printer._print(self.args[1])
        return _power(rf"{w} {w}^{{T}}", exp)


class GramMul(_Linear):
    """a G: K_j(W_j, K_j^T(W_j, a)) through the Gram matrix (G is symmetric)."""

    nargs = 2  # (a, G)
    zero_args = (0,)

    def _latex(self, printer, exp=None):
        return _power(rf"{printer._print(self.args[1])} {printer._print(self.args[0])}", exp)


class GramBox(_Linear):
    """sum_b y_b a_b^T over the batch, N_j x N_j: K^box_j(q_0, zeta_1) before W_j."""

    nargs = 2  # (a, y)
    zero_args = (0, 1)

    def _latex(self, printer, exp=None):
        return _power(rf"\sum_{{b}} {printer._print(self.args[1])} {printer._print(self.args[0])}^{{T}}", exp)


class GramOut(_Linear):
    """M W_j: turns an accumulated GramBox into the K^box_j it stands for."""

    nargs = 2  # (M, W_j)
    zero_args = (0,)

    def _latex(self, printer, exp=None):
        return _power(rf"{printer._print(self.args[0])} {printer._print(self.args[1])}", exp)
