"""Careless and hostile input: checked calls in every schedule, float32 in every schedule,
bounded compile work, deep networks, NaN semantics, module names.

Every schedule of the back end (lanes, one jitted function, Python with fused loops,
Python with the operators' own kernels, counting) is represented by one small model; the
module's SCHEDULES says which one ran, and the first test checks that all are covered.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import batch_for, compile_spec, write_model
from dbpgen.compiler import compile_file, load_generated
from oracle import Oracle
from test_codegen import check_float32
from test_gradients import CDB, assert_close

TESTS = Path(__file__).resolve().parent
PEN = {"v": "loss_gradient", "weight": 0.3}

# one model per schedule (value_and_grad's, forced), small enough to compile in seconds
SCHEDULE_SPECS = {
    "lanes": {"name": "h_lanes", "input": [3], "loss": "mse", "penalty": PEN,
              "layers": [{"dense": 6, "act": "tanh"}, {"dense": 2}]},
    "jit": {"name": "h_jit", "input": [5], "loss": "nll", "penalty": PEN,
            "layers": [{"dense": 8, "act": "relu"}, {"dense": 3, "act": "softmax"}]},
    "fused": {"name": "h_fused", "input": [96], "loss": "mse", "penalty": PEN,
              "layers": [{"dense": 200, "act": "tanh"}, {"dense": 2}]},
    # Python calling the operators' kernels, here dense ones (conv networks: test_conv*.py)
    "kernels": {"name": "h_kernels", "input": [4], "loss": "mse", "penalty": PEN,
                "layers": [{"dense": 5, "act": "relu"}, {"dense": 2}]},
}
# models whose API takes other arguments: v of shape (B, n, C), a Jacobian loop, a given v
OTHER_SPECS = [
    {"name": "h_proj", "input": [3], "loss": "none", "layers": [{"dense": 5, "act": "tanh"}, {"dense": 3}],
     "penalty": {"v": "projections", "count": 2}},
    {"name": "h_jac", "input": [4], "loss": "none", "layers": [{"dense": 6, "act": "relu"}, {"dense": 3}],
     "penalty": {"v": "jacobian"}},
    {"name": "h_random", "input": [4], "loss": "mse", "layers": [{"dense": 5, "act": "elu"}, {"dense": 2}],
     "penalty": {"v": "random", "iterations": 2}},
]


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    """Each schedule's model, compiled once: name -> path of the generated module."""
    out = tmp_path_factory.mktemp("hostile")
    paths = {kind: compile_file(write_model(spec, out), out / "generated", schedule=kind)
             for kind, spec in SCHEDULE_SPECS.items()}
    paths["count"] = compile_file(write_model(dict(SCHEDULE_SPECS["lanes"], name="h_count"), out),
                                  out / "generated", count_ops=True)
    for spec in OTHER_SPECS:
        paths[spec["name"]] = compile_file(write_model(spec, out), out / "generated")
    return paths


@pytest.fixture(scope="module")
def jitted(modules):
    """kind -> the module of `modules` imported jitted, each imported (and compiled by Numba) once."""
    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = load_generated(modules[kind])
        return loaded[kind]
    return get


KIND_OF = {spec["name"]: kind for kind, spec in SCHEDULE_SPECS.items()}


def test_every_schedule_is_represented(modules):
    for kind in ("lanes", "jit", "fused", "kernels", "count"):
        assert load_generated(modules[kind], jit=False).SCHEDULES["value_and_grad"] == kind


