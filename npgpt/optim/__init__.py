"""Optimizers: AdamW (per parameter, or over flat buffers with clipping and fp16 mixed precision),
SGD, the learning-rate schedule and global-norm clipping.

    base.py             Optimizer (param groups, set_lr, the one state-dict format), decay_groups
    adamw.py            AdamW's derivation, its array update and its one CUDA kernel, AdamW
    flat.py             FlatParameters: every parameter a view of one buffer, every gradient of another
    mixed_precision.py  FlatAdamW: AdamW over flat buffers, clipping inside the step, fp16 master
                        weights and dynamic loss scaling
    clip.py             global_grad_norm (the one norm), clip_grad_norm
    sgd.py, schedule.py SGD; get_lr (warmup + cosine)
"""
from .adamw import AdamW, adamw_update
from .base import Optimizer, decay_groups
from .clip import clip_grad_norm, global_grad_norm
from .flat import FlatParameters
from .mixed_precision import FlatAdamW
from .schedule import get_lr
from .sgd import SGD

__all__ = ["Optimizer", "AdamW", "FlatAdamW", "SGD", "FlatParameters", "adamw_update", "decay_groups",
           "get_lr", "clip_grad_norm", "global_grad_norm"]
