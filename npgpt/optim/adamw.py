r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``.

For a parameter p with gradient g at its t-th update (t = 1, 2, ...), learning rate lr, weight
decay wd, betas b1, b2::

    p <- p (1 - lr wd)                                    (1)  decay, decoupled from the gradient
    m <- b1 m + (1 - b1) g  =  m + (1 - b1)(g - m)        (2)  first moment (torch's lerp_ form)
    v <- b2 v + (1 - b2) g^2                              (3)  second moment
    p <- p - lr m_hat / (sqrt(v_hat) + eps),              (4)
         m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

The bias corrections of (4) are two scalars per step, not two passes over the moments: with

    step_size = lr / (1 - b1^t),   bias_correction2_sqrt = sqrt(1 - b2^t)          (5)

(4) is p <- p - step_size m / (sqrt(v) / bias_correction2_sqrt + eps), the same value.

The flat optimizer (``mixed_precision.FlatAdamW``) feeds the update a rescaled gradient and may skip
it: with loss scale S and global-norm clipping factor c,

    g <- grad_scale * g,   grad_scale = c / S                                     (0)

and a step whose gradients hold inf/nan is not applied (``apply`` = 0). With fp16 master weights
the update runs on the float32 master copy and the fp16 weights are its rounding.

Here: ``adamw_update`` ((0)-(5) as in-place array ops, NumPy or CuPy), the CUDA kernel that does
(0)-(4) in one pass (with an optional fp32 master copy, as llm.c's ``adamw_update``), and the
per-parameter optimizer ``AdamW``. Both ``AdamW`` and ``FlatAdamW`` call these two.
"""
import math

import numpy as np

from .. import backend
from ..layers import _cuda
from .base import Optimizer

__all__ = ["AdamW", "adamw_update", "adamw_kernel"]


def scalar(value, dtype):
    """``value`` made safe to meet arrays of ``dtype``: a Python number as it is (NumPy and CuPy
    cast it to the array's dtype), a NumPy scalar or 0-d array (which would upcast a float32 array)
    converted to ``dtype``; a 0-d CuPy array stays on its device."""
    return value if type(value) in (float, int) else value.astype(dtype, copy=False)


def group_scalars(group):
    """The scalars of (1)-(3) for a param group, by the names the update and the kernel use
    (Python floats, so they take the dtype of the arrays they meet)."""
    beta1, beta2 = group["betas"]
    return dict(decay=float(1.0 - group["lr"] * group["weight_decay"]), one_minus_beta1=1.0 - float(beta1),
                beta2=float(beta2), one_minus_beta2=1.0 - float(beta2), eps=float(group["eps"]))


# ---- array code ---------------------------------------------------------------------------------

def adamw_update(param, grad, exp_avg, exp_avg_sq, scratch, *, decay, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_scale=None):
    """Equations (0)-(4) in place, in ``param``'s dtype, with ufuncs (NumPy or CuPy).

    ``param``, ``exp_avg``, ``exp_avg_sq``, ``scratch``: arrays of one shape and dtype (``scratch`` is
    overwritten); ``grad``: that shape, any float dtype. ``decay`` = 1 - lr wd (1); ``step_size`` and
    ``bias_correction2_sqrt`` are (5); ``grad_scale`` (optional) is (0). Scalars: Python numbers, or
    NumPy scalars / 0-d arrays of ``param``'s dtype (see ``scalar``).
    """
    xp = backend.get_array_module(param)
    if grad_scale is not None:                                  # (0)
        grad = grad.astype(param.dtype)                         # a copy
        grad *= grad_scale
    if decay != 1.0:                                            # (1)
        param *= decay
    xp.subtract(grad, exp_avg, out=scratch)                     # (2)
    scratch *= one_minus_beta1
    exp_avg += scratch
    xp.multiply(grad, grad, out=scratch)                        # (3)
    scratch *= one_minus_beta2
    exp_avg_sq *= beta2
    exp_avg_sq += scratch
    xp.sqrt(exp_avg_sq, out=scratch)                            # (4) with (5)
    scratch /= bias_correction2_sqrt
    scratch += eps
    xp.divide(exp_avg, scratch, out=scratch)
    scratch *= step_size
    param -= scratch


# ---- CUDA kernel --------------------------------------------------------------------------------
# One pass over the elements. M is the type the update runs in (the master copy's, or the parameter's
# when there is none), T the parameter's, G the gradient's. Without a master copy the parameter is
# passed as both `master` and `param` (then the model's copy is not written a second time).
# The scalars may be host values or 0-d device arrays (FlatAdamW's, which never leave the GPU).

ADAMW_IN = ("G grad, M grad_scale, M step_size, M bias_correction2_sqrt, M apply, M decay, "
            "M one_minus_beta1, M beta2, M one_minus_beta2, M eps")
ADAMW_OUT = "M master, M exp_avg, M exp_avg_sq, T param"
ADAMW_BODY = _cuda.register_source("elementwise", "npgpt_adamw_update", r"""
if (apply != 0) {
    const M g = (M)grad * grad_scale;                                       // (0)
    M p = master * decay;                                                   // (1)
    const M m = exp_avg + one_minus_beta1 * (g - exp_avg);                  // (2)
    const M v = exp_avg_sq * beta2 + one_minus_beta2 * (g * g);             // (3)
    p = p - step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps));      // (4)
    exp_avg = m;
    exp_avg_sq = v;
    master = p;
    if ((const void*)&param != (const void*)&master) param = (T)p;         // the model's copy
}
""", in_params=ADAMW_IN, out_params=ADAMW_OUT, types={"M": "float32", "G": "float16"})


def adamw_kernel(xp, grad, master, exp_avg, exp_avg_sq, param, *, decay, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_scale=1.0, apply=1.0):
    """(0)-(4) in one CUDA pass, with ``adamw_update``'s scalars plus ``apply`` (0: change nothing).
    ``master``, ``exp_avg``, ``exp_avg_sq``: arrays of the update's dtype; ``param``: the model's
    weights, written as the rounding of the new ``master`` (pass the same array as ``master`` when
    there is no master copy); ``grad``: any float dtype. Scalars: Python numbers or 0-d arrays."""
    dtype = master.dtype
    kernel = _cuda.elementwise_kernel(xp, "npgpt_adamw_update", ADAMW_IN, ADAMW_OUT, ADAMW_BODY)
    kernel(grad, scalar(grad_scale, dtype), scalar(step_size, dtype), scalar(bias_correction2_sqrt, dtype),
           scalar(apply, dtype), scalar(decay, dtype), scalar(one_minus_beta1, dtype), scalar(beta2, dtype),
           scalar(one_minus_beta2, dtype), scalar(eps, dtype), master, exp_avg, exp_avg_sq, param)


# ---- the per-parameter optimizer ----------------------------------------------------------------

class AdamW(Optimizer):
    """AdamW over each parameter separately: (1)-(5) for every parameter whose ``.grad`` is not None
    (unused parameters are skipped and their moments do not advance), in place.

    ``m`` and ``v`` live in the parameter's dtype, the scalars of (5) are Python floats, so a float32
    model is updated in float32 with one shared scratch buffer and no other temporaries. On CuPy
    each parameter is one launch of the CUDA kernel instead of eleven ufunc launches; ``cuda_kernel=False``
    (or ``NPGPT_CUDA_KERNELS=0``) runs the array code there too (results agree to float rounding).

    Gradient accumulation: the engine adds gradients into ``.grad`` across ``backward()`` calls, so a
    large batch split into ``accum_steps`` micro-batches is::

        for micro_batch in range(accum_steps):
            _, loss = model(x, y)
            (loss * (1.0 / accum_steps)).backward()   # scale so the sum of grads is the mean-loss grad
        clip_grad_norm(model.parameters(), 1.0)       # optional, on the accumulated gradient
        opt.step()
        opt.zero_grad()                               # start the next accumulation from nothing
    """

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, cuda_kernel=None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.cuda_kernel = cuda_kernel   # None: the CUDA kernel on CuPy (unless switched off); False: array code

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
            b1, b2 = group["betas"]
            scalars = group_scalars(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                xp = backend.get_array_module(p.data)
                s = self.state[id(p)]
                if not s:
                    s.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
                s["step"] += 1
                t = s["step"]
                step_size = float(group["lr"]) / (1.0 - b1 ** t)          # (5), Python floats
                bias_correction2_sqrt = math.sqrt(1.0 - b2 ** t)
                if (self.cuda_kernel is not False and xp is not np and _cuda.enabled()
                        and _cuda.supports(p.dtype, p.grad.dtype)):
                    adamw_kernel(xp, p.grad, p.data, s["exp_avg"], s["exp_avg_sq"], p.data, **scalars,
                                 step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt)
                else:
                    adamw_update(p.data, p.grad, s["exp_avg"], s["exp_avg_sq"], self._buffer(p), **scalars,
                                 step_size=step_size, bias_correction2_sqrt=bias_correction2_sqrt)
