"""The one table of coordinate-wise functions (dbpgen.functable) and what reads it.

Every entry parses, prints as whole-array code and as scalar code, and both codes compute
what PyTorch computes (the reference: torch's own kernels, H(0) = 0 as dbpgen documents,
NaN propagating through max and min as in torch.relu); the parser accepts exactly the
table's names; a function outside the table is a one-line error, never a broken module.
"""
from __future__ import annotations

import math
import platform
import re
import warnings

import numba
import numpy as np
import pytest
import sympy as sp
import torch

from conftest import write_model
from dbpgen import expr as expr_module, functable
from dbpgen.backend import common
from dbpgen.codegen import helpers_source
from dbpgen.compiler import compile_file
from dbpgen.errors import ModelError
from dbpgen.expr import parse_expression
from dbpgen.functions import K
from dbpgen.ir import Z
from dbpgen.model import model_from_dict
from dbpgen.printer import CodegenError, NumbaPrinter, ScalarPrinter

W = sp.Symbol("w", real=True)

# torch's function for every name of the table: the reference the printed code must match
TORCH = {
    "exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sinh": torch.sinh, "cosh": torch.cosh,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "atan": torch.atan, "asinh": torch.asinh,
    "erf": torch.erf, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
    "sqrt": torch.sqrt, "Abs": torch.abs, "sign": torch.sign,
    "Heaviside": lambda z: torch.heaviside(z, torch.zeros((), dtype=z.dtype)),
    "Max": torch.maximum, "Min": torch.minimum,
}


class _Model:
    def __init__(self, dtype: str):
        self.dtype = dtype


def applied(entry: functable.Function) -> sp.Expr:
    """entry applied to z (and w for the two-argument ones), as the parser builds it."""
    if entry.min_args == 2:
        return entry.sympy(Z, W)
    return parse_expression(f"{entry.name}(z)", Z, "m", "f")


def test_every_name_has_a_reference():
    assert set(TORCH) == set(functable.TABLE)
    assert set(functable.ALIASES.values()) <= set(functable.TABLE)


@pytest.mark.parametrize("name", sorted(functable.FUNCTIONS))
def test_every_name_parses_to_its_sympy_function(name):
    entry = functable.FUNCTIONS[name]
    args = ", ".join(["z", "2*z", "z + 1"][: entry.min_args if entry.max_args else 3])
    parsed = parse_expression(f"{name}({args})", Z, "m", "f")
    if entry.is_class:
        assert parsed.has(entry.sympy), parsed
    else:  # sqrt: a power
        assert parsed == sp.sqrt(Z)
    too_many = ", ".join(["z"] * (entry.max_args + 1)) if entry.max_args else None
    for wrong in filter(None, [too_many, "z" if entry.min_args > 1 else None]):
        with pytest.raises(ModelError, match=f"{name}\\(\\) takes"):
            parse_expression(f"{name}({wrong})", Z, "m", "f")


def test_the_parser_accepts_exactly_the_table():
    assert set(expr_module.FUNCTIONS) == set(functable.FUNCTIONS)
    assert expr_module.CONSTANTS == functable.CONSTANTS
    for name, (function, least, most) in expr_module.FUNCTIONS.items():
        entry = functable.FUNCTIONS[name]
        assert (function, least, most) == (entry.sympy, entry.min_args, entry.max_args)
    # the back end's classes come from the same table
    assert common.ELEMENTWISE is functable.ELEMENTWISE_TYPES
    assert common.TRANSCENDENTAL is functable.TRANSCENDENTAL_TYPES
    assert set(functable.TRANSCENDENTAL_TYPES) == {
        e.sympy for e in functable.TABLE.values() if e.transcendental}
    assert common.VECTORIZED is functable.VECTORIZED_TYPES
    assert not set(functable.VECTORIZED_TYPES) & set(functable.TRANSCENDENTAL_TYPES)
    assert set(functable.BY_CLASS) <= set(functable.ELEMENTWISE_TYPES)


# names SymPy or NumPy know that the table does not have (Piecewise has a message of its
# own: tests/test_model.py)
OUTSIDE = ["asin", "acos", "atanh", "acosh", "floor", "ceiling", "gamma", "erfc", "log10", "relu",
           "DiracDelta", "re", "exp2", "cbrt", "Function"]


