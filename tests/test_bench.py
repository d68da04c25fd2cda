"""The benchmark harness (not a timing test: benchmarks run on demand, `dbpgen bench`)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import BENCHMARKS, ROOT
from dbpgen import bench
from dbpgen.cli import main
from dbpgen.model import load_model, model_from_dict


def test_harness_smoke(capsys):
    assert main(["bench", str(BENCHMARKS / "sine_cdb.yaml"), "--batch", "16",
                 "--against", "", "--seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "dbpgen" in out and "GFLOP/s" in out and "median ms" in out


def test_unknown_peer_is_a_clear_error(capsys):
    assert main(["bench", str(BENCHMARKS / "sine_cdb.yaml"), "--against", "tensorflow"]) == 2
    assert "--against" in capsys.readouterr().err


INSTALLED = [p for p in bench.PEERS if importlib.util.find_spec(p if p != "pytensor" else "pytensor")]


@pytest.mark.skipif(not INSTALLED, reason="no peer installed (pip install '.[bench]')")
@pytest.mark.parametrize("name", ["sine_cdb", "tanh_node", "mnist_cdb", "mnist_jac"])
def test_peers_compute_the_same_objective(name):
    """The peers are benchmarked on the same problem: same J and gradients as dbpgen."""
    model = load_model(BENCHMARKS / f"{name}.yaml")
    x, y, v = bench.problem(model, 8)
    module = bench.dbpgen_module(model)
    params = module.init_params(seed=0)
    value, grads = bench.dbpgen_runner(model, module, params, x, y, v)()
    for peer in INSTALLED:
        out = bench.RUNNERS[peer](model, params, x, y, v)()
        if peer == "pytensor":
            peer_value, peer_grads = out[0], out[1:]
        else:
            peer_value, peer_grads = out
            if isinstance(peer_grads, dict):  # jax sorts dict keys
                peer_grads = [peer_grads[k] for k in grads]
        assert float(peer_value) == pytest.approx(value, rel=1e-9), peer
        for ours, theirs in zip(grads.values(), peer_grads):
            theirs = np.asarray(theirs.detach() if hasattr(theirs, "detach") else theirs)
            np.testing.assert_allclose(theirs, ours, rtol=1e-7, atol=1e-12, err_msg=peer)


@pytest.mark.skipif(not INSTALLED, reason="no peer installed (pip install '.[bench]')")
@pytest.mark.parametrize("act", ["z*tanh(log(1 + exp(z)))", "z/(1 + abs(z))"])
def test_peers_run_expression_activations(tmp_path, act):
    """An activation given as an expression in z is translated for the peers, same J."""
    spec = {"name": "expr_act", "input": [3], "layers": [{"dense": 5, "act": act}, {"dense": 2}],
            "loss": "mse", "penalty": {"v": "loss_gradient", "weight": 0.1}}
    model = model_from_dict(spec, "expr_act")
    x, y, v = bench.problem(model, 4)
    module = bench.dbpgen_module(model)
    params = module.init_params(seed=0)
    value, _ = bench.dbpgen_runner(model, module, params, x, y, v)()
    for peer in INSTALLED:
        out = bench.RUNNERS[peer](model, params, x, y, v)()
        assert float(out[0]) == pytest.approx(value, rel=1e-9), peer


@pytest.mark.skipif(not INSTALLED, reason="no peer installed (pip install '.[bench]')")
def test_peers_give_zero_gradients_to_parameters_the_penalty_does_not_reach():
    """loss: none with an output-node penalty: the last bias never reaches R (eta_L = 0)."""
    model = load_model(ROOT / "examples" / "sine_node.yaml")
    x, y, v = bench.problem(model, 8)
    module = bench.dbpgen_module(model)
    params = module.init_params(seed=0)
    value, grads = bench.dbpgen_runner(model, module, params, x, y, v)()
    assert not grads[f"b{len(model.layers)}"].any()
    for peer in INSTALLED:
        out = bench.RUNNERS[peer](model, params, x, y, v)()
        peer_value, peer_grads = (out[0], out[1:]) if peer == "pytensor" else out
        if isinstance(peer_grads, dict):
            peer_grads = [peer_grads[k] for k in grads]
        assert float(peer_value) == pytest.approx(value, rel=1e-9), peer
        for ours, theirs in zip(grads.values(), peer_grads):
            theirs = np.asarray(theirs.detach() if hasattr(theirs, "detach") else theirs)
            np.testing.assert_allclose(theirs, ours, rtol=1e-7, atol=1e-12, err_msg=peer)


def test_peers_refuse_power_iterations_they_would_not_run():
    """v: random with k > 0 power iterations: the peers would take v as given and skip the
    k power iterations dbpgen runs first, so the harness reports them unsupported instead of timing them."""
    spec = {"name": "power", "input": [3], "layers": [{"dense": 4, "act": "tanh"}, {"dense": 2}],
            "loss": "mse", "penalty": {"v": "random", "iterations": 2, "weight": 0.1}}
    model = model_from_dict(spec, "power")
    x, y, v = bench.problem(model, 4)
    with pytest.raises(bench.Unsupported, match="2 power iterations"):
        bench._check_penalty(model)
    for peer in INSTALLED:
        with pytest.raises(bench.Unsupported, match="2 power iterations"):
            bench.RUNNERS[peer](model, {}, x, y, v)
    spec["penalty"]["iterations"] = 0
    bench._check_penalty(model_from_dict(spec, "power"))  # without iterations: compared as given


def test_outputs_sweep_rewrites_the_last_layer(tmp_path, capsys):
    path = bench.with_outputs(BENCHMARKS / "mnist_jac.yaml", 3, tmp_path)
    model = load_model(path)
    assert model.n_outputs == 3 and model.name == "mnist_jac_C3"
    assert main(["bench", str(BENCHMARKS / "sine_cdb.yaml"), "--batch", "8", "--against", "",
                 "--seconds", "0.02", "--outputs", "2"]) == 0
    assert "sine_cdb_C2" in capsys.readouterr().out
