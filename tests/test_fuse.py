"""Fused coordinate-wise loops (dbpgen/fuse.py) in programs that run as Python over BLAS.

GEMM-bound models (a layer of >= codegen.GEMM_BOUND_FLOPS per sample) take this schedule;
their gradients must match the independent autograd oracle, jitted and as plain Python.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT, compile_spec
from dbpgen import codegen
from test_codegen import check_float32, check_jit_equals_plain
from test_gradients import CDB, GIVEN, NODE, WGAN, check_against_oracle, mlp

WIDE = (96, 200)  # 96 x 200 x 2 flops per sample: over the GEMM bound
assert 2 * WIDE[0] * WIDE[1] >= codegen.GEMM_BOUND_FLOPS

FUSED = [
    mlp("fused_relu_softmax_cdb", ["relu", "relu"], "softmax", "nll", CDB, widths=WIDE, C=4),
    mlp("fused_tanh_sigmoid_node", ["tanh", "sigmoid"], None, "mse", NODE, widths=WIDE),
    mlp("fused_leaky_softplus_given", [{"leaky_relu": 0.1}, "softplus"], "sigmoid", "mse", GIVEN, widths=WIDE),
    mlp("fused_elu_wgan", ["elu", "z**3/3 + z"], None, "mse", WGAN, widths=WIDE),
    mlp("fused_relu_nobias_cdb", ["relu", "abs(z)"], None, "mse", CDB, widths=WIDE, bias=False),
]


@pytest.mark.parametrize("spec", FUSED, ids=[s["name"] for s in FUSED])
def test_fused_programs_match_oracle_and_plain_python(spec, tmp_path, rng):
    module = compile_spec(spec, tmp_path, jit=True)
    text = Path(module.__file__).read_text()
    assert re.search(r"^    .* = _fused\d+\(", text, flags=re.M), "nothing was fused"
    check_against_oracle(spec, module, rng)
    check_jit_equals_plain(spec, module, rng)


def test_fused_loops_store_only_what_later_statements_read():
    text = (ROOT / "generated" / "mnist_cdb.py").read_text()
    program = text.split("def _value_and_grad(", 1)[1].split("\n\n\n", 1)[0]
    # value_and_grad writes x1 into the lower half of the stacked operand of K^box_2
    name = re.search(r"x1, dg1 = (_fused\d+)\(b1, t0_, S2x_\[B:\]\)", program).group(1)
    kernel = text.split(f"def {name}(", 1)[1].split("\n\n\n", 1)[0]
    # z1 = b1 + K_1 x0 feeds only x1 = relu(z1) and G'_1: a scalar, never an array
    assert kernel.startswith("b, t, x_out):")  # names without the layer index
    assert "z = t[i, k] + b[k]" in kernel and "z_out" not in kernel
    assert "x_out[i, k] = x" in kernel and "dg_out[i, k] = dg" in kernel
    assert "x_out = " not in kernel and "dg_out = np.empty_like(t)" in kernel
    assert f"@numba.njit(cache=True)\ndef {name}(" in text
    # layer 2 has the same shape of loop: it calls the same kernel
    assert f"x2, dg2 = {name}(b2, t1_, S3x_[B:])" in program
    # forward() stores x1 only: its own loop; penalty() needs G'_1 too, and its own array
    forward = text.split("def _forward(", 1)[1].split("\n\n\n", 1)[0]
    assert re.search(r"x1 = _fused\d+\(b1, t0_\)\[0\]", forward)
    assert re.search(r"x1, dg1 = _fused\d+\(b1, t0_\)", text.split("def _penalty(", 1)[1])
    # the operands of the weight and bias adjoints (eq. 31-33) join the loop that makes what
    # they read: eta_1 = G'_1 gamma_1 with lam eta_1 + zeta_1 and its batch sum, written into
    # the stacked buffer; eta_1 itself is never stored
    call = re.search(r"(t\d+_), (t\d+_) = (_fused\d+)\(dg1, gamma1, B, lam, zeta1, S1y_\[:B\]\)", program)
    assert call, "eta1 and the adjoint operands of layer 1 are not fused"
    code = "\n".join(line.split("#")[0] for line in program.splitlines())
    assert f"db1 = {call.group(2)}/B" in program and not re.search(r"\beta1\b", code)
    kernel = text.split(f"def {call.group(3)}(", 1)[1].split("\n\n\n", 1)[0]
    assert kernel.startswith("dg, gamma, B, lam, zeta, t_out):")
    assert "t_1_out = np.zeros(dg.shape[1], dtype=dg.dtype)" in kernel
    assert "t_1_out[k] += eta*lam + zeta[i, k]" in kernel  # summed, not stored
    assert "eta_out" not in kernel and "t_out[i, k] = t" in kernel
    assert re.search(r"zeta1, t\d+_ = _fused\d+\(dg1, xi1, B, lam, S1y_\[B:\]\)", program)
    assert re.search(r"eta2, t\d+_, (t\d+_) = _fused\d+\(dg2, gamma2, B, lam, zeta2, S2y_\[B:\]\)", program)
    assert "dW1 = _dense_Kbox(S1x_, S1y_)" in program and "dW2 = _dense_Kbox(S2x_, S2y_)" in program
    assert "xi0 = _dense_KT_into(W1, zeta1, S1x_[B:])" in program and "S1x_[:B] = x0" in program
    assert len(re.findall(r"^def _fused\d+\(", text, flags=re.M)) == len(set(re.findall(r"^def (_fused\d+)\(", text, flags=re.M)))


def test_transcendental_functions_stay_numpy_ufuncs():
    program = (ROOT / "generated" / "tanh_node.py").read_text().split("def _value_and_grad(", 1)[1]
    assert "x1 = np.tanh(z1)" in program
    assert re.search(r"dg1, ddg1 = _fused\d+\(x1\)", program)  # G' and G'' through g': fused


@pytest.mark.parametrize("spec", FUSED[:2], ids=[s["name"] for s in FUSED[:2]])
def test_fused_float32_stays_float32(spec, tmp_path, rng):
    """Fused loops write float32 arrays, and stay within 1e-4 of the float64 module."""
    check_float32(spec, tmp_path, rng)
