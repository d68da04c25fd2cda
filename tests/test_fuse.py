"""Fused coordinate-wise loops (dbpgen/backend/fused.py) in programs that run as Python over
BLAS (schedule fused), or as one jitted function calling BLAS and the same loops (jit).

Wide models take the fused schedule (the chooser's cost model: the interpreter between
statements costs little beside BLAS; libm functions such as sin stay NumPy's SIMD ufuncs
there); their gradients must match the independent autograd oracle, jitted and as plain
Python, in both schedules.
What the loops store is checked on the schedule IR in test_schedule.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, compile_spec, write_model
from test_codegen import check_float32, check_jit_equals_plain
from test_gradients import CDB, GIVEN, NODE, WGAN, check_against_oracle, mlp

WIDE = (96, 200)  # 96 x 200 x 2 flops per sample: over the GEMM bound

FUSED = [
    mlp("fused_relu_softmax_cdb", ["relu", "relu"], "softmax", "nll", CDB, widths=WIDE, C=4),
    mlp("fused_tanh_sigmoid_node", ["tanh", "sigmoid"], None, "mse", NODE, widths=WIDE),
    mlp("fused_leaky_softplus_given", [{"leaky_relu": 0.1}, "softplus"], "sigmoid", "mse", GIVEN, widths=WIDE),
    mlp("fused_elu_wgan", ["elu", "z**3/3 + sin(z)"], None, "mse", WGAN, widths=WIDE),
    mlp("fused_relu_nobias_cdb", ["relu", "abs(z)"], None, "mse", CDB, widths=WIDE, bias=False),
]


# every spec in the fused schedule; in a jitted program, the ones with a transcendental function
# (sin: the fused schedule leaves it to NumPy's ufuncs, a jitted one fuses it into its loops)
# and with tanh and sigmoid (vectorized polynomials in the loops of both); relu and abs:
# every loop printed inside the jitted program
CASES = [(s, "fused") for s in FUSED] + [(FUSED[1], "jit"), (FUSED[3], "jit"), (FUSED[4], "jit")]


def _program(module, name: str = "value_and_grad") -> str:
    return Path(module.__file__).read_text().split(f"def _{name}(", 1)[1].split("\ndef ", 1)[0]


@pytest.mark.parametrize("spec, schedule", CASES, ids=[f"{s['name']}-{k}" for s, k in CASES])
def test_fused_programs_match_oracle_and_plain_python(spec, schedule, shared_module, rng):
    module = shared_module(spec, schedule)
    assert module.SCHEDULES["value_and_grad"] == schedule
    assert "_fused" in _program(module) or schedule == "jit" and "for i in range(" in _program(module), \
        "nothing was fused"
    check_against_oracle(spec, module, rng)
    check_jit_equals_plain(spec, module, rng)


def test_a_jitted_program_prints_its_loops_inline_unless_they_call_a_helper(tmp_path):
    """A jitted program's loops are printed in it (Numba compiles each once instead of on its
    own and again linked into the program); a loop calling a vectorized helper stays a
    function, where LLVM inlines the helper and vectorizes the loop."""
    relu = _program(compile_spec(FUSED[4], tmp_path, schedule="jit"))
    assert "_fused" not in relu and relu.count("for i in range(") >= 4, relu
    module = compile_spec(FUSED[1], tmp_path, schedule="jit")
    program = _program(module)
    kernels = _kernels(Path(module.__file__).read_text(), program)
    assert "_tanh1(" in kernels and "_sigmoid1(" in kernels
    assert "for i in range(" in program and "_tanh1(" not in program and "_sigmoid1(" not in program


JACOBIAN = mlp("fused_tanh_jacobian", ["tanh", "tanh"], None, "none", {"v": "jacobian"}, widths=(24, 24), C=3)


# images through downsample and avgpool: (B, C, H, W) arrays in a jitted program, where a
# whole-array product of two 4-d arrays takes Numba 9 s to compile
POOLED = {"name": "fused_pooled_jacobian", "input": [2, 4, 4],
          "layers": [{"downsample": 2, "act": "relu"}, {"avgpool": 2, "act": "softplus"}, "flatten",
                     {"dense": 3, "act": "tanh"}],
          "loss": "none", "penalty": {"v": "jacobian"}}


@pytest.mark.parametrize("spec", [FUSED[1], JACOBIAN, POOLED], ids=["tanh_sigmoid_node", "tanh_jacobian", "pooled"])
def test_a_jitted_program_computes_no_whole_array_arithmetic(spec, tmp_path, rng):
    """Numba compiles each whole-array expression of a jitted function as a kernel of its
    own (about 0.25 s each, optimized, against 0.1 s for a loop): every coordinate-wise
    statement no fused loop took, in Algorithm 4's loop over Jacobian rows too, and every
    accumulation over those rows is a loop of its own (fused.array_loops)."""
    import ast

    module = compile_spec(spec, tmp_path, schedule="jit", jit=False)
    tree = ast.parse(Path(module.__file__).read_text())
    programs = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name[1:] in module.SCHEDULES]
    assert len(programs) == len(module.SCHEDULES)
    assert spec is FUSED[1] or "for i in range(3):" in ast.unparse(tree)  # Algorithm 4's loop

    def whole_arrays(nodes, in_elements=False):
        for node in nodes:
            if isinstance(node, ast.For):  # a loop over elements runs over a size read at run time
                yield from whole_arrays(node.body, in_elements or not isinstance(node.iter.args[0], ast.Constant))
            elif isinstance(node, (ast.Assign, ast.AugAssign)) and not in_elements \
                    and any(isinstance(n, (ast.BinOp, ast.UnaryOp)) for n in ast.walk(node.value)) \
                    and not any(isinstance(n, ast.Call) for n in ast.walk(node.value)):
                yield ast.unparse(node)

    found = [f"{f.name}: {line}" for f in programs for line in whole_arrays(f.body)]
    assert not found, found
    check_against_oracle(spec, module, rng, batch=5)  # its loops, as plain Python (jitted: above)


def test_jitted_programs_print_alike_whatever_the_hash_seed(tmp_path):
    """Which operand a loop takes its sizes from is chosen by name, not by the order of a set:
    the module is the same byte for byte under any PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    path = write_model(FUSED[1], tmp_path)
    texts = set()
    for seed in ("1", "2", "3"):
        subprocess.run([sys.executable, "-m", "dbpgen.cli", "compile", str(path), "--schedule", "jit", "-o",
                        str(tmp_path / seed)], check=True, capture_output=True, env=dict(os.environ, PYTHONHASHSEED=seed))
        texts.add((tmp_path / seed / f"{FUSED[1]['name']}.py").read_bytes())
    assert len(texts) == 1


