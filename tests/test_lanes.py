"""The fused batch-minor kernels (dbpgen.lanes) for narrow dense networks.

They print the same programs as the array lowering with another schedule: chunks of
samples, fused coordinate-wise loops, K^box accumulated over chunks. Checked against the
autograd oracle across chunk boundaries, against the array lowering of the very same
program, and in float32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import batch_for, compile_spec, import_module
from dbpgen.backend import lanes
from test_codegen import check_float32
from test_gradients import CDB, NODE, assert_close, check_against_oracle, mlp

GIVEN = {"v": "given", "p": "norm", "weight": 0.2}
FUSED = [
    mlp("lanes_relu_cdb", ["relu", "relu"], None, "mse", CDB, widths=(8, 5), n_in=1, C=1),
    mlp("lanes_tanh_node", ["tanh", "silu"], None, "mse", NODE, widths=(6, 7)),
    mlp("lanes_sigmoid_given", ["softplus", {"leaky_relu": 0.1}], "sigmoid", "mse", GIVEN),
    mlp("lanes_wgan", ["elu", "tanh"], None, "none", {"v": "output", "p": "(sqrt(s) - 1)**2"}, C=1, bias=False),
]


def fused(module) -> bool:
    with open(module.__file__) as f:
        return "workspace: one chunk of every per-sample value" in f.read()


@pytest.mark.parametrize("spec", FUSED, ids=[s["name"] for s in FUSED])
def test_fused_kernels_match_the_oracle_across_chunk_boundaries(spec, shared_module, rng):
    module = shared_module(spec)
    assert fused(module)
    for batch in (1, lanes.CHUNK - 1, lanes.CHUNK, lanes.CHUNK + 1, 2 * lanes.CHUNK + 7):
        check_against_oracle(spec, module, rng, batch=batch, input_grad=False)  # lanes input_grad: test_schedule


@pytest.mark.parametrize("spec", FUSED[:2], ids=[s["name"] for s in FUSED[:2]])
def test_fused_and_array_lowerings_agree(spec, shared_module, tmp_path, rng, monkeypatch):
    a = shared_module(spec)
    monkeypatch.setattr(lanes, "MAX_WIDTH", 0)
    b = compile_spec(spec, tmp_path)
    assert fused(a) and not fused(b)
    params = a.init_params(seed=2)
    x, y, v = batch_for(spec, rng, 100)
    va, ga = a.value_and_grad(params, x, y)
    vb, gb = b.value_and_grad(params, x, y)
    assert_close(va, vb, 1e-12)
    for k in ga:
        assert_close(ga[k], gb[k], 1e-12)
    assert_close(a.vjp(params, x, v), b.vjp(params, x, v), 1e-12)


def test_wide_layers_and_softmax_keep_gemm_kernels(tmp_path):
    wide = mlp("lanes_wide", ["relu", "relu"], None, "mse", CDB, widths=(lanes.MAX_WIDTH + 1, 4))
    soft = mlp("lanes_softmax", ["relu", "relu"], "softmax", "nll", CDB)
    assert not fused(compile_spec(wide, tmp_path))
    assert not fused(compile_spec(soft, tmp_path))


@pytest.mark.parametrize("spec", FUSED[:2], ids=[s["name"] for s in FUSED[:2]])
def test_fused_float32_stays_float32_and_close(spec, shared_module, tmp_path, rng):
    m32 = check_float32(spec, tmp_path, rng, batch=70, m64=shared_module(spec))
    assert fused(m32)
    # the same code as plain Python, where a width printed as a float32 literal (lanes_relu_cdb:
    # one input, one output) would not be a range bound, as Numba lets it be
    plain = import_module(Path(m32.__file__), jit=False)
    params = m32.init_params(seed=1)
    x, y, _ = batch_for(spec, rng, 9)
    x, y = x.astype(np.float32), y.astype(np.float32)
    value, grads = plain.value_and_grad(params, x, y)
    expected, expected_grads = m32.value_and_grad(params, x, y)
    assert_close(value, expected, 1e-5)
    for k in grads:
        assert_close(grads[k], expected_grads[k], 1e-4)
