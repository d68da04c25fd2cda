"""Simplifications fire exactly where SymPy proves them (and only there), with the
operation counts of the paper's section 5."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from conftest import write_model
from dbpgen import derive
from dbpgen.functions import K, Kbox, KT
from dbpgen.program import BATCH, LAM
from test_gradients import CDB, GIVEN, NODE, mlp

PIECEWISE_LINEAR = ["relu", "leaky_relu", {"leaky_relu": 0.2}, "Max(z, 0.2*z)", "Abs(z)", "identity",
                    "Max(z, 0) - Max(-z, 0)/3"]
SMOOTH = ["tanh", "sigmoid", "softplus", "elu", "silu", "sin", "z**3/3 + z", "z*tanh(log(1 + exp(z)))"]


def derivation(spec, tmp_path):
    return derive(write_model(spec, tmp_path))


def fired_second_derivative(d, j):
    return any(note.startswith(f"G''_{j} = 0") for note in d.simplifications)


def names(d, phase):
    return [str(eq.lhs) for eq in d.equations.get(phase, [])]


@pytest.mark.parametrize("act", PIECEWISE_LINEAR + SMOOTH, ids=str)
def test_second_derivative_vanishes_only_when_proven(act, tmp_path):
    d = derivation(mlp("m", [act], "tanh", "mse", CDB, widths=(3,)), tmp_path)
    assert fired_second_derivative(d, 1) == (act in PIECEWISE_LINEAR)
    assert ("ddg1" in names(d, "forward")) == (act not in PIECEWISE_LINEAR)


def test_identity_output_constant_v_cascade_with_piecewise_linear(tmp_path):
    """Section 5.3: eta_L = 0 and the cascade remove the whole forward-backward pass."""
    d = derivation(mlp("m", ["relu", "leaky_relu"], None, "none", NODE), tmp_path)
    assert "forward-backward" not in d.equations
    assert any("proven zero" in n and "eta3" in n and "gamma1" in n for n in d.simplifications)
    grads = {str(eq.lhs): eq.rhs for eq in d["gradients"]}
    outputs = dict(d.program.outputs)
    assert outputs["b1"] == 0 and outputs["b2"] == 0 and outputs["b3"] == 0
    for j in (2, 3):  # grad_theta R = K^box(q_{j-1}, zeta_j) only, lam/B folded in
        assert grads[f"dW{j}"].atoms(Kbox) == {Kbox(j, sp.Symbol(f"q{j-1}"), LAM * sp.Symbol(f"zeta{j}") / BATCH)}
    # q_0 = 2 xi_0 is not formed: its 2 joins lam/B (eq. 32)
    assert grads["dW1"].atoms(Kbox) == {Kbox(1, sp.Symbol("xi0"), 2 * LAM * sp.Symbol("zeta1") / BATCH)}
    ops = d.ops["emitted"]
    # the paper's 3L, less two: h_L = K_L(theta_L, q_{L-1}) only fed eta_L, and with no loss
    # and an identity output nothing needs z_L = K_L(theta_L, x_{L-1}) either
    assert ops["K"] + ops["KT"] == 3 * 3 - 2


def test_identity_output_constant_v_smooth_cascade_stops(tmp_path):
    """With smooth hidden layers only gamma_{L-1} = K^T(theta_L, 0) vanishes."""
    d = derivation(mlp("m", ["tanh", "tanh"], None, "mse", NODE), tmp_path)
    fb = names(d, "forward-backward")
    assert "eta3" not in fb and "gamma2" not in fb
    # eta_2, eta_1 and gamma_1 survive the cascade, then fold into eps_j = delta_j + lam eta_j
    assert any("proven zero" in n and "gamma2" in n and "gamma1" not in n for n in d.simplifications)
    assert fb == ["eps3", "eps2", "eps1"]
    counts = d.ops
    L = 3
    assert counts["naive"]["K"] + counts["naive"]["KT"] == 5 * L - 2
    # gamma_{L-1} = K_L^T(theta_L, 0) vanishes (section 5.3), h_L becomes dead code, and one
    # K^T per layer carries both the loss and the penalty adjoint (gamma_1 .. gamma_{L-2} go)
    assert counts["emitted"]["K"] + counts["emitted"]["KT"] == 5 * L - 4 - (L - 2)


@pytest.mark.parametrize("acts", [["tanh", "tanh"], ["relu", "softplus"], ["sin", "tanh", "elu"]])
def test_loss_and_penalty_share_one_backward_pass(acts, tmp_path):
    """eps_j = delta_j + lam eta_j (eq. 28 + 15-16): derived by SymPy, one K^T per layer."""
    d = derivation(mlp("m", acts, None, "mse", NODE, widths=(3,) * len(acts)), tmp_path)
    L = len(acts) + 1
    assert any(n.startswith("one backward pass for loss and penalty") for n in d.simplifications)
    eqs = {str(eq.lhs): eq.rhs for phase in d.equations.values() for eq in phase}
    for j in range(1, L):
        kts = eqs[f"eps{j}"].atoms(KT)
        assert kts == {KT(j + 1, sp.Symbol(f"W{j + 1}"), sp.Symbol(f"eps{j + 1}"))}
        assert f"delta{j}" not in eqs and f"eta{j}" not in eqs and f"gamma{j}" not in eqs
    for j in range(1, L + 1):
        assert sp.Symbol(f"eps{j}") in eqs[f"dW{j}"].free_symbols


@pytest.mark.parametrize("out_act,loss,pen", [
    (None, "mse", CDB),            # v = 2(x_L - y) depends on the network
    ("softmax", "none", NODE),     # softmax: App. B.1, eta_L != 0
    ("tanh", "mse", NODE),         # coordinate-wise output with g'' != 0
])
def test_no_cascade_where_eta_L_is_not_zero(out_act, loss, pen, tmp_path):
    d = derivation(mlp("m", ["relu", "relu"], out_act, loss, pen), tmp_path)
    assert not any("proven zero" in n and "eta3" in n for n in d.simplifications)
    assert "eta3" in names(d, "forward-backward")


def test_classical_double_backprop_counts_and_merge(tmp_path):
    """Section 5.1: 4L - 1 linear operations; the loss reuses zeta (eq. 32-33)."""
    for L_hidden in (1, 2, 3):
        spec = mlp("m", ["relu"] * L_hidden, "softmax", "nll", CDB, widths=(4,) * L_hidden)
        d = derivation(spec, tmp_path)
        L = L_hidden + 1
        emitted = d.ops["emitted"]
        assert emitted["K"] + emitted["KT"] == 4 * L - 1
        assert emitted["Kbox"] == 2 * L and d.ops["naive"]["Kbox"] == 3 * L
        assert any(n.startswith("merged by bilinearity") for n in d.simplifications)
        assert "loss" not in d.equations or all(not str(e.lhs).startswith("delta") for e in d["loss"])


def test_separate_loss_backward_when_v_is_not_the_loss_gradient(tmp_path):
    d = derivation(mlp("m", ["tanh", "tanh"], "softmax", "nll", NODE), tmp_path)
    derived = dict(d.stages)["derive"].equations()
    assert [str(e.lhs) for e in derived["loss"]][:3] == ["delta3", "delta2", "delta1"]
    # simplified, delta_2 and delta_1 ride along with the penalty's adjoint in eps_j
    assert [str(e.lhs) for e in d["loss"]] == ["delta3", "J"]
    L = 3
    assert d.ops["naive"]["K"] + d.ops["naive"]["KT"] == 5 * L - 2


def test_no_merge_without_a_loss(tmp_path):
    d = derivation(mlp("m", ["tanh"], "softmax", "none", NODE, widths=(3,)), tmp_path)
    assert not any(n.startswith("merged") for n in d.simplifications)


def test_stages_are_recorded_in_pipeline_order(tmp_path):
    d = derivation(mlp("m", ["relu"], None, "mse", NODE, widths=(3,)), tmp_path)
    assert [name for name, _ in d.stages] == [
        "derive", "vanish_second_derivatives", "propagate_constants", "contract_input_gram",
        "hoist_invariant_adjoints", "hoist_linear_recursion", "merge_weight_adjoints", "fold_loss_adjoint",
        "fold_constant_scale", "eliminate_dead_code"]


def test_loop_invariant_weight_adjoints_leave_the_loop_over_v_i(tmp_path):
    """Naive Jacobian penalty (G'' != 0, tanh): inside the loop over v_i only the weight
    adjoints whose both arguments change with v_i stay, K^box_j(q_{j-1}, zeta_j); the
    K^box_j(x_{j-1}, eta_j) are summed once after the loop through grad_b R's sums and merge
    with the loss's (section 5.4, eq. 31); the oracle tests check the values."""
    from dbpgen.functions import Kbox
    from dbpgen.program import Loop

    spec = mlp("m", ["tanh", "tanh"], None, "mse", {"v": "jacobian", "weight": 0.1}, widths=(5, 4))
    d = derivation(spec, tmp_path)
    before = dict(d.stages)["contract_input_gram"]
    after = dict(d.stages)["hoist_invariant_adjoints"]

    def boxes_in_loop(program):
        loop = next(n for n in program.stmts if isinstance(n, Loop))
        return [b for acc in loop.accums for b in acc.expr.atoms(Kbox)]

    assert len(boxes_in_loop(before)) == 5 and len(boxes_in_loop(after)) == 3  # the cascade took one
    assert all(b.args[1].name.startswith(("q", "xi")) for b in boxes_in_loop(after))
    assert any("loop-invariant weight adjoints" in n for n in d.simplifications)


