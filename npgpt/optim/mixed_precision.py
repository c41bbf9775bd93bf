"""FlatAdamW: AdamW over flat buffers, with global-norm clipping inside the step and optional fp16
mixed precision with dynamic loss scaling.

Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training"): the model computes in
float16 (half the bytes, tensor-core GEMMs) while the optimizer keeps float32 *master* weights and
moments, because an fp16 weight cannot absorb an update smaller than ~1e-3 of its size. Small
gradients underflow in fp16, so the loss is multiplied by a scale S before backward (every
gradient is then S times larger) and the update divides by S again. The scale is *dynamic*: a
step whose gradients hold inf/nan is skipped and S is halved; after ``growth_interval`` good steps
in a row S is doubled (PyTorch's GradScaler policy).

One step over the flat gradient g (``flat.FlatParameters``), with S = 1 without loss scaling:

    norm_S = sqrt(sum(g**2))                     (M1) one pass (``clip.global_grad_norm``)
    ok     = isfinite(norm_S)                    (M2) the step is skipped when not ok
    norm   = norm_S / S                          (M3) the true global gradient norm
    c      = min(1, max_norm / (norm + 1e-6))    (M4) global-norm clipping (PyTorch's clip_grad_norm_)
    t      = t + ok                              (M5) AdamW's step counts the taken steps
    then ``adamw.py``'s (0)-(5) with grad_scale = c / S on the master weights, and w = fp16(p).

On CuPy every scalar above stays on the GPU (0-d arrays), and the per-element part is ONE launch
of the AdamW kernel per param group, so a step costs the norm's passes, those launches and a few
tiny scalar launches, and never copies to the host. On NumPy the same formulas run as ufuncs.

On CuPy the step can also be recorded in a CUDA graph (``npgpt.cuda_graphs``) and replayed: every
value that changes between steps lives in a persistent 0-d device array that the step updates in
place (S, the good-step count, the skipped count, t, the last norm), and the host values the step
reads (each group's lr, and the decay 1 - lr wd) are written into persistent 0-d arrays by
``load_hyperparameters`` before the device part (``step_on_device``) runs. A replayed graph reads
and writes the same buffers, so it follows the learning-rate schedule and the loss scale. On NumPy
the step is unchanged (plain rebinding, Python floats).
"""
from functools import partial

import numpy as np

from .. import backend
from ..layers import _cuda
from ..layers._threads import run_chunked
from .adamw import AdamW, adamw_kernel, adamw_update, group_scalars, scalar
from .base import Optimizer, host_copy
from .clip import global_grad_norm
from .flat import FlatParameters

__all__ = ["FlatAdamW"]


