"""The autograd engine: a Tensor that remembers how it was made, and reverse-mode differentiation.

Reverse mode (backpropagation; Rumelhart, Hinton & Williams 1986; Griewank & Walther,
*Evaluating Derivatives*, ch. 3): every op records its inputs (``_prev``) and a closure
(``_backward``) that, given dL/d(out) in ``out.grad``, adds dL/d(input) into each input's ``.grad``
by the chain rule. ``backward()`` orders the graph topologically (every node after all nodes that
use it) and runs the closures from the output back to the leaves.

The ops themselves live in ``ops.py`` (primitives) and ``layers/`` (hand-derived fused
layers); each builds its output with ``Tensor.from_op(data, parents, backward)``.
"""
import contextlib
import numbers

import numpy as np

from . import backend

__all__ = ["Tensor", "no_grad", "enable_grad", "is_grad_enabled", "as_array", "sum_to_shape", "lift"]

_grad_enabled = True


def is_grad_enabled():
    """True unless inside ``no_grad()``: ops record the graph only when this is True."""
    return _grad_enabled


class _GradMode(contextlib.ContextDecorator):
    def __init__(self, enabled):
        self.enabled = enabled

    def __enter__(self):
        global _grad_enabled
        self.prev, _grad_enabled = _grad_enabled, self.enabled

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self.prev
        return False


def no_grad():
    """Context manager / decorator: ops inside build no graph (evaluation, sampling, optimizer steps)."""
    return _GradMode(False)


def enable_grad():
    """Context manager / decorator: turn graph building back on inside a ``no_grad`` block."""
    return _GradMode(True)


def as_array(x, dtype=None):
    """An array of the active backend from a Tensor, array, list or number.

    Python floats and lists of floats get the default float dtype (float32 unless changed);
    arrays keep their dtype unless ``dtype`` is given.
    """
    if isinstance(x, Tensor):
        x = x.data
    xp = backend.xp
    if isinstance(x, (np.ndarray, xp.ndarray)):
        if not isinstance(x, xp.ndarray):
            x = backend.to_device(x)
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    arr = np.asarray(x)
    if dtype is None and arr.dtype.kind == "f":
        dtype = backend.get_default_dtype()
    return xp.asarray(arr, dtype=dtype)


