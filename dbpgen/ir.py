"""The model IR: a network as a chain of bilinear operators with coordinate-wise activations.

Grammar (paper eq. 8, z_j = K_j(theta_j, x_{j-1}) + b_j, x_j = g_j(z_j)):

    Model      := name dtype input_shape Layer+ loss Penalty?
    Layer      := Operator Activation            (layer j = 1..L)
    Operator   := Dense | Conv2d | Conv1d | AvgPool | Downsample | Flatten   (dbpgen.operators)
    Activation := Coordinatewise(expr in z) | SOFTMAX (last layer only)
    Penalty    := VKind p(s) weight on_logits    (R = p(xi_0), s = ||xi_0||^2, eq. 10)

Everything is a frozen dataclass; the loader (`dbpgen.model`) is the only producer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import sympy as sp

# The operators live in dbpgen.operators, one module per kind (shapes, loader rule, kernels,
# capabilities); re-exported here so that `from dbpgen.ir import Dense` keeps working.
from .operators import AvgPool, Conv1d, Conv2d, Dense, Downsample, Flatten  # noqa: F401

Z = sp.Symbol("z", real=True)
S = sp.Symbol("s", nonnegative=True)

Operator = Union[Dense, Conv2d, Conv1d, AvgPool, Downsample, Flatten]


@dataclass(frozen=True)
class Activation:
    """A coordinate-wise activation g(z), given as a SymPy expression in Z."""

    name: str
    expr: sp.Expr

    @property
    def is_softmax(self) -> bool:
        return False


@dataclass(frozen=True)
class SoftmaxActivation:
    """softmax: not coordinate-wise, allowed on the last layer only (Appendix B.1)."""

    name: str = "softmax"

    @property
    def is_softmax(self) -> bool:
        return True


IDENTITY = Activation("identity", Z)


@dataclass(frozen=True)
class Layer:
    index: int  # the paper's j, 1-based
    op: Operator
    act: Activation | SoftmaxActivation
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class Penalty:
    """R = p(xi_0) with xi_0 = (dx_L/dx_0)^* v (paper eq. 10)."""

    v: str  # loss_gradient | output | given | jacobian | random | projections
    p_name: str  # squared_norm | norm | the expression text
    p: sp.Expr  # expression in S
    weight: float
    on_logits: bool = False
    index: Optional[int] = None  # v: output
    algorithm: str = "auto"  # jacobian only
    iterations: int = 0  # random only
    count: int = 1  # projections only
    seed: int = 0

    @property
    def v_is_constant(self) -> bool:
        """Whether v is held constant, i.e. does not depend on the network (App. B)."""
        return self.v != "loss_gradient"


@dataclass(frozen=True)
class Model:
    name: str
    dtype: str  # float64 | float32
    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    loss: str  # mse | nll | none
    penalty: Optional[Penalty]
    source: str = ""  # the model file's path, for messages
    source_hash: str = ""  # sha256 of the model file's bytes

    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def has_objective(self) -> bool:
        """Whether J depends on anything: without a loss and a penalty the module is the net
        alone (forward, vjp, jvp) and J = 0."""
        return self.loss != "none" or self.penalty is not None

    @property
    def n_outputs(self) -> int:
        size = 1
        for n in self.layers[-1].out_shape:
            size *= n
        return size