@pytest.mark.parametrize("name", OUTSIDE)
def test_a_function_outside_the_table_is_a_one_line_error_at_its_field(name):
    spec = {"name": "m", "input": [2], "loss": "mse",
            "layers": [{"dense": 3, "act": f"{name}(z) + z"}, {"dense": 1}]}
    with pytest.raises(ModelError) as error:
        model_from_dict(spec, "m.yaml")
    assert error.value.field == "layers[0].act"
    text = str(error.value)
    assert "\n" not in text and f"unknown function '{name}'" in text
    assert text.startswith("m.yaml: layers[0].act: ")


@pytest.mark.parametrize("printer", [NumbaPrinter, ScalarPrinter])
@pytest.mark.parametrize("expr", [sp.acos(Z), sp.floor(Z), sp.Function("f")(Z), sp.gamma(Z) + Z,
                                  sp.exp(sp.atanh(Z))], ids=str)
def test_a_sympy_function_outside_the_table_is_a_codegen_error(printer, expr):
    with pytest.raises(CodegenError, match="cannot emit") as error:
        printer(_Model("float64")).doprint(expr)
    assert "\n" not in str(error.value)


def test_a_function_outside_the_table_never_becomes_a_module(monkeypatch, tmp_path):
    """Let the parser through acos (as a careless edit of expr.py would): the compiler still
    answers with one line at the model, and writes nothing."""
    monkeypatch.setitem(expr_module.FUNCTIONS, "acos", (sp.acos, 1, 1))
    spec = {"name": "outside", "input": [2], "loss": "mse", "penalty": {"v": "loss_gradient"},
            "layers": [{"dense": 3, "act": "acos(z/8)"}, {"dense": 1}]}
    with pytest.raises(ModelError, match="acos") as error:
        compile_file(write_model(spec, tmp_path), tmp_path / "generated")
    assert "\n" not in str(error.value)
    assert not list(tmp_path.glob("generated/*.py"))


def test_the_scalar_printer_refuses_what_is_not_coordinatewise():
    with pytest.raises(CodegenError, match="not coordinate-wise"):
        ScalarPrinter(_Model("float64")).doprint(sp.tanh(K(1, sp.Symbol("W1"), Z)))


# -- the printed code computes what torch computes ----------------------------------------

def _helpers(array_jit: str = "@numba.njit", dtype: str = "float64", jit: str = "@numba.njit",
             inline: str | None = None) -> dict:
    """The module's helpers (templates/helpers.py.j2), as the emitted module has them: the
    whole-array ones jitted (a jitted program calls them) or plain NumPy (array_jit="")."""
    names = {e.helper(s) for e in functable.TABLE.values() for s in (False, True)} - {None}
    text = helpers_source(names, dtype, jit, array_jit, inline)
    namespace = {"np": np, "math": math, "numba": numba}
    exec(compile(text, "helpers.py", "exec"), namespace)
    return namespace


class Indexed(ScalarPrinter):
    """Element i of one-dimensional arrays: the hook a back end overrides."""

    def element(self, symbol):
        return f"{symbol.name}[i]"


def _inputs(dtype):
    z = np.array([-30.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.3, 0.7, 1.0, 2.5, 30.0, np.nan])
    w = np.array([0.5, -2.0, -1.0, 0.1, 0.0, 0.0, -1e-3, np.nan, 0.7, 3.0, 2.5, -30.0, 1.0])
    return z.astype(dtype), w.astype(dtype)


def _reference(name, z, w):
    entry = functable.TABLE[name]
    args = [torch.from_numpy(z.astype(np.float64))]
    if entry.min_args == 2:
        args.append(torch.from_numpy(w.astype(np.float64)))
    ref = TORCH[name](*args).numpy()
    if name == "Heaviside":  # H(NaN) = 0 as H(0) = 0: never NaN (dbpgen.functable)
        ref[np.isnan(z)] = 0
    if name == "sign":  # torch.sign(NaN) = 0; NumPy (and autograd) keep the NaN visible
        ref[np.isnan(z)] = np.nan
    return ref


