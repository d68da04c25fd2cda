"""PyTorch out: train an nn.Sequential with torch.optim on gradients an emitted module computes.

    from dbpgen.torch import DoubleBackprop
    db = DoubleBackprop(net, (1, 28, 28), loss="nll", penalty={"v": "loss_gradient", "weight": 0.1})
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for x, y in loader:
        opt.zero_grad()
        J = db.backward(x, y)      # J = mean(l + weight R); grads of J added to each p.grad
        opt.step()

The net is compiled once (`dbpgen.from_torch`, then `dbpgen.compile`); each `backward` hands
the module the net's parameters and the batch as NumPy views of the CPU tensors (no copy
where the dtypes match) and adds the returned gradients to the parameters' `.grad`, as
`loss.backward()` would. The optional extra `[torch]`; dbpgen itself never imports torch.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from .api import compile as _compile
from .from_torch import from_torch


def _array(t, dtype):
    """A NumPy view of a CPU tensor (a copy only to change dtype or device)."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.numpy()
    return np.asarray(t, dtype=dtype) if t is not None else None


class DoubleBackprop:
    """An nn.Sequential's loss + penalty gradients from its compiled double-backpropagation
    module. loss, penalty: as in the model file; name: the module's name (default: torch_
    and a digest of the model file); out_dir: where the module is written (default: a folder
    dbpgen-torch in the system's temporary directory); jit=False runs it as
    plain Python (for debugging)."""

    def __init__(self, net, input_shape, *, loss: str = "none", penalty: dict | None = None,
                 name: str | None = None, out_dir: str | os.PathLike | None = None, dtype: str | None = None,
                 jit: bool = True):
        if loss == "none" and penalty is None:
            raise ValueError("DoubleBackprop needs loss= or penalty=: with neither, J = 0 and every gradient is 0")
        self.net = net
        if name is None:  # one file per distinct model: two nets never write over each other's module
            draft = from_torch(net, input_shape, name="torch_net", loss=loss, penalty=penalty, dtype=dtype)
            name = "torch_" + hashlib.sha256(draft.encode()).hexdigest()[:12]
        self.text = from_torch(net, input_shape, name=name, loss=loss, penalty=penalty, dtype=dtype)
        if out_dir is None:  # outside the user's checkout, kept between runs for Numba's cache
            out_dir = os.path.join(tempfile.gettempdir(), "dbpgen-torch")
        self.module = _compile(self.text, out_dir, jit=jit)
        tensors = [p for p in net.parameters()]
        if len(tensors) != len(self.module.PARAMS):
            raise ValueError(f"the net has {len(tensors)} parameter tensors, its model {len(self.module.PARAMS)}")
        self.parameters = dict(zip(self.module.PARAMS, tensors))
        for key, p in self.parameters.items():
            if tuple(p.shape) != tuple(self.module.PARAM_SHAPES[key]):
                raise ValueError(f"parameter {key}: the net's is {tuple(p.shape)}, the model's "
                                 f"{self.module.PARAM_SHAPES[key]}")

    def params(self) -> dict:
        """The net's parameters as the module's params dict (NumPy views)."""
        return {k: _array(p, self.module.DTYPE) for k, p in self.parameters.items()}

    def value_and_grad(self, x, y=None, v=None, *, seed=None, weight=None):
        """The module's (J, grads) at the net's current parameters; tensors or arrays in."""
        dtype = self.module.DTYPE
        return self.module.value_and_grad(self.params(), _array(x, dtype),
                                          None if y is None else _array(y, None if _is_index(y) else dtype),
                                          v=_array(v, dtype), seed=seed, weight=weight)

    def backward(self, x, y=None, v=None, *, seed=None, weight=None) -> float:
        """Add dJ/dtheta to each parameter's .grad (created if None, as autograd does); J."""
        value, grads = self.value_and_grad(x, y, v, seed=seed, weight=weight)
        for key, p in self.parameters.items():
            g = torch.from_numpy(grads[key]).to(dtype=p.dtype, device=p.device)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return value

    def input_grad(self, x, y) -> torch.Tensor:
        """grad_x of each sample's loss as a tensor (FGSM, PGD, saliency)."""
        dtype = self.module.DTYPE
        g = self.module.input_grad(self.params(), _array(x, dtype), _array(y, None if _is_index(y) else dtype))
        return torch.from_numpy(g)


def _is_index(y) -> bool:
    """Class indices (an integer vector), which the module one-hot encodes itself."""
    dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
    return "int" in str(dtype)
