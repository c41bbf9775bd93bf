"""AdamW over flat buffers, with optional fp16 mixed precision and dynamic loss scaling.

Mixed precision (Micikevicius et al. 2018, "Mixed Precision Training"): the model computes in
float16 (half the bytes, tensor-core GEMMs) while the optimizer keeps float32 *master* weights and
moments, because an fp16 weight cannot absorb an update smaller than ~1e-3 of its size. Small
gradients underflow in fp16, so the loss is multiplied by a scale S before backward (every
gradient is then S times larger) and the update divides by S again. The scale is *dynamic*: a
step whose gradients hold inf/nan is skipped and S is halved; after ``growth_interval`` good steps
in a row S is doubled (PyTorch's GradScaler policy).

One optimizer step over the flat gradient g (``npgpt.flat``), with S = 1 without loss scaling:

    n2   = sum(g**2)                            one reduction pass (float32 accumulation)
    ok   = isfinite(n2)                         the step is skipped when not ok
    norm = sqrt(n2) / S                         the true global gradient norm
    c    = min(1, max_norm / (norm + 1e-6))     global-norm clipping (PyTorch's clip_grad_norm_)
    t    = t + ok;  G = g * c / S               then, per element, AdamW (optim.AdamW's formulas):
    p = p (1 - lr wd);  m += (1-b1)(G - m);  v = b2 v + (1-b2) G^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);   w = fp16(p)

On CuPy every scalar above stays on the GPU (0-d arrays), and the per-element part is ONE fused
kernel per param group, so a step costs one reduction, two update launches and a dozen tiny
scalar launches, and never copies to the host. On NumPy the same formulas run as ufuncs.
"""
import numpy as np

from . import backend
from .flat import FlatParameters
from .optim import AdamW, Optimizer

__all__ = ["FlatAdamW"]

_KERNELS = {}


def _kernel(xp, kind):
    """The CuPy kernels of a step, built once: sum of squares in float32, and the AdamW update
    (``"update"`` in place on float32 weights; ``"update_copy"`` also writes the fp16 model copy)."""
    k = _KERNELS.get(kind)
    if k is not None:
        return k
    if kind == "sumsq":
        k = xp.ReductionKernel("T x", "float32 y", "float(x) * float(x)", "a + b", "y = a", "0",
                               "npgpt_sumsq")
    else:
        body = """
        if (sc[3] != 0.0f) {
            float gg = float(g) * sc[0];
            float mm = m + omb1 * (gg - m);
            float vv = v * b2 + omb2 * (gg * gg);
            p = p * decay - sc[1] * (mm / (sqrtf(vv) / sc[2] + eps));
            m = mm;
            v = vv;
        }
        """
        outs = "float32 p, float32 m, float32 v"
        if kind == "update_copy":
            body += "w = (W)p;"
            outs += ", W w"
        k = xp.ElementwiseKernel(
            "G g, raw float32 sc, float32 decay, float32 omb1, float32 b2, float32 omb2, float32 eps",
            outs, body, f"npgpt_flat_adamw_{kind}")
    _KERNELS[kind] = k
    return k


