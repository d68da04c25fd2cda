"""conv2d: cross-correlation as torch.nn.Conv2d on (C, H, W), zero padding; W (out, in, k, k)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import IMAGE, SEQUENCE, Im2colKernels, needs_rank, size

KIND = "conv2d"
TEMPLATE = "ops/conv2d.py.j2"
KEYS = ("channels", "kernel", "stride", "padding", "dilation")
PER_SAMPLE_FILTER = 512  # numbers of a filter matrix that per-sample GEMMs run from cache
PER_SAMPLE_POSITIONS = 256  # output positions of one sample that make a per-sample GEMM long enough


@dataclass(frozen=True)
class Conv2d(Im2colKernels):
    """Cross-correlation as torch.nn.Conv2d, zero padding; W has shape (out, in, k, k)."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = True
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=True, init=False)
    # im2col + GEMM kernels in NumPy over the whole batch: programs with conv2d run as
    # Python calling them
    small_kernels: bool = field(default=False, init=False)

    def out_shape(self, in_shape):
        _, H, W = in_shape
        span = self.dilation * (self.kernel - 1) + 1
        return (self.out, (H + 2 * self.padding - span) // self.stride + 1,
                (W + 2 * self.padding - span) // self.stride + 1)

    def weight_shape(self, in_shape):
        return (self.out, in_shape[0], self.kernel, self.kernel)

    def fan_in(self, in_shape) -> int:
        return in_shape[0] * self.kernel * self.kernel

    def flops(self, in_shape) -> int:
        return 2 * size(self.out_shape(in_shape)) * in_shape[0] * self.kernel * self.kernel

    def per_sample(self, in_shape) -> bool:
        """One GEMM per sample instead of one over the chunk: the results need no transposed
        copies. Worth it where each product is long (at least PER_SAMPLE_POSITIONS output
        positions: 16 x 16 and larger images) or the filter matrix (out x in k k) is small
        enough (PER_SAMPLE_FILTER numbers) to stay in cache while the columns stream past; on
        small feature maps of many channels one GEMM over the chunk is faster."""
        _, Ho, Wo = self.out_shape(in_shape)
        return Ho * Wo >= PER_SAMPLE_POSITIONS or self.out * in_shape[0] * self.kernel ** 2 <= PER_SAMPLE_FILTER

    def workspace(self, which: str, in_shape, batch: int) -> int:
        extra = 0
        if which == "Kbox" and self.per_sample(in_shape):  # the per-sample products before their sum
            extra = min(batch, self.chunk(in_shape)) * self.out * in_shape[0] * self.kernel ** 2
        return super().workspace(which, in_shape, batch) + extra

    def kernel_args(self, which: str, in_shape) -> tuple:
        common = (self.stride, self.padding, self.dilation)
        chunk = (self.chunk(in_shape), self.per_sample(in_shape))
        if which == "KT":
            return common + (in_shape[1], in_shape[2]) + chunk
        if which == "Kbox":
            return common + (self.kernel,) + chunk
        return common + chunk


def conv_fields(check, value, field: str, item: dict, kind: str, example: str) -> dict:
    """The keys of conv1d / conv2d, checked: the dataclass's keyword arguments."""
    check.mapping(value, field, example=example)
    check.keys(value, field, KEYS, required=("channels", "kernel"))
    return dict(out=check.integer(value["channels"], f"{field}.channels", minimum=1),
                kernel=check.integer(value["kernel"], f"{field}.kernel", minimum=1),
                stride=check.integer(value.get("stride", 1), f"{field}.stride", minimum=1),
                padding=check.integer(value.get("padding", 0), f"{field}.padding", minimum=0),
                dilation=check.integer(value.get("dilation", 1), f"{field}.dilation", minimum=1),
                bias=check.boolean(item.get("bias", True), f"{field[:-len(kind)]}bias"))


OP = Conv2d  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> Conv2d:
    """The loader's rule for `conv2d: {channels, kernel, stride, padding, dilation}`."""
    hint = ": use conv1d" if len(in_shape) == SEQUENCE else ""
    needs_rank(check, field, KIND, in_shape, (IMAGE,), hint)
    op = Conv2d(**conv_fields(check, value, field, item, KIND, "{channels: 8, kernel: 5}"))
    span = op.dilation * (op.kernel - 1) + 1
    padded = (in_shape[1] + 2 * op.padding, in_shape[2] + 2 * op.padding)
    if span > min(padded):
        raise check.fail(f"{field}.kernel", f"kernel spans {span} pixels, more than the padded input "
                         f"{padded[0]}x{padded[1]}")
    return op


def torch_layer(torch, op: Conv2d, h, W, b):
    return torch.nn.functional.conv2d(h, W, b, stride=op.stride, padding=op.padding, dilation=op.dilation)


def jax_layer(jax, op: Conv2d, h, W, b):
    z = jax.lax.conv_general_dilated(h, W, (op.stride, op.stride), [(op.padding, op.padding)] * 2,
                                     rhs_dilation=(op.dilation, op.dilation))
    return z + (b.reshape(-1, 1, 1) if b is not None else 0)


def gemm_shape(op: Conv2d, in_shape, batch: int) -> tuple[int, int, int]:
    _, Ho, Wo = op.out_shape(in_shape)
    return op.out, in_shape[0] * op.kernel * op.kernel, Ho * Wo * batch
