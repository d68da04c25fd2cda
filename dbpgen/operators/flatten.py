"""flatten: (C, H, W) -> C*H*W or (C, T) -> C*T in C order (torch x.flatten(1))."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import IMAGE, SEQUENCE, OperatorBase, needs_rank, size

KIND = "flatten"
TEMPLATE = "ops/flatten.py.j2"


@dataclass(frozen=True)
class Flatten(OperatorBase):
    """(C, H, W) -> C*H*W or (C, T) -> C*T in C order (parameter-free)."""

    bias: bool = field(default=False, init=False)
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        return (size(in_shape),)

    def flops(self, in_shape) -> int:
        return 0

    def kernel_args(self, which: str, in_shape) -> tuple:
        return tuple(in_shape) if which == "KT" else ()

    def kernel_name(self, which: str, in_shape) -> str:
        return f"_flatten1d_{which}" if len(in_shape) == SEQUENCE else f"_flatten_{which}"


OP = Flatten  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> Flatten:
    """The loader's rule for `flatten` (no arguments)."""
    needs_rank(check, field, KIND, in_shape, (IMAGE, SEQUENCE))
    if value not in (None, {}):
        raise check.fail(field, "flatten takes no arguments")
    return Flatten()


def torch_layer(torch, op: Flatten, h, W, b):
    return h.flatten(1)


def jax_layer(jax, op: Flatten, h, W, b):
    return h.reshape(h.shape[0], -1)