def _kernels(source: str, program: str) -> str:
    """The source of the fused loops a program calls."""
    called = re.findall(r"(_fused\d+)\(", program)
    assert called, program
    return "".join(source.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0] for name in set(called))


def test_vectorized_functions_join_the_loops_and_libm_functions_stay_numpy_ufuncs(tmp_path):
    """In the fused schedule tanh, sigmoid and exp (elu's) are evaluated inside the jitted
    loops, as the vectorized polynomials _tanh1, _sigmoid1 and _exp1 (g = tanh(z) in the loop
    that makes z, g' and g'' through g in the same loop); sin, a libm call per coordinate in
    a loop, stays a NumPy whole-array statement."""
    module = compile_spec(FUSED[1], tmp_path, schedule="fused")
    source = Path(module.__file__).read_text()
    program = source.split("def _value_and_grad(", 1)[1].split("\ndef ", 1)[0]
    assert "tanh" not in program and "sigmoid" not in program
    assert re.search(r"x1, dg1, ddg1 = (_fused\d+)\(", program), program  # z1, x1, g', g'' in one loop
    kernels = _kernels(source, program)
    assert "_tanh1(" in kernels and "_sigmoid1(" in kernels
    # the loops' scalar helpers do not make the BLAS helpers jitted: Python calls those, and
    # NumPy's BLAS, not Numba's, takes the products (a 4 x 128 x 512 K^box: 0.06 against 5 ms)
    assert not re.search(r"@numba\.njit[^\n]*\ndef _dense_K(box)?\(", source)
    module = compile_spec(FUSED[3], tmp_path, schedule="fused")
    source = Path(module.__file__).read_text()
    program = source.split("def _value_and_grad(", 1)[1].split("\ndef ", 1)[0]
    assert "np.sin(" in program and "exp" not in program
    assert "_exp1(" in _kernels(source, program)


MISH = mlp("fused_mish_cdb", ["z*tanh(log(1 + exp(z)))", "softplus"], None, "mse", CDB, widths=(24, 24))


@pytest.mark.parametrize("schedule", ["fused", "jit"])
def test_a_loop_evaluates_each_vectorized_application_once(schedule, tmp_path, rng):
    """SymPy's g' and g'' of mish repeat exp(z) and tanh(log(exp(z) + 1)) (g'' holds exp(z)
    eight times); each loop evaluates every distinct application once, as a scalar of its
    own (exp(2 z) as the square of exp(z)), and the module still matches the oracle."""
    module = compile_spec(MISH, tmp_path, schedule=schedule, jit=False)
    source = Path(module.__file__).read_text()
    loops = re.findall(r"\ndef (_fused\d+|_value_and_grad)\((.*?)(?=\n\S)", source, re.S)
    calls = [(name, re.findall(r"(_(?:exp|log|tanh|softplus)1)\(([^()]*)\)", body)) for name, body in loops]
    assert sum(len(c) for _, c in calls) >= 4, source
    for name, found in calls:
        assert len(found) == len(set(found)), (name, found)
    assert not re.search(r"_(exp|log|tanh)1\(_", source), "a helper applied to a helper's result in place"
    check_against_oracle(MISH, module, rng)


def test_the_chooser_takes_one_jitted_program_for_tanh_and_for_relu(tmp_path):
    """Layers of 48 units: one jitted program (no interpreter between its statements) for
    ReLU, and for tanh too, since tanh costs a vectorized polynomial in its loops, not a
    libm call."""
    tanh = compile_spec(FUSED[1], tmp_path)
    relu = compile_spec(FUSED[0], tmp_path)
    assert tanh.SCHEDULES["value_and_grad"] == "jit" and relu.SCHEDULES["value_and_grad"] == "jit"


FLOAT32 = [(FUSED[0], "fused"), (FUSED[1], "jit")]


@pytest.mark.parametrize("spec, schedule", FLOAT32, ids=[f"{s['name']}-{k}" for s, k in FLOAT32])
def test_fused_float32_stays_float32(spec, schedule, shared_module, tmp_path, rng):
    """Fused loops write float32 arrays, and stay within 1e-4 of the float64 module."""
    check_float32(spec, tmp_path, rng, schedule=schedule, m64=shared_module(spec, schedule))
