"""The compiler driver: load, derive, simplify, render, write atomically."""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from .budget import BudgetExceeded, deadline
from .backend.chooser import SCHEDULES, ScheduleChoiceError, applicable
from .backend.memory import peak_bytes
from .codegen import MEMORY_BATCH, Forced, lower_programs, render
from .derive import derive_programs, naive_value_and_grad
from .errors import ModelError
from .ir import Model
from .model import load_model
from .memory import peak_live_bytes
from .ops import ops_table
from .passes import simplify
from .printer import CodegenError
from .program import Program, map_exprs



@dataclass
class Compiled:
    model: Model
    naive: dict[str, Program]
    programs: dict[str, Program]
    stages: dict[str, list] = field(default_factory=dict)

    @property
    def ops(self) -> dict:
        pen = self.model.penalty
        steps = pen.iterations if pen is not None and pen.v == "random" else 0
        return ops_table(self.model, self.naive["value_and_grad"], self.programs["value_and_grad"],
                         (self.naive.get("power_step"), self.programs.get("power_step")), steps)

    def peak_bytes(self, batch: int = MEMORY_BATCH, schedule: str | None = None) -> dict:
        """Peak live bytes of value_and_grad as its schedule runs it (emitted), and of the
        unsimplified program laid out statement by statement (naive), at a batch size."""
        lowered = self._lowered(False, schedule)["value_and_grad"]
        return {"batch": batch, "emitted": peak_bytes(self.model, lowered, batch),
                "naive": peak_live_bytes(self.model, self.naive["value_and_grad"], batch)}

    def _lowered(self, count_ops: bool, schedule: str | None):
        try:
            return lower_programs(self.model, self.programs, count_ops, schedule)
        except ScheduleChoiceError as exc:
            raise ModelError(self.model.source, "--schedule", str(exc)) from None

    def source(self, count_ops: bool = False, schedule=None) -> str:
        """The module's text; schedule: a name forced for every program, or a codegen.Forced."""
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ModelError(self.model.source, "--schedule",
                             f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        try:
            with deadline(COMPILE_BUDGET):
                return render(self.model, self.programs, self.ops, self.naive["value_and_grad"], count_ops,
                              schedule, MEMORY_BATCH)[0]
        except ScheduleChoiceError as exc:
            raise ModelError(self.model.source, "--schedule", str(exc)) from None
        except CodegenError as exc:
            raise ModelError(self.model.source, "layers", str(exc)) from None
        except BudgetExceeded:
            raise _over_budget(self.model) from None


def _drop_distributions(expr):
    return sp.sympify(expr).replace(sp.DiracDelta, lambda *args: sp.S.Zero)


COMPILE_BUDGET = 20.0  # s for derivation, simplification and printing: any file is answered


def _over_budget(model: Model) -> ModelError:
    return ModelError(model.source, "layers", f"compiling this model takes more than {COMPILE_BUDGET:g} s; "
                      "use fewer layers or simpler activations")


def build(model: Model, simplified: bool = True) -> Compiled:
    """Derive and simplify every program of the module, within COMPILE_BUDGET."""
    try:
        with deadline(COMPILE_BUDGET):
            return _build(model, simplified)
    except BudgetExceeded:
        raise _over_budget(model) from None


def _build(model: Model, simplified: bool) -> Compiled:
    derived = derive_programs(model)
    stages: dict[str, list] = {}
    programs = {}
    for name, program in derived.items():
        stages[name] = [("derive", program)]
        programs[name] = simplify(program, stages[name], model) if simplified else program
    naive = dict(derived, value_and_grad=naive_value_and_grad(model))
    if not simplified:  # emit the naive programs as they are, DiracDelta read as 0 a.e.
        programs = {name: map_exprs(p, _drop_distributions) for name, p in naive.items()}
    return Compiled(model, naive, programs, stages)


def compile_file(path: str | os.PathLike, out_dir: str | os.PathLike = "generated",
                 simplified: bool = True, dtype: str | None = None, count_ops: bool = False,
                 schedule: str | None = None, tune_batch: int | None = None) -> Path:
    """Emit <out_dir>/<name>.py; on any error the previous module stays untouched.
    schedule forces one of backend.chooser.SCHEDULES for every program; tune_batch times
    value_and_grad in every schedule that applies, at that batch size, and keeps the fastest."""
    model = load_model(path)
    if dtype:
        from dataclasses import replace
        model = replace(model, dtype=dtype)
    return compile_model(model, out_dir, simplified, count_ops, schedule, tune_batch)


def compile_model(model: Model, out_dir: str | os.PathLike = "generated", simplified: bool = True,
                  count_ops: bool = False, schedule: str | None = None, tune_batch: int | None = None) -> Path:
    """Emit <out_dir>/<model.name>.py for a loaded (possibly modified) model."""
    compiled = build(model, simplified)
    if tune_batch is not None:
        if schedule is not None or count_ops:
            raise ModelError(model.source, "--tune", "measures the schedules itself: not with --schedule or --count-ops")
        schedule = tune(compiled, tune_batch)
    text = compiled.source(count_ops, schedule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{model.name}.py"
    if target.is_file() and target.read_bytes() == text.encode("utf-8"):
        return target  # unchanged: keep its mtime, so Numba's on-disk cache stays valid
    fd, tmp = tempfile.mkstemp(prefix=f".{model.name}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


TUNE_SECONDS = 0.5  # of calls per schedule and process, after the first (compiling) call
# Processes per schedule, the schedules taking turns. One process can run at half speed from
# start to end (docs/performance.md, "Single runs are noisy"): a jitted value_and_grad timed
# 0.319 ms in one tuning process and 0.16 ms in another. Each schedule keeps the least of
# its processes' medians; the processes after the first load Numba's cache.
TUNE_ROUNDS = 3


_TIMING = """
import sys, time
import numpy as np
from dbpgen.compiler import load_generated
path, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
m = load_generated(path)
rng = np.random.default_rng(0)
x = rng.normal(size=(batch,) + m.INPUT_SHAPE).astype(m.DTYPE)
y = np.eye(m.N_OUTPUTS)[rng.integers(0, m.N_OUTPUTS, batch)] if sys.argv[4] == "nll" else rng.normal(size=(batch, m.N_OUTPUTS))
y = y.astype(m.DTYPE)
v = rng.normal(size=(batch, m.N_OUTPUTS)).astype(m.DTYPE) if sys.argv[5] == "given" else None
params = m.init_params()
m.value_and_grad(params, x, y, v)  # compiles
runs, end = [], time.perf_counter() + seconds
while len(runs) < 3 or time.perf_counter() < end:
    start = time.perf_counter()
    m.value_and_grad(params, x, y, v)
    runs.append(time.perf_counter() - start)
print(float(np.median(runs)))
"""


def measure_schedules(compiled: Compiled, batch: int, seconds: float | None = None, kinds=None,
                      rounds: int = TUNE_ROUNDS) -> dict:
    """Seconds of value_and_grad at `batch` in each schedule (default: every one that
    applies): each is emitted and timed in processes of its own (modules measured one after
    another in one process disturb each other's allocations), after one call that compiles
    it, `rounds` times with the schedules taking turns; a schedule's time is the least of
    its processes' medians (see TUNE_ROUNDS)."""
    import subprocess
    import sys

    from .derive import n_vectors
    from .shapes import program_shapes

    if batch < 1:
        raise ModelError(compiled.model.source, "--batch", f"must be positive, not {batch}")
    seconds = TUNE_SECONDS if seconds is None else seconds
    model, program = compiled.model, compiled.programs["value_and_grad"]
    kinds = kinds or applicable(model, program, program_shapes(model, program, n_vectors(model)))
    v_kind = model.penalty.v if model.penalty is not None else "none"
    times: dict = {}
    with tempfile.TemporaryDirectory(prefix="dbpgen-tune-") as tmp:
        paths = {}
        for kind in kinds:
            text = compiled.source(schedule=Forced({"value_and_grad": kind}, {"value_and_grad": "tuning"}))
            paths[kind] = Path(tmp) / kind / f"{model.name}.py"
            paths[kind].parent.mkdir()
            paths[kind].write_text(text, encoding="utf-8")
        for _ in range(rounds):
            for kind, path in paths.items():
                done = subprocess.run([sys.executable, "-c", _TIMING, str(path), str(batch), str(seconds),
                                       model.loss, v_kind], capture_output=True, text=True, check=True)
                times[kind] = min(times.get(kind, math.inf), float(done.stdout.split()[-1]))
    return times


def tune(compiled: Compiled, batch: int, seconds: float | None = None, kinds=None,
         rounds: int = TUNE_ROUNDS) -> Forced:
    """value_and_grad's schedule measured on this machine (`measure_schedules`): the
    fastest is forced, with every measured time in its reason (printed in the module's
    header). kinds: the schedules to try (default: every one that applies)."""
    times = measure_schedules(compiled, batch, seconds, kinds, rounds)
    best = min(times, key=times.get)
    measured = ", ".join(f"{k} {1e3 * t:.3g} ms" for k, t in sorted(times.items(), key=lambda kv: kv[1]))
    why = f"tuned (--tune --batch {batch}): fastest measured on this machine of {measured}"
    return Forced({"value_and_grad": best}, {"value_and_grad": why})


def load_generated(path: str | os.PathLike, jit: bool = True):
    """Import a generated module from its file; jit=False runs its kernels as plain Python
    (as NUMBA_DISABLE_JIT=1 does whatever jit says)."""
    import numba

    # the module names itself for Numba's cache (see templates/module.py.j2), so the name
    # it is imported under here does not matter and it needs no sys.modules entry
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    previous = numba.config.DISABLE_JIT
    numba.config.DISABLE_JIT = previous or not jit
    try:
        spec.loader.exec_module(module)
    finally:
        numba.config.DISABLE_JIT = previous
    return module
