# %% [markdown]
# # 3. One causal attention head, by hand
#
# Attention lets each position gather information from earlier positions. For a sequence of T
# vectors x (T, C), one head with head size hs projects them three ways,
#
#     q = x Wq,  k = x Wk,  v = x Wv                       (T, hs) each: queries, keys, values
#
# and then (Vaswani et al. 2017, eq. 1):
#
#     S = q k^T / sqrt(hs)                                 (T, T) scores: how well query i matches key j
#     S_ij = -inf  where j > i                             causal mask: no looking at the future
#     P = softmax(S) row by row                            (T, T) each row sums to 1
#     y = P v                                              (T, hs) each output a weighted mean of values
#
# Dividing by sqrt(hs) keeps the scores' variance near 1 when q and k have unit-variance entries,
# so the softmax does not saturate. We compute this in plain NumPy and compare with npgpt's fused
# `F.scaled_dot_product_attention`, forward and backward.

# %%
import math

import numpy as np

import npgpt
from npgpt import Tensor
from npgpt import functional as F

rng = np.random.default_rng(0)
T, C, hs = 6, 8, 4
x = rng.standard_normal((T, C))                                    # (T, C)
Wq, Wk, Wv = (rng.standard_normal((C, hs)) / math.sqrt(C) for _ in range(3))
q, k, v = x @ Wq, x @ Wk, x @ Wv                                   # (T, hs) each

# %% [markdown]
# ## Forward in NumPy

# %%
S = q @ k.T / math.sqrt(hs)                                        # (T, T)
future = np.triu(np.ones((T, T), dtype=bool), k=1)                 # True above the diagonal
S = np.where(future, -np.inf, S)
P = np.exp(S - S.max(axis=1, keepdims=True))                       # subtract the row max: no overflow
P /= P.sum(axis=1, keepdims=True)                                  # (T, T) softmax; exp(-inf) = 0
y = P @ v                                                          # (T, hs)

np.set_printoptions(precision=3, suppress=True)
print("attention probabilities P (row i = query i, column j = key j):")
print(P)
assert np.allclose(P.sum(axis=1), 1.0)
assert np.all(P[future] == 0), "no weight on future positions"
assert np.allclose(y[0], v[0]), "position 0 can only see itself"

# %% [markdown]
# npgpt's attention takes a batch of heads, (B, NH, T, hs): here B = NH = 1. A GPT runs NH heads
# side by side on NH slices of the channels and concatenates their outputs (`nn.CausalSelfAttention`).

# %%
def heads(a):
    return Tensor(a[None, None], requires_grad=True)              # (1, 1, T, hs)


qt, kt, vt = heads(q), heads(k), heads(v)
yt = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)    # (1, 1, T, hs)
print("max |y_numpy - y_npgpt| =", np.abs(y - yt.numpy()[0, 0]).max())
assert np.allclose(y, yt.numpy()[0, 0])

# %% [markdown]
# ## Backward in NumPy
#
# Given dL/dy = dy (T, hs), the chain rule through y = P v, the softmax and S = q k^T / sqrt(hs):
#
#     dv = P^T dy                          (T, hs)
#     dP = dy v^T                          (T, T)
#     dS = P * (dP - D),  D_i = sum_j dP_ij P_ij      the softmax Jacobian, applied without forming it
#     dq = dS k / sqrt(hs),   dk = dS^T q / sqrt(hs)
#
# Masked entries have P = 0, so they get dS = 0: no gradient flows to the future.

# %%
dy = rng.standard_normal((T, hs))
dv = P.T @ dy
dP = dy @ v.T
dS = P * (dP - (dP * P).sum(axis=1, keepdims=True))
dq = dS @ k / math.sqrt(hs)
dk = dS.T @ q / math.sqrt(hs)

yt.backward(dy[None, None])                                        # npgpt's hand-written backward
for name, mine, t in [("dq", dq, qt), ("dk", dk, kt), ("dv", dv, vt)]:
    err = np.abs(mine - npgpt.to_numpy(t.grad)[0, 0]).max()
    print(f"{name}: max difference {err:.1e}")
    assert np.allclose(mine, npgpt.to_numpy(t.grad)[0, 0])

# %% [markdown]
# ## The whole head, checked end to end
#
# Composing the projections with attention in the engine, gradcheck confirms the gradients reach
# x and the three weight matrices correctly (the engine supplies dx = dq Wq^T + dk Wk^T + dv Wv^T).

# %%
def attention_head(x, Wq, Wk, Wv):
    q, k, v = (x @ W for W in (Wq, Wk, Wv))                        # (T, hs) each
    return F.scaled_dot_product_attention(q.reshape(1, 1, T, hs), k.reshape(1, 1, T, hs),
                                          v.reshape(1, 1, T, hs))


assert npgpt.gradcheck(attention_head, [x, Wq, Wk, Wv])
print("gradcheck of the whole head: ok")

# %% [markdown]
# ## One new query against all earlier keys
#
# When generating, the keys and values of earlier positions do not change, so they can be kept (the
# KV cache) and only the newest position's query computed. With Tq = 1 query and Tk = T keys, npgpt's
# causal mask is aligned to the end: the last query sees every key. Its output is the last row of
# the full computation; tour step 5 uses this to sample fast.

# %%
with npgpt.no_grad():
    last = F.scaled_dot_product_attention(Tensor(q[None, None, -1:]), Tensor(k[None, None]),
                                          Tensor(v[None, None]), is_causal=True)   # (1, 1, 1, hs)
assert np.allclose(last.numpy()[0, 0, 0], y[-1])
print("one query with all keys == last row of y:", last.numpy()[0, 0, 0])