@pytest.mark.parametrize("kind", ["lanes", "jit", "fused", "kernels", "count", "h_proj", "h_jac", "h_random"])
def test_wrong_inputs_are_refused_before_any_kernel_runs(kind, modules):
    """Wrong shapes of every parameter, x, y, v, u, wrong dtypes, missing keys and bad weights:
    a ValueError or TypeError naming the argument. In a subprocess, so that an out-of-bounds
    kernel would show as a crash. The kernels run as plain Python (NUMBA_DISABLE_JIT=1): the
    checks are Python's either way, NumPy refuses any out-of-bounds index of the valid calls
    (made first) as NUMBA_BOUNDSCHECK=1 would, and nothing is compiled. (The jitted kernels
    of these modules: test_nan_and_inf_inputs_propagate_as_in_torch, test_float32_in_every_schedule.)"""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    done = subprocess.run([sys.executable, str(TESTS / "wrong_inputs.py"), str(modules[kind])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrong inputs refused cleanly" in done.stdout


def test_class_indices_out_of_range_are_refused(modules):
    m = load_generated(modules["jit"], jit=False)
    params, x = m.init_params(), np.ones((2, 5))
    for labels in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match="class indices in y"):
            m.value_and_grad(params, x, np.array(labels))


@pytest.mark.parametrize("kind", ["lanes", "jit", "fused"])
def test_float32_in_every_schedule(kind, tmp_path, rng, jitted):
    """(The kernels schedule: test_conv.py::test_conv_network_jitted_and_float32.)"""
    m32 = check_float32(SCHEDULE_SPECS[kind], tmp_path, rng, batch=6, schedule=kind, m64=jitted(kind))
    assert m32.SCHEDULES["value_and_grad"] == kind


# -- every allowed function, in every way a program is printed ------------------------

EVERY_FUNCTION = (
    "sin(z)/4 + cos(z)/4 + tanh(z) + sinh(z/4) + cosh(z/4) + tan(z/4) + atan(z) + asinh(z)"
    " + erf(z) + exp(-z*z) + log(1 + z*z) + sqrt(1 + z*z) + Abs(z)/4 + sign(z)/8 + Heaviside(z)/8"
    " + Max(z, 0.1*z, -1)/2 + Min(z, 0.5)/2 + sigmoid(z) + softplus(z) + abs(z)/8 + max(z, 0)/8"
    " + min(z, 0)/8 + pi*z/10 + E*z/10")
# the functions cheap in a jitted function's loops (no libm call; tanh, exp, log, sigmoid and
# softplus vectorized polynomials)
PIECEWISE = ("Abs(z)/4 + sign(z)/8 + Heaviside(z)/8 + Max(z, 0.1*z, -1)/2 + Min(z, 0.5)/2 + z*z/4 + tanh(z)/4"
             " + exp(-z*z)/4 + log(1 + z*z)/4 + sigmoid(z)/4 + softplus(z)/4")


# whole activations whose g' and g'' carry distributions (DiracDelta, its derivative) that
# vanish almost everywhere: they must be dropped where they multiply to zero
DISTRIBUTIONS = ["z*Heaviside(z)", "sign(z)*z**2"]
ALL_SCHEDULES = ("lanes", "jit", "fused", "kernels", "count")


def test_the_expression_uses_every_allowed_function():
    from dbpgen.functable import FUNCTIONS, TRANSCENDENTAL_TYPES

    for name, entry in FUNCTIONS.items():  # the table of dbpgen.functable, aliases included
        assert f"{name}(" in EVERY_FUNCTION
        if entry.is_class and entry.sympy not in TRANSCENDENTAL_TYPES:
            assert f"{name}(" in PIECEWISE or name in ("abs", "max", "min")


@pytest.mark.parametrize("kind, act", [("lanes", EVERY_FUNCTION), ("jit", PIECEWISE), ("fused", EVERY_FUNCTION),
                                       ("count", EVERY_FUNCTION)])
def test_every_allowed_function_compiles_and_matches_the_oracle(kind, act, tmp_path, rng):
    base = SCHEDULE_SPECS["lanes" if kind == "count" else kind]
    layers = [dict(layer, act=act) if "act" in layer and layer["act"] != "softmax" else layer
              for layer in base["layers"]]
    spec = dict(base, name=f"h_every_{kind}", layers=layers)
    path = compile_file(write_model(spec, tmp_path), tmp_path / "generated", count_ops=kind == "count",
                        schedule=None if kind == "count" else kind)
    m = load_generated(path)
    assert m.SCHEDULES["value_and_grad"] == kind
    oracle = Oracle(spec)
    params = m.init_params(seed=2)
    x, y, _ = batch_for(spec, rng, batch=5)
    value, grads = m.value_and_grad(params, x, y)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y)
    assert abs(value - ref_value) <= 1e-10 * abs(ref_value)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], 1e-9)


