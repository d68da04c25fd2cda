"""The back end: schedule IR and its verifier, the chooser, forced schedules, PEAK_BYTES.

Every way of running a program is a lowering into the schedule IR (dbpgen/backend/); these
tests check the IR itself, that the chooser's reason reaches the module, that every
schedule that applies computes the same gradients as the autograd oracle, and that
PEAK_BYTES is what a call holds, measured.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

from conftest import BENCHMARKS, ROOT, write_model
from dbpgen.backend import chooser
from dbpgen.backend.schedule import (OPEN, AddTo, Alloc, Call, For, Free, Function, Let, Rows, ScheduleError, Store,
                                     elem, name, verify)
from dbpgen.codegen import lower_programs
from dbpgen.compiler import build, compile_file, load_generated
from dbpgen.model import load_model
from test_gradients import NODE, check_against_oracle, mlp

TESTS = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"


# -- the IR and its verifier -----------------------------------------------------------------

def test_verifier_accepts_a_well_formed_function():
    fn = Function("_f", ("a",), (
        Alloc("out", (name("n"),), zero=True),
        For("i", name("n"), (Let("t", 2 * elem("a", name("i"))), AddTo(elem("out", name("i")), name("t"))),
            scalar=True),
        Call(("c",), "_dense_Kbox", (name("a"), name("out")), plain=True),
        Free(("c",)),
    ), (name("out"),))
    with pytest.raises(ScheduleError, match=r"reads undefined \['n'\]"):
        verify(fn, {"_dense_Kbox"})
    fn = Function("_f", ("a", "n"), fn.body, fn.returns)
    assert verify(fn, {"_dense_Kbox"}) is fn


@pytest.mark.parametrize("body, message", [
    ((Let("t", name("u")),), r"t reads undefined \['u'\]"),
    ((For("i", 3, ()),), "empty loop"),
    ((Call(("t",), "_nowhere", ()),), "unknown function _nowhere"),
    ((Call((), "_dense_Kbox", (name("a"),)),), "_dense_Kbox assigns nothing"),
    ((Store(elem("w", 0), name("a")),), r"reads undefined \['w'\]"),
    ((For("i", 3, (Let("t", name("a")),)), Let("u", name("t"))), r"u reads undefined \['t'\]"),
    ((Let("t", name("a")), Free(("t",)), Let("u", name("t"))), r"u reads undefined \['t'\]"),
    ((Store(Rows(name("a"), OPEN, name("B")), name("a")),), r"reads undefined \['B'\]"),
])
def test_verifier_refuses_what_would_not_run(body, message):
    with pytest.raises(ScheduleError, match=message):
        verify(Function("_f", ("a",), body, (name("a"),)), {"_dense_Kbox"})
    with pytest.raises(ScheduleError, match="returns nothing"):
        verify(Function("_f", ("a",), (), ()), set())


def test_schedules_are_values_equal_kernels_are_equal():
    make = lambda: Function("", ("a",), (Let("t", sp.tanh(name("a"))),), (name("t"),), decorator="njit")
    assert make() == make() and hash(make()) == hash(make())


# -- the chooser ------------------------------------------------------------------------------

def test_the_chooser_names_its_reason_in_the_module_header():
    text = (ROOT / "generated" / "mnist_cdb.py").read_text()
    header = text.split('"""', 2)[1]
    assert "How each program runs" in header
    assert "value_and_grad: fused, predicted per call at batch 128: fused " in header
    assert "not lanes: a layer wider than 32 units" in header
    sine = (ROOT / "generated" / "sine_cdb.py").read_text().split('"""', 2)[1]
    assert "value_and_grad: lanes" in sine


def test_every_threshold_is_in_the_chooser():
    """codegen prints what the chooser decided; it holds no threshold of its own."""
    import dbpgen.codegen as codegen

    source = Path(codegen.__file__).read_text()
    for word in ("MAX_WIDTH", "MAX_DEPTH", "TRANSCENDENTAL", "small_kernels", "predict"):
        assert word not in source