@pytest.mark.parametrize("array_jit", ["@numba.njit", ""], ids=["jitted", "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_array_forms_compute_torchs_values(dtype, array_jit):
    helpers = _helpers(array_jit)
    z, w = _inputs(dtype)
    printer = NumbaPrinter(_Model(np.dtype(dtype).name))
    for name, entry in functable.TABLE.items():
        code = printer.doprint(applied(entry))
        assert entry.array.split("(")[0] in code
        with np.errstate(all="ignore"):
            got = eval(code, dict(helpers), {"z": z, "w": w})
        assert got.dtype == dtype, (name, code)
        ref = _reference(name, z, w)
        tol = 1e-12 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, equal_nan=True, err_msg=f"{name}: {code}")


@pytest.mark.parametrize("array_jit", ["@numba.njit", ""], ids=["jitted", "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_and_softplus_saturate_without_warnings(dtype, array_jit):
    """Far out on either side (and at +-inf) the array forms give torch's limits, in the
    input's dtype, without an overflow warning from exp."""
    helpers = _helpers(array_jit)
    z = np.array([-np.inf, -1e4, -800.0, -100.0, 100.0, 800.0, 1e4, np.inf], dtype=dtype)
    for name in ("sigmoid", "softplus"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = helpers[f"_{name}"](z)
        assert got.dtype == dtype, name
        ref = TORCH[name](torch.from_numpy(z.astype(np.float64))).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scalar_forms_compute_torchs_values_jitted_and_plain(dtype):
    """One jitted loop evaluates every scalar form (NaN and float32 included); the same
    code under plain Python (NUMBA_DISABLE_JIT) gives the same numbers."""
    helpers = _helpers(dtype=np.dtype(dtype).name)
    printer = Indexed(_Model(np.dtype(dtype).name))
    names = list(functable.TABLE)
    codes = [printer.doprint(applied(functable.TABLE[n])) for n in names]
    for name, code in zip(names, codes):
        assert functable.TABLE[name].scalar.split("(")[0] in code, code
    lines = [f"        out[{k}, i] = {code}" for k, code in enumerate(codes)]
    source = "def every(z, w, out):\n    for i in range(z.shape[0]):\n" + "\n".join(lines) + "\n"
    namespace = dict(helpers)
    exec(compile(source, "scalar_forms.py", "exec"), namespace)
    z, w = _inputs(dtype)
    jitted = np.zeros((len(names), z.size), dtype=dtype)
    numba.njit(namespace["every"])(z, w, jitted)
    plain = np.zeros_like(jitted)
    with np.errstate(all="ignore"):
        namespace["every"](z, w, plain)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    for k, name in enumerate(names):
        ref = _reference(name, z, w)
        for got in (jitted[k], plain[k]):
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, equal_nan=True,
                                       err_msg=f"{name}: {codes[k]}")


# x86's 80-bit long double has 64 mantissa bits, 11 more than float64; elsewhere (arm64,
# Windows) long double may be float64 itself, and float64 references get a 1-ulp allowance
EXTENDED = np.finfo(np.longdouble).nmant >= 63


def _extended(name, x):
    """The reference, in long double: 80-bit on x86 (float64 where the platform has no more)."""
    x = x.astype(np.longdouble)
    with np.errstate(all="ignore"):
        return {"tanh": np.tanh, "exp": np.exp, "log": np.log,
                "sigmoid": lambda a: 1 / (1 + np.exp(-a)),
                "softplus": lambda a: np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a)))}[name](x)


VECTORIZED = sorted(name for name, entry in functable.TABLE.items() if entry.vectorized)


def test_the_vectorized_functions_are_exp_log_tanh_sigmoid_softplus():
    assert VECTORIZED == ["exp", "log", "sigmoid", "softplus", "tanh"]
    assert not any(functable.TABLE[name].transcendental for name in VECTORIZED)