@pytest.mark.parametrize("v", ["jacobian", "projections"])
def test_the_forward_backward_recursion_runs_once_after_the_loop_over_v_i(v, tmp_path):
    """eq. (28), (30) summed over i: gamma_j = K^T_{j+1}(eta_{j+1}) and eta_j = G''_j h_j xi_j +
    G'_j gamma_j are linear in eta with operators the loop does not change, and the loop only
    sums eta_j; so the loop sums the sources G''_j h_j xi_j and the recursion, with its K^T,
    runs once after it (C - 1 fewer K^T per layer); the oracle tests check the values."""
    from dbpgen.functions import KT
    from dbpgen.program import Loop

    spec = mlp("m", ["tanh", "tanh", "tanh"], None, "mse", {"v": v, "weight": 0.1, "count": 3}
               if v == "projections" else {"v": v, "weight": 0.1}, widths=(5, 4, 6), C=3)
    d = derivation(spec, tmp_path)
    before, after = (dict(d.stages)[name] for name in ("hoist_invariant_adjoints", "hoist_linear_recursion"))

    def kt(nodes):
        return sum(len(n.expr.atoms(KT)) for n in nodes)

    def in_loop(program):
        return next(n for n in program.stmts if isinstance(n, Loop))

    after_loop = [n for n in after.stmts[after.stmts.index(in_loop(after)) + 1:] if n.phase == "forward-backward"]
    assert kt(in_loop(before).body) - kt(in_loop(after).body) == kt(after_loop) == 2  # gamma_2, gamma_1
    assert not any(s.target.name.startswith(("eta", "gamma")) for s in in_loop(after).body)
    assert any(n.startswith("linear recursion run once after the loop") for n in d.simplifications)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_the_loss_backward_pass_carries_the_summed_penalty_adjoint(act, tmp_path):
    """After the loop over v_i, the penalty's summed adjoint (eta_j after
    hoist_linear_recursion, G'' != 0; Algorithm 4's etahat_j, G'' = 0) and the loss's delta_j
    obey the same linear recursion: eps_j = delta_j + lam eta_j, one K^T per layer for both."""
    from dbpgen.functions import KT
    from dbpgen.program import Loop

    out, loss = (None, "mse") if act == "tanh" else ("softmax", "nll")  # relu: eta_L != 0 needs G''_L != 0
    spec = mlp("m", [act, act], out, loss, {"v": "jacobian", "weight": 0.1}, widths=(5, 4), C=3)
    d = derivation(spec, tmp_path)
    assert any(n.startswith("one backward pass for loss and penalty") for n in d.simplifications)
    program = dict(d.stages)["eliminate_dead_code"]
    loop = next(n for n in program.stmts if isinstance(n, Loop))
    after = program.stmts[program.stmts.index(loop) + 1:]
    assert sum(len(n.expr.atoms(KT)) for n in after) == 2  # eps_2, eps_1: L - 1 for loss and penalty