def test_the_cost_model_ranks_schedules_by_their_work():
    """Narrow networks: the lanes kernel; 64-wide ReLU layers: one jitted program (0.335
    against 0.40 ms fused, measured); GEMM-bound ones: BLAS from Python, where a jitted
    program saves too little for its compile time; libm functions repeated in g, g', g'':
    computed once where the schedule shares them."""
    from dbpgen.backend import chooser, cost

    cases = {
        "lanes": mlp("cm_narrow", ["relu", "relu"], None, "mse", NODE, widths=(8, 8)),
        "jit": mlp("cm_mid", ["relu", "relu"], None, "mse", NODE, widths=(64, 64)),
        "fused": mlp("cm_wide", ["relu", "relu"], None, "mse", NODE, widths=(512, 512)),
    }
    from dbpgen.model import model_from_dict

    for expected, spec in cases.items():
        model = model_from_dict(spec, spec["name"] + ".yaml")
        program = build(model).programs["value_and_grad"]
        times = {k: cost.predict(k, model, program, 128) for k in ("lanes", "jit", "fused", "kernels")}
        ranked = {k: chooser.rank((t, chooser.compile_seconds(k, model, program))) for k, t in times.items()}
        assert min(ranked, key=ranked.get) == expected, times
        assert all(t > 0 for t in times.values())
        # twice the batch: at least as long, at most a bit over twice as long
        for kind, t in times.items():
            assert t <= cost.predict(kind, model, program, 256) <= 2.2 * t
    wide_tanh = model_from_dict(mlp("cm_tanh", ["tanh", "tanh"], None, "mse", NODE, widths=(256, 256)), "t.yaml")
    program = build(wide_tanh).programs["value_and_grad"]
    times = {k: cost.predict(k, wide_tanh, program, 128) for k in ("jit", "fused", "kernels")}
    assert times["jit"] < times["fused"] < times["kernels"], times
    assert cost.work(wide_tanh, program, 128).vectorized >= 2 * 256 * 128  # g = tanh(z), two layers
    # sin and cos repeat in g, g', g'' of this activation: the schedules that share each
    # distinct application (fused, kernels) pay for it once, the lanes kernel per call site
    wave = "sin(z) + z*cos(z)"
    narrow_wave = model_from_dict(mlp("cm_wave", [wave, wave], None, "mse", NODE, widths=(32, 32)), "w.yaml")
    program = build(narrow_wave).programs["value_and_grad"]
    w = cost.work(narrow_wave, program, 128)
    assert sum(n for _, n, _ in w.distinct) < w.transcendental / 2
    assert {f for f, _, _ in w.distinct} == {"sin", "cos"} and w.vectorized == 0
    # mish's exp, log and tanh are vectorized polynomials in loops: no libm call at all
    mish = "z*tanh(log(1 + exp(z)))"
    narrow_mish = model_from_dict(mlp("cm_mish", [mish, mish], None, "mse", NODE, widths=(32, 32)), "m.yaml")
    program = build(narrow_mish).programs["value_and_grad"]
    w = cost.work(narrow_mish, program, 128)
    assert w.transcendental == 0 and not w.distinct and w.vectorized >= 3 * 2 * 32 * 128
    times = {k: cost.predict(k, narrow_mish, program, 128) for k in ("lanes", "jit", "fused", "kernels")}
    assert min(times, key=times.get) in ("fused", "jit"), times


def test_the_cost_model_prices_each_function_by_what_it_costs():
    """A scalar libm tanh costs more than twice an exp (LIBM_RELATIVE), but in loops tanh (and
    exp, log, sigmoid, softplus) is a vectorized polynomial, cheaper than a libm exp: 8- and
    16-wide tanh networks, and an 8-wide softplus one, are predicted faster in the lanes
    kernel than as fused loops called from Python. softplus's whole-array form is six NumPy
    passes (ARRAY_PASSES), which the kernels schedule pays for."""
    from dbpgen.backend import cost
    from dbpgen.model import model_from_dict

    def predicted(act: str, width: int) -> dict:
        spec = mlp(f"cf_{act}{width}", [act] * 3, None, "mse", NODE, widths=(width,) * 3)
        model = model_from_dict(spec, spec["name"] + ".yaml")
        program = build(model).programs["value_and_grad"]
        return {k: cost.predict(k, model, program, 128) for k in ("lanes", "fused", "kernels")}

    m = cost.MACHINE
    assert cost.LIBM_RELATIVE["tanh"] > 2 * cost.LIBM_RELATIVE["exp"]
    assert m.vector_element < cost.LIBM_RELATIVE["exp"] * m.lane_libm
    tanh16, tanh8, softplus8 = predicted("tanh", 16), predicted("tanh", 8), predicted("softplus", 8)
    assert tanh16["lanes"] < tanh16["fused"] and tanh8["lanes"] < tanh8["fused"]
    assert softplus8["lanes"] < softplus8["fused"]
    # the six NumPy passes (two of them libm ufuncs) of softplus cost more than tanh's ufunc
    assert predicted("softplus", 16)["kernels"] > tanh16["kernels"]


