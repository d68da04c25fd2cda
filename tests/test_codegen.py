"""The emitted module: golden files, determinism, Numba-jitted vs plain Python, float32."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import BENCHMARKS, ROOT, batch_for, compile_spec, import_module
from dbpgen.backend.emit import DECORATORS
from dbpgen.compiler import compile_file
from oracle import Oracle
from test_gradients import CDB, GIVEN, NODE, assert_close, check_against_oracle, mlp

MODELS = sorted((ROOT / "examples").glob("*.yaml")) + sorted(BENCHMARKS.glob("*.yaml"))
UPDATE = "python -m pytest tests/test_codegen.py --update-golden"


def _first_difference(new: bytes, old: bytes) -> str:
    pairs = zip(new.decode().splitlines(), old.decode().splitlines())
    for number, (a, b) in enumerate(pairs, 1):
        if a != b:
            return f"line {number}: {b.strip()[:80]!r} -> {a.strip()[:80]!r}"
    return "lengths differ"


@pytest.mark.parametrize("path", MODELS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_generated_folder_is_up_to_date(path, tmp_path, update_golden):
    """generated/ doubles as golden files: recompiling must reproduce them byte for byte.
    With --update-golden the fresh compile replaces a golden file that differs."""
    out = compile_file(path, tmp_path)
    golden = ROOT / "generated" / out.name
    fresh = out.read_bytes()
    if update_golden:
        if not golden.exists() or golden.read_bytes() != fresh:
            staged = golden.with_suffix(f".{path.parent.name}.tmp")  # two models may share a name
            staged.write_bytes(fresh)
            staged.replace(golden)
        return
    assert golden.exists(), f"generated/{out.name} is missing; to write it: {UPDATE}"
    assert fresh == golden.read_bytes(), \
        f"generated/{out.name} is stale ({_first_difference(fresh, golden.read_bytes())}); to rewrite it: {UPDATE}"


def test_every_golden_file_has_its_model_in_the_repository():
    """The models the golden test compiles are in the repository, and every golden file is
    the compile of one of them (no golden file outlives its model)."""
    assert MODELS and all(p.resolve().is_relative_to(ROOT) for p in MODELS)
    names = {yaml.safe_load(p.read_text())["name"] for p in MODELS}
    assert {p.stem for p in (ROOT / "generated").glob("*.py")} == names


def test_output_is_deterministic_and_standalone(tmp_path):
    path = ROOT / "examples" / "sine_cdb.yaml"
    first = compile_file(path, tmp_path / "a").read_bytes()
    second = compile_file(path, tmp_path / "b").read_bytes()
    assert first == second
    tree = ast.parse(first)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported - {"ctypes", "math", "os", "sys"} == {"numpy", "numba"}  # besides the standard library
    text = first.decode()
    assert "dbpgen" in text.splitlines()[2] and "sha256" in text


JITTED = [
    mlp("jit_relu_cdb", ["relu", "relu"], None, "mse", CDB),
    mlp("jit_softmax_nll_cdb", ["relu", "tanh"], "softmax", "nll", CDB),
    mlp("jit_tanh_node", ["tanh", "silu"], None, "mse", NODE),
    mlp("jit_sigmoid_given", [{"leaky_relu": 0.1}, "z*tanh(log(1 + exp(z)))"], "sigmoid", "mse", GIVEN),
    # wider than the fused kernels take, below the GEMM bound: one jitted whole-batch function
    mlp("jit_wide_relu_cdb", ["relu", "relu"], None, "mse", CDB, widths=(40, 33)),
]


def _decorated(text: str, function: str) -> bool:
    return f"{DECORATORS['njit']}\ndef {function}(" in text


def test_schedules_follow_the_shapes(tmp_path):
    """codegen.jit_program: fused kernels (narrow), one jitted function (small), Python over
    BLAS (GEMM-bound); helpers that are one BLAS call are jitted only for jitted callers."""
    wide = compile_spec(mlp("wide", ["relu", "relu"], None, "mse", CDB, widths=(512, 512), n_in=64), tmp_path,
                        jit=True)
    text = Path(wide.__file__).read_text()
    assert "def _value_and_grad(" in text and not _decorated(text, "_value_and_grad")
    assert "def _dense_K(W, x):" in text and not _decorated(text, "_dense_K")
    assert f"{DECORATORS['reassoc']}\ndef _rowdot2(" in text  # loops stay jitted
    small = compile_spec(mlp("small", ["relu", "relu"], None, "mse", CDB, widths=(40, 33)), tmp_path, jit=True)
    text = Path(small.__file__).read_text()
    assert _decorated(text, "_value_and_grad") and _decorated(text, "_dense_K")
    narrow = (ROOT / "generated" / "sine_cdb.py").read_text()
    assert "fastmath" in narrow.split("def _value_and_grad(")[0].rsplit("\n", 2)[-2]
    # widths read at run time, so that LLVM does not unroll every loop over units
    assert "n8_ = W1.shape[0]" in narrow and "for i in range(n8_):" in narrow


@pytest.mark.parametrize("spec", JITTED, ids=[s["name"] for s in JITTED])
def test_jitted_matches_oracle_and_plain_python(spec, shared_module, rng):
    jitted = shared_module(spec)
    check_against_oracle(spec, jitted, rng, input_grad=False)  # jitted input_grad: test_schedule
    check_jit_equals_plain(spec, jitted, rng)


def check_jit_equals_plain(spec, jitted, rng):
    """The same module under NUMBA_DISABLE_JIT semantics gives the same numbers."""
    plain = import_module(Path(jitted.__file__), jit=False)
    params = jitted.init_params(seed=1)
    x, y, v = batch_for(spec, rng)
    vv = v if spec["penalty"]["v"] == "given" else None
    a_value, a_grads = jitted.value_and_grad(params, x, y, v=vv)
    b_value, b_grads = plain.value_and_grad(params, x, y, v=vv)
    assert_close(a_value, b_value, 1e-13)
    for k in a_grads:
        assert_close(a_grads[k], b_grads[k], 1e-13)


def check_float32(spec, tmp_path, rng, batch=8, schedule=None, m64=None):
    """The float32 module stays float32 and within 1e-4 of float64 (m64: the float64 module
    of spec, when a test has it already); returns it."""
    if m64 is None:
        m64 = compile_spec(dict(spec, name=spec["name"] + "_64"), tmp_path, jit=True, schedule=schedule)
    m32 = compile_spec(dict(spec, name=spec["name"] + "_32", dtype="float32"), tmp_path, jit=True,
                       schedule=schedule)
    params = m64.init_params(seed=0)
    x, y, v = batch_for(spec, rng, batch=batch)
    value64, grads64 = m64.value_and_grad(params, x, y)
    p32 = {k: a.astype(np.float32) for k, a in params.items()}
    value32, grads32 = m32.value_and_grad(p32, x.astype(np.float32), y.astype(np.float32))
    assert abs(value32 - value64) <= 1e-4 * max(1.0, abs(value64))
    for k, g in grads64.items():
        assert grads32[k].dtype == np.float32
        assert_close(grads32[k], g, 1e-4)
    assert m32.forward(p32, x.astype(np.float32)).dtype == np.float32
    assert m32.init_params()["W1"].dtype == np.float32
    return m32


@pytest.mark.parametrize("spec", JITTED[:2], ids=[s["name"] for s in JITTED[:2]])
def test_float32_within_1e_4_of_float64(spec, shared_module, tmp_path, rng):
    check_float32(spec, tmp_path, rng, m64=shared_module(spec))


def test_nll_accepts_class_indices_like_torch(tmp_path, rng):
    spec = mlp("labels", ["tanh"], "softmax", "nll", CDB, widths=(4,), C=3)
    m = compile_spec(spec, tmp_path, jit=False)
    params = m.init_params()
    x = rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    assert_close(m.value_and_grad(params, x, labels)[0], m.value_and_grad(params, x, np.eye(3)[labels])[0], 0)


def test_softmax_and_nll_are_stable_for_huge_logits(tmp_path):
    spec = mlp("huge", ["relu"], "softmax", "nll", CDB, widths=(3,), n_in=2, C=3)
    m = compile_spec(spec, tmp_path, jit=False)
    params = m.init_params()
    params["W2"] = params["W2"] * 1e4
    x = np.array([[30.0, -20.0], [5.0, 7.0]])
    value, grads = m.value_and_grad(params, x, np.array([0, 1]))
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads.values())


def test_relu_kink_gives_no_nan(tmp_path):
    spec = mlp("kink", ["relu"], None, "mse", CDB, widths=(2,), n_in=1, C=1)
    m = compile_spec(spec, tmp_path, jit=False)
    params = m.init_params()
    params["b1"][:] = 0.0
    value, grads = m.value_and_grad(params, np.zeros((3, 1)), np.ones((3, 1)))
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads.values())


def test_installed_templates_are_found():
    from dbpgen.codegen import TEMPLATE, template_dir
    assert (template_dir() / TEMPLATE).is_file()


def test_numba_disable_jit_environment_runs_the_same_code(tmp_path, rng):
    """NUMBA_DISABLE_JIT=1 (as a user would set it) gives the oracle's gradients too."""
    import json
    import os
    import subprocess
    import sys

    spec = mlp("envjit", ["relu", "tanh"], "softmax", "nll", CDB)
    m = compile_spec(spec, tmp_path, jit=False)
    x, y, _ = batch_for(spec, rng)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    script = (
        "import importlib.util, json, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('m', {m.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not hasattr(m._value_and_grad, 'py_func')  # really not jitted\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r}); y = np.load({str(tmp_path / 'y.npy')!r})\n"
        "value, grads = m.value_and_grad(m.init_params(seed=2), x, y)\n"
        "print(json.dumps({'value': value, **{k: g.tolist() for k, g in grads.items()}}))\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    ref_value, ref_grads = Oracle(spec).value_and_grad(m.init_params(seed=2), x, y)
    assert_close(got["value"], ref_value)
    for k, g in ref_grads.items():
        assert_close(np.array(got[k]), g)


def test_numba_cache_loads_under_any_import_name(tmp_path):
    """The on-disk cache written under one import name loads under another (fresh processes):
    the second and third process compile nothing. Optimized, as users run it (unoptimized,
    Numba does not cache some callers: tests/conftest.py)."""
    import subprocess
    import sys

    module = compile_file(ROOT / "examples" / "sine_cdb.yaml", tmp_path)
    calls = {
        "importlib": "import importlib.util as u; s = u.spec_from_file_location('{n}', r'{p}'); "
                     "m = u.module_from_spec(s); s.loader.exec_module(m)",
        "dbpgen": "from dbpgen.compiler import load_generated; m = load_generated(r'{p}')",
    }
    env = dict(os.environ, NUMBA_OPT="3")
    values, hits = [], []
    for name, load in [("importlib", "first_name"), ("importlib", "other_name"), ("dbpgen", "")]:
        code = (calls[name].format(n=load, p=module) + "; import numpy as np; p = m.init_params(0); "
                "print(m.value_and_grad(p, np.ones((5, 1)), np.zeros((5, 1)))[0]); "
                "s = m._value_and_grad.stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        value, counts = out.stdout.strip().splitlines()
        values.append(value)
        hits.append(tuple(map(int, counts.split())))
    assert len(set(values)) == 1
    assert hits == [(0, 1), (1, 0), (1, 0)]  # compiled once, then loaded under two other names


def test_small_gemm_forms_only_where_the_blas_has_small_matrix_kernels(tmp_path):
    """A module reads at import which kernels NumPy's OpenBLAS runs: with AVX2 kernels
    (OPENBLAS_CORETYPE=Haswell, as on the AVX2 machines and pinned AVX-512 ones) SMALL_GEMM
    is 0 (K never copies W^T, K^box never splits); in this process it follows the rule."""
    import subprocess
    import sys

    from dbpgen.backend.blas import blas_core
    from dbpgen.backend.chooser import SMALL_GEMM, SMALL_KERNEL_CORES

    module = compile_file(ROOT / "examples" / "sine_cdb.yaml", tmp_path)
    code = ("from dbpgen.compiler import load_generated; m = load_generated(r'%s'); "
            "print(m._blas_core(), m.SMALL_GEMM)" % module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, OPENBLAS_CORETYPE="Haswell"))
    assert out.returncode == 0, out.stderr
    core, small = out.stdout.split()
    assert core == "Haswell" and small == "0"
    m = import_module(module)
    assert m.SMALL_GEMM == (SMALL_GEMM if blas_core() in SMALL_KERNEL_CORES else 0)


def test_every_package_is_installed():
    """A non-editable install ships exactly the packages pyproject.toml lists: each
    folder of dbpgen/ with an __init__.py must be among them."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dbpgen").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
