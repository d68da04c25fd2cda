"""The bilinear operator kernels in templates/ops/*.py.j2 (paper section 2.1).

Every layer is a bilinear K(theta, x) with three kernels: K, its transpose K^T(theta, y)
(the adjoint in x) and its weight-adjoint K^box(x, y) (the adjoint in theta, summed over
the batch).  The templates are rendered directly (no model, no compiler), once jitted and
once as plain Python, and checked for
  * the adjoint identities <K(th, x), y> = <x, K^T(th, y)> = <th, K^box(x, y)>,
  * Theorem 2.3: the weight-adjoint of K^T is K^box, <K^T(th, y), x> = <th, K^box(x, y)>,
  * forward semantics equal to torch (skipped without torch),
  * jitted == plain, float32 in -> float32 out, C-contiguous results.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbpgen.backend.chooser import COPY_WT_BATCH, COPY_WT_SIZE, SMALL_GEMM

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
OPS = ("dense", "conv2d", "avgpool", "downsample", "flatten")
JIT = '@numba.njit(cache=False, error_model="numpy")'  # as emitted (backend/emit.py)
MODES = ("jit", "plain")
SETTINGS = settings(max_examples=30, deadline=None)
RTOL = 1e-10


def decorators(jit: str) -> dict:
    """The module's decorator table (dbpgen.backend.emit.DECORATORS), uncached for tests."""
    from dbpgen.backend.emit import DECORATORS

    return {k: v.replace("cache=True", "cache=False") if jit else "" for k, v in DECORATORS.items()}


