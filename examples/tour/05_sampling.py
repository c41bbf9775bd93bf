# %% [markdown]
# # 5. Sampling: temperature, top-k and the KV cache
#
# A language model gives, for a prompt, a score (logit) z_i for every token i of the vocabulary.
# Generating text is a loop: turn the last position's logits into probabilities, draw one token,
# append it, repeat. The knobs:
#
#     p_i = exp(z_i / tau) / sum_j exp(z_j / tau)      temperature tau: < 1 sharpens, > 1 flattens
#     top-k: keep the k most likely tokens, renormalize  (cuts off the long tail of unlikely ones)
#     tau = 0: greedy decoding, always the argmax
#
# This step samples from the model that step 4 saved (`tour_tiny_gpt.npz` in the working directory).
# Run alone, it first trains a small one for a few seconds (run step 4 first for better text).

# %%
import importlib.resources
import json
import os
import time

import numpy as np

import npgpt
from npgpt.optim import get_lr
from npgpt.tokenizer import CharTokenizer

QUICK = os.environ.get("NPGPT_TOUR_QUICK", "0") not in ("", "0")
CHECKPOINT = "tour_tiny_gpt.npz"
npgpt.seed(0)

# %% [markdown]
# ## The model: step 4's, or a quick one

# %%
def train_quick_model(iters, block_size=64, batch_size=16, learning_rate=3e-3):
    """Step 4's loop, shortened: a tiny char GPT on the first 100k characters of Shakespeare."""
    text = (importlib.resources.files("npgpt") / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    ids = tok.encode_array(text[:100_000])
    config = npgpt.GPTConfig(vocab_size=tok.n_vocab, block_size=block_size, n_layer=2, n_head=4, n_embd=64)
    model = npgpt.GPT(config)
    opt = model.configure_optimizer(learning_rate, weight_decay=0.1, betas=(0.9, 0.99), flat=True,
                                    max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    for it in range(iters):
        opt.set_lr(get_lr(it, learning_rate, 3, iters, learning_rate / 10))
        starts = rng.integers(0, len(ids) - block_size, size=batch_size)
        windows = np.stack([ids[s:s + block_size + 1] for s in starts]).astype(np.int64)   # (B, T+1)
        _, loss = model(windows[:, :-1], windows[:, 1:])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    print(f"trained a quick model: {iters} steps, last train loss {loss.item():.3f}")
    return model, tok


if os.path.exists(CHECKPOINT):
    with np.load(CHECKPOINT) as ckpt:
        meta = json.loads(str(ckpt["__meta__"]))
        model = npgpt.GPT(npgpt.GPTConfig.from_dict(meta["config"]))
        model.load_state_dict({name: ckpt[name] for name in ckpt.files if name != "__meta__"})
    tok = CharTokenizer(meta["chars"])
    print(f"loaded {CHECKPOINT}: {meta['iters']} training steps, val loss {meta['val_loss']:.3f}")
else:
    model, tok = train_quick_model(iters=30 if QUICK else 300)
model.eval()                                   # no dropout while sampling
V = tok.n_vocab

# %% [markdown]
# ## From logits to probabilities
#
# The logits of the position after the prompt, at three temperatures. The entropy
# H = -sum p_i ln p_i (in nats; ln V when uniform) measures how spread out the choice is: it falls as
# the temperature falls.

# %%
prompt = np.array([tok.encode("ROMEO:\nWhat")])                            # (1, T)
with npgpt.no_grad():
    logits, _ = model(prompt)                                              # (1, T, V)
z = npgpt.to_numpy(logits.data[0, -1]).astype(np.float64)                  # (V,) the last position


def probabilities(z, temperature, top_k=None):
    z = z / temperature
    if top_k is not None:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)                   # keep the k largest
    p = np.exp(z - z.max())
    return p / p.sum()


entropies = []
for temperature in (2.0, 1.0, 0.5):
    p = probabilities(z, temperature)
    top = np.argsort(-p)[:5]
    entropies.append(-(p * np.log(np.maximum(p, 1e-300))).sum())      # 0 ln 0 = 0
    shown = ", ".join(f"{tok.decode([i])!r} {p[i]:.2f}" for i in top)
    print(f"temperature {temperature}: entropy {entropies[-1]:.2f} nats (ln V = {np.log(V):.2f}); top 5: {shown}")
assert entropies[0] > entropies[1] > entropies[2]

p_top5 = probabilities(z, 1.0, top_k=5)
assert np.count_nonzero(p_top5) == 5 and np.isclose(p_top5.sum(), 1.0)

# %% [markdown]
# ## Drawing tokens
#
# `model.generate(idx, max_new_tokens, temperature, top_k, seed)` runs that loop. Drawing one token
# for 1000 copies of the prompt at once (a batch), the frequencies approach the probabilities
# computed above; with top_k=5 no token outside the five most likely ever appears.

# %%
batch = np.repeat(prompt, 1000, axis=0)                                    # (1000, T)
for top_k, p in [(None, probabilities(z, 1.0)), (5, p_top5)]:
    drawn = npgpt.to_numpy(model.generate(batch, max_new_tokens=1, top_k=top_k, seed=0))[:, -1]   # (1000,)
    freq = np.bincount(drawn, minlength=V) / len(drawn)
    distance = 0.5 * np.abs(freq - p).sum()                               # total variation, in [0, 1]
    print(f"top_k={top_k}: {len(set(drawn.tolist()))} distinct tokens drawn; total variation between "
          f"frequencies and probabilities {distance:.3f}")
    assert distance < (0.15 if top_k is None else 0.05)
    assert np.all(p[drawn] > 0), "only tokens with nonzero probability are drawn"

# %% [markdown]
# Text, then: a lower temperature and top-k give safer, more repetitive text. The same seed gives
# the same text.

# %%
for temperature, top_k in [(1.0, None), (0.8, 10)]:
    out = model.generate(prompt, max_new_tokens=80, temperature=temperature, top_k=top_k, seed=1)
    print(f"--- temperature {temperature}, top_k {top_k}:\n{tok.decode(npgpt.to_numpy(out[0]))}")
again = model.generate(prompt, max_new_tokens=80, temperature=0.8, top_k=10, seed=1)
assert np.array_equal(npgpt.to_numpy(out), npgpt.to_numpy(again))

# %% [markdown]
# ## The KV cache
#
# Without a cache, every new token reruns the model over the whole context: O(T^2) work per token
# for attention. But the keys and values of earlier positions never change (the mask stops them
# from seeing later tokens), so each layer can keep them and process only the newest token, whose
# one query attends to all the cached keys (step 3's last cell). Feeding a sequence in two pieces
# through a cache gives the same logits as feeding it at once:

# %%
with npgpt.no_grad():
    full, _ = model(prompt)                                                # (1, T, V)
    cache = model.new_cache()                                              # one dict per layer
    model(prompt[:, :-1], cache=cache)                                     # fills keys/values (1, NH, T-1, hs)
    last, _ = model(prompt[:, -1:], cache=cache)                           # (1, 1, V): only the new token
diff = np.abs(npgpt.to_numpy(full.data[:, -1]) - npgpt.to_numpy(last.data[:, -1])).max()
print(f"last-position logits, full pass vs cache: max difference {diff:.1e}")
assert diff < 1e-4

# %% [markdown]
# So greedy decoding (temperature 0, no randomness) must give the same text with and without the
# cache; only the time differs.

# %%
n_new = model.config.block_size - prompt.shape[1]                          # fill the context window
timings = {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n_new, temperature=0, use_cache=use_cache)
    timings[use_cache] = (time.perf_counter() - t0, tok.decode(npgpt.to_numpy(out[0])))
print(f"greedy, {n_new} tokens: {timings[True][0] * 1e3:.0f} ms with the cache, "
      f"{timings[False][0] * 1e3:.0f} ms without")
print(timings[True][1])
assert timings[True][1] == timings[False][1]
