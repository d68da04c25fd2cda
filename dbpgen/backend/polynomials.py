"""The constants of the vectorized scalar forms (functable `vectorized`), per dtype.

Inside a jitted loop, a libm call per element (17-25 ns for tanh on an AVX2 core) keeps
LLVM from vectorizing the loop around it. `_tanh1` (templates/helpers.py.j2) computes tanh
from arithmetic only:

    tanh(z) = sign(z) t / (t + 2),   t = expm1(2|z|) = 2^k (1 + p(r)) - 1 = 2^k p(r) + (2^k - 1)

with 2|z| = k ln2 + r, |r| <= ln2 / 2 (Cody and Waite: ln2 in two parts, the first with
trailing zero bits, so that k * hi is exact), p the Taylor polynomial of expm1 to the
first degree whose remainder is below half an ulp, and 2^k a product of selects over the
bits of k (exact: powers of two). |z| is clamped where tanh rounds to 1 in the dtype,
which bounds k. The template prints what `tanh_form` decides; strict IEEE evaluation is
assumed (no fastmath on the helper: reassociation would undo the two-part reduction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ln2 = LN2_HI + LN2_LO: fdlibm's split for float64 (LN2_HI has 32 significant bits); for
# float32 the first 12 bits of ln2's float32 mantissa
LN2_HI = {"float64": 6.93147180369123816490e-01, "float32": 0.693145751953125}
LN2_LO = {"float64": 1.90821492927058770002e-10, "float32": 1.4286068202862268e-06}


@dataclass(frozen=True)
class TanhForm:
    """The printed constants of `_tanh1` in one dtype (each a literal in that dtype)."""

    clamp: str                   # |z| past which tanh(z) rounds to +-1
    inv_ln2: str
    ln2_hi: str
    ln2_lo: str
    coefficients: tuple[str, ...]  # 1/n! for n = degree .. 2, in Horner order
    powers: tuple[tuple[int, str], ...]  # (bit of k, 2^(2^bit)) for every bit k can have
    half: str
    one: str
    two: str
    degree: int


def _literal(value: float, dtype: str) -> str:
    return repr(float(value)) if dtype == "float64" else f"np.float32({float(np.float32(value))!r})"


def tanh_form(dtype: str) -> TanhForm:
    eps = float(np.finfo(dtype).eps)
    clamp = math.ceil(math.log(4 / eps) / 2) + 1  # 1 - tanh(z) ~ 2 exp(-2z) < eps / 2 past it
    r_max = math.log(2) / 2
    degree = next(d for d in range(2, 30) if r_max ** d / math.factorial(d + 1) < eps / 2)
    k_max = math.floor(2 * clamp / math.log(2) + 0.5)
    lit = lambda v: _literal(v, dtype)  # noqa: E731
    return TanhForm(
        clamp=lit(clamp), inv_ln2=lit(1 / math.log(2)), ln2_hi=lit(LN2_HI[dtype]), ln2_lo=lit(LN2_LO[dtype]),
        coefficients=tuple(lit(1 / math.factorial(n)) for n in range(degree, 1, -1)),
        powers=tuple((1 << b, lit(2.0 ** (1 << b))) for b in range(k_max.bit_length())),
        half=lit(0.5), one=lit(1), two=lit(2), degree=degree)
