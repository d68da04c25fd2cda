"""dbpgen.distributed on a real distributed.LocalCluster (2 worker processes), nothing mocked.

The objective is a mean over samples, so the distributed value and gradients must equal the
single-process module on the whole arrays to 1e-12 (float64) whatever the chunking, for
every kind of penalty; workers import the uploaded module once per process; a worker killed
mid-computation changes nothing; data larger than a worker's memory streams from disk;
training with a client equals training without one.

The workers run the modules' kernels as plain Python (NUMBA_DISABLE_JIT=1: the same code,
no LLVM time in the suite); the module's own tests cover the jitted kernels.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from conftest import compile_spec  # noqa: E402
from dbpgen import distributed as dist  # noqa: E402
from dbpgen.train import train  # noqa: E402
from test_gradients import CDB, GIVEN, NODE, mlp  # noqa: E402

WORKER_ENV = dict(dist.PINNED, NUMBA_DISABLE_JIT="1")

SPECS = {
    "cdb": mlp("d_cdb", ["tanh", "relu"], None, "mse", CDB),
    "node_nll": mlp("d_node", ["softplus"], "softmax", "nll", NODE, widths=(5,), C=3),
    "given": mlp("d_given", ["tanh"], None, "mse", GIVEN, widths=(4,)),
    "jacobian": mlp("d_jac", ["tanh"], None, "none", {"v": "jacobian", "weight": 0.4}, widths=(4,)),
    "random": mlp("d_rand", ["tanh"], None, "mse", {"v": "random", "iterations": 2, "p": "norm", "seed": 5},
                  widths=(4,), C=3),
    "projections": mlp("d_proj", ["elu"], None, "mse", {"v": "projections", "count": 2, "weight": 0.5},
                       widths=(4,), C=3),
    "loss_only": mlp("d_loss", ["sigmoid"], "softmax", "nll", None, widths=(4,), C=3),
}
N = 13
CHUNKINGS = {"one chunk": (13,), "uneven": (5, 1, 7), "one per sample": (1,) * 13, "deep tree": (2,) * 6 + (1,)}


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, env=WORKER_ENV)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    return {k: compile_spec(s, tmp_path_factory.mktemp(k), jit=False, schedule="kernels") for k, s in SPECS.items()}


def data(kind, m, n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *m.INPUT_SHAPE))
    y = None
    if SPECS[kind]["loss"] == "nll":
        y = np.eye(m.N_OUTPUTS)[rng.integers(0, m.N_OUTPUTS, n)]
    elif SPECS[kind]["loss"] == "mse":
        y = rng.normal(size=(n, m.N_OUTPUTS))
    v = rng.normal(size=(n, m.N_OUTPUTS)) if kind == "given" else None
    return x, y, v


def chunked(a, rows):
    return None if a is None else da.from_array(a, chunks=(rows,) + a.shape[1:])


def assert_same(got, want, rtol=1e-12):
    J, grads = got
    J0, grads0 = want
    assert J == pytest.approx(J0, rel=rtol, abs=1e-300)
    assert set(grads) == set(grads0)
    for k in grads0:
        scale = max(np.abs(grads0[k]).max(), 1e-300)
        assert np.abs(grads[k] - grads0[k]).max() <= rtol * scale, k
        assert grads[k].dtype == grads0[k].dtype


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_equals_the_single_process_module_whatever_the_chunking(kind, modules, client):
    m = modules[kind]
    params = m.init_params(seed=2)
    x, y, v = data(kind, m)
    want = m.value_and_grad(params, x, y, v=v, seed=9)
    for rows in CHUNKINGS.values():
        got = dist.value_and_grad(m, params, chunked(x, rows), chunked(y, rows), chunked(v, rows),
                                  seed=9, client=client, split_every=2)
        assert_same(got, want)
    # NumPy arrays, chunked by `chunks=`; a weight for this call as in the module
    assert_same(dist.value_and_grad(m, params, x, y, v, seed=9, client=client, chunks=4, weight=0.0),
                m.value_and_grad(params, x, y, v=v, seed=9, weight=0.0))


def test_the_default_seed_is_the_model_files(modules, client):
    m = modules["random"]
    params = m.init_params(seed=1)
    x, y, _ = data("random", m)
    assert_same(dist.value_and_grad(m, params, x, y, client=client, chunks=3), m.value_and_grad(params, x, y))
    other = dist.value_and_grad(m, params, x, y, client=client, chunks=3, seed=6)
    assert other[0] != m.value_and_grad(params, x, y)[0]


def test_workers_import_the_uploaded_module_once_per_process(modules, client, tmp_path):
    m = modules["cdb"]
    params = m.init_params(seed=0)
    x, y, _ = data("cdb", m, n=40)
    for _ in range(2):
        dist.value_and_grad(m, params, x, y, client=client, chunks=2)  # 20 tasks

    def where(dask_worker):
        module = sys.modules[m.__name__]
        return dist.LOADS.get(m.__name__, 0), module.__file__, dask_worker.local_directory

    seen = client.run(where)
    assert len(seen) == 2
    for loads, path, local in seen.values():
        assert loads == 1  # imported once for all its tasks
        # the worker's own copy, sent through Dask: no shared file system needed
        assert path.startswith(local) and path != m.__file__


def test_a_path_to_the_module_works_as_the_module(modules, client):
    m = modules["cdb"]
    params = m.init_params(seed=0)
    x, y, _ = data("cdb", m)
    assert_same(dist.value_and_grad(m.__file__, params, x, y, client=client, chunks=5),
                m.value_and_grad(params, x, y))


def test_inputs_of_any_rank_line_up_by_the_batch_axis(client, tmp_path):
    """Images with integer class labels, and projections with directions given as (N, n, C):
    every array is chunked along its batch axis, whatever its rank."""
    cnn = {"name": "d_cnn", "input": [1, 6, 6], "loss": "nll",
           "layers": [{"conv2d": {"channels": 2, "kernel": 3}, "act": "tanh"}, "flatten",
                      {"dense": 3, "act": "softmax"}],
           "penalty": {"v": "loss_gradient", "weight": 0.2}}
    proj = mlp("d_proj_given", ["tanh"], None, "none", {"v": "projections", "count": 2}, widths=(4,), C=3)
    rng = np.random.default_rng(7)
    for spec, x, y, v in ((cnn, rng.normal(size=(11, 1, 6, 6)), rng.integers(0, 3, 11), None),
                          (proj, rng.normal(size=(11, 3)), None, rng.normal(size=(11, 2, 3)))):
        (tmp_path / spec["name"]).mkdir()
        m = compile_spec(spec, tmp_path / spec["name"], jit=False, schedule="kernels")
        params = m.init_params(seed=1)
        want = m.value_and_grad(params, x, y, v=v)
        for rows in ((11,), (4, 4, 3), (1,) * 11):
            assert_same(dist.value_and_grad(m, params, chunked(x, rows), chunked(y, rows), chunked(v, rows),
                                            client=client), want)


def test_a_module_whose_file_was_compiled_again_is_refused(tmp_path):
    m = compile_spec(SPECS["cdb"], tmp_path, jit=False, schedule="kernels")
    compile_spec(dict(SPECS["cdb"], penalty=dict(CDB, weight=0.9)), tmp_path, jit=False, schedule="kernels")
    x, y, _ = data("cdb", m)
    with pytest.raises(ValueError, match="no longer holds the module"):
        dist.value_and_grad(m, m.init_params(seed=0), x, y, client=Untouched())


class Untouched:
    """A client the module check must fail before: any use but the upload's lookup is a failure."""

    def __getattr__(self, name):
        raise AssertionError(f"work was sent to the cluster ({name})")

    def __hash__(self):
        return 1


