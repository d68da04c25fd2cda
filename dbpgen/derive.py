"""The derivation pass: a Model becomes the paper's unsimplified programs.

Builds, as SymPy statements, the forward pass (eq. 8), the backward pass xi/zeta
(Alg. 1, eq. 15-16), the backward-backward pass q/h (Alg. 2, eq. 20-21), the
forward-backward pass eta/gamma (Alg. 3, eq. 28, 30) with eta_L from Appendix B, and the
weight gradients (eq. 31) plus the loss gradients (eq. 32-33, reusing zeta for classical
double backpropagation as section 4.5 allows). g', g'' and grad p come from sp.diff.
Nothing is simplified here: that is the job of `dbpgen.passes`.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import sympy as sp

from .budget import BudgetExceeded, attempt, deadline
from .errors import ModelError
from .functions import Bias, BiasBox, BSum, Dot, K, KT, Kbox, LogSumExp, OneHot, Row, RowSum, Softmax
from .ir import S, Z, Model
from .program import BATCH, LAM, Accum, Loop, Program, Role, Stmt, verify


def sym(name: str, j: int | None = None) -> sp.Symbol:
    return sp.Symbol(name if j is None else f"{name}{j}")


class _Builder:
    """Collects statements in execution order."""

    def __init__(self):
        self.stmts: list[Stmt] = []

    def let(self, target: sp.Symbol, expr, phase: str, eq: str, role: Role) -> sp.Symbol:
        """Append target = expr; role says which quantity of the paper it is (program.py)."""
        self.stmts.append(Stmt(target, sp.sympify(expr), phase, eq, role))
        return target


def params(model: Model) -> tuple[sp.Symbol, ...]:
    out = []
    for layer in model.layers:
        if layer.op.has_params:
            out.append(sym("W", layer.index))
        if layer.op.bias:
            out.append(sym("b", layer.index))
    return tuple(out)


def apply_K(model: Model, j: int, x):
    """K_j(theta_j, x), or K_j(x) for a parameter-free layer."""
    if model.layers[j - 1].op.has_params:
        return K(j, sym("W", j), x)
    return K(j, x)


def apply_KT(model: Model, j: int, y):
    """K_j^T(theta_j, y), or K_j^T(y) for a parameter-free layer."""
    if model.layers[j - 1].op.has_params:
        return KT(j, sym("W", j), y)
    return KT(j, y)


def param_layers(model: Model) -> list[int]:
    return [layer.index for layer in model.layers if layer.op.has_params]


# -- per-layer derivative rules ------------------------------------------------------


def g_prime(model: Model, j: int, u, head_identity: bool = False):
    """G'_j(z_j) u: coordinate-wise (eq. 15) or the softmax Jacobian (App. B.1)."""
    act = model.layers[j - 1].act
    if head_identity:
        return u
    if act.is_softmax:
        x = sym("x", j)
        return x * u - Dot(x, u) * x
    return sym("dg", j) * u


def g_second(model: Model, j: int, h, xi, head_identity: bool = False):
    """(d(G'_j(z_j) xi)/dz_j)^* h with xi held fixed: M_j(G''_j h, xi) of eq. (28).

    For softmax this is the corrected Appendix B.1 term: with S = diag(x) - x x^T,
    d(S xi)/dz = (diag(xi) - <x, xi> I - x xi^T) S, whose adjoint applied to h is
    S(xi*h - <x, xi> h - <x, h> xi).
    """
    act = model.layers[j - 1].act
    if head_identity:
        return sp.S.Zero
    if act.is_softmax:
        x = sym("x", j)
        u = xi * h - Dot(x, xi) * h - Dot(x, h) * xi
        return x * u - Dot(x, u) * x
    return sym("ddg", j) * h * xi


# -- the passes of the paper ---------------------------------------------------------


