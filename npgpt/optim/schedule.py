"""The learning-rate schedule: nanoGPT's linear warmup, then cosine decay, then a floor."""
import math

__all__ = ["get_lr"]


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """The learning rate at iteration ``it``:

    1. ``it < warmup_iters``: linear warmup, ``learning_rate * (it + 1) / (warmup_iters + 1)``;
    2. ``it >= lr_decay_iters``: ``min_lr``;
    3. in between: a half cosine from ``learning_rate`` (at ``warmup_iters``) down to ``min_lr``
       (at ``lr_decay_iters``).
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)   # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))                 # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)
