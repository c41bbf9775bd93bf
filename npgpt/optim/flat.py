"""Flat parameter and gradient buffers: every parameter is a view of ONE contiguous array, and every
gradient a view of another.

An optimizer that walks parameters one by one pays a kernel launch (CuPy, ~10 us) or a Python
loop iteration per parameter and per operation; GPT-2 small has 148 parameter tensors. With flat
buffers the AdamW update, the global gradient norm and zeroing the gradients are each one pass
over one array, and a later data-parallel all-reduce is one call (as in llm.c and PyTorch DDP's
gradient buckets).

Layout: parameters in the order given, group after group, so each param group is one contiguous
slice ``FlatParameters.group_slices[i]``. Nothing is copied twice: each parameter's values are
copied into the buffer once, then ``p.data`` *becomes* the view. Each gradient view is bound to its
parameter with ``Tensor.bind_grad_buffer``, so the backward pass adds into it in place and
``zero_grad`` is one fill.

Rules that follow: never rebind ``p.data`` or ``p.grad`` of a flat parameter (write into them:
``p.data[...] = value``, as ``Module.load_state_dict`` does), and unused parameters get a zero
gradient rather than None.
"""
import numpy as np

from .. import backend

__all__ = ["FlatParameters"]


class FlatParameters:
    """Lay ``groups`` (a list of lists of leaf Parameters) out in one buffer of ``dtype``.

    Attributes: ``data`` (N,) and ``grad`` (N,) flat arrays on the parameters' backend;
    ``params`` (all parameters, in layout order); ``group_slices`` (one ``slice`` per group);
    ``offsets`` (start of each parameter). ``dtype`` defaults to the first parameter's dtype; the
    parameters are cast to it.
    """

    def __init__(self, groups, dtype=None):
        groups = [list(g) for g in groups]
        self.params = [p for g in groups for p in g]
        if not self.params:
            raise ValueError("FlatParameters got no parameters")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter appears more than once; flat buffers need each parameter once")
        for p in self.params:
            if not p.requires_grad or not p.is_leaf:
                raise TypeError("flat buffers hold leaf Tensors with requires_grad=True")
            if p.grad_is_bound:
                raise ValueError("a parameter is already a view of another flat buffer")
        xp = backend.get_array_module(self.params[0].data)
        if any(backend.get_array_module(p.data) is not xp for p in self.params):
            raise ValueError("all parameters must live on one backend (numpy or cupy)")
        self.dtype = np.dtype(dtype or self.params[0].dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"flat buffers hold floats, not {self.dtype}")
        sizes = [int(p.size) for p in self.params]
        self.offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
        self.size = int(sum(sizes))
        self.data = xp.empty(self.size, dtype=self.dtype)      # (N,)
        self.grad = xp.zeros(self.size, dtype=self.dtype)      # (N,)
        self.group_slices, start = [], 0
        for g in groups:
            n = sum(int(p.size) for p in g)
            self.group_slices.append(slice(start, start + n))
            start += n
        for p, off, n in zip(self.params, self.offsets, sizes):
            view = self.data[off:off + n]
            view[...] = p.data.reshape(-1)                      # the one copy (cast to dtype)
            if p.grad is not None:
                self.grad[off:off + n] = p.grad.reshape(-1)    # keep a gradient already accumulated
            p.data = view.reshape(p.shape)
            p.bind_grad_buffer(self.grad[off:off + n].reshape(p.shape))

    def zero_grad(self):
        """All gradients to zero in one fill."""
        self.grad.fill(0)

    def views(self, flat):
        """Per-parameter views (shaped like the parameters) of another flat array laid out the same."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected a flat array of shape ({self.size},), got {flat.shape}")
        return [flat[o:o + p.size].reshape(p.shape) for p, o in zip(self.params, self.offsets)]