DERIVATIVE_BUDGET = 5.0  # s of SymPy per activation; the built-in ones need < 0.1
REWRITE_BUDGET = 1.0  # s for an optional rewrite; past it the plain form is kept
REWRITE_MAX_OPS = 200  # larger derivatives are not searched for a cheaper form at all
# g''/g' that sp.cancel already brings to at most this many operations without a division
# is taken as it is: sp.simplify would return the same (tanh: -2 tanh(z)) after importing
# sympy.physics on its first call, 0.3 s of every dbpgen compile
SHORT_RATIO_OPS = 4
_X, _DG = sp.Symbol("x_"), sp.Symbol("dg_")  # g(z) and g'(z) in activation_derivatives


def _divides(expr: sp.Expr) -> bool:
    return any(p.exp.is_negative for p in expr.atoms(sp.Pow))


def _via_first(ddg: sp.Expr, dg: sp.Expr) -> sp.Expr:
    """g'' as g' times a cheaper factor where SymPy finds one (tanh'' = -2 x tanh'), so the
    emitted code reuses dg_j; never through a division, which could meet 0/0."""
    if not dg.free_symbols or ddg.has(sp.DiracDelta, sp.Heaviside, sp.Piecewise) \
            or sp.count_ops(ddg) > REWRITE_MAX_OPS:
        return ddg

    def rewrite() -> sp.Expr:
        if ddg.is_zero:
            return ddg
        ratio = sp.cancel(ddg / dg)  # tanh, sigmoid, softplus: already short, no sp.simplify
        if _divides(ratio) or sp.count_ops(ratio) > SHORT_RATIO_OPS:
            ratio = sp.simplify(ddg / dg)
        if _divides(ratio):
            return ddg
        candidate = _DG * ratio
        return candidate if sp.count_ops(candidate) < sp.count_ops(ddg) else ddg

    return attempt(REWRITE_BUDGET, rewrite, ddg)


def _fold_sign(expr: sp.Expr) -> sp.Expr:
    """Exact identities of sp.diff's sign(z) (d|z|/dz), for real z: z sign(z) = |z| and
    |z| sign(z) = z in every product, then the terms other than DiracDelta, Heaviside or
    Piecewise ones (which later passes drop or keep as terms) as one fraction where that is
    shorter. softsign's g' = -z sign(z)/(|z| + 1)^2 + 1/(|z| + 1) becomes 1/(|z| + 1)^2 and
    its g'' (less its DiracDelta term) -2 sign(z)/(|z| + 1)^3: divisions fewer per
    coordinate in the emitted loop."""
    sign, absz = sp.sign(Z), sp.Abs(Z)
    if not expr.has(sign) or sp.count_ops(expr) > REWRITE_MAX_OPS:
        return expr

    def fold(product: sp.Mul) -> sp.Expr:
        powers = product.as_powers_dict()
        while powers.get(sign, 0) >= 1:
            if powers.get(Z, 0) >= 1:
                powers[Z] -= 1
                powers[absz] = powers.get(absz, 0) + 1
            elif powers.get(absz, 0) >= 1:
                powers[absz] -= 1
                powers[Z] = powers.get(Z, 0) + 1
            else:
                break
            powers[sign] -= 1
        return sp.Mul(*(base ** e for base, e in powers.items()))

    def fold_all(e: sp.Expr) -> sp.Expr:
        return e.replace(lambda t: t.is_Mul and t.has(sign), fold)

    def rewrite() -> sp.Expr:
        folded = fold_all(expr)
        # DiracDelta, Heaviside and Piecewise terms stay terms of their own (a later pass
        # drops or keeps them); the others are joined into one fraction whose numerator,
        # expanded, folds again: z/(|z| + 1)^3 - sign(z)/(|z| + 1)^2 = -sign(z)/(|z| + 1)^3
        terms = sp.Add.make_args(folded)
        kept = sp.Add(*(t for t in terms if t.has(sp.DiracDelta, sp.Heaviside, sp.Piecewise)))
        rest = sp.Add(*(t for t in terms if not t.has(sp.DiracDelta, sp.Heaviside, sp.Piecewise)))
        numer, denom = sp.fraction(sp.together(rest))
        joined = fold_all(sp.expand(numer)) / denom
        return min((expr, folded, kept + sp.cancel(sp.together(rest)), kept + joined, kept + sp.cancel(joined)),
                   key=sp.count_ops)

    return attempt(REWRITE_BUDGET, rewrite, expr)


