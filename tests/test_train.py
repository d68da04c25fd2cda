"""Training with emitted gradients (issue 6): optimizers, lazy regularization, files, `dbpgen train`."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from dbpgen import cli
from dbpgen.compiler import load_generated
from dbpgen.errors import ModelError
from dbpgen.optim import SGD, Adam
from dbpgen.train import (evaluate, load_data, load_params, loss_only_module, params_from_state_dict, save_params,
                          train)


@pytest.fixture(scope="module")
def cdb():
    return load_generated(ROOT / "generated" / "sine_cdb.py")


@pytest.fixture(scope="module")
def mse():
    return load_generated(ROOT / "generated" / "sine_mse.py")


def sine_data(n=200, seed=0):
    x = np.random.default_rng(seed).uniform(-np.pi, np.pi, (n, 1))
    return x, np.sin(x)


# --- the weight keyword of the emitted value_and_grad -----------------------------------


def test_value_and_grad_weight_keyword(cdb, mse):
    params = cdb.init_params(seed=2)
    x, y = sine_data(16)
    j_default, g_default = cdb.value_and_grad(params, x, y)
    j_model, g_model = cdb.value_and_grad(params, x, y, weight=cdb.WEIGHT)
    j0, g0 = cdb.value_and_grad(params, x, y, weight=0.0)
    j1, g1 = cdb.value_and_grad(params, x, y, weight=1.0)
    j3, g3 = cdb.value_and_grad(params, x, y, weight=0.3)
    # weight 0 is the loss alone: the model without a penalty computes the same
    j_loss, g_loss = mse.value_and_grad(params, x, y)
    assert j0 == pytest.approx(j_loss, rel=1e-13)
    assert j0 == pytest.approx(np.mean(np.sum((cdb.forward(params, x) - y) ** 2, axis=1)), rel=1e-13)
    assert j_default == j_model
    assert j1 - j0 == pytest.approx(np.mean(cdb.penalty(params, x, y)), rel=1e-12)
    assert j3 == pytest.approx(j0 + 0.3 * (j1 - j0), rel=1e-12)
    for k in params:
        np.testing.assert_array_equal(g_default[k], g_model[k])
        np.testing.assert_allclose(g0[k], g_loss[k], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(g3[k], g0[k] + 0.3 * (g1[k] - g0[k]), rtol=1e-10, atol=1e-14)
    assert not np.allclose(g1["W2"], g0["W2"])  # the weight does reach the gradients


# --- optimizers: textbook formulas on a quadratic, and torch.optim ---------------------------


def quadratic(seed=0, n=6):
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(n, n))
    A = Q @ Q.T + n * np.eye(n)
    b = rng.normal(size=n)
    grad = lambda p: {"p": A @ p["p"] - b}  # noqa: E731   f = p^T A p / 2 - b^T p
    return A, b, grad


def test_adam_is_kingma_ba_algorithm_1():
    A, b, grad = quadratic()
    lr, b1, b2, eps = 0.05, 0.8, 0.99, 1e-6
    params = {"p": np.zeros(6)}
    opt = Adam(params, lr=lr, betas=(b1, b2), eps=eps)
    theta, m, v = np.zeros(6), np.zeros(6), np.zeros(6)
    for t in range(1, 201):
        g = A @ theta - b
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        opt.step(grad(params))
        np.testing.assert_allclose(params["p"], theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["p"], np.linalg.solve(A, b), atol=1e-3)


def test_adam_defaults_are_torchs():
    opt = Adam({"p": np.zeros(2)})
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    sgd = SGD({"p": np.zeros(2)})
    assert (sgd.lr, sgd.momentum, sgd.dampening, sgd.weight_decay, sgd.nesterov) == (1e-3, 0.0, 0.0, 0.0, False)


def test_sgd_momentum_is_heavy_ball():
    """Polyak heavy ball as Sutskever et al. (2013) write it: v <- mu v - lr g, p <- p + v."""
    A, b, grad = quadratic(1)
    lr, mu = 0.01, 0.9
    params = {"p": np.ones(6)}
    opt = SGD(params, lr=lr, momentum=mu)
    theta, v = np.ones(6), np.zeros(6)
    for _ in range(300):
        v = mu * v - lr * (A @ theta - b)
        theta = theta + v
        opt.step(grad(params))
        np.testing.assert_allclose(params["p"], theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["p"], np.linalg.solve(A, b), atol=1e-4)


def test_plain_sgd_and_bad_arguments():
    params = {"p": np.array([1.0, -2.0])}
    SGD(params, lr=0.5).step({"p": np.array([2.0, 2.0])})
    np.testing.assert_array_equal(params["p"], [0.0, -3.0])
    with pytest.raises(ValueError):
        Adam(params, lr=0)
    with pytest.raises(ValueError):
        SGD(params, nesterov=True)
    with pytest.raises(KeyError):
        Adam(params).step({})
    with pytest.raises(TypeError):
        Adam({"p": [1.0]})


TORCH_CASES = [
    ("adam", {"lr": 0.03}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ("sgd", {"lr": 0.01, "momentum": 0.9}),
    ("sgd", {"lr": 0.01, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]


@pytest.mark.parametrize("kind, options", TORCH_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(TORCH_CASES)])
def test_update_sequence_matches_torch_optim(kind, options, cdb):
    """The same parameters after 40 steps on the sine network's emitted gradients."""
    torch = pytest.importorskip("torch")
    params = cdb.init_params(seed=0)
    x, y = sine_data(64, seed=1)
    ours = {k: a.copy() for k, a in params.items()}
    theirs = {k: torch.tensor(a, dtype=torch.float64) for k, a in params.items()}
    opt = (Adam if kind == "adam" else SGD)(ours, **options)
    topt = (torch.optim.Adam if kind == "adam" else torch.optim.SGD)(list(theirs.values()), **options)
    for step in range(40):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        _, grads = cdb.value_and_grad(ours, x[batch], y[batch])
        _, tgrads = cdb.value_and_grad({k: t.numpy() for k, t in theirs.items()}, x[batch], y[batch])
        opt.step(grads)
        for k, t in theirs.items():
            t.grad = torch.tensor(tgrads[k])
        topt.step()
        for k in ours:
            np.testing.assert_allclose(ours[k], theirs[k].numpy(), rtol=1e-10, atol=1e-12)