def test_a_scaled_penalty_adjoint_is_not_folded(tmp_path):
    """projections scale R by C/n: the gradients read lam C/n eta_j, which eps_j = delta_j +
    lam eta_j does not take in whole; folding would keep both recursions, so the pass leaves
    the program alone and says nothing."""
    spec = mlp("m", ["tanh", "tanh"], None, "mse", {"v": "projections", "count": 2, "weight": 0.1},
               widths=(5, 4), C=3)
    d = derivation(spec, tmp_path)
    assert not any(n.startswith("one backward pass for loss and penalty") for n in d.simplifications)


def test_constant_factor_of_q0_moves_into_K_and_Kbox(tmp_path):
    """q_0 = 2 xi_0 (p = squared norm) feeds only K_1 and K^box_1: by linearity the 2 moves
    into them (eq. 20, 32) and q_0 is not formed; a per-sample factor (p = norm) stays."""
    d = derivation(mlp("m", ["relu", "tanh"], "softmax", "nll", CDB), tmp_path)
    eqs = {str(eq.lhs): eq.rhs for phase in d.equations.values() for eq in phase}
    assert "q0" not in eqs and not any(sp.Symbol("q0") in e.free_symbols for e in eqs.values())
    W1, xi0, zeta1 = sp.Symbol("W1"), sp.Symbol("xi0"), sp.Symbol("zeta1")
    assert eqs["h1"] == 2 * K(1, W1, xi0)
    assert Kbox(1, xi0, 2 * LAM * zeta1 / BATCH) in eqs["dW1"].atoms(Kbox)
    assert any(n.startswith("q0 = 2*xi0: the factor 2 moved") for n in d.simplifications)
    given = derivation(mlp("g", ["relu", "tanh"], None, "mse", GIVEN), tmp_path)
    geqs = {str(eq.lhs): eq.rhs for phase in given.equations.values() for eq in phase}
    assert "q0" in geqs and sp.Symbol("q0") in geqs["h1"].free_symbols
    assert not any(n.startswith("q0 =") for n in given.simplifications)


