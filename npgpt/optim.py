"""Optimizers (AdamW, SGD), the learning-rate schedule and gradient clipping.

An optimizer holds *param groups*, PyTorch style: each group is a dict with its ``"params"`` (leaf
Tensors with ``requires_grad=True``) and its hyperparameters, so the model can decay only its
matrices::

    opt = AdamW([{"params": matrices, "weight_decay": 0.1},
                 {"params": biases_and_gains, "weight_decay": 0.0}], lr=6e-4, betas=(0.9, 0.95))

A plain list of Tensors is one group with the constructor's hyperparameters. ``step()`` updates
every parameter whose ``.grad`` is not None (unused parameters are skipped and their moments do not
advance), in place and in the parameter's dtype; ``zero_grad()`` sets every ``.grad`` to None.
``opt.set_lr(lr)`` (or ``group["lr"] = lr``) changes the rate before a step, e.g. from ``get_lr``.

Gradient accumulation. The engine adds gradients into ``.grad`` across ``backward()`` calls, so a
large batch split into ``accum_steps`` micro-batches is::

    for micro_batch in range(accum_steps):
        _, loss = model(x, y)
        (loss * (1.0 / accum_steps)).backward()   # scale so the sum of grads is the mean-loss grad
    clip_grad_norm(model.parameters(), 1.0)       # optional, on the accumulated gradient
    opt.step()
    opt.zero_grad()                               # start the next accumulation from nothing

Checkpoints. ``state_dict()`` returns plain data: the hyperparameters of each group, the index of
each parameter (in the order the groups list them) and its moment buffers as NumPy arrays (host
copies), which ``npgpt.checkpoint`` stores as-is. ``load_state_dict`` copies them back onto the
parameters' backend and dtype, so a resumed run takes bit-identical steps.
"""
import math

import numpy as np

from . import backend
from .engine import Tensor

__all__ = ["Optimizer", "AdamW", "SGD", "get_lr", "clip_grad_norm"]


def _host_copy(a):
    """A NumPy copy of an array on any backend that does not alias the live buffer."""
    h = backend.to_numpy(a)
    return h.copy() if h is a else h


