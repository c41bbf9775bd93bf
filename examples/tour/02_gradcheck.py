# %% [markdown]
# # 2. Checking a backward with finite differences
#
# Every backward in npgpt is written by hand, so every one needs a check that does not trust the
# derivation. The central difference of a function f in direction d,
#
#     (f(x + eps d) - f(x - eps d)) / (2 eps)  =  <grad f(x), d> + O(eps^2),
#
# needs only the forward. In float64 with eps = 1e-6 it is good to about 1e-10 (the O(eps^2)
# truncation error against the O(1e-16 / eps) rounding error), far below the size of any real bug.
# For an output y of any shape, `npgpt.gradcheck` checks the scalar L = sum(r * y) with a fixed
# random r: one backward with dL/dy = r, against the finite differences of L.

# %%
import numpy as np

import npgpt
from npgpt import Tensor
from npgpt import functional as F

rng = np.random.default_rng(0)

# %% [markdown]
# ## A layer from the library
#
# Layer norm over the last axis, `y = (x - mean) / sqrt(var + eps) * w + b`, is one fused graph node
# with a hand-derived backward (`npgpt/layers/layer_norm.py`). gradcheck perturbs each element of x,
# w and b (inputs of up to 256 elements are checked element by element, larger ones along random
# directions) and compares.

# %%
x, w, b = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)
assert npgpt.gradcheck(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b])
assert npgpt.gradcheck(F.gelu, [rng.standard_normal((4, 6))])
print("layer_norm and gelu: analytic gradients agree with finite differences")

# %% [markdown]
# ## Your own op
#
# An op computes its output from the inputs' arrays and returns `Tensor.from_op(out, parents,
# backward)`. The `backward(dout)` closure receives dL/d(out) and adds dL/d(input) into each
# input with `input._accumulate(...)` (add, never assign: an input used twice gets both terms).
#
# Softplus, a smooth ReLU:
#
#     y = log(1 + e^x)        dy/dx = e^x / (1 + e^x) = sigmoid(x)
#
# The forward below is written as max(x, 0) + log(1 + e^-|x|), the same function without
# overflow for large |x|.

# %%
def softplus(x, derivative=None):
    xp = npgpt.get_array_module(x.data)                   # numpy, or cupy on the GPU
    out = xp.maximum(x.data, 0) + xp.log1p(xp.exp(-xp.abs(x.data)))   # (...) like x

    def backward(dout):
        sigmoid = 1.0 / (1.0 + xp.exp(-x.data))
        local = sigmoid if derivative is None else derivative(x.data)
        x._accumulate(dout * local)                       # chain rule: dL/dx = dL/dy * dy/dx

    return Tensor.from_op(out, (x,), backward, "softplus")


x = rng.standard_normal((4, 5)) * 3
assert npgpt.gradcheck(softplus, [x])
print("softplus with dy/dx = sigmoid(x): passes")

# the op also composes with everything else in the engine
t = Tensor(x, requires_grad=True)
(softplus(t) * 2.0).sum().backward()
assert np.allclose(npgpt.to_numpy(t.grad), 2.0 / (1.0 + np.exp(-x)))

# %% [markdown]
# ## A wrong backward is caught
#
# A classic slip: differentiating e^x / (1 + e^x) once more, i.e. writing the *second*
# derivative sigmoid(x) (1 - sigmoid(x)) where the first belongs. The check names the input, the
# worst element, and both numbers.

# %%
def wrong_derivative(x):
    s = 1.0 / (1.0 + npgpt.get_array_module(x).exp(-x))
    return s * (1.0 - s)


try:
    npgpt.gradcheck(lambda x: softplus(x, derivative=wrong_derivative), [x])
    raise AssertionError("gradcheck should have caught the wrong derivative")
except npgpt.GradcheckError as err:
    print("GradcheckError:", err)
    caught = err
assert "input 0" in str(caught)

# %% [markdown]
# Subtler bugs are caught too: a backward that forgets that x was broadcast (here: y = x + c with
# x of shape (1, 5) broadcast against c of shape (4, 5)), and so hands x a gradient summed over
# only one of the four rows.

# %%
def add_forgetting_broadcast(x, c):
    out = x.data + c.data                                  # (4, 5)

    def backward(dout):
        x._accumulate(dout[:1])                            # wrong: should sum dout over the rows
        c._accumulate(dout)

    return Tensor.from_op(out, (x, c), backward, "bad_add")


xb, c = rng.standard_normal((1, 5)), rng.standard_normal((4, 5))
try:
    npgpt.gradcheck(add_forgetting_broadcast, [xb, c])
    raise AssertionError("gradcheck should have caught the missing sum")
except npgpt.GradcheckError as err:
    print("GradcheckError:", err)
assert npgpt.gradcheck(lambda x, c: x + c, [xb, c])       # the engine's add sums: npgpt.sum_to_shape
print("the engine's own broadcasting add passes")