@pytest.mark.parametrize("kind", ALL_SCHEDULES)
def test_distributions_vanish_in_every_schedule(kind, tmp_path, rng):
    """z*Heaviside(z) and sign(z)*z**2 as whole activations, one hidden and one at the
    output (where g'' enters eta_L, App. B), each in both places across the schedules: the
    DiracDelta terms of g' and g'' are dropped and the gradients are the oracle's."""
    hidden, out = DISTRIBUTIONS if kind in ("lanes", "fused", "count") else DISTRIBUTIONS[::-1]
    base = dict(SCHEDULE_SPECS["lanes" if kind == "count" else kind])
    if kind == "jit":  # mse instead of softmax: wider than lanes take, below the GEMM bound
        base["loss"], base["layers"] = "mse", [{"dense": 40, "act": "relu"}, {"dense": 3}]
    *first, last = base["layers"]
    layers = [dict(layer, act=hidden) if "act" in layer else layer for layer in first] + [dict(last, act=out)]
    spec = dict(base, name=f"h_dist_{kind}", layers=layers)
    path = compile_file(write_model(spec, tmp_path), tmp_path / "generated", count_ops=kind == "count",
                        schedule=None if kind == "count" else kind)
    m = load_generated(path)
    assert m.SCHEDULES["value_and_grad"] == kind
    params = m.init_params(seed=3)
    _, y, _ = batch_for(spec, rng, batch=6)
    x = rng.normal(size=(6, *spec["input"]))
    value, grads = m.value_and_grad(params, x, y)
    ref_value, ref_grads = Oracle(spec).value_and_grad(params, x, y)
    assert abs(value - ref_value) <= 1e-10 * abs(ref_value)
    for k in ref_grads:
        assert np.any(ref_grads[k] != 0), k  # a test that could fail
        assert_close(grads[k], ref_grads[k], 1e-9)


def test_a_constant_activation_is_refused_at_its_field(tmp_path):
    """g = 1 would make x_j one number for every sample, which no schedule emits (K of a
    number); found by random models, where it crashed the compiler or emitted a module that
    failed at run time. The parser refuses it, hidden or at the output, in one line."""
    for layers, field in [([{"dense": 4, "act": "1 + 0*z"}, {"dense": 2}], "layers[0].act"),
                          ([{"dense": 2, "act": "exp(z - z)"}], "layers[0].act"),
                          ([{"dense": 4, "act": "tanh"}, {"dense": 2, "act": "3"}], "layers[1].act")]:
        spec = {"name": "h_const", "input": [3], "loss": "none", "layers": layers, "penalty": {"v": "jacobian"}}
        done, _ = dbpgen_cli("compile", write_model(spec, tmp_path), cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"{field}: " in done.stderr and "is the constant" in done.stderr


# -- bounded compile work -----------------------------------------------------------------

def nested(template: str, depth: int) -> str:
    text = "z"
    for k in range(depth):
        text = template[k % len(template)].format(text)
    return text


HOSTILE_ACTS = {
    "exp6": nested(["exp({})"], 6),
    "sin_cos12": nested(["sin({})", "cos({})"], 12),
    "sigmoid8": nested(["sigmoid({})"], 8),
    "tanh_sqrt10": nested(["tanh({})"], 10).replace("(z)", "(sqrt(z*z + 1))"),
}


def dbpgen_cli(*args, cwd, timeout=60):
    """`dbpgen ARGS` run in cwd, paths given relative to it (as a user types them)."""
    args = [os.path.relpath(a, cwd) if isinstance(a, Path) else a for a in args]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dbpgen.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)
    return done, time.monotonic() - start


