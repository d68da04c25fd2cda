"""The constants of the vectorized scalar forms (functable `vectorized`), per dtype.

Inside a jitted loop, a libm call per element (17-25 ns for tanh on an AVX2 core, about 5
for exp) keeps LLVM from vectorizing the loop around it. The scalar helpers of
templates/helpers.py.j2 compute from arithmetic, selects and bit casts only:

    _exp1    exp(z) = 2^k (1 + p(r)),  z = k ln2 + r, |r| <= ln2 / 2
    _tanh1   tanh(z) = sign(z) t / (t + 2),  t = expm1(2|z|) = 2^k p(r) + (2^k - 1)
    _log1    log(x) = e ln2 + 2 atanh(s),  x = 2^e m, m in [sqrt(1/2), sqrt(2)], s = (m-1)/(m+1)
    _log1p01 log1p(x) for x in [0, 1] (softplus): 2 atanh(x / (2 + x)), or
             ln2 + 2 atanh((x - 1) / (x + 3)) past sqrt(2) - 1, so that |s| <= 0.172 again

with ln2 in two parts (Cody and Waite: the first with trailing zero bits, so that k * hi is
exact), p the Taylor polynomial of expm1 and 2 atanh(s) = 2s + 2s (s^2/3 + s^4/5 + ...)
each to the first degree whose remainder is below half an ulp, and 2^k and e from the
float's bits (`Bits`: an integer of the same width, `.view`). Arguments are clamped where
the result rounds to its limit (0, inf, +-1), which bounds k. The template prints what
these forms decide; strict IEEE evaluation is assumed (no fastmath on the helpers:
reassociation would undo the two-part reduction).
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
class ReductionForm:
    """What `_exp1` and `_tanh1` share, in one dtype (each a literal in that dtype): z = k ln2
    + r with ln2 in two parts, and the Taylor polynomial of expm1 on |r| <= ln2 / 2; `_log1`
    takes the same two parts of ln2."""

    inv_ln2: str
    ln2_hi: str
    ln2_lo: str
    coefficients: tuple[str, ...]  # 1/n! for n = degree .. 2, in Horner order
    degree: int


@dataclass(frozen=True)
class TanhForm:
    """The printed constants of `_tanh1` in one dtype besides the reduction's."""

    clamp: str                   # |z| past which tanh(z) rounds to +-1
    half: str
    one: str
    two: str


def _literal(value: float, dtype: str) -> str:
    if not math.isfinite(value):
        text = {"inf": "np.inf", "-inf": "-np.inf"}.get(repr(value), "np.nan")
    else:
        text = repr(float(value) if dtype == "float64" else float(np.float32(value)))
    return text if dtype == "float64" else f"np.float32({text})"


def reduction_form(dtype: str) -> ReductionForm:
    eps = float(np.finfo(dtype).eps)
    r_max = math.log(2) / 2
    degree = next(d for d in range(2, 30) if r_max ** d / math.factorial(d + 1) < eps / 2)
    lit = lambda v: _literal(v, dtype)  # noqa: E731
    return ReductionForm(inv_ln2=lit(1 / math.log(2)), ln2_hi=lit(LN2_HI[dtype]), ln2_lo=lit(LN2_LO[dtype]),
                         coefficients=tuple(lit(1 / math.factorial(n)) for n in range(degree, 1, -1)),
                         degree=degree)


def tanh_form(dtype: str) -> TanhForm:
    eps = float(np.finfo(dtype).eps)
    clamp = math.ceil(math.log(4 / eps) / 2) + 1  # 1 - tanh(z) ~ 2 exp(-2z) < eps / 2 past it
    lit = lambda v: _literal(v, dtype)  # noqa: E731
    return TanhForm(clamp=lit(clamp), half=lit(0.5), one=lit(1), two=lit(2))


@dataclass(frozen=True)
class Bits:
    """How a float of the dtype is taken apart: `{integer}(bits).view({float})` and back."""

    integer: str        # the integer type of the same width, as printed: np.int64
    float: str          # the float type: np.float64
    to_float: str       # how an integer becomes a float of the dtype in a jitted loop
    bias: int           # the exponent's bias: 2^e has the bits (e + bias) << shift
    shift: int          # mantissa bits
    exponent_mask: int  # the exponent's bits, once shifted down
    mantissa_mask: int
    one: int            # the bits of 1.0


