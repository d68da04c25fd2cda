"""Python API: `dbpgen.derive(path)` returns the derived, simplified equations."""
from __future__ import annotations

import os
from dataclasses import dataclass

import sympy as sp

from .compiler import Compiled, build
from .model import load_model
from .program import Program


@dataclass
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


def derive(path: str | os.PathLike) -> Derivation:
    return Derivation(build(load_model(path)))
