"""downsample: invertible space-to-depth on (C, H, W), channel order of torch.nn.PixelUnshuffle."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import IMAGE, SEQUENCE, OperatorBase, needs_rank
from .avgpool import divisible

KIND = "downsample"
TEMPLATE = "ops/downsample.py.j2"


@dataclass(frozen=True)
class Downsample(OperatorBase):
    """Invertible space-to-depth, channel order of torch.nn.PixelUnshuffle (parameter-free)."""

    k: int
    bias: bool = field(default=False, init=False)
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        C, H, W = in_shape
        return (C * self.k * self.k, H // self.k, W // self.k)

    def flops(self, in_shape) -> int:
        return 0

    def kernel_args(self, which: str, in_shape) -> tuple:
        return (self.k,)


OP = Downsample  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> Downsample:
    """The loader's rule for `downsample: k` (2-D only)."""
    hint = ": downsample is 2-D only" if len(in_shape) == SEQUENCE else ""
    needs_rank(check, field, KIND, in_shape, (IMAGE,), hint)
    k = check.integer(value, field, minimum=1)
    divisible(check, field, in_shape, k)
    return Downsample(k)


def torch_layer(torch, op: Downsample, h, W, b):
    return torch.nn.functional.pixel_unshuffle(h, op.k)


def jax_layer(jax, op: Downsample, h, W, b):
    k = op.k
    B, C, H, Wd = h.shape
    return h.reshape(B, C, H // k, k, Wd // k, k).transpose(0, 1, 3, 5, 2, 4).reshape(B, C * k * k, H // k, Wd // k)