@pytest.mark.parametrize("name", sorted(HOSTILE_ACTS))
def test_hostile_expressions_are_answered_within_30_s(name, tmp_path):
    spec = {"name": f"h_{name}", "input": [3], "loss": "mse", "penalty": CDB,
            "layers": [{"dense": 4, "act": HOSTILE_ACTS[name]}, {"dense": 1}]}
    done, seconds = dbpgen_cli("compile", write_model(spec, tmp_path), "-o", tmp_path / "out", cwd=tmp_path)
    assert seconds < 30, f"answered after {seconds:.0f} s"
    if done.returncode == 2:  # refused: one line at the field
        assert done.stderr.count("\n") == 1 and ": layers[0].act: " in done.stderr, done.stderr
    else:
        assert done.returncode == 0, done.stderr
        m = load_generated(tmp_path / "out" / f"h_{name}.py", jit=False)
        with np.errstate(all="ignore"):  # exp(exp(...)) overflows: inf and NaN, but it runs
            value, grads = m.value_and_grad(m.init_params(), np.full((2, 3), 0.1), np.zeros((2, 1)))
        assert isinstance(value, float) and grads["W1"].shape == (4, 3)


def test_an_activation_over_the_budget_is_an_error_at_its_field(monkeypatch, tmp_path):
    derive = importlib.import_module("dbpgen.derive")  # dbpgen.derive is also a function
    monkeypatch.setattr(derive, "DERIVATIVE_BUDGET", 1.0)
    derive.activation_derivatives.cache_clear()
    spec = {"name": "h_budget", "input": [3], "loss": "mse",
            "layers": [{"dense": 4, "act": "relu"}, {"dense": 4, "act": HOSTILE_ACTS["tanh_sqrt10"]}, {"dense": 1}]}
    from dbpgen.errors import ModelError
    try:
        with pytest.raises(ModelError, match=r"layers\[1\]\.act: SymPy needs more than"):
            compile_file(write_model(spec, tmp_path), tmp_path / "out")
    finally:
        derive.activation_derivatives.cache_clear()
    assert not (tmp_path / "out" / "h_budget.py").exists()


def test_budgets_nest_and_the_outer_one_wins():
    from dbpgen.budget import BudgetExceeded, attempt, deadline

    def spin():
        while True:
            pass

    with pytest.raises(BudgetExceeded):
        with deadline(0.2):
            attempt(5.0, spin, "fallback")  # the outer budget expires inside: not a fallback
    with deadline(5.0):
        assert attempt(0.1, spin, "fallback") == "fallback"
        assert attempt(1.0, lambda: "done", "fallback") == "done"


def test_a_lost_budget_exception_is_raised_again():
    """An exception raised from the timer's handler can be lost (one raised while the
    interpreter runs a finalizer during garbage collection is printed and ignored): the
    handler raises again until the block is closed, so the block cannot run on with no
    timer armed (a SymPy rewrite under a 2 s budget ran for minutes in a test session)."""
    import time

    from dbpgen.budget import BudgetExceeded, deadline

    lost = 0
    start = time.thread_time()
    with pytest.raises(BudgetExceeded):
        with deadline(0.2):
            try:
                while time.thread_time() - start < 5:
                    pass
            except BudgetExceeded:
                lost += 1  # swallowed, as a finalizer would
            while time.thread_time() - start < 5:
                pass
    assert lost == 1 and time.thread_time() - start < 1


def test_budgets_count_the_compilers_own_cpu_time():
    """Another thread's CPU time (BLAS workers after a product, a user's thread) does not
    use up the main thread's budget, and waiting on another process costs none of it."""
    import threading
    import time

    import numpy as np

    from dbpgen.budget import deadline

    stop = threading.Event()
    a = np.ones((400, 400))

    def burn():  # NumPy's product releases the GIL: this thread runs beside the main one
        while not stop.is_set():
            a @ a

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        with deadline(0.6):
            start = time.thread_time()
            while time.thread_time() - start < 0.3:  # half the budget of the main thread's own CPU
                pass
            time.sleep(0.8)  # wall time past the budget, no CPU time
    finally:
        stop.set()
        worker.join()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_alias_bombs_are_refused_before_expansion(tmp_path):
    lines = ["name: bomb", "input: [1]", "layers: [{dense: 1}]", "loss: mse", "penalty:", "  v: loss_gradient",
             "  junk:", "    a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    done, seconds = dbpgen_cli("compile", write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n"), cwd=tmp_path)
    assert done.returncode == 2 and seconds < 30
    assert done.stderr == "bomb.yaml: yaml: aliases (*a3) expand to more than 100,000 values, at line 12\n"