def _tanh_ratios(expr: sp.Expr) -> sp.Expr:
    """sinh(a)^m cosh(a)^-n in a product as tanh(a)^k sinh(a)^(m-k) cosh(a)^(k-n), k = min(m, n),
    an exact identity: log(cosh(z))' = sinh(z)/cosh(z) becomes tanh(z), one vectorized
    polynomial in the emitted loops instead of two scalar libm calls, and its g'' then
    1 - tanh(z)^2 instead of 1 - sinh(z)^2/cosh(z)^2 (which is nan where cosh overflows)."""
    if not (expr.has(sp.sinh) and expr.has(sp.cosh)):
        return expr

    def fold(product: sp.Mul) -> sp.Expr:
        powers = product.as_powers_dict()
        for base in [b for b in powers if isinstance(b, sp.sinh)]:
            cosh = sp.cosh(base.args[0])
            m, n = sp.sympify(powers[base]), -sp.sympify(powers.get(cosh, 0))
            if not (m.is_Integer and n.is_Integer and m > 0 and n > 0):
                continue
            k = min(m, n)
            powers[base], powers[cosh] = m - k, k - n
            powers[sp.tanh(base.args[0])] = powers.get(sp.tanh(base.args[0]), 0) + k
        return sp.Mul(*(b ** e for b, e in powers.items()))

    return expr.replace(lambda t: t.is_Mul and t.has(sp.sinh) and t.has(sp.cosh), fold)