def bits_of(dtype: str) -> Bits:
    info = np.finfo(dtype)
    shift, width = info.nmant, info.bits
    bias = int(info.maxexp) - 1
    return Bits(integer=f"np.int{width}", float=f"np.{dtype}", to_float="float" if dtype == "float64" else "np.float32",
                bias=bias, shift=shift, exponent_mask=(1 << info.nexp) - 1, mantissa_mask=(1 << shift) - 1,
                one=bias << shift)


@dataclass(frozen=True)
class ExpForm:
    """The printed constants of `_exp1` in one dtype besides the reduction's."""

    hi: str                  # exp overflows to inf past it
    lo: str                  # and rounds to 0 below it
    k_limit: str             # past every k the clamped argument has: NaN's k is not an integer
    half: str
    one: str
    inf: str


def exp_form(dtype: str) -> ExpForm:
    info = np.finfo(dtype)
    hi = math.ceil(math.log(float(info.max)))
    lo = math.floor(math.log(float(info.smallest_subnormal)) - math.log(2)) - 1  # exp(lo) < half the least float
    # 2^k = 2^(k//2) 2^(k - k//2): both halves normal floats for every k in [lo, hi] / ln2
    assert (hi / math.log(2) + 1) // 2 < int(info.maxexp) - 1 and (-lo / math.log(2) + 1) // 2 < -int(info.minexp)
    lit = lambda v: _literal(v, dtype)  # noqa: E731
    return ExpForm(hi=lit(hi), lo=lit(lo), k_limit=lit(2 * math.ceil(-lo / math.log(2))),
                   half=lit(0.5), one=lit(1), inf=lit(math.inf))


@dataclass(frozen=True)
class LogForm:
    """The printed constants of `_log1` and `_log1p01` in one dtype."""

    tiny: str                 # the smallest normal float: below it, scale by 2^scale_bits
    scale: str
    scale_bits: int
    scaled_bias: int          # the exponent's bias of a scaled float: bias + scale_bits
    sqrt2: str
    sqrt2_minus_1: str
    coefficients: tuple[str, ...]  # 1/(2n+1) for n = terms .. 1, in Horner order
    half: str
    one: str
    two: str
    three: str
    zero: str
    inf: str
    minus_inf: str
    nan: str
    terms: int


def log_form(dtype: str) -> LogForm:
    info = np.finfo(dtype)
    eps = float(info.eps)
    w_max = ((math.sqrt(2) - 1) / (math.sqrt(2) + 1)) ** 2  # |s| <= (sqrt2 - 1) / (sqrt2 + 1)
    # the first number of terms whose remainder, w^(n+1) / (2n + 3) relative to 2s, is below half an ulp
    terms = next(n for n in range(0, 40) if w_max ** (n + 1) / (2 * n + 3) < eps / 2)
    scale_bits = info.nmant + 2
    lit = lambda v: _literal(v, dtype)  # noqa: E731
    return LogForm(tiny=lit(float(info.smallest_normal)), scale=lit(2.0 ** scale_bits), scale_bits=scale_bits,
                   scaled_bias=bits_of(dtype).bias + scale_bits,
                   sqrt2=lit(math.sqrt(2)), sqrt2_minus_1=lit(math.sqrt(2) - 1),
                   coefficients=tuple(lit(1 / (2 * n + 1)) for n in range(terms, 0, -1)),
                   half=lit(0.5), one=lit(1), two=lit(2),
                   three=lit(3), zero=lit(0), inf=lit(math.inf), minus_inf=lit(-math.inf), nan=lit(math.nan), terms=terms)


def forms(dtype: str) -> dict:
    """Every vectorized helper's constants in `dtype`, by the name the template uses."""
    return {"reduction": reduction_form(dtype), "tanh": tanh_form(dtype), "exp": exp_form(dtype),
            "log": log_form(dtype), "bits": bits_of(dtype)}
