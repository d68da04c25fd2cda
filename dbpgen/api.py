"""Python API: `dbpgen.derive(model)` returns the derived, simplified equations;
`dbpgen.compile(model)` emits and imports the module."""
from __future__ import annotations

import os
from dataclasses import dataclass

import sympy as sp

from .compiler import Compiled, build
from .model import as_model
from .program import Program


@dataclass(repr=False)
class Derivation:
    """The derivation of a model's value_and_grad program.

    `equations` maps each pass (forward, backward, backward-backward, forward-backward,
    loss, gradients) to its SymPy equations in execution order; `simplifications` lists
    what fired; `naive` is the unsimplified program; `stages` every pass's output.
    """

    compiled: Compiled

    @property
    def program(self) -> Program:
        return self.compiled.programs["value_and_grad"]

    @property
    def naive(self) -> Program:
        return self.compiled.naive["value_and_grad"]

    @property
    def equations(self) -> dict[str, list[sp.Eq]]:
        return self.program.equations()

    @property
    def simplifications(self) -> list[str]:
        return list(self.program.fired)

    @property
    def stages(self) -> list:
        return self.compiled.stages["value_and_grad"]

    @property
    def ops(self) -> dict:
        return self.compiled.ops

    def __getitem__(self, phase: str) -> list[sp.Eq]:
        return self.equations[phase]

    def __repr__(self) -> str:
        passes = ", ".join(self.equations)
        return (f"<Derivation of {self.compiled.model.name}: {passes}; "
                f"{len(self.simplifications)} simplifications>")

    def __str__(self) -> str:
        from .equations import equations_text

        return equations_text(self.compiled.model, self.program)

    def _repr_markdown_(self) -> str:
        """Jupyter: the equations grouped by pass, in LaTeX, and the simplifications."""
        from .equations import equations_markdown

        return equations_markdown(self.compiled.model, self.program)


def derive(model) -> Derivation:
    """The derivation of a model: a path to a model file, YAML text, or a dict."""
    return Derivation(build(as_model(model)))


def compile(model, out_dir: str | os.PathLike = "generated", *, schedule: str | None = None,
            jit: bool = True):
    """Emit <out_dir>/<name>.py for a model (a path, YAML text or a dict) and import it.
    schedule: force one (see `dbpgen compile --schedule`); jit=False runs it as plain Python."""
    from .compiler import compile_model, load_generated

    return load_generated(compile_model(as_model(model), out_dir, schedule=schedule), jit=jit)
