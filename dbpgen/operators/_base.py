"""What every operator kind shares: the capability defaults and the rank helpers.

An operator is a frozen dataclass; the back end never asks for its kind, only for these
attributes and methods (see docs/design.md, "Adding an operator"):

    kind            the YAML key and the template templates/ops/<kind>.py.j2
    has_params      W{j} exists (and b{j} unless bias is false)
    bias            b{j} exists
    small_kernels   its kernels are small enough to be inlined in a jitted program
    gram            K(W, K^T(W, .)) may go through W W^T (passes/gram.py)
    lanes           the narrow batch-minor schedule can run it row by row (lanes.py)
    stacked_kbox    two K^box of one layer may run as one GEMM over the stacked batch,
                    and K / K^T may write into a given buffer (printer, fuse.py)
    out_shape, weight_shape, fan_in, flops, kernel_args, kernel_name, workspace,
    bias_param_shape (b's own shape), bias_shape (how b broadcasts over one sample),
    bias_sum (the helper summing a per-sample array into b's shape)
"""
from __future__ import annotations

import math

VECTOR, SEQUENCE, IMAGE = 1, 2, 3
# A convolution's im2col buffer holds about this many numbers (1 MiB in float32, 2 MiB in
# float64, a core's L2 cache here): its kernels take the batch that many samples' worth at a
# time (`Im2colKernels.chunk`), so that the GEMM reads the columns the gather loop has just
# written from cache. Measured on the conv sweep's layers (K + K^T + K^box, float32): 1.1-1.9x
# faster than one buffer for the whole batch, and the buffers stay small at any batch size.
BUFFER_ELEMENTS = 1 << 18
RANK_NAMES = {VECTOR: "a vector", SEQUENCE: "a sequence", IMAGE: "an image"}
RANK_SHAPES = {VECTOR: "[n]", SEQUENCE: "[channels, length]", IMAGE: "[channels, height, width]"}


def size(shape) -> int:
    return math.prod(shape)


def describe(shape) -> str:
    """'an image [1, 28, 28]' etc., for messages."""
    return f"{RANK_NAMES.get(len(shape), 'an array')} {list(shape)}"


class OperatorBase:
    """Defaults of the capabilities; an operator dataclass overrides what it has."""

    gram = False
    lanes = False
    stacked_kbox = False

    def kernel_name(self, which: str, in_shape) -> str:
        """The emitted kernel that applies K, KT or Kbox (templates/ops/<kind>.py.j2)."""
        return f"_{self.kind}_{which}"

    def bias_param_shape(self, out_shape) -> tuple[int, ...]:
        """b{j}'s own shape: one number per output channel (first axis)."""
        return tuple(out_shape[:1])

    def bias_shape(self, out_shape) -> tuple[int, ...]:
        """The shape b{j} takes to broadcast over one sample: per channel (first axis)."""
        return self.bias_param_shape(out_shape) + (1,) * (len(out_shape) - 1)

    def bias_sum(self, out_shape) -> str:
        """The helper (templates/helpers.py.j2) summing a batch into b{j}'s shape (K^box of b)."""
        return "_bsum" if len(out_shape) == 1 else "_bsum_channels"

    def kernel_args(self, which: str, in_shape) -> tuple:
        return ()

    def workspace(self, which: str, in_shape, batch: int) -> int:
        """Numbers a kernel holds while it runs beside its arguments and result (im2col
        buffers, padded copies); counted in PEAK_BYTES (dbpgen/backend/memory.py)."""
        return 0


class Im2colKernels(OperatorBase):
    """A convolution whose kernels run over im2col buffers (templates/ops/conv*.py.j2):
    `chunk` samples at a time, so that a buffer holds at most BUFFER_ELEMENTS numbers."""

    def cols_per_sample(self, in_shape) -> int:
        """Numbers of one sample's im2col buffer: (in channels x filter taps) x output positions."""
        out_shape = self.out_shape(in_shape)
        return in_shape[0] * self.kernel ** (len(in_shape) - 1) * size(out_shape[1:])

    def chunk(self, in_shape) -> int:
        """Samples per chunk: as many as BUFFER_ELEMENTS allows, at least one."""
        return max(1, BUFFER_ELEMENTS // max(1, self.cols_per_sample(in_shape)))

    def padded_per_sample(self, in_shape) -> int:
        """Numbers of one sample's input with its zero border (the kernels' padded copy of a
        chunk, from which the gather loops read without bounds tests); 0 without padding."""
        if not self.padding:
            return 0
        return in_shape[0] * math.prod(n + 2 * self.padding for n in in_shape[1:])

    def workspace(self, which: str, in_shape, batch: int) -> int:
        # one chunk's im2col buffer, the GEMM's other operand or result in channel-major order,
        # and the chunk's padded copy (K, K^box) or padded result (K^T)
        n = min(batch, self.chunk(in_shape))
        return n * (self.cols_per_sample(in_shape) + size(self.out_shape(in_shape))
                    + self.padded_per_sample(in_shape))


def needs_rank(check, field: str, kind: str, in_shape, ranks: tuple[int, ...], hint: str = "") -> None:
    """The rank check of an operator's input, with the wording of SPEC section 1."""
    if len(in_shape) in ranks:
        return
    if ranks == (VECTOR,):
        wanted = "a vector input"
    elif IMAGE in ranks:
        wanted = "an image input " + " or ".join(RANK_SHAPES[r] for r in sorted(ranks, reverse=True))
    else:
        wanted = "a sequence input " + RANK_SHAPES[SEQUENCE]
    raise check.fail(field, f"{kind} needs {wanted}, got {describe(in_shape)}{hint}")