@functools.lru_cache(maxsize=None)
def render_ops(jit: str, count_ops: bool = False) -> dict:
    """Render the op templates into one source string and exec it; cached, so every
    kernel is compiled at most once per dtype/layout for the whole test session."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    source = "\n\n".join(
        env.get_template(f"ops/{op}.py.j2").render(jit=jit, array_jit=jit, count_ops=count_ops,
                                                   decorators=decorators(jit)) for op in OPS
    )
    # the dense kernels that write into a half of a stacked buffer (the fused schedule's)
    source += "\n\n" + env.get_template("helpers.py.j2").render(
        jit=jit, array_jit=jit, decorators=decorators(jit), helpers={"_dense_K_into", "_dense_KT_into"})
    namespace = {"np": np, "numba": numba, "SMALL_GEMM": SMALL_GEMM, "COPY_WT": (COPY_WT_BATCH, COPY_WT_SIZE)}
    if count_ops:
        namespace["COUNTS"] = {"K": 0, "KT": 0, "Kbox": 0}
    exec(compile(source, f"<ops jit={jit!r} count_ops={count_ops}>", "exec"), namespace)
    return namespace


def ops(mode: str) -> dict:
    return render_ops(JIT if mode == "jit" else "")


def dot(a, b) -> float:
    return float(np.vdot(a, b))


def assert_same(lhs: float, rhs: float, scale: float):
    """lhs == rhs relative to scale (a bound on the sums' absolute terms, so that a
    cancelling inner product near 0 is not held to an impossible relative tolerance)."""
    assert abs(lhs - rhs) <= RTOL * max(scale, 1e-300), (lhs, rhs, scale)


def conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# -- strategies -------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    B, Cin, Cout = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k, s, p, d = (draw(st.integers(1, 4)), draw(st.integers(1, 3)),
                  draw(st.integers(0, 2)), draw(st.integers(1, 2)))
    lo = max(1, d * (k - 1) + 1 - 2 * p)  # smallest input with an output of size >= 1
    H, Wd = draw(st.integers(lo, lo + 7)), draw(st.integers(lo, lo + 7))
    seed = draw(st.integers(0, 2**32 - 1))
    chunk = draw(st.integers(1, 3))  # samples per im2col buffer: uneven last chunks included
    per_sample = draw(st.booleans())  # one GEMM per sample, or one over the chunk
    return dict(B=B, Cin=Cin, Cout=Cout, k=k, s=s, p=p, d=d, H=H, Wd=Wd, seed=seed, chunk=chunk,
                per_sample=per_sample)


def conv_arrays(c, dtype=np.float64):
    rng = np.random.default_rng(c["seed"])
    Ho, Wo = conv_out(c["H"], c["k"], c["s"], c["p"], c["d"]), conv_out(c["Wd"], c["k"], c["s"], c["p"], c["d"])
    x = rng.normal(size=(c["B"], c["Cin"], c["H"], c["Wd"])).astype(dtype)
    W = rng.normal(size=(c["Cout"], c["Cin"], c["k"], c["k"])).astype(dtype)
    y = rng.normal(size=(c["B"], c["Cout"], Ho, Wo)).astype(dtype)
    return W, x, y


def apply_conv(ns, c, W, x, y):
    geometry = (c["s"], c["p"], c["d"])
    return (
        ns["_conv2d_K"](W, x, *geometry, c["chunk"], c["per_sample"]),
        ns["_conv2d_KT"](W, y, *geometry, c["H"], c["Wd"], c["chunk"], c["per_sample"]),
        ns["_conv2d_Kbox"](x, y, *geometry, c["k"], c["chunk"], c["per_sample"]),
    )


@st.composite
def pool_cases(draw, exact: bool = True):
    """(B, C, H, W, k) with H, W multiples of k (exact) or with a remainder < k."""
    B, C, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    Ho, Wo = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rh = 0 if exact else draw(st.integers(0, k - 1))
    rw = 0 if exact else draw(st.integers(0, k - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(B=B, C=C, k=k, H=Ho * k + rh, Wd=Wo * k + rw, Ho=Ho, Wo=Wo, seed=seed)


def pool_arrays(c, out_channels: int, dtype=np.float64):
    rng = np.random.default_rng(c["seed"])
    x = rng.normal(size=(c["B"], c["C"], c["H"], c["Wd"])).astype(dtype)
    y = rng.normal(size=(c["B"], out_channels, c["Ho"], c["Wo"])).astype(dtype)
    return x, y


@st.composite
def dense_cases(draw):
    return dict(B=draw(st.integers(1, 3)), n=draw(st.integers(1, 6)), m=draw(st.integers(1, 6)),
                seed=draw(st.integers(0, 2**32 - 1)))


def dense_arrays(c, dtype=np.float64):
    rng = np.random.default_rng(c["seed"])
    return (rng.normal(size=(c["m"], c["n"])).astype(dtype),
            rng.normal(size=(c["B"], c["n"])).astype(dtype),
            rng.normal(size=(c["B"], c["m"])).astype(dtype))


# -- adjoint (dot-product) identities ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=conv_cases())
def test_conv2d_adjoints(mode, c):
    ns = ops(mode)
    W, x, y = conv_arrays(c)
    Kx, KTy, Kbox = apply_conv(ns, c, W, x, y)
    assert Kx.shape == y.shape and KTy.shape == x.shape and Kbox.shape == W.shape
    scale = np.abs(Kx).sum() * np.abs(y).max() + np.abs(x).sum() * np.abs(KTy).max() \
        + np.abs(W).sum() * np.abs(Kbox).max()
    lhs = dot(Kx, y)
    assert_same(lhs, dot(x, KTy), scale)   # K^T is the adjoint in x
    assert_same(lhs, dot(W, Kbox), scale)  # K^box is the adjoint in theta


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=conv_cases())
def test_conv2d_theorem_2_3_weight_adjoint_of_KT_is_Kbox(mode, c):
    """Theorem 2.3: theta -> K^T(theta, y) is linear and its adjoint is x -> K^box(x, y):
    <K^T(theta, y), x> = <theta, K^box(x, y)>, for every theta, x, y."""
    ns = ops(mode)
    W, x, y = conv_arrays(c)
    _, KTy, Kbox = apply_conv(ns, c, W, x, y)
    scale = np.abs(x).sum() * np.abs(KTy).max() + np.abs(W).sum() * np.abs(Kbox).max()
    assert_same(dot(KTy, x), dot(W, Kbox), scale)
    # and K^T is linear in theta (so that it has a weight-adjoint at all)
    W2 = np.random.default_rng(c["seed"] + 1).normal(size=W.shape)
    geometry = (c["s"], c["p"], c["d"], c["H"], c["Wd"], c["chunk"], c["per_sample"])
    np.testing.assert_allclose(
        ns["_conv2d_KT"](2.0 * W + W2, y, *geometry),
        2.0 * KTy + ns["_conv2d_KT"](W2, y, *geometry),
        rtol=1e-10, atol=1e-10,
    )


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=dense_cases())
def test_dense_adjoints(mode, c):
    ns = ops(mode)
    W, x, y = dense_arrays(c)
    Kx, KTy, Kbox = ns["_dense_K"](W, x), ns["_dense_KT"](W, y), ns["_dense_Kbox"](x, y)
    scale = np.abs(Kx).sum() * np.abs(y).max() + np.abs(x).sum() * np.abs(KTy).max() \
        + np.abs(W).sum() * np.abs(Kbox).max()
    assert_same(dot(Kx, y), dot(x, KTy), scale)
    assert_same(dot(Kx, y), dot(W, Kbox), scale)
    assert_same(dot(KTy, x), dot(W, Kbox), scale)  # Theorem 2.3


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=pool_cases())
def test_avgpool_adjoint(mode, c):
    ns = ops(mode)
    x, y = pool_arrays(c, c["C"])
    Kx, KTy = ns["_avgpool_K"](x, c["k"]), ns["_avgpool_KT"](y, c["k"])
    assert Kx.shape == y.shape and KTy.shape == x.shape
    scale = np.abs(Kx).sum() * np.abs(y).max() + np.abs(x).sum() * np.abs(KTy).max()
    assert_same(dot(Kx, y), dot(x, KTy), scale)


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=pool_cases())
def test_downsample_adjoint_and_inverse(mode, c):
    ns = ops(mode)
    k = c["k"]
    x, y = pool_arrays(c, c["C"] * k * k)
    Kx, KTy = ns["_downsample_K"](x, k), ns["_downsample_KT"](y, k)
    assert Kx.shape == y.shape and KTy.shape == x.shape
    scale = np.abs(Kx).sum() * np.abs(y).max() + np.abs(x).sum() * np.abs(KTy).max()
    assert_same(dot(Kx, y), dot(x, KTy), scale)
    # a permutation: K^T = K^-1, exactly
    np.testing.assert_array_equal(ns["_downsample_KT"](Kx, k), x)
    np.testing.assert_array_equal(ns["_downsample_K"](KTy, k), y)


@pytest.mark.parametrize("mode", MODES)
@SETTINGS
@given(c=pool_cases())
def test_flatten_adjoint(mode, c):
    ns = ops(mode)
    x, _ = pool_arrays(c, 1)
    B, C, H, Wd = x.shape
    y = np.random.default_rng(c["seed"]).normal(size=(B, C * H * Wd))
    Kx, KTy = ns["_flatten_K"](x), ns["_flatten_KT"](y, C, H, Wd)
    assert Kx.shape == y.shape and KTy.shape == x.shape
    scale = np.abs(Kx).sum() * np.abs(y).max() + np.abs(x).sum() * np.abs(KTy).max()
    assert_same(dot(Kx, y), dot(x, KTy), scale)
    np.testing.assert_array_equal(ns["_flatten_KT"](Kx, C, H, Wd), x)


# -- semantics: equal to torch -----------------------------------------------------------


@SETTINGS
@given(c=conv_cases())
def test_conv2d_matches_torch(c):
    torch = pytest.importorskip("torch")
    ns = ops("jit")
    W, x, y = conv_arrays(c)
    Kx, KTy, Kbox = apply_conv(ns, c, W, x, y)
    tW, tx, ty = map(torch.from_numpy, (W, x, y))
    geometry = dict(stride=c["s"], padding=c["p"], dilation=c["d"])
    ref = torch.nn.functional.conv2d(tx, tW, **geometry).numpy()
    np.testing.assert_allclose(Kx, ref, rtol=1e-10, atol=1e-10)
    # K^T is the gradient w.r.t. the input and K^box the gradient w.r.t. the weight
    np.testing.assert_allclose(
        KTy, torch.nn.grad.conv2d_input(x.shape, tW, ty, **geometry).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        Kbox, torch.nn.grad.conv2d_weight(tx, W.shape, ty, **geometry).numpy(), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(c=pool_cases(exact=False))
def test_avgpool_matches_torch(c):
    torch = pytest.importorskip("torch")
    x, _ = pool_arrays(c, c["C"])
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(x), c["k"]).numpy()
    np.testing.assert_allclose(ops("jit")["_avgpool_K"](x, c["k"]), ref, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(c=pool_cases())
def test_downsample_matches_torch_pixel_unshuffle(c):
    torch = pytest.importorskip("torch")
    ns, k = ops("jit"), c["k"]
    x, y = pool_arrays(c, c["C"] * k * k)
    np.testing.assert_array_equal(
        ns["_downsample_K"](x, k), torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), k).numpy())
    np.testing.assert_array_equal(
        ns["_downsample_KT"](y, k), torch.nn.functional.pixel_shuffle(torch.from_numpy(y), k).numpy())


@SETTINGS
@given(c=pool_cases(exact=False))
def test_flatten_matches_torch(c):
    torch = pytest.importorskip("torch")
    x, _ = pool_arrays(c, 1)
    np.testing.assert_array_equal(ops("jit")["_flatten_K"](x), torch.from_numpy(x).flatten(1).numpy())


# -- jitted == plain; dtypes; layouts -----------------------------------------------------


def close(a, b, tol=1e-12):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0.0))))


@SETTINGS
@given(c=pool_cases())
def test_parameter_free_jit_equals_plain(c):
    k = c["k"]
    x, y = pool_arrays(c, c["C"])
    _, yd = pool_arrays(c, c["C"] * k * k)
    B, C, H, Wd = x.shape
    yf = np.random.default_rng(c["seed"]).normal(size=(B, C * H * Wd))
    calls = [
        ("_avgpool_K", (x, k)), ("_avgpool_KT", (y, k)),
        ("_downsample_K", (x, k)), ("_downsample_KT", (yd, k)),
        ("_flatten_K", (x,)), ("_flatten_KT", (yf, C, H, Wd)),
    ]
    for name, args in calls:
        close(ops("jit")[name](*args), ops("plain")[name](*args))


def all_calls(dtype):
    """One call of every kernel, on a fixed conv geometry with padding, stride and dilation."""
    c = dict(B=2, Cin=3, Cout=2, k=3, s=2, p=1, d=2, H=9, Wd=8, seed=7, chunk=1)
    W, x, y = conv_arrays(c, dtype)
    rng = np.random.default_rng(0)
    xp = rng.normal(size=(2, 3, 4, 6)).astype(dtype)
    yp = rng.normal(size=(2, 3, 2, 3)).astype(dtype)
    yd = rng.normal(size=(2, 12, 2, 3)).astype(dtype)
    Wl, xl, yl = (rng.normal(size=s).astype(dtype) for s in ((4, 5), (2, 5), (2, 4)))
    geometry = (c["s"], c["p"], c["d"])
    return [
        ("_conv2d_K", (W, x, *geometry, 1, False)),
        ("_conv2d_KT", (W, y, *geometry, c["H"], c["Wd"], 1, False)),
        ("_conv2d_Kbox", (x, y, *geometry, c["k"], 1, False)),
        ("_conv2d_K", (W, x, *geometry, 2, True)),  # per-sample GEMMs
        ("_conv2d_KT", (W, y, *geometry, c["H"], c["Wd"], 2, True)),
        ("_conv2d_Kbox", (x, y, *geometry, c["k"], 2, True)),
        ("_conv2d_K", (W, x, 1, 0, 1, 2, False)),  # the no-padding branch, one chunk
        ("_conv2d_KT", (W, np.ones((2, 2, 7, 6), dtype), 1, 0, 1, 9, 8, 2, False)),
        ("_avgpool_K", (xp, 2)), ("_avgpool_KT", (yp, 2)),
        ("_downsample_K", (xp, 2)), ("_downsample_KT", (yd, 2)),
        ("_flatten_K", (xp,)), ("_flatten_KT", (rng.normal(size=(2, 72)).astype(dtype), 3, 4, 6)),
        ("_dense_K", (Wl, xl)), ("_dense_KT", (Wl, yl)), ("_dense_Kbox", (xl, yl)),
    ]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved_and_c_contiguous(mode, dtype):
    ns = ops(mode)
    for name, args in all_calls(dtype):
        out = ns[name](*args)
        assert out.dtype == dtype, name
        assert out.flags.c_contiguous, name


def test_float32_close_to_float64():
    ns = ops("jit")
    for (name, a32), (_, a64) in zip(all_calls(np.float32), all_calls(np.float64)):
        np.testing.assert_allclose(ns[name](*a32), ns[name](*a64), rtol=1e-4, atol=1e-4, err_msg=name)


# -- the template format -------------------------------------------------------------------

# kernels that are plain Python in every rendering (NumPy over the whole batch: conv)
PLAIN = "{# plain Python: NumPy's BLAS over the batch #}"
# one-BLAS-call kernels are jitted only when a jitted program calls them (dbpgen/codegen.py)
ARRAY_JIT = "{% if array_jit %}\n{{ array_jit }}\n{% endif %}"
# (and, jitted, the dense kernels print np.dot into an allocated product, which Numba
# compiles in half the time of @: `{% else %}` the plain form)
ALLOWED_JINJA = {"{{ jit }}", PLAIN, "{% if count_ops %}", "{% endif %}", "{% if array_jit %}",
                 "{{ array_jit }}", "{% else %}"}
# a kind with kernels per rank ((C, H, W) and (C, T)) prints the variants the module calls
VARIANT_JINJA = re.compile(r'\{% set (one_d|two_d) = helpers is not defined( or "_\w+" in helpers)+ %\}'
                           r'|\{% if (one_d|two_d) %\}')


@pytest.mark.parametrize("op", OPS + ("conv1d",))
def test_template_uses_only_the_jit_and_count_ops_blocks(op):
    text = (TEMPLATES / "ops" / f"{op}.py.j2").read_text()
    for line in text.splitlines():
        if re.search(r"\{[{%#]|[}%#]\}", line):
            assert line.strip() in ALLOWED_JINJA or VARIANT_JINJA.fullmatch(line.strip()), line
    functions = re.findall(r"^def (\w+)\(", text, flags=re.M)
    jit_lines = "|".join(re.escape(j) for j in ("{{ jit }}", PLAIN, ARRAY_JIT))
    decorated = re.findall(rf"^(?:{jit_lines})\ndef (\w+)\(", text, flags=re.M)
    assert functions and functions == decorated  # every function is preceded by a jit line
    for name in (f"{op}{rank}_{kind}" for rank in ("", "1d") for kind in ("K", "KT", "Kbox")):
        if f"def _{name}(" in text:
            kind = name.rsplit("_", 1)[1]
            body = text.split(f"def _{name}(", 1)[1].split("\n", 1)[1]
            assert body.startswith(f'{{% if count_ops %}}\n    COUNTS["{kind}"] += 1\n{{% endif %}}\n'), name


def test_count_ops_counts_each_application():
    ns = render_ops("", count_ops=True)
    for name, args in all_calls(np.float64):
        kind = name.rsplit("_", 1)[1]
        before = dict(ns["COUNTS"])
        ns[name](*args)
        after = ns["COUNTS"]
        assert after[kind] == before[kind] + 1, name
        assert sum(after.values()) == sum(before.values()) + 1, name  # helpers do not count


def test_no_kernel_starts_threads_of_its_own():
    """BLAS's threads are a module's only threads: a jitted parallel kernel beside them
    spins against them for the same cores (ten times slower on two cores)."""
    for op in OPS + ("conv1d",):
        text = (TEMPLATES / "ops" / f"{op}.py.j2").read_text()
        assert "prange" not in text and "parallel=True" not in text and "decorators.parallel" not in text, op
    from dbpgen.backend.emit import DECORATORS

    assert not any("parallel" in d for d in DECORATORS.values())


def test_conv_chunks_do_not_change_the_result():
    """The kernels take the batch `chunk` samples at a time (to bound the im2col buffer):
    every chunk size, uneven last chunks and more chunks than one included, gives the
    whole-batch result up to rounding, and the plain and jitted renderings agree."""
    ns = ops("plain")
    for B in (5, 1, 21):
        for s, p, d in ((1, 0, 1), (2, 1, 2)):
            c = dict(B=B, Cin=3, Cout=4, k=3, s=s, p=p, d=d, H=11, Wd=10, seed=B)
            W, x, y = conv_arrays(c)
            whole = (ns["_conv2d_K"](W, x, s, p, d, B, False), ns["_conv2d_KT"](W, y, s, p, d, 11, 10, B, False),
                     ns["_conv2d_Kbox"](x, y, s, p, d, 3, B, False))
            for chunk in (1, 2, 4):
                for per_sample in (False, True):  # and one GEMM per sample gives it too
                    parts = (ns["_conv2d_K"](W, x, s, p, d, chunk, per_sample),
                             ns["_conv2d_KT"](W, y, s, p, d, 11, 10, chunk, per_sample),
                             ns["_conv2d_Kbox"](x, y, s, p, d, 3, chunk, per_sample))
                    for a, b in zip(parts, whole):
                        close(a, b)
                        assert a.flags.c_contiguous


def _with_small_gemm(ns: dict, name: str, bound: int):
    """A plain-Python kernel of `ns` reading SMALL_GEMM = bound instead (its own globals)."""
    import types

    f = ns[name]
    return types.FunctionType(f.__code__, {**ns, "SMALL_GEMM": bound}, f.__name__, f.__defaults__)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_kernels_agree_on_both_sides_of_small_gemm(mode, dtype):
    """K copies W^T at or below SMALL_GEMM multiply-adds (from COPY_WT_BATCH samples, W up to
    COPY_WT_SIZE) and K^box splits a stacked batch whose halves are: every form gives the einsum's product in the input's dtype,
    C-contiguous, for batches even and odd, below, around and past the bound; the plain
    kernels also with the bound moved so that every batch takes each branch."""
    ns, rng = ops(mode), np.random.default_rng(0)
    W = rng.standard_normal((64, 48)).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-10)
    kernels = [ns]
    if mode == "plain":  # 0: never the small form nor the split; 10**12: always the small form
        kernels += [{name: _with_small_gemm(ns, name, bound)
                     for name in ("_dense_K", "_dense_KT", "_dense_Kbox", "_dense_K_into", "_dense_KT_into")}
                    for bound in (0, 10 ** 12, 300 * 48 * 64)]  # the last splits 400 and 401, not 651
    # n * 48 * 64 against SMALL_GEMM: below, under COPY_WT_BATCH; below; over with halves
    # below (even, odd); over, the larger half (326) over; over
    for n in (8, 40, 400, 401, 651, 1000):
        x, y = rng.standard_normal((n, 48)).astype(dtype), rng.standard_normal((n, 64)).astype(dtype)
        x64, y64, W64 = (a.astype(np.float64) for a in (x, y, W))
        for k in kernels:
            # the _into forms write into a half of a stacked buffer, as the fused schedule has them
            stacked_y, stacked_x = np.zeros((2 * n, 64), dtype), np.zeros((2 * n, 48), dtype)
            K_into = k["_dense_K_into"](W, x, stacked_y[n:])
            KT_into = k["_dense_KT_into"](W, y, stacked_x[:n])
            assert np.shares_memory(K_into, stacked_y) and np.shares_memory(KT_into, stacked_x)
            assert not stacked_y[:n].any() and not stacked_x[n:].any()
            for got, want in ((k["_dense_K"](W, x), np.einsum("oi,bi->bo", W64, x64)),
                              (k["_dense_KT"](W, y), np.einsum("oi,bo->bi", W64, y64)),
                              (k["_dense_Kbox"](x, y), np.einsum("bi,bo->oi", x64, y64)),
                              (stacked_y[n:], np.einsum("oi,bi->bo", W64, x64)),
                              (stacked_x[:n], np.einsum("oi,bo->bi", W64, y64))):
                assert got.dtype == dtype and got.flags.c_contiguous
                np.testing.assert_allclose(got, want, **tol)
    assert 8 < COPY_WT_BATCH <= 40 and 64 * 48 <= COPY_WT_SIZE
    assert 40 * 48 * 64 <= SMALL_GEMM < 400 * 48 * 64 and 326 * 48 * 64 > SMALL_GEMM >= 201 * 48 * 64


def test_kernels_are_cacheable():
    """Numba refuses to cache (cache=True) a function whose code holds dynamic globals,
    e.g. a call of numba.get_num_threads() in a kernel or any helper it calls: none here."""
    ns = ops("jit")
    rng = np.random.default_rng(0)
    W, x, y = (rng.normal(size=s) for s in ((4, 5), (2, 5), (2, 4)))
    into = [("_dense_K_into", (W, x, np.zeros((4, 4))[2:])), ("_dense_KT_into", (W, y, np.zeros((4, 5))[:2]))]
    for name, args in all_calls(np.float64) + into:
        ns[name](*args)
        if not hasattr(ns[name], "overloads"):  # plain Python (conv): nothing to cache
            continue
        for overload in ns[name].overloads.values():
            assert not overload.library.has_dynamic_globals, name
