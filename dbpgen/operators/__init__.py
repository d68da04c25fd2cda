"""The operator registry: one module per layer kind, holding everything about that kind.

Each module of this package defines

    KIND, TEMPLATE          the YAML key and templates/ops/<kind>.py.j2
    OP, the frozen IR dataclass: shapes, flops, kernel arguments and names, capabilities
                            (see _base.OperatorBase: gram, lanes, stacked_kbox, ...)
    parse(check, value, field, in_shape, item)
                            the loader's rule (check: dbpgen.model._Checker)
    torch_layer / jax_layer the same layer in PyTorch and JAX (dbpgen.bench's peers)
    gemm_shape              (parametrised kinds) the GEMM one application amounts to

The back end asks the dataclass for capabilities, never for its kind. Adding a kind:
docs/design.md, "Adding an operator".
"""
from __future__ import annotations

from types import ModuleType

from . import avgpool, conv1d, conv2d, dense, downsample, flatten
from .avgpool import AvgPool
from .conv1d import Conv1d
from .conv2d import Conv2d
from .dense import Dense
from .downsample import Downsample
from .flatten import Flatten

REGISTRY: dict[str, ModuleType] = {m.KIND: m for m in (dense, conv2d, conv1d, avgpool, downsample, flatten)}
OPERATORS: tuple[str, ...] = tuple(REGISTRY)


def get(kind: str) -> ModuleType:
    """The module of an operator kind (KeyError for an unknown one)."""
    return REGISTRY[kind]


def has_params(kind: str) -> bool:
    """Whether layers of this kind have parameters (and so may take `bias:`)."""
    return REGISTRY[kind].OP.has_params


__all__ = ["REGISTRY", "OPERATORS", "get", "has_params", "AvgPool", "Conv1d", "Conv2d", "Dense",
           "Downsample", "Flatten"]
