"""The model IR: a network as a chain of bilinear operators with coordinate-wise activations.

Grammar (paper eq. 8, z_j = K_j(theta_j, x_{j-1}) + b_j, x_j = g_j(z_j)):

    Model      := name dtype input_shape Layer+ loss Penalty?
    Layer      := Operator Activation            (layer j = 1..L)
    Operator   := Dense | Conv2d | AvgPool | Downsample | Flatten   (each: shapes, flops, kernel args)
    Activation := Coordinatewise(expr in z) | SOFTMAX (last layer only)
    Penalty    := VKind p(s) weight on_logits    (R = p(xi_0), s = ||xi_0||^2, eq. 10)

Everything is a frozen dataclass; the loader (`dbpgen.model`) is the only producer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import sympy as sp

Z = sp.Symbol("z", real=True)
S = sp.Symbol("s", nonnegative=True)


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Dense:
    """z = W x + b; W has shape (out, n_in)."""

    out: int
    bias: bool = True
    kind: str = field(default="dense", init=False)
    has_params: bool = field(default=True, init=False)
    # small kernels: programs calling them are jitted whole (LLVM inlines every call site)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.out,)

    def weight_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.out, in_shape[0])

    def fan_in(self, in_shape: tuple[int, ...]) -> int:
        return in_shape[0]

    def flops(self, in_shape: tuple[int, ...]) -> int:
        """Multiply-adds of one application to one sample, counted as 2 flops each."""
        return 2 * self.out * in_shape[0]

    def kernel_args(self, which: str, in_shape) -> tuple:
        """Literal arguments the K / KT / Kbox kernels take after the arrays."""
        return ()


@dataclass(frozen=True)
class Conv2d:
    """Cross-correlation as torch.nn.Conv2d, zero padding; W has shape (out, in, k, k)."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = True
    kind: str = field(default="conv2d", init=False)
    has_params: bool = field(default=True, init=False)
    # im2col + GEMM kernels are large: inlined at every call site they cost minutes of LLVM
    # time, so programs with conv2d run as Python calling the jitted kernels
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
        return 2 * _size(self.out_shape(in_shape)) * in_shape[0] * self.kernel * self.kernel

    def kernel_args(self, which: str, in_shape) -> tuple:
        common = (self.stride, self.padding, self.dilation)
        if which == "KT":
            return common + (in_shape[1], in_shape[2])
        if which == "Kbox":
            return common + (self.kernel,)
        return common


@dataclass(frozen=True)
class AvgPool:
    """k-by-k mean with stride k (parameter-free)."""

    k: int
    bias: bool = field(default=False, init=False)
    kind: str = field(default="avgpool", init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        C, H, W = in_shape
        return (C, H // self.k, W // self.k)

    def flops(self, in_shape) -> int:
        return _size(in_shape)

    def kernel_args(self, which: str, in_shape) -> tuple:
        return (self.k,)


@dataclass(frozen=True)
class Downsample:
    """Invertible space-to-depth, channel order of torch.nn.PixelUnshuffle (parameter-free)."""

    k: int
    bias: bool = field(default=False, init=False)
    kind: str = field(default="downsample", init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        C, H, W = in_shape
        return (C * self.k * self.k, H // self.k, W // self.k)

    def flops(self, in_shape) -> int:
        return 0

    def kernel_args(self, which: str, in_shape) -> tuple:
        return (self.k,)


@dataclass(frozen=True)
class Flatten:
    """(C, H, W) -> C*H*W in C order (parameter-free)."""

    bias: bool = field(default=False, init=False)
    kind: str = field(default="flatten", init=False)
    has_params: bool = field(default=False, init=False)
    small_kernels: bool = field(default=True, init=False)

    def out_shape(self, in_shape):
        return (_size(in_shape),)

    def flops(self, in_shape) -> int:
        return 0

    def kernel_args(self, which: str, in_shape) -> tuple:
        return tuple(in_shape) if which == "KT" else ()


Operator = Union[Dense, Conv2d, AvgPool, Downsample, Flatten]


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
    def n_outputs(self) -> int:
        size = 1
        for n in self.layers[-1].out_shape:
            size *= n
        return size