class FlatAdamW(Optimizer):
    """AdamW (decoupled weight decay) over flat buffers, optionally in fp16 mixed precision.

    ``params``: a list of Parameters or of param-group dicts (``{"params": [...], "weight_decay":
    0.0}``), as for ``optim.AdamW``. ``dtype``: the compute dtype of the model — ``None`` keeps the
    parameters' dtype (the flat buffer IS the weights); ``"float16"`` casts the model to fp16 views
    of one fp16 buffer and keeps float32 master weights here. ``max_grad_norm`` > 0 clips the global
    gradient norm inside the step. ``loss_scale``: ``"dynamic"`` (the default with fp16), a fixed
    number, or None (no scaling; the default otherwise).

    Use ``opt.backward(loss)`` (backward of the loss times the scale), then ``opt.step()`` and
    ``opt.zero_grad()``. Every parameter steps every time (an unused one has a zero gradient).
    ``opt.grad_norm`` (0-d array) is the last step's norm before clipping, and ``opt.loss_scale``
    the current scale; reading them as floats synchronizes with the GPU, so log them sparingly.
    Param groups, their checks and ``set_lr`` are ``optim.Optimizer``'s (with AdamW's checks); the
    state (flat moments, step, loss scale) is this class's own.
    """

    _check_group = AdamW._check_group

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, dtype=None,
                 max_grad_norm=0.0, loss_scale="auto", init_scale=2.0 ** 16, growth_interval=2000,
                 fused=None):
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
        self._t = xp.asarray(0, dtype=np.int64)                # 0-d: AdamW's step t (taken steps)
        self.grad_norm = xp.asarray(0.0, dtype=np.float32)
        self.max_grad_norm = float(max_grad_norm)
        self.fused = fused if fused is not None else xp is not np

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
        xp, g = self.xp, self.flat.grad
        self.step_count += 1
        S = self._scale
        if self.scaled or self.max_grad_norm > 0:
            n2 = _kernel(xp, "sumsq")(g) if self.fused and g.dtype != np.float64 else _sumsq(g)  # 0-d
            ok = xp.isfinite(n2)
            norm = xp.sqrt(n2) / S
            self.grad_norm = norm
            c = xp.minimum(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
            gmul = xp.where(ok, c / S, 0.0)
        else:
            ok, gmul = xp.asarray(True), xp.asarray(1.0)
        if not self.dynamic:
            ok = xp.asarray(True)          # without dynamic scaling a step is never skipped (as torch)
        self._t = self._t + ok.astype(np.int64)
        for group, sl in zip(self.param_groups, self.flat.group_slices):
            self._update(group, sl, gmul, ok)
        if self.dynamic:
            self._update_scale(ok)

    def _update(self, group, sl, gmul, ok):
        xp = self.xp
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        t = xp.maximum(self._t, 1).astype(np.float64)           # bias corrections of the taken steps
        step_size = lr / (1.0 - xp.power(b1, t))
        bc2_sqrt = xp.sqrt(1.0 - xp.power(b2, t))
        p, m, v, g = self.master[sl], self.exp_avg[sl], self.exp_avg_sq[sl], self.flat.grad[sl]
        if self.fused and p.dtype == np.float32:
            sc = xp.stack([xp.asarray(gmul, np.float32), step_size.astype(np.float32),
                           bc2_sqrt.astype(np.float32), ok.astype(np.float32)])   # (4,) on the device
            f = np.float32
            args = (g, sc, f(1.0 - lr * wd), f(1.0 - b1), f(b2), f(1.0 - b2), f(eps), p, m, v)
            if self.mixed:
                _kernel(xp, "update_copy")(*args, self.flat.data[sl])
            else:
                _kernel(xp, "update")(*args)
            return
        if not bool(ok):                                        # NumPy (or float64): a host branch
            return
        dt = p.dtype.type
        G = g.astype(p.dtype) * dt(gmul)                        # unscaled, clipped gradient
        p *= dt(1.0 - lr * wd)
        m += dt(1.0 - b1) * (G - m)
        v *= dt(b2)
        v += dt(1.0 - b2) * (G * G)
        p -= dt(step_size) * (m / (xp.sqrt(v) / dt(bc2_sqrt) + dt(eps)))
        if self.mixed:
            self.flat.data[sl] = p                              # refresh the fp16 model copy

    def _update_scale(self, ok):
        """Halve S after a skipped step; double it after ``growth_interval`` good steps in a row."""
        xp = self.xp
        good = xp.where(ok, self._good + 1, 0)
        grow = good >= self.growth_interval
        self._scale = xp.where(ok, xp.where(grow, self._scale * 2.0, self._scale),
                               self._scale * 0.5).astype(np.float32)
        self._good = xp.where(grow, 0, good)
        self._skipped = self._skipped + (~ok).astype(np.int64)

    # ---- checkpoints -------------------------------------------------------------------------
    def master_state_dict(self, model):
        """``model.state_dict()`` with the float32 master weights in place of the fp16 copies (so a
        mixed-precision checkpoint loads into a float32 model unchanged)."""
        sd = model.state_dict()
        if self.mixed:
            ids = {id(p): w for p, w in zip(self.flat.params, self.flat.views(self.master))}
            for name, p in model.named_parameters():
                if id(p) in ids:
                    sd[name] = backend.to_numpy(ids[id(p)]).copy()
        return sd

    def state_dict(self):
        """Plain data (host copies) that resumes this optimizer exactly."""
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"flat": True, "step": self.step_count, "t": int(self._t), "sizes": [int(p.size) for p in self.flat.params],
                "exp_avg": backend.to_numpy(self.exp_avg).copy(),
                "exp_avg_sq": backend.to_numpy(self.exp_avg_sq).copy(),
                "scaler": {"scale": float(self._scale), "good": int(self._good), "skipped": int(self._skipped)},
                "param_groups": groups}

    def load_state_dict(self, sd):
        """Restore what ``state_dict()`` returned onto this optimizer's (identically laid out) buffers."""
        if isinstance(sd, dict) and not sd.get("flat") and "state" in sd:
            sd = _from_per_parameter(sd, self.flat.params)
        if not isinstance(sd, dict) or not sd.get("flat"):
            raise ValueError("not a FlatAdamW state dict (a per-parameter AdamW state cannot be loaded "
                             "into flat buffers); pass what FlatAdamW.state_dict() returned")
        sizes = [int(p.size) for p in self.flat.params]
        if [int(s) for s in sd["sizes"]] != sizes or len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("the state dict was saved for different parameters; build the optimizer over "
                             "the same parameters, in the same groups and order")
        xp = self.xp
        self.exp_avg[...] = xp.asarray(np.asarray(sd["exp_avg"]), dtype=self.master.dtype)
        self.exp_avg_sq[...] = xp.asarray(np.asarray(sd["exp_avg_sq"]), dtype=self.master.dtype)
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "n_params")})
            g["betas"] = tuple(float(b) for b in g["betas"])
        self.step_count = int(sd["step"])
        self._t = xp.asarray(int(sd["t"]), dtype=np.int64)
        sc = sd["scaler"]
        self._scale = xp.asarray(sc["scale"], dtype=np.float32)
        self._good = xp.asarray(int(sc["good"]), dtype=np.int64)
        self._skipped = xp.asarray(int(sc["skipped"]), dtype=np.int64)


def _from_per_parameter(sd, params):
    """A per-parameter ``optim.AdamW`` state dict (older checkpoints) in the flat layout: the moments
    concatenated in the same group order; parameters that never stepped get zero moments."""
    state = sd["state"]
    if len(state) != len(params):
        raise ValueError(f"the state dict holds {len(state)} parameters but this optimizer has {len(params)}")
    def flat(key):
        return np.concatenate([np.asarray(s[key]).reshape(-1) if s and key in s else np.zeros(p.size)
                               for s, p in zip(state, params)])
    t = max((int(s.get("step", 0)) for s in state if s), default=0)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"flat": True, "step": int(sd.get("step", t)), "t": t, "sizes": [int(p.size) for p in params],
            "exp_avg": flat("exp_avg"), "exp_avg_sq": flat("exp_avg_sq"),
            "scaler": {"scale": 1.0, "good": 0, "skipped": 0}, "param_groups": groups}


def _sumsq(g):
    """sum(g**2) accumulated in float32 (float64 for float64 g), as a 0-d array."""
    xp = backend.get_array_module(g)
    acc = g if g.dtype.itemsize >= 4 else g.astype(np.float32)
    return xp.asarray(xp.vdot(acc, acc))

