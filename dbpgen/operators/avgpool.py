"""avgpool: k-by-k mean with stride k on (C, H, W), k-wide mean with stride k on (C, T)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import IMAGE, SEQUENCE, OperatorBase, needs_rank, size

KIND = "avgpool"
TEMPLATE = "ops/avgpool.py.j2"


@dataclass(frozen=True)
class AvgPool(OperatorBase):
    """k-by-k mean with stride k (k-wide on a sequence); parameter-free."""

    k: int
    bias: bool = field(default=False, init=False)
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        C, *space = in_shape
        return (C,) + tuple(n // self.k for n in space)

    def flops(self, in_shape) -> int:
        return size(in_shape)

    def kernel_args(self, which: str, in_shape) -> tuple:
        return (self.k,)

    def kernel_name(self, which: str, in_shape) -> str:
        return f"_avgpool1d_{which}" if len(in_shape) == SEQUENCE else f"_avgpool_{which}"


OP = AvgPool  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> AvgPool:
    """The loader's rule for `avgpool: k`."""
    needs_rank(check, field, KIND, in_shape, (IMAGE, SEQUENCE))
    k = check.integer(value, field, minimum=1)
    divisible(check, field, in_shape, k)
    return AvgPool(k)


def divisible(check, field: str, in_shape, k: int) -> None:
    if len(in_shape) == SEQUENCE and in_shape[1] % k:
        raise check.fail(field, f"length {in_shape[1]} is not divisible by {k}")
    if len(in_shape) == IMAGE and (in_shape[1] % k or in_shape[2] % k):
        raise check.fail(field, f"height and width {in_shape[1]}x{in_shape[2]} are not divisible by {k}")


def torch_layer(torch, op: AvgPool, h, W, b):
    F = torch.nn.functional
    return F.avg_pool1d(h, op.k) if h.dim() == 3 else F.avg_pool2d(h, op.k)


def jax_layer(jax, op: AvgPool, h, W, b):
    k = op.k
    if h.ndim == 3:
        B, C, T = h.shape
        return h.reshape(B, C, T // k, k).mean(axis=3)
    B, C, H, Wd = h.shape
    return h.reshape(B, C, H // k, k, Wd // k, k).mean(axis=(3, 5))