@pytest.mark.parametrize("act", ["z/(1 + abs(z))", "z*abs(z)", "abs(z)**3/(1 + abs(z))", "sign(z)*z**2",
                                 "abs(z)*sin(z)", "abs(z)/(1 + abs(z))"])
def test_sign_products_fold_exactly(act):
    """d|z|/dz = sign(z): z sign(z) = |z| and |z| sign(z) = z fold in every product
    (derive._fold_sign), never changing a value; softsign's g' and g'' (less its DiracDelta
    term) become one fraction each, the numerator folded after joining."""
    from dbpgen.derive import activation_derivatives
    from dbpgen.expr import parse_expression
    from dbpgen.ir import Z

    expr = parse_expression(act, Z, "m", "f")
    dg, ddg = activation_derivatives(expr)
    plain = sp.diff(expr, Z)
    a_e = lambda e: e.replace(sp.DiracDelta, lambda *args: sp.S.Zero)  # noqa: E731 - zero a.e.
    for ours, theirs in ((dg, plain), (ddg, sp.diff(plain, Z))):
        for z in (-3.0, -0.7, -1e-3, 1e-3, 0.4, 2.5):
            value = a_e(ours).subs(Z, z)
            assert abs(float(value - a_e(theirs).subs(Z, z))) <= 1e-12 * (1 + abs(float(value))), (ours, z)
        assert not any(isinstance(f, sp.Mul) and {Z, sp.sign(Z)} <= set(f.args) for f in sp.preorder_traversal(ours))
    if act == "z/(1 + abs(z))":
        assert not dg.has(sp.sign) and sp.count_ops(dg) < sp.count_ops(plain)
        assert sp.simplify(a_e(ddg) + 2 * sp.sign(Z) / (sp.Abs(Z) + 1) ** 3) == 0
        assert sp.count_ops(a_e(ddg)) <= sp.count_ops(-2 * sp.sign(Z) / (sp.Abs(Z) + 1) ** 3)
    if act == "abs(z)/(1 + abs(z))":
        assert sp.count_ops(dg) <= sp.count_ops(sp.sign(Z) / (sp.Abs(Z) + 1) ** 2)