class FlatAdamW(Optimizer):
    """AdamW (decoupled weight decay) over flat buffers, optionally in fp16 mixed precision.

    ``params``: a list of Parameters or of param-group dicts (``{"params": [...], "weight_decay":
    0.0}``), as for ``AdamW``. ``dtype``: the compute dtype of the model — ``None`` keeps the
    parameters' dtype (the flat buffer IS the weights); ``"float16"`` casts the model to fp16 views
    of one fp16 buffer and keeps float32 master weights here. ``max_grad_norm`` > 0 clips the global
    gradient norm inside the step. ``loss_scale``: ``"dynamic"`` (the default with fp16), a fixed
    number, or None (no scaling; the default otherwise). ``cuda_kernel=False`` (or ``NPGPT_CUDA_KERNELS=0``)
    runs the array code on CuPy instead of the CUDA kernel.

    Use ``opt.backward(loss)`` (backward of the loss times the scale), then ``opt.step()`` and
    ``opt.zero_grad()``. Every parameter steps every time (an unused one has a zero gradient).
    ``opt.grad_norm`` (0-d array) is the last step's norm before clipping, and ``opt.loss_scale``
    the current scale; reading them as floats synchronizes with the GPU, so log them sparingly.
    Param groups, their checks, ``set_lr`` and the state-dict format are ``Optimizer``'s (with
    AdamW's checks); the moments live in two flat arrays, ``exp_avg`` and ``exp_avg_sq``.
    """

    _buffers = AdamW._buffers
    _check_group = AdamW._check_group

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, dtype=None,
                 max_grad_norm=0.0, loss_scale="auto", init_scale=2.0 ** 16, growth_interval=2000,
                 cuda_kernel=None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {max_grad_norm}")
        first = self.param_groups[0]["params"][0]
        compute = np.dtype(dtype or first.dtype)
        if compute.kind != "f":
            raise TypeError(f"dtype must be a float dtype, got {compute}")
        self.mixed = compute.itemsize < 4                       # fp16 model, fp32 master weights
        master_dtype = np.dtype(np.float32) if self.mixed else compute
        plists = [g["params"] for g in self.param_groups]
        if self.mixed:                                         # (N,) float32, before the cast to fp16
            xp = backend.get_array_module(first.data)
            master = xp.concatenate([p.data.reshape(-1).astype(master_dtype) for ps in plists for p in ps])
        self.flat = FlatParameters(plists, compute)            # the model's weights and grads
        self.master = master if self.mixed else self.flat.data  # without fp16: the weights themselves
        xp = self.xp = backend.get_array_module(self.master)
        self.exp_avg = xp.zeros_like(self.master)              # (N,) m
        self.exp_avg_sq = xp.zeros_like(self.master)           # (N,) v
        self._flat_scratch = None                              # (N,) for the array code, made on first use
        if loss_scale == "auto":
            loss_scale = "dynamic" if self.mixed else None
        if loss_scale not in (None, "dynamic") and not (float(loss_scale) > 0):
            raise ValueError(f"loss_scale must be 'dynamic', a positive number or None, got {loss_scale!r}")
        self.dynamic = loss_scale == "dynamic"
        s = init_scale if self.dynamic else (1.0 if loss_scale is None else float(loss_scale))
        self.scaled = loss_scale is not None
        self.growth_interval = int(growth_interval)
        self._scale = xp.asarray(s, dtype=np.float32)          # 0-d: S
        self._good = xp.asarray(0, dtype=np.int64)             # 0-d: good steps since the last change
        self._skipped = xp.asarray(0, dtype=np.int64)          # 0-d: steps skipped for inf/nan
        self._t = xp.asarray(0, dtype=np.int64)                # 0-d: AdamW's t (taken steps), (M5)
        self.grad_norm = xp.asarray(0.0, dtype=np.float32)
        self.max_grad_norm = float(max_grad_norm)
        self.cuda_kernel = cuda_kernel          # None: the CUDA kernel on CuPy (unless switched off); False: array code
        self._true, self._one = xp.asarray(True), xp.asarray(1.0)       # constants: no upload inside a step
        self._device_hyper = None               # CuPy: per group (lr float64, decay), 0-d, updated in place
        if xp is not np:
            self.grad_norm = xp.zeros((), _cuda.acc_dtype(self.flat.grad.dtype))   # the norm's own dtype
            self._device_hyper = [(xp.zeros((), np.float64), xp.zeros((), self.master.dtype))
                                  for _ in self.param_groups]

    # ---- the user-facing loop ------------------------------------------------------------------
    @property
    def loss_scale(self):
        """The current loss scale S (a float; synchronizes with the GPU)."""
        return float(self._scale)

    @property
    def skipped_steps(self):
        """How many steps were skipped because the gradients held inf or nan (synchronizes)."""
        return int(self._skipped)

    def backward(self, loss):
        """Backpropagate ``loss`` times the loss scale (plain ``loss.backward()`` without scaling)."""
        if not self.scaled:
            loss.backward()
            return
        with np.errstate(over="ignore", invalid="ignore"):   # fp16 overflow is expected: step() skips it
            (loss * self._scale).backward()

    def zero_grad(self):
        """All gradients to zero (one fill of the flat gradient buffer)."""
        self.flat.zero_grad()

    def step(self):
        """Unscale, check for inf/nan, clip, update the master weights and refresh the fp16 copy;
        a step with non-finite gradients changes nothing but the loss scale (see the module doc)."""
        self.step_count += 1
        self.load_hyperparameters()
        self.step_on_device()

    def load_hyperparameters(self):
        """CuPy: each group's lr and decay 1 - lr wd (host values, e.g. from ``set_lr``) into the
        persistent 0-d arrays ``step_on_device`` reads: one fill each, outside any recorded graph.
        Nothing on NumPy, where the step reads the Python floats."""
        if self._device_hyper is None:
            return
        for group, (lr, decay) in zip(self.param_groups, self._device_hyper):
            lr.fill(group["lr"])
            decay.fill(group_scalars(group)["decay"])

    @property
    def capturable(self):
        """``step_on_device`` can be recorded in a CUDA graph: CuPy with the AdamW kernel (the array
        code branches on the host when a step is skipped)."""
        return self._device_hyper is not None and self._use_kernel()

    def step_buffers(self):
        """Every array a step and ``zero_grad`` write (weights, master copy, moments, gradient, scaler
        state, t, the last norm): what ``npgpt.cuda_graphs`` saves and restores around a warm-up step."""
        arrays = [self.flat.data, self.flat.grad, self.exp_avg, self.exp_avg_sq, self._t, self._scale,
                  self._good, self._skipped, self.grad_norm]
        return arrays + ([self.master] if self.mixed else [])

    def _use_kernel(self):
        return (self.cuda_kernel is not False and self.xp is not np and _cuda.enabled()
                and self.master.dtype == np.float32)

    def _set(self, name, value):
        """State ``name`` = value: rebound on NumPy (as always); on CuPy written into the persistent
        0-d array, so a recorded graph keeps reading and writing the same buffer."""
        if self.xp is np:
            setattr(self, name, value)
        else:
            self.xp.copyto(getattr(self, name), value, casting="unsafe")

    def step_on_device(self):
        """The step without its host bookkeeping (``step_count``, ``load_hyperparameters``): on CuPy
        with the kernel it only launches device work, so ``npgpt.cuda_graphs`` can record it."""
        xp = self.xp
        S = self._scale
        if self.scaled or self.max_grad_norm > 0:
            norm_scaled = global_grad_norm(self.flat.grad)                      # (M1), 0-d
            ok = xp.isfinite(norm_scaled)                                       # (M2)
            norm = norm_scaled / S                                              # (M3)
            self._set("grad_norm", norm)
            clip = xp.minimum(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
            grad_scale = xp.where(ok, clip / S, 0.0)                            # (M4), adamw (0)
        else:
            ok, grad_scale = self._true, self._one
        if not self.dynamic:
            ok = self._true                # without dynamic scaling a step is never skipped (as torch)
        self._set("_t", self._t + ok.astype(np.int64))                         # (M5)
        t = xp.maximum(self._t, 1).astype(np.float64)        # adamw (5): t counts the taken steps
        use_kernel = self._use_kernel()
        if not use_kernel and not bool(ok):                  # the array code: a host branch
            self._update_scale(ok)
            return
        if not use_kernel and self._flat_scratch is None:
            self._flat_scratch = xp.empty_like(self.master)
        dtype = self.master.dtype
        hyper = self._device_hyper or [(group["lr"], None) for group in self.param_groups]
        for group, sl, (lr, decay) in zip(self.param_groups, self.flat.group_slices, hyper):
            b1, b2 = group["betas"]
            args = dict(group_scalars(group), grad_scale=scalar(grad_scale, dtype),   # 0-d, on the device
                        step_size=scalar(lr / (1.0 - xp.power(b1, t)), dtype),
                        bias_correction2_sqrt=scalar(xp.sqrt(1.0 - xp.power(b2, t)), dtype))
            if decay is not None and use_kernel:
                args["decay"] = decay                        # CuPy: 1 - lr wd, from the device
            master, param = self.master[sl], self.flat.data[sl]    # the same array without fp16
            if use_kernel:
                adamw_kernel(xp, self.flat.grad[sl], master, self.exp_avg[sl], self.exp_avg_sq[sl], param,
                             apply=ok, **args)
                continue
            run_chunked(partial(adamw_update, **args), master, self.flat.grad[sl], self.exp_avg[sl],
                        self.exp_avg_sq[sl], self._flat_scratch[sl])          # elementwise: split over threads
            if self.mixed:
                param[...] = master                                 # refresh the fp16 model copy
        self._update_scale(ok)

    def _update_scale(self, ok):
        """Halve S after a skipped step; double it after ``growth_interval`` good steps in a row."""
        if not self.dynamic:
            return
        xp = self.xp
        good = xp.where(ok, self._good + 1, 0)
        grow = good >= self.growth_interval
        self._set("_scale", xp.where(ok, xp.where(grow, self._scale * 2.0, self._scale),
                                     self._scale * 0.5).astype(np.float32))
        self._set("_good", xp.where(grow, 0, good))
        self._set("_skipped", self._skipped + (~ok).astype(np.int64))

    # ---- checkpoints -------------------------------------------------------------------------
    def master_state_dict(self, model):
        """``model.state_dict()`` with the float32 master weights in place of the fp16 copies (so a
        mixed-precision checkpoint loads into a float32 model unchanged)."""
        sd = model.state_dict()
        if self.mixed:
            ids = {id(p): w for p, w in zip(self.flat.params, self.flat.views(self.master))}
            for name, p in model.named_parameters():
                if id(p) in ids:
                    sd[name] = host_copy(ids[id(p)])
        return sd

    def state_dict(self):
        """Plain data (host copies) that resumes this optimizer exactly: ``Optimizer``'s format, each
        parameter at step t with its slices of the flat moments, plus the loss scaler's state."""
        t = int(self._t)
        moments = [self.flat.views(host_copy(self.exp_avg)), self.flat.views(host_copy(self.exp_avg_sq))]
        states = [{"step": t, "exp_avg": m, "exp_avg_sq": v} if t else {} for m, v in zip(*moments)]
        return {**self._state_dict(states),
                "scaler": {"scale": float(self._scale), "good": int(self._good), "skipped": int(self._skipped)}}

    def load_state_dict(self, sd):
        """Restore a state dict (this optimizer's, a per-parameter ``AdamW``'s, or the flat format of
        checkpoints before 2026-11-30) onto this optimizer's identically laid out buffers. A parameter
        without saved moments starts from zero; t is the largest saved step."""
        groups, states, step = self._read_state_dict(sd)
        xp = self.xp
        for key, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            host = np.concatenate([s[key].reshape(-1) if key in s else np.zeros(p.size, flat.dtype)
                                   for s, p in zip(states, self.flat.params)])
            flat[...] = xp.asarray(host, dtype=flat.dtype)
        scaler = sd.get("scaler") or {"scale": 1.0, "good": 0, "skipped": 0}   # AdamW's: no scaler
        self.param_groups, self.step_count = groups, step
        self._set("_t", xp.asarray(max((s.get("step", 0) for s in states), default=0), dtype=np.int64))
        self._set("_scale", xp.asarray(scaler["scale"], dtype=np.float32))
        self._set("_good", xp.asarray(int(scaler["good"]), dtype=np.int64))
        self._set("_skipped", xp.asarray(int(scaler["skipped"]), dtype=np.int64))