class Optimizer:
    """Base class: param groups, ``zero_grad``, ``set_lr``, and state dicts of per-parameter buffers.

    Subclasses set ``_buffers`` (names of the per-parameter arrays in ``state``), fill
    ``defaults`` and implement ``_check_group`` and ``step``.
    """

    _buffers = ()

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            raise TypeError("params must be a list of Tensors or of param-group dicts, not one Tensor; "
                            "wrap it in a list: [p]")
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        seen = set()
        for g in groups:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError("param groups must all be dicts with a 'params' list, e.g. "
                                "{'params': [...], 'weight_decay': 0.0}")
            group = {**self.defaults, **g}
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            for p in group["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
                    raise TypeError(f"the optimizer can only update leaf Tensors with requires_grad=True, "
                                    f"got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears more than once in the optimizer's param groups")
                seen.add(id(p))
            self._check_group(group)
            self.param_groups.append(group)
        self.state = {id(p): {} for p in self._params()}   # per parameter: {"step": t, buffers...}
        self.step_count = 0                                  # number of step() calls
        self._scratch = {}                                   # (module, dtype, slot) -> flat buffer

    def _check_group(self, group):
        if group["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {group['lr']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")

    def _params(self):
        """All parameters, group by group, in order (the indices used by state dicts)."""
        return [p for g in self.param_groups for p in g["params"]]

    def _buffer(self, p, slot=0):
        """Scratch array number ``slot`` shaped like ``p``: a view of one flat buffer per slot, shared
        by all parameters of that backend and dtype (so a step allocates nothing)."""
        xp = backend.get_array_module(p.data)
        key = (xp.__name__, p.data.dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < p.data.size:
            size = max(q.data.size for q in self._params()
                       if q.data.dtype == p.data.dtype and backend.get_array_module(q.data) is xp)
            buf = self._scratch[key] = xp.empty(size, dtype=p.data.dtype)
        return buf[:p.data.size].reshape(p.data.shape)

    def zero_grad(self):
        """Set every parameter's ``.grad`` to None (the next backward starts from nothing)."""
        for p in self._params():
            p.zero_grad()

    def set_lr(self, lr):
        """Use learning rate ``lr`` in every group from the next ``step()`` on."""
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        for g in self.param_groups:
            g["lr"] = lr

    def step(self):
        raise NotImplementedError

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        """Plain data that resumes this optimizer exactly: step count, each group's hyperparameters
        and parameter indices, and each parameter's step and buffers as NumPy arrays (copies)."""
        params = self._params()
        index = {id(p): i for i, p in enumerate(params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        state = []
        for p in params:
            s = self.state[id(p)]
            state.append({k: (_host_copy(v) if k in self._buffers else v) for k, v in s.items()})
        return {"step": self.step_count, "param_groups": groups, "state": state}

    def load_state_dict(self, sd):
        """Restore what ``state_dict()`` returned (possibly after a checkpoint round trip) onto this
        optimizer's parameters; buffers go to each parameter's backend and dtype. Raises ValueError
        when the state was saved for a different set of parameters."""
        fix = "build the optimizer over the same parameters, in the same groups and order, as when it was saved"
        try:
            groups, state = sd["param_groups"], sd["state"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"not an optimizer state dict (missing {e}); pass what state_dict() returned") from e
        params = self._params()
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups but this optimizer has "
                             f"{len(self.param_groups)}; {fix}")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(saved['params'])} parameters in the state dict "
                                 f"but {len(group['params'])} here; {fix}")
        if len(state) != len(params):
            raise ValueError(f"the state dict holds state for {len(state)} parameters but this optimizer "
                             f"has {len(params)}; {fix}")
        new_state = {}
        for i, (p, s) in enumerate(zip(params, state)):
            s = dict(s or {})
            xp = backend.get_array_module(p.data)
            for k in self._buffers:
                if k in s:
                    a = s[k]
                    if tuple(a.shape) != tuple(p.shape):
                        raise ValueError(f"parameter {i}: saved {k} has shape {tuple(a.shape)} but the "
                                         f"parameter has shape {tuple(p.shape)}; {fix}")
                    s[k] = xp.array(backend.to_numpy(a), dtype=p.data.dtype)  # always a fresh copy
            if "step" in s:
                s["step"] = int(s["step"])
            new_state[id(p)] = s
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            g = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            if "betas" in g:
                g["betas"] = tuple(float(b) for b in g["betas"])   # JSON turns tuples into lists
            g["params"] = group["params"]
            self._check_group(g)
            new_groups.append(g)
        self.param_groups, self.state = new_groups, new_state
        self.step_count = int(sd.get("step", 0))


_KERNELS = {}


def _adamw_kernel(xp):
    """The whole AdamW update of one parameter as one CuPy elementwise kernel (built once)."""
    k = _KERNELS.get("adamw")
    if k is None:
        k = _KERNELS["adamw"] = xp.ElementwiseKernel(
            "T g, T decay, T one_minus_b1, T b2, T one_minus_b2, T step_size, T bc2_sqrt, T eps",
            "T p, T m, T v",
            """
            p = p * decay;
            m = m + one_minus_b1 * (g - m);
            v = v * b2 + one_minus_b2 * (g * g);
            p = p - step_size * (m / (sqrt(v) / bc2_sqrt + eps));
            """,
            "npgpt_adamw")
    return k


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``.

    For each parameter p with gradient g, at its t-th update (t counts from 1)::

        p -= lr * wd * p                         # decay, decoupled from the gradient
        m = b1 * m + (1 - b1) * g                # first moment
        v = b2 * v + (1 - b2) * g**2             # second moment
        p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

    ``m`` and ``v`` live in the parameter's dtype; the bias corrections are Python floats, so a
    float32 model is updated in float32 with one shared scratch buffer and no other temporaries.
    On CuPy each parameter is updated by one fused elementwise kernel instead of eleven ufunc
    launches (``fused=False`` turns that off; results agree to float rounding).
    """

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.fused = fused   # None: one fused kernel per parameter on CuPy; False: ufuncs everywhere

    def _check_group(self, group):
        """The base checks, then betas in [0, 1) and eps >= 0 (shared with ``FlatAdamW``)."""
        Optimizer._check_group(self, group)
        group["betas"] = tuple(float(b) for b in group["betas"])
        b1, b2 = group["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")
        if group["eps"] < 0:
            raise ValueError(f"eps must be >= 0, got {group['eps']}")

    def step(self):
        """One AdamW update of every parameter that has a gradient (in place)."""
        self.step_count += 1
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                xp = backend.get_array_module(p.data)
                s = self.state[id(p)]
                if not s:
                    s["step"] = 0
                    s["exp_avg"] = xp.zeros_like(p.data)
                    s["exp_avg_sq"] = xp.zeros_like(p.data)
                s["step"] += 1
                t = s["step"]
                m, v, w = s["exp_avg"], s["exp_avg_sq"], p.data
                step_size = lr / (1.0 - b1 ** t)                 # Python floats: no float64 arrays
                bc2_sqrt = math.sqrt(1.0 - b2 ** t)
                if self.fused is not False and xp is not np and g.dtype == w.dtype:
                    f = w.dtype.type
                    _adamw_kernel(xp)(g, f(1.0 - lr * wd), f(1.0 - b1), f(b2), f(1.0 - b2),
                                      f(step_size), f(bc2_sqrt), f(eps), w, m, v)
                    continue
                buf = self._buffer(p)
                if wd != 0.0:
                    w *= 1.0 - lr * wd
                # m = b1 m + (1 - b1) g, written as m += (1 - b1)(g - m) (torch's lerp_)
                xp.subtract(g, m, out=buf)
                buf *= 1.0 - b1
                m += buf
                # v = b2 v + (1 - b2) g^2
                xp.multiply(g, g, out=buf)
                buf *= 1.0 - b2
                v *= b2
                v += buf
                # p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                xp.sqrt(v, out=buf)
                buf /= bc2_sqrt
                buf += eps
                xp.divide(m, buf, out=buf)
                buf *= step_size
                w -= buf


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and Nesterov momentum, as ``torch.optim.SGD``
    (with dampening 0)::

        g = grad + wd * p                        # coupled (L2) weight decay, if weight_decay > 0
        b = g on the first step, else momentum * b + g
        g = g + momentum * b if nesterov else b  # (only when momentum > 0)
        p -= lr * g
    """

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
                d = self._buffer(p)
                owned = False                            # True once g is one of our scratch buffers
                if wd != 0.0:                            # g = grad + wd * p
                    xp.multiply(p.data, wd, out=d)
                    d += g
                    g, owned = d, True
                if mu != 0.0:
                    b = s.get("momentum_buffer")
                    if b is None:
                        b = s["momentum_buffer"] = g.astype(p.data.dtype, copy=True)
                    else:                                # b = mu * b + g
                        b *= mu
                        b += g
                    if nesterov:                         # g = g + mu * b
                        e = self._buffer(p, 1)
                        xp.multiply(b, mu, out=e)
                        e += g
                        g, owned = e, True
                    else:
                        g, owned = b, False
                out = g if owned else d                  # p -= lr * g
                xp.multiply(g, lr, out=out)
                p.data -= out


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """The learning rate at iteration ``it``: nanoGPT's linear warmup then cosine decay.

    ``learning_rate * (it + 1) / (warmup_iters + 1)`` for ``it < warmup_iters``; then a half cosine
    from ``learning_rate`` (at ``warmup_iters``) down to ``min_lr`` (at ``lr_decay_iters``); then ``min_lr``.
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)   # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))                 # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def clip_grad_norm(params, max_norm):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``; returns the norm
    before clipping as a Python float.

    The norm is sqrt(sum over params of sum(g**2)), each parameter's sum of squares taken in one
    pass in its own dtype (a dot product, no temporary) and the sums added in float64. If the norm
    exceeds ``max_norm``, every gradient is multiplied by ``max_norm / (norm + 1e-6)`` (PyTorch's
    ``clip_grad_norm_``). Parameters without a gradient are ignored. A non-finite norm is returned
    and nothing is scaled.
    """
    if isinstance(params, Tensor):
        params = [params]
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sums = {}   # array module -> per-parameter sums of squares (device scalars: one sync per module)
    for g in grads:
        xp = backend.get_array_module(g)
        flat = g.reshape(-1)
        sums.setdefault(xp, []).append(xp.vdot(flat, flat))
    total = 0.0
    for xp, ss in sums.items():
        total += float(np.sum(backend.to_numpy(xp.stack(ss)).astype(np.float64)))
    norm = math.sqrt(total)
    if norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g *= coef
    return norm
