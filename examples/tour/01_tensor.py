# %% [markdown]
# # 1. A Tensor and its backward
#
# A `Tensor` is an array (NumPy, or CuPy on a GPU) plus what is needed to differentiate through
# it: every op records its inputs and a small closure that applies the chain rule for that op.
# `loss.backward()` visits the graph from the loss back to the leaves and fills `.grad` of every
# leaf made with `requires_grad=True`.
#
# We build one linear layer and a squared loss,
#
#     y = x W + b          x (N, D), W (D, M), b (M,)  ->  y (N, M)
#     L = 1/2 sum(y^2)
#
# and check the three gradients against the formulas derived by hand:
#
#     dL/dy = y
#     dL/dW = x^T dL/dy            (D, M)
#     dL/db = sum over rows of dL/dy   (M,)   b was broadcast over N rows, so its gradient sums them
#     dL/dx = dL/dy W^T            (N, D)
#
# Run the cells top to bottom (Jupyter or VS Code open this file as a notebook), or run
# `python examples/tour/01_tensor.py`.

# %%
import numpy as np

import npgpt
from npgpt import Tensor

npgpt.seed(0)
rng = np.random.default_rng(0)
N, D, M = 4, 3, 2
x = Tensor(rng.standard_normal((N, D)), requires_grad=True)     # float64 arrays stay float64
W = Tensor(rng.standard_normal((D, M)), requires_grad=True)
b = Tensor(rng.standard_normal(M), requires_grad=True)

y = x @ W + b                     # (N, M): two graph nodes, matmul then add
L = 0.5 * (y * y).sum()           # scalar
print("y =", y)                   # the repr names the op that made it
print("L =", L.item())

# %% [markdown]
# Nothing has been differentiated yet: `.grad` is filled only by `backward()`. Every node already
# knows how it was made, so one call runs the chain rule from L back to x, W and b.

# %%
assert W.grad is None
L.backward()

y_np = y.numpy()                  # dL/dy = y
x_np, W_np = x.numpy(), W.numpy()
expected = {"W": x_np.T @ y_np, "b": y_np.sum(axis=0), "x": y_np @ W_np.T}
for name, t in [("W", W), ("b", b), ("x", x)]:
    print(f"dL/d{name} {t.grad.shape}:\n{npgpt.to_numpy(t.grad)}")
    assert np.allclose(npgpt.to_numpy(t.grad), expected[name]), name
print("all three gradients match the formulas")

# %% [markdown]
# ## Gradients accumulate
#
# `backward()` *adds* into `.grad` (a tensor used twice gets the sum of both paths' gradients, and
# several backward passes can be summed: gradient accumulation). So before the next backward the
# optimizer, or you, resets them with `zero_grad()`.

# %%
L2 = 0.5 * ((x @ W + b) ** 2).sum()   # the same loss, built again
L2.backward()
assert np.allclose(npgpt.to_numpy(W.grad), 2 * expected["W"])
print("after a second backward, W.grad is twice the gradient")
for t in (x, W, b):
    t.zero_grad()
assert W.grad is None

# %% [markdown]
# A tensor used twice: `z = w * w` is the product of `w` with itself, and its two uses each
# contribute `w` to the gradient, so dz/dw = 2 w.

# %%
w = Tensor([3.0], requires_grad=True)
(w * w).sum().backward()
print("d(w*w)/dw at w=3:", w.grad)
assert np.allclose(npgpt.to_numpy(w.grad), [6.0])

# %% [markdown]
# ## Evaluation without a graph, and dtypes
#
# Inside `npgpt.no_grad()` ops record nothing (no closures, no kept inputs): that is how the
# model is evaluated and sampled. Python floats and lists become float32 (the training dtype); a
# float32 tensor stays float32 through every op, because Python numbers take the tensor's dtype.

# %%
with npgpt.no_grad():
    y_eval = x @ W + b
assert not y_eval.requires_grad
print("under no_grad: requires_grad =", y_eval.requires_grad)

h = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
out = (h * 0.5 + 1.0).tanh().mean()
print("dtypes:", h.dtype, "->", out.dtype)
assert h.dtype == np.float32 and out.dtype == np.float32