@pytest.mark.parametrize("act", ["log(cosh(z))", "z*sinh(2*z)/cosh(2*z)", "sinh(z)**3/cosh(z)**2", "sinh(z)/cosh(z)**3",
                                 "sinh(z)/(1 + cosh(z))", "sinh(z)*(1 + cosh(z))", "sinh(z)/cosh(2*z)",
                                 "z*sinh(z)/(z + cosh(z))"])
def test_hyperbolic_ratios_become_tanh_exactly(act):
    """sinh(a)^m / cosh(a)^n folds into tanh(a)^min(m, n) (derive._tanh_ratios): the same
    values, no sinh/cosh ratio left, and log(cosh(z))'' finite where cosh(z) overflows."""
    from dbpgen.derive import _DG, _X, activation_derivatives
    from dbpgen.expr import parse_expression
    from dbpgen.ir import Z

    expr = parse_expression(act, Z, "m", "f")
    dg, ddg = activation_derivatives(expr)
    plain = sp.diff(expr, Z)
    whole = {_X: expr, _DG: plain}  # g and g' where the derivatives reuse them
    for ours, theirs in ((dg, plain), (ddg, sp.diff(plain, Z))):
        for z in (-3.0, -0.7, 1e-3, 0.4, 2.5):
            value = ours.xreplace(whole).subs(Z, z)
            assert abs(float(value - theirs.subs(Z, z))) <= 1e-12 * (1 + abs(float(value))), (ours, z)
        for product in sp.preorder_traversal(ours):
            if isinstance(product, sp.Mul):
                powers = product.as_powers_dict()
                assert not any(isinstance(b, sp.sinh) and powers.get(sp.cosh(b.args[0]), 0) < 0 for b in powers), ours
    if act == "log(cosh(z))":
        assert dg == sp.tanh(Z) and sp.expand(ddg - (1 - sp.tanh(Z) ** 2)) == 0
        with np.errstate(all="raise"):  # evaluated as NumPy would: 1 - sinh^2/cosh^2 was nan past |z| = 710
            assert sp.lambdify(Z, ddg, "numpy")(800.0) == 0.0 and sp.lambdify(Z, dg, "numpy")(-800.0) == -1.0


def test_a_second_derivative_nonzero_at_a_sample_point_is_not_sent_to_simplify(monkeypatch):
    # mish's g'' cost sp.simplify its whole budget per layer before SymPy gave up; a value
    # that is clearly nonzero at a sample point settles it without simplify
    from dbpgen.passes import second_derivative as sd

    z = sp.Symbol("z_sample_test", real=True)
    mish = sp.diff(z * sp.tanh(sp.log(1 + sp.exp(z))), z, 2)

    def refuse(expr, *args, **kwargs):
        raise AssertionError("sp.simplify was called")

    monkeypatch.setattr(sd.sp, "simplify", refuse)
    assert not sd.almost_everywhere_zero(mish)
    assert sd.nonzero_somewhere(sp.Heaviside(z) - sp.Rational(1, 2))  # nonzero on both sides of 0
    monkeypatch.undo()
    # an expression that is 0 everywhere is never nonzero at a sample (its rounding residue
    # at SAMPLE_DIGITS is far below the threshold), and simplify still proves it
    zero = sp.sin(z) ** 2 + sp.cos(z) ** 2 - 1 + sp.DiracDelta(z)
    assert not sd.nonzero_somewhere(sd.without_distributions(zero))
    assert sd.almost_everywhere_zero(zero)