def test_aliases_of_repeated_layers_are_read(tmp_path):
    """yaml.safe_dump writes a layer repeated in a list as an anchor and aliases."""
    import yaml

    layer = {"dense": 4, "act": "tanh"}
    text = yaml.safe_dump({"name": "repeated", "input": [2], "layers": [layer] * 5 + [{"dense": 1}], "loss": "mse"})
    assert "*id001" in text
    done, _ = dbpgen_cli("compile", write(tmp_path / "repeated.yaml", text), "-o", tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys; a model file with two `act:` (or `on:` and
    `'on':`) says which key, where."""
    cases = {"act.yaml": ("name: a\ninput: [2]\nlayers:\n  - {dense: 3, act: tanh, act: relu}\n  - {dense: 1}\n",
                          "act.yaml: yaml: key 'act' given twice, at lines 4 and 4\n"),
             "on.yaml": ("name: o\ninput: [2]\nlayers: [{dense: 1}]\nloss: mse\npenalty:\n  v: loss_gradient\n"
                         "  on: logits\n  'on': outputs\n", "on.yaml: yaml: key 'on' given twice, at lines 7 and 8\n")}
    for file, (text, message) in cases.items():
        done, _ = dbpgen_cli("compile", write(tmp_path / file, text), "-o", tmp_path, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr == message, done.stderr
    from dbpgen.errors import ModelError
    from dbpgen.model import _parse_yaml

    # a merge key (<<) and an override of what it merges is no duplicate, at any depth
    merged = _parse_yaml(b"defs:\n  big: &big\n    <<: {dense: 3, act: relu}\n    act: tanh\nlayer:\n  <<: *big\n", "m")
    assert merged["layer"] == {"dense": 3, "act": "tanh"}
    with pytest.raises(ModelError, match="key 'act' given twice"):  # a duplicate inside a merged mapping
        _parse_yaml(b"layer:\n  <<: {dense: 3, act: relu, act: tanh}\n", "m")


def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "model.yaml"
    os.mkfifo(fifo)
    done, seconds = dbpgen_cli("compile", fifo, "-o", tmp_path, cwd=tmp_path)
    assert done.returncode == 2 and seconds < 30
    assert done.stderr == "model.yaml: file: is a pipe or socket, not a file\n"


def test_huge_names_files_and_layer_counts_get_short_errors(tmp_path):
    cases = {
        "name.yaml": ("name: " + "a" * 200_000 + "\ninput: [1]\nlayers: [{dense: 1}]\nloss: mse\n",
                      "name: is 200,000 characters long; at most 100"),
        "deep.yaml": ("name: deep\ninput: [3]\nlayers:\n" + "  - {dense: 4, act: relu}\n" * 5000
                      + "loss: mse\n", "layers: 5,000 layers; dbpgen compiles at most 200"),
        "wide.yaml": ("name: wide\ninput: [100000]\nlayers: [{dense: 100000}, {dense: 1}]\nloss: mse\n",
                      "layers[0]: too large for this machine: its parameters would need more than"),
        "big.yaml": ("name: big\n" + "#" * 300_000 + "\n", "file: holds more than 262,144 bytes, the most"),
    }
    for file, (text, message) in cases.items():
        done, seconds = dbpgen_cli("compile", write(tmp_path / file, text), cwd=tmp_path)
        assert done.returncode == 2 and seconds < 30, done.stderr[:500]
        assert done.stderr.startswith(f"{file}: {message}"), done.stderr[:500]
        assert done.stderr.count("\n") == 1 and len(done.stderr) < 800
    if os.path.exists("/dev/zero"):  # a file that never ends is read no further than the limit
        done, seconds = dbpgen_cli("compile", "/dev/zero", "-o", tmp_path, cwd=tmp_path)
        assert done.returncode == 2 and seconds < 30, done.stderr[:500]
        assert done.stderr == "/dev/zero: file: holds more than 262,144 bytes, the most a model file may hold\n"
    unknown = "name: k\ninput: [1]\nlayers: [{dense: 1}]\nloss: mse\n" + "x" * 100_000 + ": 1\n"
    done, _ = dbpgen_cli("compile", write(tmp_path / "key.yaml", unknown), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and len(done.stderr) < 800


@pytest.mark.parametrize("name", ["os", "sys", "ctypes", "typing", "importlib", "sympy", "numpy", "yaml", "__init__",
                                  "__main__"])
def test_names_that_shadow_modules_are_refused(name, tmp_path, monkeypatch, capsys):
    """`dbpgen compile` in this process (a real process's one-line errors: the tests above)."""
    from dbpgen import cli

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "m.yaml", f"name: {name}\ninput: [1]\nlayers: [{{dense: 1}}]\nloss: mse\n")
    assert cli.main(["compile", "m.yaml", "-o", "."]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1, printed.err
    assert printed.err.startswith(f"m.yaml: name: '{name}' "), printed.err
    assert not (tmp_path / f"{name}.py").exists()


# -- deep networks --------------------------------------------------------------------------

# The peak is this process's own (VmHWM of its address space): ru_maxrss would also count
# the parent's, which a vfork-spawned child inherits at exec (a pytest worker's gigabytes).
DEEP_RUN = """
import sys, time
import numpy as np
from dbpgen.compiler import compile_file, load_generated
start = time.monotonic()
m = load_generated(compile_file(sys.argv[1], sys.argv[2]))
params = m.init_params()
x, y = np.random.default_rng(0).normal(size=(64, 4)), np.zeros((64, 1))
m.value_and_grad(params, x, y)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(time.monotonic() - start, peak, m.SCHEDULES["value_and_grad"])
"""


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_fifty_layers_compile_and_run_within_30_s_and_2_gb(act, tmp_path):
    """Compile + import + first call in a fresh process (empty Numba cache): kernels are
    shared by layers of one shape, so the work does not grow with depth times width."""
    spec = {"name": f"h_deep_{act}", "input": [4], "loss": "mse", "penalty": CDB,
            "layers": [{"dense": 4, "act": act}] * 49 + [{"dense": 1}]}
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", DEEP_RUN, str(write_model(spec, tmp_path)), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    seconds, peak, schedule = done.stdout.split()
    assert float(seconds) < 30 and int(peak) < 2 << 30, done.stdout
    assert schedule == "fused"


def test_deep_networks_match_the_oracle(tmp_path, rng):
    spec = {"name": "h_deep_check", "input": [3], "loss": "mse", "penalty": CDB,
            "layers": [{"dense": 5, "act": a} for a in ["tanh", "relu", "sigmoid", "elu"] * 3] + [{"dense": 2}]}
    m = compile_spec(spec, tmp_path)
    assert m.SCHEDULES["value_and_grad"] == "fused"
    oracle = Oracle(spec)
    params = m.init_params(seed=1)
    x, y, _ = batch_for(spec, rng)
    value, grads = m.value_and_grad(params, x, y)
    ref_value, ref_grads = oracle.value_and_grad(params, x, y)
    assert abs(value - ref_value) <= 1e-10 * abs(ref_value)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], 1e-9)


