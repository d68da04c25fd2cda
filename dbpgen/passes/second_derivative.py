"""G''_j = 0 almost everywhere, when SymPy proves it (paper section 5.2, eq. 34).

For piecewise-linear activations (relu, leaky_relu, Max(z, 0.2*z), Abs(z), ...) SymPy's
second derivative is a sum of DiracDelta terms (or exactly 0). DiracDelta vanishes
everywhere but on a null set (footnote 2 of section 6.1), so we replace it by 0 and ask
SymPy to simplify; if the result is identically 0, the statement g''_j becomes 0 and eq. (28)
reduces to eta_j = G'_j(z_j) gamma_j (eq. 34) once the zero is propagated.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import sympy as sp

from ..budget import attempt
from ..program import Program, Stmt


PROOF_BUDGET = 2.0  # s of sp.simplify per g''; past it G'' is kept (a missed simplification)
PROOF_MAX_OPS = 400  # larger g'' are not simplified at all (deterministic, unlike time)
# Fixed sample points (no randomness: the output is deterministic) of both signs, away
# from the kinks of piecewise-linear activations; each free symbol takes one coordinate.
SAMPLES = ((0.7316, -1.3892, 0.4127, 2.0583), (-0.5281, 1.1738, -2.2467, 0.3059),
           (1.6142, 0.2395, -0.8813, -1.5271))
SAMPLE_DIGITS = 30  # evaluated at this precision, so a zero's rounding residue is < 1e-20


def without_distributions(expr: sp.Expr) -> sp.Expr:
    """expr with its DiracDelta terms, which vanish off a null set, read as 0."""
    return expr.replace(sp.DiracDelta, lambda *args: sp.S.Zero)


@functools.lru_cache(maxsize=None)
def almost_everywhere_zero(expr: sp.Expr) -> bool:
    """Whether SymPy proves expr = 0 up to DiracDelta terms (a null set)."""
    reduced = without_distributions(expr)
    if reduced == 0:
        return True
    if sp.count_ops(reduced) > PROOF_MAX_OPS or nonzero_somewhere(reduced):
        return False
    return attempt(PROOF_BUDGET, lambda: sp.simplify(reduced) == 0, False)


def nonzero_somewhere(expr: sp.Expr) -> bool:
    """Whether expr is clearly nonzero at one of the SAMPLES: then no simplification makes it
    0, and sp.simplify need not spend its budget failing to (mish's g'' took 1.5 s per layer).
    A sample where expr is not a finite number proves nothing."""
    symbols = sorted(expr.free_symbols, key=sp.default_sort_key)
    for point in SAMPLES:
        values = {s: sp.Float(point[i % len(point)], SAMPLE_DIGITS) for i, s in enumerate(symbols)}
        try:
            value = complex(expr.evalf(SAMPLE_DIGITS, subs=values))
        except (TypeError, ValueError, ArithmeticError):
            continue
        if abs(value) > 1e-12 and value == value and abs(value) != float("inf"):
            return True
    return False


def vanish_second_derivatives(program: Program) -> Program:
    """Replace every g''_j statement that SymPy proves zero a.e. by 0 (eq. 34); in any
    other, drop the DiracDelta terms (a g'' such as that of |z| + z^2 = 2 delta(z) + 2)."""
    stmts, fired = [], []
    for stmt in program.stmts:
        second = isinstance(stmt, Stmt) and stmt.role.quantity == "ddg"
        if second and almost_everywhere_zero(stmt.expr):
            j = stmt.role.layer
            how = "0 exactly" if stmt.expr == 0 else f"{sp.sstr(stmt.expr)} = 0 almost everywhere"
            fired.append(f"G''_{j} = 0: SymPy proves g''_{j} = {how} (eq. 34)")
            stmt = replace(stmt, expr=sp.S.Zero)
        elif second and stmt.expr.has(sp.DiracDelta):
            fired.append(f"g''_{stmt.role.layer}: DiracDelta terms read as 0 almost everywhere (footnote 2)")
            stmt = replace(stmt, expr=without_distributions(stmt.expr))
        stmts.append(stmt)
    return program.with_(stmts=tuple(stmts), fired=program.fired + tuple(fired))
