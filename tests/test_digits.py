"""docs/digits-robustness: what its table and plot claim, checked on the committed arrays,
and the attacks of examples/digits_robustness.py checked on a small model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import ROOT, load_example

RESULTS = json.loads((ROOT / "docs" / "digits-robustness.json").read_text())
MID = RESULTS["epsilons"].index(0.1)  # the ε the doc discusses
TEST_SIZE = 500
# two standard errors of an accuracy near 1/2 on 500 test images: sqrt(0.25 / 500) = 0.022
MARGIN = 2 * math.sqrt(0.25 / TEST_SIZE)
NETS = sorted({row["net"] for row in RESULTS["models"].values()})
REGULARIZED = ["double backprop", "Jacobian (Alg. 4)", "random projections"]


def row(net, penalty):
    return RESULTS["models"][f"{net}/{penalty}"]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("penalty", REGULARIZED)
def test_every_regularizer_raises_pgd_accuracy_at_eps_0_1_and_keeps_clean_accuracy(net, penalty):
    plain, reg = row(net, "plain"), row(net, penalty)
    assert reg["pgd"][MID] >= plain["pgd"][MID] + 2 * MARGIN, (reg["pgd"][MID], plain["pgd"][MID])
    assert reg["clean"] >= plain["clean"] - 0.03  # within three points
    assert reg["pgd"][0] == reg["clean"]  # ε = 0 is the clean accuracy


def test_what_the_doc_says_of_the_penalties_against_each_other():
    difference = 2 * math.sqrt(2) * math.sqrt(0.25 / TEST_SIZE)  # two standard errors of a difference
    cdb, jac, proj = (row("cnn", p)["pgd"][MID] for p in REGULARIZED)
    assert cdb >= max(jac, proj) + difference  # double backprop is the strongest on the CNN
    for net in NETS:  # one random projection is as good as the exact Jacobian
        assert abs(row(net, "random projections")["pgd"][MID] - row(net, "Jacobian (Alg. 4)")["pgd"][MID]) <= difference
    for r in RESULTS["models"].values():  # nothing survives eps >= 0.2
        assert r["pgd"][RESULTS["epsilons"].index(0.2)] < 0.05


@pytest.mark.parametrize("key", list(RESULTS["models"]))
def test_pgd_is_the_stronger_attack_and_accuracy_falls_with_eps(key):
    r = RESULTS["models"][key]
    assert all(p <= f + 1e-12 for p, f in zip(r["pgd"], r["fgsm"]))  # PGD finds at least what FGSM finds
    assert all(b <= a + MARGIN for a, b in zip(r["pgd"], r["pgd"][1:]))  # non-increasing, to noise


def test_the_regularizers_cost_what_the_table_says():
    for net in NETS:
        base = row(net, "plain")["seconds_per_epoch"]
        jac = row(net, "Jacobian (Alg. 4)")["seconds_per_epoch"]
        proj = row(net, "random projections")["seconds_per_epoch"]
        assert proj < jac  # one direction per sample against C = 10
        assert base < proj


@pytest.fixture(scope="module")
def script():
    return load_example("digits_robustness")


def test_fgsm_and_pgd_stay_in_the_ball_and_the_box_and_find_errors(script, tmp_path):
    import dbpgen
    from dbpgen.train import train

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 6))
    y = (x[:, 0] + x[:, 1] > 1).astype(int)
    m = dbpgen.compile({"name": "attack", "input": [6], "loss": "nll",
                        "layers": [{"dense": 16, "act": "relu"}, {"dense": 2, "act": "softmax"}]}, tmp_path, jit=False)
    params = train(m, x, np.eye(2)[y], lr=1e-2, epochs=30, batch_size=32, progress=False).params
    clean = script.accuracy(m, params, x, y)
    assert clean > 0.9
    for eps in (0.05, 0.2):
        for attack in (script.fgsm, script.pgd):
            adv = attack(m, params, x, y, eps)
            assert np.all(np.abs(adv - x) <= eps + 1e-12) and adv.min() >= 0 and adv.max() <= 1
        assert script.accuracy(m, params, script.pgd(m, params, x, y, eps), y) < clean
    # FGSM moves every pixel by eps along the sign of the loss gradient (where the box allows)
    adv = script.fgsm(m, params, x, y, 0.05)
    g = m.input_grad(params, x, y)
    np.testing.assert_array_equal(adv, np.clip(x + 0.05 * np.sign(g), 0, 1))