# --- the training loop ------------------------------------------------------------------


def test_training_reduces_the_loss_and_is_deterministic(cdb, mse):
    x, y = sine_data(300)
    start = evaluate(mse, mse.init_params(seed=0), x, y)
    a = train(mse, x, y, lr=1e-2, epochs=30, batch_size=32, seed=0, progress=False)
    b = train(mse, x, y, lr=1e-2, epochs=30, batch_size=32, seed=0, progress=False)
    c = train(mse, x, y, lr=1e-2, epochs=30, batch_size=32, seed=1, progress=False)
    assert a.loss < 0.05 * start and a.steps == 30 * 10 and len(a.losses) == 30
    assert a.losses[-1] < a.losses[0]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    sgd = train(cdb, x, y, optimizer="sgd", lr=0.02, momentum=0.9, epochs=20, batch_size=32, progress=False)
    assert sgd.objective < 0.2 * evaluate(cdb, cdb.init_params(seed=0), x, y)
    init = mse.init_params(seed=5)
    before = {k: v.copy() for k, v in init.items()}
    train(mse, x, y, init, epochs=1, progress=False)
    for k in init:  # the caller's params are copied, not trained in place
        np.testing.assert_array_equal(init[k], before[k])


class Recorder:
    """A module proxy that records the weight of every value_and_grad call."""

    def __init__(self, module):
        self.module = module
        self.weights = []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def value_and_grad(self, params, x, y=None, v=None, seed=None, weight=None):
        self.weights.append(weight)
        return self.module.value_and_grad(params, x, y, v=v, seed=seed, weight=weight)


@pytest.mark.parametrize("lazy", [1, 3, 4])
def test_lazy_regularization_applies_the_penalty_every_k_steps(cdb, lazy):
    x, y = sine_data(100)
    rec = Recorder(cdb)
    result = train(rec, x, y, lr=1e-2, epochs=3, batch_size=10, lazy=lazy, weight=0.25, progress=False)
    steps = rec.weights[:30]  # then come the evaluation calls (weight 0.25 and 0)
    expected = [0.25 * lazy if t % lazy == 0 else 0.0 for t in range(30)]
    assert steps == expected
    assert result.regularized_steps == len(range(0, 30, lazy)) and result.steps == 30
    assert rec.weights[30:] == [0.25, 0.0]
    assert result.objective > result.loss


