"""Optimizers over an emitted module's params/grads dicts, with torch.optim's semantics.

Both update the arrays of `params` in place, as torch.optim updates a model's tensors:

    opt = Adam(params, lr=1e-3)
    value, grads = m.value_and_grad(params, x, y)
    opt.step(grads)

The formulas are torch.optim.SGD's and torch.optim.Adam's (amsgrad=False, maximize=False,
foreach/fused irrelevant), and the defaults are theirs: SGD(lr=1e-3, momentum=0,
dampening=0, weight_decay=0, nesterov=False); Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
weight_decay=0) where weight_decay adds `weight_decay * p` to the gradient (L2, not AdamW).
"""
from __future__ import annotations

import numpy as np


class Optimizer:
    """Base class: `params` is the dict the module's functions take; `step(grads)` updates it."""

    def __init__(self, params: dict, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        for name, a in params.items():
            if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"params[{name!r}] must be a floating-point numpy array (updated in place)")
        self.params = params
        self.lr = float(lr)
        self.state: dict[str, dict] = {name: {} for name in params}
        self.steps = 0

    def step(self, grads: dict) -> None:
        missing = set(self.params) - set(grads)
        if missing:
            raise KeyError(f"grads has no entry for {sorted(missing)}")
        self.steps += 1
        for name, p in self.params.items():
            g = np.asarray(grads[name], dtype=p.dtype)
            if g.shape != p.shape:
                raise ValueError(f"grads[{name!r}] has shape {g.shape}, params[{name!r}] {p.shape}")
            self._update(p, g, self.state[name])

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict) -> None:  # pragma: no cover
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: buf = momentum buf + (1 - dampening) g (buf = g at the first step);
    g <- g + momentum buf if nesterov else buf; p -= lr g. weight_decay adds wd p to g first."""

    def __init__(self, params: dict, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)

    def _update(self, p, g, state):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """torch.optim.Adam: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def __init__(self, params: dict, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, p, g, state):
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * g * g
        step_size = self.lr / (1.0 - b1 ** t)
        denom = np.sqrt(v) / np.sqrt(1.0 - b2 ** t) + self.eps
        p -= step_size * m / denom


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
