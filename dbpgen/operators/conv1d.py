"""conv1d: cross-correlation as torch.nn.Conv1d on (C, T), zero padding; W (out, in, k)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import IMAGE, SEQUENCE, Im2colKernels, needs_rank, size
from .conv2d import conv_fields

KIND = "conv1d"
TEMPLATE = "ops/conv1d.py.j2"


@dataclass(frozen=True)
class Conv1d(Im2colKernels):
    """Cross-correlation as torch.nn.Conv1d, zero padding; W has shape (out, in, k)."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = True
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=True, init=False)
    # im2col + GEMM kernels in NumPy, as conv2d's: programs run as Python calling them
    small_kernels: bool = field(default=False, init=False)

    def out_shape(self, in_shape):
        _, T = in_shape
        span = self.dilation * (self.kernel - 1) + 1
        return (self.out, (T + 2 * self.padding - span) // self.stride + 1)

    def weight_shape(self, in_shape):
        return (self.out, in_shape[0], self.kernel)

    def fan_in(self, in_shape) -> int:
        return in_shape[0] * self.kernel

    def flops(self, in_shape) -> int:
        return 2 * size(self.out_shape(in_shape)) * in_shape[0] * self.kernel

    def kernel_args(self, which: str, in_shape) -> tuple:
        common = (self.stride, self.padding, self.dilation)
        chunk = (self.chunk(in_shape),)
        if which == "KT":
            return common + (in_shape[1],) + chunk
        if which == "Kbox":
            return common + (self.kernel,) + chunk
        return common + chunk


OP = Conv1d  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> Conv1d:
    """The loader's rule for `conv1d: {channels, kernel, stride, padding, dilation}`."""
    hint = ": use conv2d" if len(in_shape) == IMAGE else ""
    needs_rank(check, field, KIND, in_shape, (SEQUENCE,), hint)
    op = Conv1d(**conv_fields(check, value, field, item, KIND, "{channels: 8, kernel: 5}"))
    span = op.dilation * (op.kernel - 1) + 1
    padded = in_shape[1] + 2 * op.padding
    if span > padded:
        raise check.fail(f"{field}.kernel", f"kernel spans {span} samples, more than the padded input "
                         f"length {padded}")
    return op


def torch_layer(torch, op: Conv1d, h, W, b):
    return torch.nn.functional.conv1d(h, W, b, stride=op.stride, padding=op.padding, dilation=op.dilation)


def jax_layer(jax, op: Conv1d, h, W, b):
    z = jax.lax.conv_general_dilated(h, W, (op.stride,), [(op.padding, op.padding)],
                                     rhs_dilation=(op.dilation,))
    return z + (b.reshape(-1, 1) if b is not None else 0)


def gemm_shape(op: Conv1d, in_shape, batch: int) -> tuple[int, int, int]:
    _, To = op.out_shape(in_shape)
    return op.out, in_shape[0] * op.kernel, To * batch
