"""dense: z = W x + b on a vector; W has shape (out, n_in) (torch.nn.Linear)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ._base import VECTOR, OperatorBase, needs_rank

KIND = "dense"
TEMPLATE = "ops/dense.py.j2"


@dataclass(frozen=True)
class Dense(OperatorBase):
    """z = W x + b; W has shape (out, n_in)."""

    out: int
    bias: bool = True
    kind: str = field(default=KIND, init=False)
    has_params: bool = field(default=True, init=False)
    # small kernels: programs calling them are jitted whole (LLVM inlines every call site)
    small_kernels: bool = field(default=True, init=False)
    # K(W, K^T(W, .)) through the Gram matrix W W^T (passes/gram.py)
    gram: bool = field(default=True, init=False)
    # the narrow batch-minor schedule runs it row by row (lanes.py)
    lanes: bool = field(default=True, init=False)
    # two K^box of the layer as one GEMM over the stacked batch; K / K^T into a given buffer
    stacked_kbox: bool = field(default=True, init=False)

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


OP = Dense  # the registry's handle on the dataclass


def parse(check, value, field: str, in_shape: tuple, item: dict) -> Dense:
    """The loader's rule for `dense: N` (check: model._Checker; field: layers[i].dense)."""
    needs_rank(check, field, KIND, in_shape, (VECTOR,), ": put flatten before it")
    return Dense(out=check.integer(value, field, minimum=1),
                 bias=check.boolean(item.get("bias", True), f"{field[:-len(KIND)]}bias"))


def torch_layer(torch, op: Dense, h, W, b):
    """The same layer in PyTorch (the peers of dbpgen.bench, the tests)."""
    return h @ W.T + (b if b is not None else 0)


def jax_layer(jax, op: Dense, h, W, b):
    return h @ W.T + (b if b is not None else 0)


def pytensor_layer(pt, op: Dense, h, W, b):
    """PyTensor's peer (the only kind wired up for it)."""
    return h @ W.T + (b if b is not None else 0)


def gemm_shape(op: Dense, in_shape, batch: int) -> tuple[int, int, int]:
    """(M, K, N) of the GEMM one application amounts to over the batch."""
    return batch, in_shape[0], op.out