# -- NaN in, NaN out, as in PyTorch ---------------------------------------------------------

NAN_SPECS = [
    SCHEDULE_SPECS["lanes"], SCHEDULE_SPECS["jit"], SCHEDULE_SPECS["fused"],
    {"name": "h_nan_lanes", "input": [3], "loss": "mse", "penalty": PEN,
     "layers": [{"dense": 6, "act": {"leaky_relu": 0.1}}, {"dense": 5, "act": "Max(z, 0.1*z)"},
                {"dense": 4, "act": "Min(z, 1)"}, {"dense": 2, "act": "relu"}]},
    {"name": "h_nan_fused", "input": [96], "loss": "mse", "penalty": PEN,
     "layers": [{"dense": 200, "act": "relu"}, {"dense": 4, "act": "Min(z, 1)"}, {"dense": 2, "act": "Max(z, -1)"}]},
]
TORCH_ACTS = {
    "relu": lambda t, z: t.relu(z), "tanh": lambda t, z: t.tanh(z), "softmax": lambda t, z: t.softmax(z, -1),
    "Max(z, 0.1*z)": lambda t, z: t.maximum(z, 0.1 * z), "Min(z, 1)": lambda t, z: t.minimum(z, t.ones(())),
    "Max(z, -1)": lambda t, z: t.maximum(z, -t.ones(())),
}