def test_lazy_regularization_with_a_loss_only_module(cdb, mse, tmp_path):
    """The penalty's module runs on steps 0, k, 2k, ... only; the loss-only module on the others."""
    x, y = sine_data(100)
    rec, rec_loss = Recorder(cdb), Recorder(mse)
    result = train(rec, x, y, lr=1e-2, epochs=3, batch_size=10, lazy=4, progress=False, loss_module=rec_loss)
    assert rec.weights[:-2] == [4 * cdb.WEIGHT] * 8 and rec.weights[-2:] == [cdb.WEIGHT, 0.0]
    assert len(rec_loss.weights) == 22 and result.regularized_steps == 8
    # the same numbers as weight=0 on the penalty's module
    same = train(cdb, x, y, lr=1e-2, epochs=3, batch_size=10, lazy=4, progress=False)
    for k in same.params:
        np.testing.assert_allclose(result.params[k], same.params[k], rtol=1e-12, atol=1e-14)
    # the sibling is compiled from the model file without its penalty
    sibling = loss_only_module(ROOT / "examples" / "sine_cdb.yaml", tmp_path)
    assert sibling.__file__.endswith("sine_cdb_loss.py") and sibling.WEIGHT == 0.0
    params = cdb.init_params(seed=1)
    j, g = sibling.value_and_grad(params, x, y)
    j0, g0 = cdb.value_and_grad(params, x, y, weight=0)
    assert j == pytest.approx(j0, rel=1e-13)
    with pytest.raises(ModelError, match="loss: a model without a loss"):
        loss_only_module(ROOT / "examples" / "sine_node.yaml", tmp_path)