@functools.lru_cache(maxsize=None)
def activation_derivatives(expr: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(g', g'') of g(z) = expr (eq. 9) by sp.diff, in z, x_ = g(z) and dg_ = g'(z).

    x_ replaces g(z) where g' and g'' contain it (tanh' = 1 - x^2). DiracDelta terms of g'
    (sign, Heaviside) are 0 almost everywhere and dropped, as autodiff frameworks do; those
    of g'' are left to the second-derivative pass (eq. 34). Cached per activation.
    """
    reuse = {} if expr.is_Symbol else {expr: _X}
    plain = sp.diff(expr, Z)
    d1 = attempt(REWRITE_BUDGET, lambda: _tanh_ratios(plain), plain)
    dg = _fold_sign(d1.replace(sp.DiracDelta, lambda *args: sp.S.Zero)).xreplace(reuse)
    second = sp.diff(d1, Z)
    ddg = _fold_sign(attempt(REWRITE_BUDGET, lambda: _tanh_ratios(second), second)).xreplace(reuse)
    return dg, _via_first(ddg, dg)


@functools.lru_cache(maxsize=None)
def _in_layer(exprs: tuple[sp.Expr, ...], j: int) -> tuple[sp.Expr, ...]:
    """exprs in layer j's names; SymPy re-evaluates every node it rebuilds, which can cost
    as much as differentiating (tanh(tanh(...)) asks whether each argument is real)."""
    names = {Z: sym("z", j), _X: sym("x", j), _DG: sym("dg", j)}
    return tuple(e.xreplace(names) for e in exprs)


def layer_rules(model: Model, j: int) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """g_j(z_j), g'_j(z_j) and g''_j(z_j) of layer j, within DERIVATIVE_BUDGET (else a
    ModelError at the layer's act)."""
    act = model.layers[j - 1].act
    try:
        with deadline(DERIVATIVE_BUDGET):
            return _in_layer((act.expr,) + activation_derivatives(act.expr), j)
    except BudgetExceeded:
        raise ModelError(model.source, f"layers[{j - 1}].act",
                         f"SymPy needs more than {DERIVATIVE_BUDGET:g} s to differentiate this "
                         "activation twice; simplify it") from None


def forward(model: Model, b: _Builder, derivatives: bool = True) -> None:
    """z_j = K_j(theta_j, x_{j-1}) + b_j, x_j = g_j(z_j) (eq. 8), plus g'_j and g''_j."""
    for layer in model.layers:
        j = layer.index
        z = apply_K(model, j, sym("x", j - 1)) + (Bias(j, sym("b", j)) if layer.op.bias else 0)
        b.let(sym("z", j), z, "forward", "(8)", Role("z", j))
        if layer.act.is_softmax:
            b.let(sym("x", j), Softmax(sym("z", j)), "forward", "(8)", Role("x", j))
            continue
        g, dg, ddg = layer_rules(model, j)
        b.let(sym("x", j), g, "forward", "(8)", Role("x", j))
        if derivatives:
            b.let(sym("dg", j), dg, "forward", "g' (9), SymPy", Role("dg", j))
            b.let(sym("ddg", j), ddg, "forward", "g'' (9), SymPy", Role("ddg", j))


def loss_gradient_out(model: Model):
    """v = grad of l w.r.t. the penalised output (x_L, or z_L for `on: logits`), eq. (11)."""
    L, y = model.L, sym("y")
    x = sym("x", L)
    if model.loss == "nll":
        # grad_{z_L} l = (sum y) x_L - y (eq. 43 without assuming sum y = 1)
        return RowSum(y) * x - y
    w = 2 * (x - y)  # eq. (12)
    if model.penalty and model.penalty.on_logits:
        return g_prime(model, L, w)
    return w


def backward(model: Model, b: _Builder, v, head_identity: bool, phase: str = "backward") -> None:
    """Alg. 1: zeta_j = G'_j xi_j (15), xi_{j-1} = K_j^T(theta_j, zeta_j) (16)."""
    L = model.L
    if v is None:  # softmax + nll, classical double backprop: zeta_L directly (eq. 43)
        b.let(sym("zeta", L), RowSum(sym("y")) * sym("x", L) - sym("y"), phase, "(43)", Role("zeta", L))
    else:
        b.let(sym("xi", L), v, phase, "Alg. 1: xi_L = v", Role("xi", L))
        b.let(sym("zeta", L), g_prime(model, L, sym("xi", L), head_identity), phase, "(15)", Role("zeta", L))
    for j in range(L, 0, -1):
        if j < L:
            b.let(sym("zeta", j), g_prime(model, j, sym("xi", j)), phase, "(15)", Role("zeta", j))
        b.let(sym("xi", j - 1), apply_KT(model, j, sym("zeta", j)), phase, "(16)", Role("xi", j - 1))


def p_prime(p: sp.Expr) -> sp.Expr:
    """p'(s) from SymPy; where it is singular at s = 0 (p = norm), the subgradient 0 there.
    DiracDelta terms (of Heaviside, sign, Abs in p) are 0 almost everywhere and dropped, as
    for g' and as autodiff frameworks do: p = Heaviside(s - 1) s has p' = Heaviside(s - 1)."""
    dp = sp.diff(p, S).replace(sp.DiracDelta, lambda *args: sp.S.Zero)
    at_zero = dp.subs(S, 0)
    if not (at_zero.is_finite and at_zero.is_real):
        dp = sp.Piecewise((dp, S > 0), (0, True))
    return dp.subs(S, sym("s"))


def penalty_value(model: Model, b: _Builder, target: str = "R", quantity: str = "R") -> sp.Symbol:
    """R = p(xi_0) with s = ||xi_0||^2 (eq. 10)."""
    s = b.let(sym("s"), Dot(sym("xi0"), sym("xi0")), "backward", "s = ||xi_0||^2", Role("s"))
    return b.let(sym(target), model.penalty.p.subs(S, s), "backward", "(10)", Role(quantity))


def backward_backward(model: Model, b: _Builder, q0, head_identity: bool, eq0: str) -> None:
    """Alg. 2: h_j = K_j(theta_j, q_{j-1}) (20), q_j = G'_j h_j (21)."""
    L = model.L
    b.let(sym("q", 0), q0, "backward-backward", eq0, Role("q", 0))
    for j in range(1, L + 1):
        b.let(sym("h", j), apply_K(model, j, sym("q", j - 1)), "backward-backward", "(20)", Role("h", j))
        b.let(sym("q", j), g_prime(model, j, sym("h", j), head_identity and j == L),
              "backward-backward", "(21)", Role("q", j))


def gamma_out(model: Model):
    """gamma_L = (dv/d out)^* q_L: zero for a constant v (App. B), else from l's Hessian."""
    pen, L = model.penalty, model.L
    q = sym("q", L)
    if pen.v_is_constant:
        return sp.S.Zero
    if model.loss == "nll":  # v = (sum y) x_L - y on logits; dv/dz_L = (sum y) S (eq. 44)
        return RowSum(sym("y")) * g_prime(model, L, q)
    if pen.on_logits:  # v = G'_L(z_L) 2 (x_L - y)
        w = 2 * (sym("x", L) - sym("y"))
        return g_second(model, L, q, w) + g_prime(model, L, 2 * g_prime(model, L, q))
    return 2 * q  # v = 2 (x_L - y)


def eta_out(model: Model, b: _Builder, head_identity: bool) -> None:
    """eta_L = grad_{z_L} R from Appendix B: M(G''_L h_L, xi_L) + G'_L gamma_L, or eq. (44)."""
    L, pen = model.L, model.penalty
    if pen.v == "loss_gradient" and model.loss == "nll" and not pen.on_logits:
        b.let(sym("eta", L), RowSum(sym("y")) * g_prime(model, L, sym("h", L)),
              "forward-backward", "(44)", Role("eta_out", L))
        return
    b.let(sym("gamma", L), gamma_out(model), "forward-backward", "(29), App. B", Role("gamma_out", L))
    eta = g_second(model, L, sym("h", L), sym("xi", L), head_identity)
    eta += g_prime(model, L, sym("gamma", L), head_identity)
    act = model.layers[-1].act
    if act.is_softmax and not head_identity:
        where = "App. B.1, corrected"
    elif head_identity or act.expr == Z:
        where = "App. B.3"
    else:
        where = "App. B, (28) at j = L"
    b.let(sym("eta", L), eta, "forward-backward", where, Role("eta_out", L))


def forward_backward(model: Model, b: _Builder, head_identity: bool) -> None:
    """Alg. 3: eta_L from App. B, eta_j (28), gamma_{j-1} = K_j^T(theta_j, eta_j) (30)."""
    L = model.L
    eta_out(model, b, head_identity)
    for j in range(L, 0, -1):
        if j < L:
            eta = g_second(model, j, sym("h", j), sym("xi", j)) + g_prime(model, j, sym("gamma", j))
            b.let(sym("eta", j), eta, "forward-backward", "(28)", Role("eta", j))
        if j > 1:
            b.let(sym("gamma", j - 1), apply_KT(model, j, sym("eta", j)), "forward-backward", "(30)",
                  Role("gamma", j - 1))


def accumulated_forward_backward(model: Model, b: _Builder) -> None:
    """Alg. 4's single forward-backward pass on etahat_L = sum_i eta_L^(i) (section 5.4, 5-6).

    Valid because G''_j = 0 for j < L makes eta_j^(i) = G'_j gamma_j^(i) (eq. 34) linear in
    eta_L^(i), so the sums over i commute with eq. (30) and (34).
    """
    for j in range(model.L, 0, -1):
        if j < model.L:
            b.let(sym("etahat", j), g_prime(model, j, sym("gammahat", j)), "forward-backward", "(34), summed",
                  Role("etahat", j))
        if j > 1:
            b.let(sym("gammahat", j - 1), apply_KT(model, j, sym("etahat", j)), "forward-backward",
                  "(30), summed", Role("gammahat", j - 1))


def loss_backward(model: Model, b: _Builder) -> None:
    """delta_j = grad_{z_j} l: standard backpropagation (eq. 15-16 with v = grad l, §4.5)."""
    L = model.L
    b.let(sym("delta", L), g_prime(model, L, 2 * (sym("x", L) - sym("y")))
          if model.loss == "mse" else RowSum(sym("y")) * sym("x", L) - sym("y"), "loss", "(33)",
          Role("delta", L))
    for j in range(L - 1, 0, -1):
        b.let(sym("delta", j), g_prime(model, j, apply_KT(model, j + 1, sym("delta", j + 1))),
              "loss", "(15)-(16)", Role("delta", j))


def loss_value(model: Model) -> sp.Expr:
    """Per-sample l(x_L, y): mse (eq. 12) or nll through log-softmax."""
    L, y = model.L, sym("y")
    if model.loss == "mse":
        return RowSum((sym("x", L) - y) ** 2)
    return RowSum(y) * LogSumExp(sym("z", L)) - RowSum(y * sym("z", L))


def gradients(model: Model, b: _Builder, delta: str | None, penalty_terms=None) -> list:
    """Weight and bias gradients of J = (1/B) sum_b [l + lam R] (eq. 31-33).

    penalty_terms(j) gives (grad_{theta_j} R, grad_{b_j} R before the batch sum), scaled by lam.
    """
    outputs = []
    for layer in model.layers:
        j = layer.index
        if not layer.op.has_params:
            continue
        dW, db = sp.S.Zero, sp.S.Zero
        if delta:
            dW += Kbox(j, sym("x", j - 1), sym(delta, j))
            db += sym(delta, j)
        if penalty_terms:
            pW, pb = penalty_terms(j)
            dW += LAM * pW
            db += LAM * pb
        outputs.append((f"W{j}", b.let(sym("dW", j), dW / BATCH, "gradients", "(31), (32)", Role("grad_W", j))))
        if layer.op.bias:
            outputs.append((f"b{j}", b.let(sym("db", j), BiasBox(j, db) / BATCH, "gradients", "(31), (33)",
                                          Role("grad_b", j))))
    return outputs


def single_terms(j: int):
    """eq. (31): grad_theta R = K^box(q_{j-1}, zeta_j) + K^box(x_{j-1}, eta_j), grad_b R = eta_j."""
    return (Kbox(j, sym("q", j - 1), sym("zeta", j)) + Kbox(j, sym("x", j - 1), sym("eta", j)), sym("eta", j))


# -- Jacobian and projection penalties: a loop over the vectors v_i ------------------

I = sp.Symbol("i", integer=True, nonnegative=True)
MULTI = ("jacobian", "projections")


def n_vectors(model: Model) -> int:
    """How many v the penalty sums over: C for jacobian, count for projections, else 1."""
    pen = model.penalty
    if pen and pen.v == "jacobian":
        return model.n_outputs
    if pen and pen.v == "projections":
        return pen.count
    return 1


def penalty_scale(model: Model) -> sp.Expr:
    """R = scale * sum_i p(J^T v_i): 1 for jacobian, C/n for projections (Hoffman et al.)."""
    if model.penalty.v == "projections":
        return sp.Rational(model.n_outputs, model.penalty.count)
    return sp.S.One


def smooth_hidden_layers(model: Model) -> list:
    """Hidden layers whose g'' SymPy cannot prove zero a.e. (they block Algorithm 4)."""
    from .passes.second_derivative import almost_everywhere_zero

    return [layer for layer in model.layers[:-1]
            if not almost_everywhere_zero(sp.diff(layer.act.expr, Z, 2))]


def multi_algorithm(model: Model) -> str:
    """naive (C double backpropagations) or optimized (Algorithm 4 generalized)."""
    pen = model.penalty
    blocking = smooth_hidden_layers(model)
    if pen.algorithm == "naive":
        return "naive"
    if blocking:
        if pen.algorithm == "optimized":
            layer = blocking[0]
            raise ModelError(model.source, "penalty.algorithm",
                             f"'optimized' needs piecewise-linear hidden activations, but layers[{layer.index - 1}]"
                             f".act '{layer.act.name}' has g'' = {sp.sstr(sp.diff(layer.act.expr, Z, 2))} != 0")
        return "naive"
    return "optimized"


def per_vector(model: Model):
    """v_i inside the loop: e_i (jacobian) or the i-th given/random direction (projections)."""
    if model.penalty.v == "jacobian":
        return OneHot(I, model.n_outputs)
    return Row(sym("V"), I)


def _vector_loop(model: Model, body: _Builder, accums: list, eq: str) -> Loop:
    return Loop(I, n_vectors(model), tuple(body.stmts), tuple(accums), eq)


def multi_penalty_body(model: Model, body: _Builder) -> Accum:
    """Alg. 1 for v_i, R_i = p(xi_0^(i)); R accumulates scale * R_i."""
    backward(model, body, per_vector(model), model.penalty.on_logits)
    Ri = penalty_value(model, body, "Ri", "R_i")
    return Accum(sym("R"), penalty_scale(model) * Ri, "(10), summed over i", Role("R"))


def multi_value_and_grad(model: Model, b: _Builder):
    """Section 5.4: naive loop of C double backpropagations, or Algorithm 4 (optimized)."""
    pen, L = model.penalty, model.L
    head = pen.on_logits
    body = _Builder()
    accums = [multi_penalty_body(model, body)]
    backward_backward(model, body, 2 * p_prime(pen.p) * sym("xi0"), head, "q_0 = grad p(xi_0) = 2 p'(s) xi_0")
    scale = penalty_scale(model)
    if multi_algorithm(model) == "naive":
        forward_backward(model, body, head)
        for layer in model.layers:
            j = layer.index
            if not layer.op.has_params:
                continue
            pW, pb = single_terms(j)
            accums.append(Accum(sym("gW", j), pW, "(31), summed over i", Role("grad_W_R", j)))
            if layer.op.bias:
                accums.append(Accum(sym("gb", j), pb, "(31), summed over i", Role("grad_b_R", j)))
        b.stmts.append(_vector_loop(model, body, accums, "C double backpropagations (section 5.4, naive)"))
        terms = lambda j: (scale * sym("gW", j), scale * (sym("gb", j) if model.layers[j - 1].op.bias else 0))
        return terms, ()
    eta_out(model, body, head)
    for j in param_layers(model):
        accums.append(Accum(sym("thetahat", j), Kbox(j, sym("q", j - 1), sym("zeta", j)), "Alg. 4: theta^1_j",
                            Role("thetahat", j)))
    accums.append(Accum(sym("etahat", L), sym("eta", L), "Alg. 4: eta_L, summed", Role("etahat", L)))
    b.stmts.append(_vector_loop(model, body, accums, "Alg. 4 (section 5.4): backward and backward-backward per v_i"))
    accumulated_forward_backward(model, b)
    note = ("Algorithm 4 (generalized): the forward-backward pass runs once on sum_i eta_L^(i), "
            "since SymPy proves G''_j = 0 for every hidden layer (section 5.4)")
    terms = lambda j: (scale * (sym("thetahat", j) + Kbox(j, sym("x", j - 1), sym("etahat", j))),
                       scale * sym("etahat", j))
    return terms, (note,)


# -- whole programs ------------------------------------------------------------------


def penalty_v(model: Model):
    """v of eq. (10) for the model's penalty; None means zeta_L is set directly (eq. 43)."""
    pen = model.penalty
    if pen.v == "loss_gradient":
        if model.loss == "nll" and not pen.on_logits:
            return None
        return loss_gradient_out(model)
    return sym("v")  # output, given, random: held constant, built by the module's wrapper


def inputs(model: Model, *names: str) -> tuple[sp.Symbol, ...]:
    return params(model) + tuple(sym(n) for n in names)


def forward_program(model: Model) -> Program:
    b = _Builder()
    forward(model, b, derivatives=False)
    return verify(Program("forward", inputs(model, "x0"), tuple(b.stmts), (("out", sym("x", model.L)),)))


def penalty_program(model: Model) -> Program:
    b = _Builder()
    forward(model, b)
    if model.penalty.v in MULTI:
        body = _Builder()
        accum = multi_penalty_body(model, body)
        b.stmts.append(_vector_loop(model, body, [accum], "R = scale * sum_i p(J^T v_i)"))
    else:
        backward(model, b, penalty_v(model), model.penalty.on_logits)
        penalty_value(model, b)
    return verify(Program("penalty", inputs(model, "x0", "y", "v", "V"), tuple(b.stmts), (("R", sym("R")),)))


def vjp_program(model: Model) -> Program:
    """xi_0 = (dx_L/dx_0)^* v: Alg. 1 on its own."""
    b = _Builder()
    forward(model, b)
    backward(model, b, sym("v"), False)
    return verify(Program("vjp", inputs(model, "x0", "v"), tuple(b.stmts), (("xi0", sym("xi0")),)))


def input_grad_program(model: Model) -> Program:
    """grad_x l per sample: Alg. 1 with xi_L = grad_{x_L} l = 2 (x_L - y) (eq. 12), or, for
    softmax + nll, zeta_L = grad_{z_L} l directly (eq. 43)."""
    b = _Builder()
    forward(model, b)
    backward(model, b, None if model.loss == "nll" else 2 * (sym("x", model.L) - sym("y")), False)
    return verify(Program("input_grad", inputs(model, "x0", "y"), tuple(b.stmts), (("xi0", sym("xi0")),)))


def jvp_program(model: Model) -> Program:
    """(dx_L/dx_0) u: Alg. 2 with q_0 = u is exactly the forward-mode tangent recursion."""
    b = _Builder()
    forward(model, b)
    backward_backward(model, b, sym("u"), False, eq0="q_0 = u")
    return verify(Program("jvp", inputs(model, "x0", "u"), tuple(b.stmts), (("Ju", sym("q", model.L)),)))


def power_step_program(model: Model) -> Program:
    """One power iteration's J J^T v (section 4.1.3): the forward pass once, Alg. 1 from
    xi_L = v, then Alg. 2 from q_0 = xi_0, whose q_L is J (J^T v)."""
    b = _Builder()
    forward(model, b)
    head = model.penalty.on_logits
    backward(model, b, sym("v"), head)
    backward_backward(model, b, sym("xi0"), head, eq0="q_0 = xi_0 = J^T v")
    return verify(Program("power_step", inputs(model, "x0", "v"), tuple(b.stmts), (("JJTv", sym("q", model.L)),)))


def value_and_grad_program(model: Model, algorithm: str | None = None) -> Program:
    """J and its gradients: forward, backward, backward-backward, forward-backward, eq. (31)."""
    b = _Builder()
    forward(model, b)
    pen = model.penalty
    per_sample = loss_value(model) if model.loss != "none" else sp.S.Zero
    delta, terms, notes = None, None, ()
    if pen and pen.v in MULTI:
        if algorithm:
            model = replace(model, penalty=replace(pen, algorithm=algorithm))
        terms, notes = multi_value_and_grad(model, b)
        per_sample += LAM * sym("R")
    elif pen:
        head = pen.on_logits
        backward(model, b, penalty_v(model), head)
        R = penalty_value(model, b)
        backward_backward(model, b, 2 * p_prime(pen.p) * sym("xi0"), head, "q_0 = grad p(xi_0) = 2 p'(s) xi_0")
        forward_backward(model, b, head)
        per_sample += LAM * R
        terms = single_terms
        if pen.v == "loss_gradient":
            delta = "zeta"  # section 4.5: zeta_j = grad_{z_j} l, reused
    if model.loss != "none" and delta is None:
        loss_backward(model, b)
        delta = "delta"
    J = b.let(sym("J"), BSum(per_sample) / BATCH, "loss", "J = (1/B) sum_b [l + lam R]", Role("loss"))
    grads = gradients(model, b, delta, terms)
    return verify(Program("value_and_grad", inputs(model, "x0", "y", "v", "V") + (LAM,), tuple(b.stmts),
                          (("value", J),) + tuple(grads), fired=notes))


def naive_value_and_grad(model: Model) -> Program:
    """The paper's unsimplified program (the 'naive' column of OPS): C full passes for jacobian."""
    return value_and_grad_program(model, "naive")


def derive_programs(model: Model) -> dict[str, Program]:
    """All programs of the emitted module, unsimplified (the 'naive' column of OPS)."""
    programs = {"forward": forward_program(model), "vjp": vjp_program(model), "jvp": jvp_program(model)}
    if model.loss != "none":
        programs["input_grad"] = input_grad_program(model)
    if model.penalty:
        programs["penalty"] = penalty_program(model)
    if model.penalty and model.penalty.v == "random":  # J J^T of the penalised output
        programs["power_step"] = power_step_program(model)
    programs["value_and_grad"] = value_and_grad_program(model)
    return programs