class Untouchable:
    """A client stand-in that fails the test if anything is sent to it."""

    def __getattr__(self, name):
        raise AssertionError(f"work was sent to the cluster ({name}) before the input was checked")


@pytest.mark.parametrize("case, message", [
    ("y chunked unlike x", r"y is chunked along the batch axis as \(5, 8\), x as \(4, 4, 5\)"),
    ("feature axis chunked", r"x is chunked along axis 1 \(2 chunks\)"),
    ("params of another module", r"params\['W1'\] must be real numbers of shape \(4, 3\) for the module"),
    ("missing parameter", r"params has no 'b2'"),
    ("too few labels", r"y must have 13 samples along axis 0"),
    ("wrong input width", r"x must have shape \(N, 3\), got \(13, 4\)"),
    ("negative seed", r"seed must be a non-negative integer"),
    ("labels of another width", r"y must have shape \(N, 2\) \(or be N integer class indices\), got \(13, 3\)"),
    ("no labels", r"this model needs y, of shape \(N, 2\)"),
    ("no samples per chunk", r"chunks must be a positive number of samples, got 0"),
])
def test_bad_input_is_one_clear_error_before_any_work_is_sent(case, message, modules):
    m = modules["cdb"]
    params = m.init_params(seed=0)
    x, y, _ = data("cdb", m)
    kwargs = {}
    if case == "y chunked unlike x":
        x, y = da.from_array(x, chunks=((4, 4, 5), 3)), da.from_array(y, chunks=((5, 8), 2))
    elif case == "feature axis chunked":
        x = da.from_array(x, chunks=(5, 2))
    elif case == "params of another module":
        params = dict(params, W1=params["W1"].T)  # e.g. a torch Linear's weight of a transposed layer
    elif case == "missing parameter":
        params = {k: a for k, a in params.items() if k != "b2"}
    elif case == "too few labels":
        y = y[:-1]
    elif case == "wrong input width":
        x = np.zeros((13, 4))
    elif case == "negative seed":
        kwargs["seed"] = -1
    elif case == "labels of another width":
        y = np.zeros((13, 3))
    elif case == "no labels":
        y = None
    elif case == "no samples per chunk":
        kwargs["chunks"] = 0
    with pytest.raises(ValueError, match=message):
        dist.value_and_grad(m, params, x, y, client=Untouchable(), **kwargs)