def torch_forward(torch, spec, params, x):
    h = torch.as_tensor(x)
    for j, layer in enumerate(spec["layers"], 1):
        h = h @ params[f"W{j}"].T + params[f"b{j}"]
        act = layer.get("act", "identity")
        if isinstance(act, dict):
            h = torch.nn.functional.leaky_relu(h, act["leaky_relu"])
        elif act != "identity":
            h = TORCH_ACTS[act](torch, h)
    return h


@pytest.mark.parametrize("spec", NAN_SPECS, ids=[s["name"] for s in NAN_SPECS])
def test_nan_and_inf_inputs_propagate_as_in_torch(spec, tmp_path, rng, jitted):
    torch = pytest.importorskip("torch")  # in the test extra; importorskip only for a bare install
    m = jitted(KIND_OF[spec["name"]]) if spec["name"] in KIND_OF else compile_spec(spec, tmp_path)
    params = m.init_params(seed=4)
    x, y, _ = batch_for(spec, rng, batch=6)
    x[1, 0], x[2, 1], x[3, 0], x[4, :] = np.nan, np.inf, -np.inf, np.nan
    tparams = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    out = torch_forward(torch, spec, tparams, x)
    np.testing.assert_allclose(m.forward(params, x), out.detach().numpy(), rtol=1e-12, equal_nan=True)
    # the loss alone (weight 0): its value and which gradients are not finite, as torch's
    if spec["loss"] == "nll":
        loss = -(torch.as_tensor(y) * torch.log(out)).sum() / len(x)
    else:
        loss = ((out - torch.as_tensor(y)) ** 2).sum() / len(x)
    loss.backward()
    value, grads = m.value_and_grad(params, x, y, weight=0.0)
    assert np.isnan(value) == np.isnan(loss.item())
    for k, g in grads.items():
        assert np.isnan(g).any() == tparams[k].grad.isnan().any().item(), k
    # a NaN sample gives a NaN per-sample penalty, the finite samples finite ones
    R = m.penalty(params, x, y)
    assert np.isnan(R[[1, 4]]).all() and np.isfinite(R[[0, 5]]).all()


@pytest.mark.parametrize("schedule", ["lanes", "jit", "fused"])
def test_a_division_by_zero_in_a_jitted_kernel_gives_nan_not_an_exception(schedule, tmp_path, rng):
    """Jitted kernels divide as NumPy does (error_model="numpy"): sqrt(|z|)'s
    g' = sign(z) / (2 sqrt(|z|)) at z = 0 is 0/0, NaN as in torch, not a ZeroDivisionError."""
    spec = {"name": f"h_div0_{schedule}", "input": [3], "loss": "mse", "penalty": PEN,
            "layers": [{"dense": 4, "act": "sqrt(abs(z))"}, {"dense": 2}]}
    m = compile_spec(spec, tmp_path, schedule=schedule)
    params = m.init_params(seed=0)
    params["W1"][0], params["b1"][0] = 0.0, 0.0  # unit 1's z is exactly 0 in every sample
    x, y, _ = batch_for(spec, rng)
    assert np.isfinite(m.forward(params, x)).all()
    with np.errstate(all="ignore"):
        value, grads = m.value_and_grad(params, x, y)
        assert np.isnan(value) and np.isnan(m.penalty(params, x, y)).all()
    params["W1"][0], params["b1"][0] = 1.0, 1.0  # away from 0 again: finite
    value, grads = m.value_and_grad(params, x + 10.0, y)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())
