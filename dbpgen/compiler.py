"""The compiler driver: load, derive, simplify, render, write atomically."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sympy as sp

from .budget import BudgetExceeded, deadline
from .backend.chooser import SCHEDULES, ScheduleChoiceError
from .backend.memory import peak_bytes
from .codegen import MEMORY_BATCH, lower_programs, render
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
        return ops_table(self.model, self.naive["value_and_grad"], self.programs["value_and_grad"])

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

    def source(self, count_ops: bool = False, schedule: str | None = None) -> str:
        if schedule is not None and schedule not in SCHEDULES:
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
                 schedule: str | None = None) -> Path:
    """Emit <out_dir>/<name>.py; on any error the previous module stays untouched.
    schedule forces one of backend.chooser.SCHEDULES for every program."""
    model = load_model(path)
    if dtype:
        from dataclasses import replace
        model = replace(model, dtype=dtype)
    return compile_model(model, out_dir, simplified, count_ops, schedule)


def compile_model(model: Model, out_dir: str | os.PathLike = "generated", simplified: bool = True,
                  count_ops: bool = False, schedule: str | None = None) -> Path:
    """Emit <out_dir>/<model.name>.py for a loaded (possibly modified) model."""
    text = build(model, simplified).source(count_ops, schedule)
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


def load_generated(path: str | os.PathLike, jit: bool = True):
    """Import a generated module from its file; jit=False runs its kernels as plain Python."""
    import numba

    # the module names itself for Numba's cache (see templates/module.py.j2), so the name
    # it is imported under here does not matter and it needs no sys.modules entry
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    previous = numba.config.DISABLE_JIT
    numba.config.DISABLE_JIT = not jit
    try:
        spec.loader.exec_module(module)
    finally:
        numba.config.DISABLE_JIT = previous
    return module