class Tensor:
    """An n-d array (numpy or cupy) plus what is needed to differentiate through it.

    ``Tensor(data, requires_grad=False, dtype=None)``: ``data`` is an array, list or number.
    Leaves made by the user with ``requires_grad=True`` (parameters) get ``.grad`` filled by
    ``backward()``; intermediate results keep no gradient unless ``retain_grad()`` is called.
    """

    __slots__ = ("data", "grad", "requires_grad", "_prev", "_backward", "_op", "_grad_owned",
                 "_retain", "_freed", "_grad_fixed", "name", "__weakref__")
    __array_priority__ = 1000  # make `ndarray + Tensor` call Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, name=None):
        self.data = as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only float tensors can require gradients, got dtype {self.data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._prev = ()
        self._backward = None
        self._op = ""
        self._grad_owned = False  # True when .grad is a buffer this tensor may update in place
        self._grad_fixed = False  # True when .grad is a view of a flat buffer (never rebound)
        self._retain = False
        self._freed = False
        self.name = name

    @classmethod
    def from_op(cls, data, parents, backward, op=""):
        """The result of an op: wraps ``data`` and, if any parent needs a gradient (and grad mode
        is on), records ``parents`` and the ``backward()`` closure that reads ``out.grad``."""
        out = cls.__new__(cls)
        out.data = np.asarray(data) if isinstance(data, np.generic) else data  # numpy 0-d results
        out.grad = None
        out._grad_owned = out._retain = out._freed = out._grad_fixed = False
        out.name = None
        out._op = op
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._prev = tuple(parents)
            out._backward = backward
        else:
            out.requires_grad = False
            out._prev = ()
            out._backward = None
        return out

    # ---- array-like properties ---------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def is_leaf(self):
        """True for tensors not produced by a recorded op (inputs and parameters)."""
        return self._backward is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op}" if self._op else ""
        return f"Tensor({backend.to_numpy(self.data)!r}{grad}{op})"

    def numpy(self):
        """The data as a NumPy array (copied to the host when on the GPU)."""
        return backend.to_numpy(self.data)

    def item(self):
        """The value of a one-element tensor as a Python number."""
        return self.data.item()

    def detach(self):
        """A new leaf sharing this tensor's data but cut from the graph (no gradient flows back)."""
        return Tensor(self.data)

    def requires_grad_(self, flag=True):
        """Mark this leaf as needing a gradient (in place); returns self."""
        if not self.is_leaf:
            raise RuntimeError("requires_grad_ only applies to leaf tensors; use detach() first")
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"only float tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = bool(flag)
        return self

    def retain_grad(self):
        """Keep ``.grad`` of this intermediate result after backward (leaves always keep theirs)."""
        self._retain = True
        return self

    def zero_grad(self):
        """Forget the accumulated gradient: set ``.grad`` to None, or fill it with zeros when it is a
        view of a flat gradient buffer (``bind_grad_buffer``), which must keep its place."""
        if self._grad_fixed:
            self.grad.fill(0)
            return
        self.grad = None
        self._grad_owned = False

    def bind_grad_buffer(self, grad):
        """Make ``grad`` (an array shaped like this leaf, e.g. a view of a flat gradient buffer, see
        ``npgpt.optim.flat``) this leaf's gradient for good: backward adds into it in place and
        ``zero_grad`` fills it with zeros instead of dropping it. Raises ValueError when the leaf
        is already bound to a buffer (see ``grad_is_bound``)."""
        if self._grad_fixed:
            raise ValueError("this parameter's gradient is already a view of another flat buffer")
        if tuple(grad.shape) != tuple(self.shape):
            raise ValueError(f"the gradient buffer has shape {tuple(grad.shape)} but the tensor has "
                             f"shape {tuple(self.shape)}")
        self.grad = grad
        self._grad_owned = self._grad_fixed = True

    @property
    def grad_is_bound(self):
        """True once ``bind_grad_buffer`` made ``.grad`` a fixed buffer (it is never rebound)."""
        return self._grad_fixed

    # ---- reverse mode --------------------------------------------------------------------------
    def _accumulate(self, g, owned=False):
        """``self.grad += g``. The first gradient is kept by reference (no copy) unless this is a
        leaf, whose ``.grad`` outlives the pass and must be its own writeable buffer (an op that
        hands over a fresh array nobody else holds passes ``owned=True`` to skip that copy); later
        ones are added in place into a buffer we own, or out of place into one we don't."""
        if isinstance(g, np.generic):  # NumPy reductions of 0-d arrays return scalars
            g = np.asarray(g)
        if self.grad is None:
            if self._backward is None or self._retain:
                self.grad = g if owned and getattr(g.flags, "writeable", True) else g.copy()  # CuPy: always
                self._grad_owned = True
            else:
                self.grad = g
                self._grad_owned = owned   # a fresh array nobody else holds: later ones add into it
        elif self._grad_owned:
            self.grad += g
        else:
            self.grad = self.grad + g
            self._grad_owned = True

    def backward(self, grad=None, retain_graph=False):
        """Fill ``.grad`` of every leaf that requires it with d(self)/d(leaf), accumulated.

        ``grad`` is dL/d(self); it may be omitted only for a one-element tensor (then 1).
        The graph is freed afterwards (so its memory is released) unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "computation had requires_grad=True (or it ran under no_grad())")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, got "
                                   f"shape {self.shape}; pass grad= of that shape")
            grad = backend.get_array_module(self.data).ones_like(self.data)
        else:
            grad = as_array(grad, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape} but the tensor has shape {self.shape}")
        if self._freed:
            raise RuntimeError("backward() through a graph that was already freed; call "
                               "backward(retain_graph=True) the first time to go through it twice")
        order = self.topological_order()
        self._accumulate(grad)
        for node in reversed(order):  # outputs first: each node's grad is complete when reached
            if node._backward is None:
                continue
            if node.grad is not None:
                node._backward(node.grad)
            if not retain_graph:
                node._backward, node._prev, node._freed = None, (), True
            if not node._retain:
                node.grad, node._grad_owned = None, False

    def topological_order(self, every_input=False):
        """Nodes reachable from self, each after all of its inputs (iterative DFS, no recursion):
        the nodes that need a gradient (what ``backward`` walks), or with ``every_input`` every
        input, constants included, first inputs first (what ``npgpt.viz.graph`` draws)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, children_done = stack.pop()
            if node._freed and node is not self:
                raise RuntimeError("backward() through a graph that was already freed; call "
                                   "backward(retain_graph=True) the first time to go through it twice")
            if children_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for p in (reversed(node._prev) if every_input else node._prev):
                if (every_input or p.requires_grad) and id(p) not in visited:
                    stack.append((p, False))
        return order


# ---- helpers shared by the ops ----------------------------------------------------------------

def sum_to_shape(g, shape):
    """Sum gradient ``g`` down to ``shape``: the adjoint of broadcasting ``shape`` up to ``g.shape``.

    Leading axes that broadcasting added are summed away; axes where ``shape`` has size 1 are
    summed with keepdims. Returns ``g`` itself when the shapes already match.
    """
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return g.reshape(shape)


def lift(x, like):
    """A Tensor for ``x``; Python numbers take ``like``'s dtype so float32 stays float32."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number) and like is not None and like.dtype.kind == "f":
        return Tensor(as_array(x, like.dtype))
    return Tensor(x)