SMALL = mlp("sched_small", ["tanh", "relu"], None, "mse", NODE, widths=(6, 5))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = write_model(SMALL, tmp_path_factory.mktemp("sched"))
    return path, load_model(path)


def test_a_small_dense_model_can_run_every_schedule(small_model):
    path, model = small_model
    compiled = build(model)
    program = compiled.programs["value_and_grad"]
    from dbpgen.shapes import program_shapes
    from dbpgen.derive import n_vectors
    shapes = program_shapes(model, program, n_vectors(model))
    assert chooser.applicable(model, program, shapes) == ["lanes", "jit", "fused", "kernels"]
    assert chooser.applicable(model, program, shapes, count_ops=True) == ["count"]


@pytest.mark.optimized  # run optimized, by tests/test_optimized.py (tests/conftest.py)
@pytest.mark.parametrize("kind", ["lanes", "jit", "fused", "kernels"])
def test_forced_schedules_match_the_oracle(kind, small_model, tmp_path, rng):
    path, _ = small_model
    m = load_generated(compile_file(path, tmp_path / kind, schedule=kind))
    assert set(m.SCHEDULES.values()) == {kind}
    assert "forced (--schedule)" in Path(m.__file__).read_text().split('"""', 2)[1]
    check_against_oracle(SMALL, m, rng, batch=7)


# found by Hypothesis: the unsimplified vjp keeps G''_1 of a softplus layer that nothing reads
DEAD = {"name": "dead_ddg", "input": [1], "loss": "mse",
        "layers": [{"dense": 3, "act": "softplus", "bias": False}, {"dense": 1, "act": "identity", "bias": False},
                   {"dense": 1, "act": "identity", "bias": False}, {"dense": 3, "act": "softmax", "bias": False}]}


@pytest.mark.parametrize("kind", ["jit", "fused", "kernels"])
def test_values_nothing_reads_compile_in_every_schedule(kind, tmp_path, rng):
    path = write_model(DEAD, tmp_path)
    m = load_generated(compile_file(path, tmp_path / kind, schedule=kind, simplified=False), jit=False)
    check_against_oracle(DEAD, m, rng, batch=4)


