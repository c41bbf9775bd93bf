"""Check an op's backward against central finite differences, in float64.

For a function f and a direction d, the central difference
    (f(x + eps d) - f(x - eps d)) / (2 eps) = <grad f(x), d> + O(eps^2)
(truncation error O(eps^2 f'''), rounding error O(u f / eps), so eps ~ 1e-6 in float64 gives
~1e-10 accuracy). A tensor-valued output y is reduced to the scalar L = sum(r * y) with a fixed
random r, so the engine's backward is run once with dL/dy = r and compared with the differences of L.

Small inputs are checked element by element (d = unit vectors); large ones along random unit
directions (a directional derivative checks every element's contribution at once).
"""
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .engine import Tensor, no_grad

__all__ = ["gradcheck", "gradcheck_report", "GradcheckError", "GradcheckReport", "register_check",
           "CHECKS"]


class GradcheckError(AssertionError):
    """The analytic gradient of some input disagrees with finite differences."""


@dataclass
class InputReport:
    index: int
    shape: tuple
    mode: str                 # "elementwise" or "directional"
    max_abs_err: float
    max_rel_err: float
    worst: object             # element index (tuple) or direction number
    analytic: float
    numeric: float
    ok: bool


@dataclass
class GradcheckReport:
    inputs: list = field(default_factory=list)

    @property
    def ok(self):
        return all(r.ok for r in self.inputs)

    @property
    def max_abs_err(self):
        return max((r.max_abs_err for r in self.inputs), default=0.0)

    @property
    def max_rel_err(self):
        return max((r.max_rel_err for r in self.inputs), default=0.0)


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def gradcheck_report(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, max_elements=256, n_directions=8, seed=0):
    """Compare ``fn``'s backward with central differences; return a GradcheckReport (never raises
    on a mismatch). Arguments as for ``gradcheck``."""
    xp = backend.xp
    checked, arrays = [], []
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor):
            data, wants = x.data, x.requires_grad
        else:
            data = backend.to_device(x)
            wants = data.dtype.kind == "f"
        if data.dtype.kind == "f":
            data = backend.get_array_module(data).ascontiguousarray(data, dtype=np.float64).copy()
        arrays.append(data)
        if wants:
            checked.append(i)
    if not checked:
        raise ValueError("gradcheck: no input to check; pass float arrays or Tensors with requires_grad=True")

    gen = np.random.default_rng(seed)
    with backend.default_dtype(np.float64):
        def run(arrs, grad):
            ts = [Tensor(a, requires_grad=grad and i in checked) for i, a in enumerate(arrs)]
            return ts, _outputs(fn(*ts))

        ts, outs = run(arrays, True)
        weights = [xp.asarray(gen.standard_normal(o.shape)) for o in outs]
        for k, (o, r) in enumerate(zip(outs, weights)):
            if o.dtype != np.float64:
                raise TypeError(f"gradcheck: output {k} has dtype {o.dtype}; the op must keep float64 inputs float64")
            if o.requires_grad:
                o.backward(r.astype(o.dtype), retain_graph=k < len(outs) - 1)

        def loss(arrs):
            with no_grad():
                _, outs_ = run(arrs, False)
                return float(sum(float((o.data * r).sum()) for o, r in zip(outs_, weights)))

        report = GradcheckReport()
        for i in checked:
            x = arrays[i]
            g = ts[i].grad if ts[i].grad is not None else xp.zeros_like(x)
            if x.size <= max_elements:
                mode, pairs = "elementwise", []
                flat = x.reshape(-1)
                for j in range(x.size):
                    orig = flat[j].item()
                    flat[j] = orig + eps
                    fp = loss(arrays)
                    flat[j] = orig - eps
                    fm = loss(arrays)
                    flat[j] = orig
                    pairs.append((float(g.reshape(-1)[j]), (fp - fm) / (2 * eps)))
                where = lambda j: tuple(int(v) for v in np.unravel_index(j, x.shape))  # noqa: E731
            else:
                mode, pairs = "directional", []
                for j in range(n_directions):
                    d = gen.standard_normal(x.shape)
                    d = xp.asarray(d / np.linalg.norm(d))
                    arrays[i] = x + eps * d
                    fp = loss(arrays)
                    arrays[i] = x - eps * d
                    fm = loss(arrays)
                    arrays[i] = x
                    pairs.append((float((g * d).sum()), (fp - fm) / (2 * eps)))
                where = lambda j: f"direction {j}"  # noqa: E731
            a = np.array([p[0] for p in pairs])
            n = np.array([p[1] for p in pairs])
            abs_err = np.abs(a - n)
            rel_err = abs_err / np.maximum(np.abs(n), atol)  # relative where |numeric| > atol
            excess = abs_err - (atol + rtol * np.abs(n))
            j = int(np.argmax(excess)) if len(pairs) else 0
            report.inputs.append(InputReport(
                index=i, shape=tuple(x.shape), mode=mode,
                max_abs_err=float(abs_err.max(initial=0.0)),
                max_rel_err=float(rel_err.max(initial=0.0)),
                worst=where(j) if len(pairs) else None,
                analytic=float(a[j]) if len(pairs) else 0.0, numeric=float(n[j]) if len(pairs) else 0.0,
                ok=bool((excess <= 0).all())))
    return report


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, max_elements=256, n_directions=8, seed=0):
    """Check ``fn``'s analytic gradients against central finite differences in float64.

    fn:        takes one Tensor per input and returns a Tensor (any shape) or a tuple of Tensors.
    inputs:    arrays or Tensors. Float arrays and Tensors with ``requires_grad=True`` are checked;
               integer arrays and other Tensors are passed as constants. All are cast to float64.
    eps:       finite-difference step.
    atol/rtol: an element passes when |analytic - numeric| <= atol + rtol * |numeric|.
    max_elements: inputs up to this size are checked element by element, larger ones along
               ``n_directions`` random unit directions.

    Returns True, or raises GradcheckError naming the input, the worst element and both values.
    """
    report = gradcheck_report(fn, inputs, eps=eps, atol=atol, rtol=rtol, max_elements=max_elements,
                              n_directions=n_directions, seed=seed)
    for r in report.inputs:
        if not r.ok:
            raise GradcheckError(
                f"gradient of input {r.index} (shape {r.shape}) disagrees with finite differences at "
                f"{r.mode} element {r.worst}: analytic {r.analytic:.10g} vs numeric {r.numeric:.10g} "
                f"(abs err {abs(r.analytic - r.numeric):.3g}, atol={atol}, rtol={rtol})")
    return True


# ---- registry of op checks, run by `npgpt gradcheck` --------------------------------------------

CHECKS = {}


def register_check(name, fn, make_inputs):
    """Register an op for ``npgpt gradcheck``: ``make_inputs(rng)`` returns the input list
    (numpy arrays) for ``fn`` on random shapes."""
    CHECKS[name] = (fn, make_inputs)
    return fn