@pytest.mark.optimized  # run optimized, by tests/test_optimized.py (tests/conftest.py)
@pytest.mark.parametrize("name", VECTORIZED)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_vectorized_functions_are_within_three_ulp_everywhere(dtype, name):
    """Each vectorized scalar form (a polynomial, selects and bit casts, no libm call)
    against the function in 80-bit long double on a dense sweep of the whole range,
    subnormals, signed zeros, infinities, huge values and NaN; jitted as the module jits it,
    the loop around it is vectorized (packed multiplies); as plain Python (NUMBA_DISABLE_JIT)
    it gives the same numbers, without a warning but exp's own overflow of a finite argument
    (np.exp's too)."""
    dt = np.dtype(dtype).name
    helper = functable.TABLE[name].scalar_helper
    helpers = _helpers(dtype=dt, jit='@numba.njit(error_model="numpy")',
                       inline='@numba.njit(error_model="numpy", inline="always")')
    # a loop over an array calling the helper by its global name, as the module's loops do
    exec(f"def each(a, out):\n    for i in range(a.shape[0]):\n        out[i] = {helper}(a[i])\n", helpers)
    loop = numba.njit(error_model="numpy")(helpers["each"])
    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    tiny, big = float(info.smallest_subnormal), float(info.max)
    specials = [0.0, -0.0, tiny, -tiny, float(info.smallest_normal), 1e-310, 1e-40, np.inf, -np.inf, np.nan,
                1e300, -1e300, big, -big, 709.78, 709.79, -745.1, -745.2, 88.72, 88.73, -103.2, -103.3]
    with np.errstate(over="ignore"):
        a = np.concatenate([rng.standard_normal(20000) * 4, np.linspace(-30, 30, 60001), np.linspace(-800, 800, 8001),
                            np.geomspace(tiny, big, 8001), -np.geomspace(tiny, big, 8001), specials]).astype(dtype)
    got = np.empty_like(a)
    loop(a, got)
    # the helper itself computes in the dtype: no float64 promotion inside the loop (called
    # once from Python: an inlined helper has no compiled signature of its own)
    helpers[helper](a[0])
    assert [sig.return_type for sig in helpers[helper].nopython_signatures] == [numba.from_dtype(dtype)]
    # packed multiplies on 256- or 512-bit registers, where LLVM optimizes (NUMBA_OPT=3: this
    # test runs so in tests/test_optimized.py; the suite itself compiles with NUMBA_OPT=0)
    if int(numba.config.OPT) >= 3 and platform.machine() in ("x86_64", "AMD64"):
        packed = r"vmulp%s\s+[^\n]*%%[yz]mm" % ("d" if dtype == np.float64 else "s")
        assert re.search(packed, loop.inspect_asm(loop.signatures[0])), "the loop is not vectorized"
    ref = _extended(name, a)
    with np.errstate(over="ignore"):
        rounded = ref.astype(dtype)  # inf where the result overflows the dtype, 0 where it underflows
        finite = np.isfinite(rounded)
        ulp = np.abs(got[finite].astype(np.longdouble) - ref[finite]) / np.spacing(np.abs(rounded[finite]))
    bound = 3 if EXTENDED or dtype == np.float32 else 4  # a float64 reference's own rounding
    assert ulp.max() <= bound, (dt, name, float(ulp.max()), a[finite][ulp.argmax()])
    assert np.array_equal(got[~finite], rounded[~finite], equal_nan=True)
    zeros = (a == 0) & (rounded == 0)  # tanh(-0) = -0
    assert np.array_equal(np.signbit(got[zeros]), np.signbit(rounded[zeros]))
    some = np.r_[0:a.size:53, a.size - len(specials):a.size]
    python = _helpers(array_jit="", dtype=dt, jit="", inline="")[helper]  # as NUMBA_DISABLE_JIT runs it
    with warnings.catch_warnings(), np.errstate(over="ignore" if name == "exp" else "raise"):
        warnings.simplefilter("error")
        plain = np.array([python(x) for x in a[some]])
    assert plain.dtype == dtype
    np.testing.assert_array_equal(plain, got[some])


def test_helpers_needed_are_the_ones_the_printed_code_calls():
    import re

    expr = parse_expression("sigmoid(z) + erf(z)*softplus(z) + tanh(z) + Abs(z)", Z, "m", "f")
    for scalar, printer in ((False, NumbaPrinter), (True, ScalarPrinter)):
        code = printer(_Model("float64")).doprint(expr)
        called = set(re.findall(r"\b(_[a-z0-9]+)\(", code))
        assert functable.helpers_needed(expr, scalar) == called != set()


def test_scalar_printer_forms():
    printer = Indexed(_Model("float64"))
    z = sp.Symbol("z")
    assert printer.doprint(sp.Piecewise((z, z > 0), (2 * z, True))) == "(z[i] if (z[i] > 0) else 2*z[i])"
    assert printer.doprint(sp.Heaviside(z)) == "(1.0 if z[i] > 0 else 0.0)"
    assert printer.doprint(sp.Abs(z) + z**3) == "z[i]**3 + abs(z[i])"
    assert printer.doprint(sp.Max(z, 0, 2 * z)) == "np.maximum(np.maximum(0, z[i]), 2*z[i])"
    assert ScalarPrinter(_Model("float32")).doprint(sp.Heaviside(z)) == \
        "(np.float32(1.0) if z > 0 else np.float32(0.0))"