def test_lazy_regularization_trains_the_penalty_too(cdb):
    """Noisy labels keep l's gradient, and so R_cdb, away from 0: the penalty has work to do."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, (256, 1))
    y = np.sin(x) + 0.3 * rng.normal(size=x.shape)
    runs = {name: train(cdb, x, y, lr=1e-2, epochs=20, batch_size=32, seed=1, progress=False, **options)
            for name, options in (("plain", {"weight": 1.0}), ("lazy", {"weight": 1.0, "lazy": 4}),
                                  ("none", {"weight": 0.0}))}
    penalty = {name: float(np.mean(cdb.penalty(r.params, x, y))) for name, r in runs.items()}
    assert penalty["plain"] < 0.8 * penalty["none"] and penalty["lazy"] < 0.8 * penalty["none"], penalty
    assert runs["lazy"].regularized_steps == 40 and runs["plain"].regularized_steps == 160


# --- files ---------------------------------------------------------------------------------


def test_params_round_trip(tmp_path, cdb):
    params = cdb.init_params(seed=3)
    save_params(tmp_path / "p.npz", params)
    back = load_params(tmp_path / "p.npz", cdb)
    assert list(back) == list(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
        assert back[k].dtype == cdb.DTYPE and back[k].flags.c_contiguous
    np.savez(tmp_path / "f32.npz", **{k: a.astype(np.float32).T.T for k, a in params.items()})
    assert load_params(tmp_path / "f32.npz", cdb)["W2"].dtype == np.float64
    bad = dict(params, W2=params["W2"].T)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ModelError, match=r"bad.npz: W2: expected shape \(5, 8\)"):
        load_params(tmp_path / "bad.npz", cdb)
    np.savez(tmp_path / "missing.npz", **{k: a for k, a in params.items() if k != "b3"})
    with pytest.raises(ModelError, match="missing.npz: b3: missing array"):
        load_params(tmp_path / "missing.npz", cdb)


def test_data_file_checks(tmp_path, cdb):
    x, y = sine_data(10)
    np.savez(tmp_path / "flat.npz", x=x, y=y[:, 0])  # y of shape (N,) for one output
    xx, yy, vv = load_data(tmp_path / "flat.npz", cdb)
    assert yy.shape == (10, 1) and vv is None
    np.savez(tmp_path / "short.npz", x=x, y=y[:5])
    with pytest.raises(ModelError, match="short.npz: y: expected shape"):
        load_data(tmp_path / "short.npz", cdb)
    np.savez(tmp_path / "extra.npz", x=x, y=y, z=y)
    with pytest.raises(ModelError, match="extra.npz: z: unexpected array"):
        load_data(tmp_path / "extra.npz", cdb)


def test_torch_state_dict_maps_onto_params(cdb):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, 1)).double()
    params = params_from_state_dict(net.state_dict(), cdb)
    assert params["W2"].shape == tuple(net[2].weight.shape) == (5, 8)  # (out, in) on both sides
    x = np.linspace(-3, 3, 50).reshape(-1, 1)
    with torch.no_grad():
        expected = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(cdb.forward(params, x), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="weight/bias entries"):
        params_from_state_dict(torch.nn.Linear(1, 8).state_dict(), cdb)


# --- the command line ------------------------------------------------------------------------


def test_cli_train_matches_the_python_api(tmp_path, capsys):
    x, y = sine_data(200, seed=4)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    out = tmp_path / "trained.npz"
    args = ["train", str(ROOT / "examples" / "sine_cdb.yaml"), "--data", str(tmp_path / "data.npz"), "-o", str(out),
            "--epochs", "5", "--batch-size", "16", "--lr", "0.01", "--seed", "3", "--lazy", "2", "--quiet",
            "--module-dir", str(tmp_path / "gen")]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "65 steps (33 with the penalty)" in printed.out and str(out) in printed.out
    assert printed.err == ""  # --quiet: no progress bar
    module = load_generated(tmp_path / "gen" / "sine_cdb.py")
    assert (tmp_path / "gen" / "sine_cdb_loss.py").exists()  # --lazy: loss-only steps run the sibling
    expected = train(module, x, y, lr=0.01, epochs=5, batch_size=16, seed=3, lazy=2, progress=False,
                     loss_module=load_generated(tmp_path / "gen" / "sine_cdb_loss.py"))
    trained = load_params(out, module)
    for k in expected.params:
        np.testing.assert_array_equal(trained[k], expected.params[k])
    # --init continues from saved params; sgd with momentum
    assert cli.main(args[:-3] + ["--init", str(out), "--optimizer", "sgd", "--momentum", "0.9", "-o",
                                 str(tmp_path / "more.npz"), "--quiet", "--module-dir", str(tmp_path / "gen")]) == 0


BAD = [
    (["--data", "{tmp}/nope.npz"], "nope.npz: file: no such file"),
    (["--data", "{tmp}/junk.npz"], "junk.npz: file: not a .npz archive"),
    (["--data", "{tmp}/array.npy"], "array.npy: file: a single .npy array"),
    (["--data", "{tmp}/wide.npz"], "wide.npz: x: expected a numeric array of shape (N, 1)"),
    (["--data", "{tmp}/nolabels.npz"], "nolabels.npz: y: missing array (loss: mse needs labels)"),
    (["--data", "{tmp}/ok.npz", "--init", "{tmp}/ok.npz"], "ok.npz: x: unexpected array"),
    (["--data", "{tmp}/ok.npz", "--lazy", "0"], "sine_cdb.yaml: --lazy: must be a positive integer, got 0"),
    (["--data", "{tmp}/ok.npz", "--lr", "-1"], "sine_cdb.yaml: --lr: must be a positive number"),
    (["--data", "{tmp}/ok.npz", "--nesterov"], "sine_cdb.yaml: --nesterov: needs --optimizer sgd"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    x, y = sine_data(8)
    (tmp / "junk.npz").write_text("not numpy\n")
    np.save(tmp / "array.npy", x)
    np.savez(tmp / "wide.npz", x=np.zeros((8, 2)), y=y)
    np.savez(tmp / "nolabels.npz", x=x)
    np.savez(tmp / "ok.npz", x=x, y=y)
    return tmp


@pytest.mark.parametrize("extra, message", BAD, ids=[m.split(":")[1].strip() + "-" + str(i) for i, (_, m) in enumerate(BAD)])
def test_cli_train_bad_input_is_one_line_exit_2(extra, message, bad_files, capsys):
    args = ["train", str(ROOT / "examples" / "sine_cdb.yaml"), "--quiet", "--module-dir", str(bad_files / "gen"),
            *[a.format(tmp=bad_files) for a in extra]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_train_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dbpgen.cli", "train", str(ROOT / "examples" / "sine_cdb.yaml"),
                           "--data", "missing.npz", "--module-dir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "missing.npz: file: no such file\n" and "Traceback" not in proc.stderr


def test_labels_and_directions_may_be_python_lists(tmp_path):
    from conftest import compile_spec
    from dbpgen.train import train

    spec = {"name": "lists", "input": [2], "loss": "nll", "layers": [{"dense": 3, "act": "softmax"}]}
    m = compile_spec(spec, tmp_path, jit=False)
    x = np.random.default_rng(0).normal(size=(10, 2))
    labels = [int(i) for i in np.arange(10) % 3]
    a = train(m, x, labels, epochs=2, batch_size=4, progress=False)
    b = train(m, x, np.array(labels), epochs=2, batch_size=4, progress=False)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
