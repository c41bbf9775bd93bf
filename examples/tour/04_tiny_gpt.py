# %% [markdown]
# # 4. A tiny GPT, trained for a minute
#
# A character-level language model on the Shakespeare text bundled with npgpt: the model reads
# T characters and, at every position t, predicts the next character. Its loss is the mean
# cross-entropy
#
#     L = -1/(B T) sum_{b,t} log p(x_{b,t+1} | x_{b,1..t})
#
# A model that knows nothing spreads probability evenly over the V characters and scores
# L = ln V (ln 84 = 4.43 for the 84 distinct characters here); training pushes L down.
# `npgpt train` does all of this at a larger scale, with evaluation, checkpoints and resume
# (`npgpt/train.py`); here is the loop in full.
#
# The full run takes about a minute on a laptop CPU. `NPGPT_TOUR_QUICK=1` (set by the test suite)
# shrinks it to a few seconds: the loss still falls, the samples are still gibberish.

# %%
import importlib.resources
import json
import math
import os
import time

import numpy as np

import npgpt
from npgpt.optim import get_lr
from npgpt.tokenizer import CharTokenizer

QUICK = os.environ.get("NPGPT_TOUR_QUICK", "0") not in ("", "0")
MAX_ITERS = 30 if QUICK else 1500              # about a minute on a laptop CPU when not QUICK
N_CHARS = 100_000 if QUICK else 1_000_000      # the slice of the corpus we train on
EVAL_BATCHES = 4 if QUICK else 20
CHECKPOINT = "tour_tiny_gpt.npz"               # step 5 samples from this file (in the working directory)

npgpt.seed(0)                                  # weights (and dropout, sampling) from npgpt's generator
rng = np.random.default_rng(0)                 # batches

# %% [markdown]
# ## Text to token ids
#
# One token per character: `CharTokenizer` numbers the distinct characters of the corpus in code
# point order. We take the vocabulary from the whole corpus and train on the first `N_CHARS`
# characters: 90 % for training, the rest held out to measure how well the model generalizes.

# %%
text = (importlib.resources.files("npgpt") / "data" / "shakespeare.txt").read_text(encoding="utf-8")
tok = CharTokenizer.from_text(text)
print(f"corpus: {len(text):,} characters, vocabulary of {tok.n_vocab}: {''.join(tok.chars)!r}")
ids = tok.encode_array(text[:N_CHARS])                       # (N,) uint32
n_train = int(0.9 * len(ids))
train_ids, val_ids = ids[:n_train], ids[n_train:]
print(f"{len(train_ids):,} training and {len(val_ids):,} validation tokens")
print("first tokens:", ids[:12].tolist(), "=", repr(tok.decode(ids[:12])))
assert tok.decode(tok.encode("ROMEO:")) == "ROMEO:"

# %% [markdown]
# ## Batches
#
# A batch is B random windows of T + 1 consecutive tokens: x is the first T, y the same shifted by
# one, so y[b, t] is the character that follows x[b, 0..t].

# %%
block_size, batch_size = 64, 16


def get_batch(data, rng):
    starts = rng.integers(0, len(data) - block_size, size=batch_size)      # (B,)
    x = np.stack([data[s:s + block_size] for s in starts])                  # (B, T)
    y = np.stack([data[s + 1:s + 1 + block_size] for s in starts])          # (B, T)
    return x.astype(np.int64), y.astype(np.int64)


x, y = get_batch(train_ids, rng)
print("x[0]:", repr(tok.decode(x[0][:24])), "\ny[0]:", repr(tok.decode(y[0][:24])))
assert np.array_equal(x[:, 1:], y[:, :-1])

# %% [markdown]
# ## The model
#
# GPT-2's architecture at toy size: token and position embeddings, `n_layer` blocks of causal
# self-attention (`n_head` heads, step 3) and an MLP, a final layer norm and an output layer that
# shares its weights with the token embedding. At initialization the logits are near zero, so the
# loss is near ln V.

# %%
config = npgpt.GPTConfig(vocab_size=tok.n_vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=64)
model = npgpt.GPT(config)
print(f"{model.num_params():,} parameters")
_, loss = model(x, y)                                                       # logits (B, T, V), scalar loss
print(f"loss at initialization: {loss.item():.3f}  (ln V = {math.log(tok.n_vocab):.3f})")
assert abs(loss.item() - math.log(tok.n_vocab)) < 0.1

eval_batches = [get_batch(val_ids, np.random.default_rng(1000 + i)) for i in range(EVAL_BATCHES)]


def val_loss():
    """Mean loss over fixed held-out batches, without building a graph."""
    model.eval()
    with npgpt.no_grad():
        losses = [model(xb, yb)[1].item() for xb, yb in eval_batches]
    model.train()
    return float(np.mean(losses))


# %% [markdown]
# ## The optimizer and the loop
#
# AdamW with weight decay on the matrices only. `flat=True` makes every parameter a view of one
# buffer (and every gradient of another), so gradient clipping (`max_grad_norm`: the global norm of
# all gradients is capped at 1) and the update are one pass each. The learning rate warms up for
# a few steps, then follows a cosine down to a tenth of its peak (`npgpt.optim.get_lr`).
#
# Each iteration: a batch, forward to the loss, backward to the gradients, one optimizer step,
# and the gradients back to zero (they accumulate, step 1).

# %%
learning_rate = 3e-3
opt = model.configure_optimizer(learning_rate, weight_decay=0.1, betas=(0.9, 0.99), flat=True,
                                max_grad_norm=1.0)

val_before = val_loss()
print(f"val loss before training: {val_before:.3f}")
t0 = time.perf_counter()
for it in range(MAX_ITERS):
    opt.set_lr(get_lr(it, learning_rate, warmup_iters=min(100, MAX_ITERS // 10),
                      lr_decay_iters=MAX_ITERS, min_lr=learning_rate / 10))
    x, y = get_batch(train_ids, rng)
    _, loss = model(x, y)
    opt.backward(loss)
    opt.step()
    opt.zero_grad()
    if it % max(1, MAX_ITERS // 10) == 0 or it == MAX_ITERS - 1:
        print(f"step {it:5d}: train loss {loss.item():.3f}  ({time.perf_counter() - t0:.1f} s)")
val_after = val_loss()
print(f"val loss after {MAX_ITERS} steps: {val_after:.3f} (was {val_before:.3f})")
assert val_after < val_before - 0.3, "training should lower the held-out loss"

# %% [markdown]
# ## Save it for sampling
#
# The weights by their GPT-2 names, plus the config and the vocabulary, in one `.npz`.
# (`npgpt train` writes a fuller checkpoint with the optimizer state, for resuming.)

# %%
meta = {"config": config.to_dict(), "chars": tok.chars, "val_loss": val_after, "iters": MAX_ITERS}
np.savez(CHECKPOINT, __meta__=np.array(json.dumps(meta)), **model.state_dict())
print(f"saved {CHECKPOINT}")

prompt = np.array([tok.encode("ROMEO:")])                                  # (1, 6)
out = model.generate(prompt, max_new_tokens=120, temperature=0.8, top_k=20, seed=0)
print(tok.decode(npgpt.to_numpy(out[0])))