def dbpgen_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dbpgen.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_a_schedule_that_does_not_apply_is_one_line_naming_those_that_do(tmp_path):
    lenet = ROOT / "examples" / "lenet_cdb.yaml"
    (tmp_path / "generated").mkdir()
    previous = tmp_path / "generated" / "lenet_cdb.py"
    previous.write_text("# the previous module\n")
    done = dbpgen_cli("compile", lenet, "-o", tmp_path / "generated", "--schedule", "jit", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "lenet_cdb.yaml" in lines[0] and "--schedule" in lines[0]
    assert "'jit' does not apply" in lines[0] and "applicable: fused, kernels" in lines[0]
    assert previous.read_text() == "# the previous module\n"
    done = dbpgen_cli("compile", lenet, "--schedule", "fastest", cwd=tmp_path)
    assert done.returncode == 2 and "choose from lanes, jit, fused, kernels, count" in done.stderr


WIDE = mlp("sched_wide", ["relu", "tanh"], None, "mse", NODE, widths=(96, 200))  # GEMM-bound: fused


def test_tuning_keeps_the_fastest_schedule_and_records_the_times(tmp_path, rng):
    """dbpgen compile --tune --batch B: each schedule emitted, imported and timed (the two
    that compile fastest here)."""
    from dbpgen.compiler import tune

    compiled = build(load_model(write_model(WIDE, tmp_path)))
    forced = tune(compiled, 16, seconds=0.05, kinds=("fused", "kernels"), rounds=2)
    why = forced.why["value_and_grad"]
    assert why.startswith("tuned (--tune --batch 16): fastest measured on this machine of ")
    times = dict(part.rsplit(" ", 2)[:2] for part in why.split(" of ", 1)[1].split(", "))
    assert set(times) == {"fused", "kernels"} and forced.kinds == {"value_and_grad": next(iter(times))}
    out = tmp_path / "sched_wide.py"
    out.write_text(compiled.source(schedule=forced))
    m = load_generated(out)
    assert m.SCHEDULES["value_and_grad"] == forced.kinds["value_and_grad"] and why in m.__doc__
    (tmp_path / "untuned.py").write_text(compiled.source())
    untuned = load_generated(tmp_path / "untuned.py")
    assert m.SCHEDULES["forward"] == untuned.SCHEDULES["forward"]  # the others keep the chooser's schedule
    check_against_oracle(WIDE, m, rng, batch=7)


def test_tuning_times_each_schedule_in_turns_and_keeps_its_fastest_process(tmp_path, monkeypatch):
    """A process can run at half speed from start to end: --tune times every schedule in
    several processes, the schedules taking turns, and keeps each one's least median (here
    the processes are stand-ins printing given medians)."""
    from dbpgen import compiler

    compiled = build(load_model(write_model(WIDE, tmp_path)))
    order, medians = [], {"fused": iter([3e-3, 1e-3]), "kernels": iter([2e-3, 2.5e-3])}

    def process(args, **kwargs):
        kind = Path(args[3]).parent.name  # the schedule's own module file
        order.append(kind)
        return subprocess.CompletedProcess(args, 0, stdout=f"{next(medians[kind])}\n", stderr="")

    monkeypatch.setattr(subprocess, "run", process)
    times = compiler.measure_schedules(compiled, 16, 0.01, ("fused", "kernels"), rounds=2)
    assert order == ["fused", "kernels", "fused", "kernels"]
    assert times == {"fused": 1e-3, "kernels": 2e-3}


def test_tune_flags_are_checked(small_model, tmp_path):
    path, _ = small_model
    done = dbpgen_cli("compile", path, "--batch", "64", cwd=tmp_path)
    assert done.returncode == 2 and "--batch: is the batch size --tune measures at" in done.stderr
    done = dbpgen_cli("compile", path, "--tune", "--schedule", "jit", cwd=tmp_path)
    assert done.returncode == 2 and "--tune: measures the schedules itself" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for command in (("compile", path, "--tune", "--batch", "0"), ("ops", path, "--batch", "-3")):
        done = dbpgen_cli(*command, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.endswith(f"--batch: must be a positive integer, got {command[-1]}\n")


# -- schedules of the fused lowering, read off the IR ------------------------------------------

@pytest.fixture(scope="module")
def mnist_schedules():
    model = load_model(BENCHMARKS / "mnist_cdb.yaml")
    return lower_programs(model, build(model).programs)


def _calls(fn):
    return [n for n in fn.body if isinstance(n, Call)]


def test_fused_loops_store_only_what_later_statements_read(mnist_schedules):
    vg = mnist_schedules["value_and_grad"]
    assert vg.kind == "fused"
    kernels = {k.name: k for s in mnist_schedules.values() for k in s.kernels}
    assert len(kernels) == sum(len(s.kernels) for s in mnist_schedules.values())  # each printed once
    calls = {c.targets: c for c in _calls(vg.entry)}
    # x1 = relu(b1 + K_1 x0) is written into the lower half of the stacked operand of K^box_2
    first = calls[("x1", "dg1")]
    assert first.into == ("x1",) and first.args[-1] == Rows(name("S2x_"), name("B"), OPEN)
    kernel = kernels[first.function]
    assert kernel.params == ("b", "t", "x_out")  # names without the layer index
    loop = kernel.body[-1].body[0]  # for i (samples): for k (units)
    made = [n.target for n in loop.body if isinstance(n, Let)]
    stored = [n.target.base.label.name for n in loop.body if isinstance(n, Store)]
    assert made == ["z", "x", "dg"] and stored == ["x_out", "dg_out"]  # z stays a scalar
    assert [n.target for n in kernel.body if isinstance(n, Alloc)] == ["dg_out"]  # x_out is given
    # layer 2 has the same shape of loop: it calls the same kernel
    assert calls[("x2", "dg2")].function == first.function
    # the weight adjoints are one GEMM over the stacked batch (eq. 31-32)
    for j in (1, 2, 3):
        box = calls[(f"dW{j}",)]
        assert box.function == "_dense_Kbox" and box.args == (name(f"S{j}x_"), name(f"S{j}y_"))
    xi0 = calls[("xi0",)]
    assert xi0.function == "_dense_KT_into" and xi0.args[-1] == Rows(name("S1x_"), name("B"), OPEN)
    assert Store(Rows(name("S1x_"), OPEN, name("B")), sp.Symbol("x0"), "copied into its half") in vg.entry.body
    # the bias adjoint (eq. 33) is summed inside a loop: accumulated, not stored per sample
    sums = [k for k in kernels.values() if any(isinstance(n, AddTo) for n in k.body[-1].body[0].body)]
    assert sums and all(n.zero for k in sums for n in k.body if isinstance(n, Alloc) and len(n.shape) == 1)
    # penalty stores what it reads later: x1 and G'_1, in one loop (lowered as fused: the
    # chooser takes a jitted program for it, whose loops are printed inline)
    model = load_model(BENCHMARKS / "mnist_cdb.yaml")
    fused = lower_programs(model, build(model).programs, schedule="fused")
    kernels = {k.name: k for s in fused.values() for k in s.kernels}
    penalty = {c.targets: c for c in _calls(fused["penalty"].entry)}
    assert ("x1", "dg1") in penalty and kernels[penalty[("x1", "dg1")].function].labels == ("x", "dg")


def test_python_schedules_free_arrays_at_their_last_read(mnist_schedules):
    body = mnist_schedules["value_and_grad"].entry.body
    freed = [n for node in body if isinstance(node, Free) for n in node.names]
    assert "t0_" in freed and "dg1" in freed and len(freed) == len(set(freed))
    returned = {"J", "dW1", "db1", "dW2", "db2", "dW3", "db3"}
    assert not returned & set(freed)


# -- PEAK_BYTES against a measurement ----------------------------------------------------------

MEASURE = TESTS / "measure_peak.py"


@pytest.mark.parametrize("source, batch, schedule", [
    (BENCHMARKS / "mnist_cdb.yaml", 1024, None),       # fused
    (BENCHMARKS / "mnist_cdb.yaml", 1024, "kernels"),  # plain statements
    (EXAMPLES / "lenet_cdb.yaml", 128, None),          # conv kernels and their im2col buffers
], ids=["mnist-fused", "mnist-kernels", "lenet"])
def test_peak_bytes_match_a_measurement(source, batch, schedule, tmp_path):
    """The resident-set high-water mark of one value_and_grad call (every array of 64 KiB
    or more from its own mapping, so that a freed one leaves the resident set) against
    PEAK_BYTES of the schedule that runs, at the same batch size."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the high-water mark")
    path = compile_file(source, tmp_path, schedule=schedule)
    compiled = build(load_model(source))
    predicted = compiled.peak_bytes(batch, schedule)["emitted"]
    assert f"'emitted': {compiled.peak_bytes(schedule=schedule)['emitted']}" in path.read_text()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, str(MEASURE), str(path), str(batch)], capture_output=True,
                          text=True, env=env, timeout=300, check=True)
    measured = int(done.stdout.split()[-1])
    assert 0.75 * predicted <= measured <= 1.25 * predicted, (measured, predicted)


def _dense_spec(width: int) -> dict:
    return {"name": f"relu{width}", "dtype": "float32", "input": [32], "loss": "mse",
            "layers": [{"dense": width, "act": "relu"} for _ in range(3)] + [{"dense": 4}],
            "penalty": {"v": "loss_gradient", "p": "squared_norm", "weight": 0.1}}


@pytest.mark.parametrize("jitted", [True, False])
def test_every_product_of_a_module_goes_to_one_blas(jitted, tmp_path):
    """NumPy's products and Numba's go to two OpenBLAS libraries (numpy's and scipy's), each
    with its own threads: alternating between them, a 64-wide float32 network at batch 512
    took 8 ms instead of 0.85, its calls waiting on the other library's spinning threads.
    Where any jitted program calls a helper (jit), every dense product is jitted, the ones
    writing into stacked buffers that only Python calls (fused) too; where none does, none
    is."""
    import numba

    from dbpgen.codegen import Forced
    from dbpgen.compiler import compile_model
    from dbpgen.model import load_model

    model = load_model(write_model(_dense_spec(64), tmp_path))
    kinds = {name: "fused" for name in ("forward", "vjp", "jvp", "input_grad", "penalty", "value_and_grad")}
    kinds["forward"] = "jit" if jitted else "fused"
    forced = Forced(kinds, {name: "forced (test)" for name in kinds})
    m = load_generated(compile_model(model, tmp_path / "g", schedule=forced))
    assert m.SCHEDULES["forward"] == ("jit" if jitted else "fused") and m.SCHEDULES["value_and_grad"] == "fused"
    products = [n for n in ("_dense_K", "_dense_KT", "_dense_Kbox", "_dense_K_into", "_dense_KT_into")
                if hasattr(m, n)]
    assert "_dense_KT_into" in products  # the fused value_and_grad's stacked buffers
    assert {isinstance(getattr(m, n), numba.core.registry.CPUDispatcher) for n in products} == {jitted}
