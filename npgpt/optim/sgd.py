"""Stochastic gradient descent with optional momentum and Nesterov momentum, as ``torch.optim.SGD``
(with dampening 0)::

    g = grad + wd * p                        (1)  coupled (L2) weight decay, if weight_decay > 0
    b = g on the first step, else mu b + g   (2)  momentum buffer (only when momentum mu > 0)
    g = g + mu b if nesterov else b          (3)
    p -= lr * g                              (4)
"""
from .. import backend
from .base import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    """SGD (1)-(4) over each parameter with a gradient, in place; ``.grad`` is not modified."""

    _buffers = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=bool(nesterov),
                                      weight_decay=weight_decay))

    def _check_group(self, group):
        super()._check_group(group)
        if group["momentum"] < 0:
            raise ValueError(f"momentum must be >= 0, got {group['momentum']}")
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0; pass e.g. momentum=0.9 "
                             "or nesterov=False")

    def step(self):
        """One SGD update of every parameter that has a gradient (in place; ``.grad`` is not modified)."""
        self.step_count += 1
        for group in self.param_groups:
            lr, wd, mu, nesterov = group["lr"], group["weight_decay"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                xp = backend.get_array_module(p.data)
                s = self.state[id(p)]
                s["step"] = s.get("step", 0) + 1
                decayed = self._buffer(p)
                owned = False                            # True once g is one of our scratch buffers
                if wd != 0.0:                            # (1)
                    xp.multiply(p.data, wd, out=decayed)
                    decayed += g
                    g, owned = decayed, True
                if mu != 0.0:
                    b = s.get("momentum_buffer")
                    if b is None:                        # (2)
                        b = s["momentum_buffer"] = g.astype(p.data.dtype, copy=True)
                    else:
                        b *= mu
                        b += g
                    if nesterov:                         # (3)
                        look_ahead = self._buffer(p, 1)
                        xp.multiply(b, mu, out=look_ahead)
                        look_ahead += g
                        g, owned = look_ahead, True
                    else:
                        g, owned = b, False
                out = g if owned else decayed            # (4)
                xp.multiply(g, lr, out=out)
                p.data -= out