def test_a_worker_killed_mid_computation_changes_nothing(modules, client):
    m = modules["cdb"]
    params = m.init_params(seed=4)
    x, y, _ = data("cdb", m, n=3000)
    want = m.value_and_grad(params, x, y)
    pids = client.run(os.getpid)
    result, errors = {}, []

    def run():
        try:
            result["got"] = dist.value_and_grad(m, params, x, y, client=client, chunks=5)  # 600 tasks
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert thread.is_alive(), "the computation ended before the worker could be killed"
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert not errors, errors
    assert_same(result["got"], want)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it
    assert victim not in client.run(os.getpid).values()


def test_a_data_set_larger_than_a_workers_memory_streams_from_disk(tmp_path):
    # loss only: NumPy calls alone, fast without Numba (the penalties are checked above)
    spec = mlp("d_wide", ["tanh"], None, "mse", None, widths=(3,), n_in=2048, C=2)
    m = compile_spec(spec, tmp_path, jit=False, schedule="kernels")
    params = m.init_params(seed=0)
    limit = 350 * 2 ** 20  # a worker holds 180 MB before any data
    n, rows = 34300, 700  # 562 MB of x in 49 chunks of 11 MB
    x = da.random.default_rng(3).standard_normal((n, 2048), chunks=(rows, 2048))
    y = da.random.default_rng(4).standard_normal((n, 2), chunks=(rows, 2))
    da.to_npy_stack(tmp_path / "x", x, axis=0)
    da.to_npy_stack(tmp_path / "y", y, axis=0)
    x, y = da.from_npy_stack(tmp_path / "x"), da.from_npy_stack(tmp_path / "y")
    assert x.nbytes > 1.5 * limit
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit=limit, env=WORKER_ENV) as cluster, \
            distributed.Client(cluster) as c:
        got = dist.value_and_grad(m, params, x, y, client=c)
        assert all(w["memory_limit"] == limit for w in c.scheduler_info(n_workers=-1)["workers"].values())
    assert_same(got, m.value_and_grad(params, x.compute(), y.compute()))  # the whole data in this process


@pytest.mark.parametrize("kind, lazy", [("random", 1), ("cdb", 2)])
def test_training_on_dask_equals_training_in_one_process(kind, lazy, modules, client):
    m = modules[kind]
    x, y, _ = data(kind, m, n=50, seed=3)
    common = dict(optimizer="adam", lr=1e-2, epochs=3, batch_size=16, seed=1, lazy=lazy, progress=False)
    alone = train(m, x, y, **common)
    spread = train(m, da.from_array(x, chunks=10), da.from_array(y, chunks=10), client=client, **common)
    assert spread.steps == alone.steps == 12
    for k in alone.params:
        np.testing.assert_allclose(spread.params[k], alone.params[k], rtol=1e-10, atol=1e-13)
    assert spread.objective == pytest.approx(alone.objective, rel=1e-10)


def test_train_command_with_dask(modules, client, tmp_path):
    import yaml

    m = modules["cdb"]
    model = tmp_path / "d_cdb.yaml"
    model.write_text(yaml.safe_dump(SPECS["cdb"], sort_keys=False))
    x, y, _ = data("cdb", m, n=40, seed=5)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "stack").mkdir()
    da.to_npy_stack(tmp_path / "stack" / "x", da.from_array(x, chunks=15), axis=0)
    da.to_npy_stack(tmp_path / "stack" / "y", da.from_array(y, chunks=15), axis=0)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    args = ["train", str(model), "--epochs", "2", "--batch-size", "8", "--quiet", "--module-dir", str(tmp_path / "gen")]

    def run(*extra, out=None):
        out = ["-o", str(tmp_path / out)] if out else []
        return subprocess.run([sys.executable, "-m", "dbpgen.cli", *args, *extra, *out],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)

    # lazy regularization: every second step runs <name>_loss, the network without its penalty,
    # on the cluster too; in this process the same numbers come from weight=0
    for lazy, data_arg, address, out in ((2, tmp_path / "stack", client.scheduler.address, "cluster.npz"),
                                         (1, tmp_path / "data.npz", "local:1", "local.npz")):
        alone = train(m, x, y, optimizer="adam", epochs=2, batch_size=8, seed=0, lazy=lazy, progress=False).params
        done = run("--data", str(data_arg), "--dask", address, "--lazy", str(lazy), out=out)
        assert done.returncode == 0, done.stderr
        trained = np.load(tmp_path / out)
        for k in alone:
            np.testing.assert_allclose(trained[k], alone[k], rtol=1e-10, atol=1e-13)
    bad = run("--data", str(tmp_path / "data.npz"), "--dask", "local:zero")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--dask" in bad.stderr, bad.stderr
