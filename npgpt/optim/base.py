"""The optimizer base class: param groups, ``zero_grad``, ``set_lr`` and the one state-dict format.

An optimizer holds *param groups*, PyTorch style: each group is a dict with its ``"params"`` (leaf
Tensors with ``requires_grad=True``) and its hyperparameters, so the model can decay only its
matrices (``decay_groups`` builds the usual two groups)::

    opt = AdamW([{"params": matrices, "weight_decay": 0.1},
                 {"params": biases_and_gains, "weight_decay": 0.0}], lr=6e-4, betas=(0.9, 0.95))

A plain list of Tensors is one group with the constructor's hyperparameters. ``opt.set_lr(lr)`` (or
``group["lr"] = lr``) changes the rate before a step, e.g. from ``get_lr``.

State dicts (every optimizer here, per-parameter or flat, writes and reads this one format)::

    {"step":         number of step() calls,
     "param_groups": [{hyperparameters..., "params": [indices of the group's parameters]}, ...],
     "state":        [per parameter, in group order: {} (never updated) or
                      {"step": t, "<buffer>": NumPy array shaped like the parameter, ...}],
     ...}            optimizer extras, e.g. FlatAdamW's "scaler": {"scale", "good", "skipped"}

AdamW's buffers are ``exp_avg`` and ``exp_avg_sq``, SGD's ``momentum_buffer``. The arrays are host
copies, which ``npgpt.checkpoint`` stores as they are; loading copies them onto each parameter's
backend and dtype, so a resumed run takes bit-identical steps. The flat format FlatAdamW wrote
before 2026-11-30 (``{"flat": True, "t", "sizes", "exp_avg": (N,), ...}``) still loads.
"""
import numpy as np

from .. import backend
from ..engine import Tensor

__all__ = ["Optimizer", "decay_groups"]


def decay_groups(params, weight_decay):
    """The two param groups of GPT-2 training: ``weight_decay`` on matrices (>= 2-D: embeddings and
    linear weights), none on vectors (biases, layer-norm gains). An empty group is left out. For
    the default ``GPT(GPTConfig())``: 18 matrices in the first group, 34 vectors in the second.
    """
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def host_copy(a):
    """A NumPy copy of an array on any backend that does not alias the live buffer."""
    h = backend.to_numpy(a)
    return h.copy() if h is a else h


class Optimizer:
    """Base class: param groups, ``zero_grad``, ``set_lr``, and state dicts.

    Subclasses set ``_buffers`` (names of the per-parameter arrays in ``state``), fill ``defaults``
    and implement ``_check_group`` and ``step``.
    """

    _buffers = ()

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            raise TypeError("params must be a list of Tensors or of param-group dicts, not one Tensor; "
                            "wrap it in a list: [p]")
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        seen = set()
        for g in groups:
            if not isinstance(g, dict) or "params" not in g:
                raise TypeError("param groups must all be dicts with a 'params' list, e.g. "
                                "{'params': [...], 'weight_decay': 0.0}")
            group = {**self.defaults, **g}
            ps = group["params"]
            group["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
            for p in group["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
                    raise TypeError(f"the optimizer can only update leaf Tensors with requires_grad=True, "
                                    f"got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears more than once in the optimizer's param groups")
                seen.add(id(p))
            self._check_group(group)
            self.param_groups.append(group)
        self.state = {id(p): {} for p in self._params()}   # per parameter: {"step": t, buffers...}
        self.step_count = 0                                  # number of step() calls
        self._scratch = {}                                   # (module, dtype, slot) -> flat buffer

    def _check_group(self, group):
        if group["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {group['lr']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")

    def _params(self):
        """All parameters, group by group, in order (the indices used by state dicts)."""
        return [p for g in self.param_groups for p in g["params"]]

    def _buffer(self, p, slot=0):
        """Scratch array number ``slot`` shaped like ``p``: a view of one flat buffer per slot, shared
        by all parameters of that backend and dtype (so a step allocates nothing)."""
        xp = backend.get_array_module(p.data)
        key = (xp.__name__, p.data.dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < p.data.size:
            size = max(q.data.size for q in self._params()
                       if q.data.dtype == p.data.dtype and backend.get_array_module(q.data) is xp)
            buf = self._scratch[key] = xp.empty(size, dtype=p.data.dtype)
        return buf[:p.data.size].reshape(p.data.shape)

    def zero_grad(self):
        """Set every parameter's ``.grad`` to None (the next backward starts from nothing)."""
        for p in self._params():
            p.zero_grad()

    def set_lr(self, lr):
        """Use learning rate ``lr`` in every group from the next ``step()`` on."""
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        for g in self.param_groups:
            g["lr"] = lr

    def step(self):
        raise NotImplementedError

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        """Plain data that resumes this optimizer exactly (the format in the module docstring)."""
        states = [{k: (host_copy(v) if k in self._buffers else v) for k, v in self.state[id(p)].items()}
                  for p in self._params()]
        return self._state_dict(states)

    def _state_dict(self, states):
        """The state dict with ``states`` (one dict per parameter, in group order, buffers already
        host copies) and this optimizer's step count and param groups."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"step": self.step_count, "param_groups": groups, "state": states}

    def load_state_dict(self, sd):
        """Restore what ``state_dict()`` returned (possibly after a checkpoint round trip) onto this
        optimizer's parameters; buffers go to each parameter's backend and dtype. Raises ValueError
        when the state was saved for a different set of parameters."""
        groups, states, step = self._read_state_dict(sd)
        new_state = {}
        for p, s in zip(self._params(), states):
            xp = backend.get_array_module(p.data)
            new_state[id(p)] = {k: (xp.array(v, dtype=p.data.dtype) if k in self._buffers else v)
                                for k, v in s.items()}                 # always a fresh copy
        self.param_groups, self.state, self.step_count = groups, new_state, step

    def _read_state_dict(self, sd):
        """Check ``sd`` against this optimizer's parameters, changing nothing. Returns the new param
        groups, the per-parameter states (buffers as NumPy arrays) and the step count."""
        name = type(self).__name__
        fix = "build the optimizer over the same parameters, in the same groups and order, as when it was saved"
        params = self._params()
        if isinstance(sd, dict) and sd.get("flat"):
            sd = _from_flat_format(sd, params, fix)
        try:
            groups, state = sd["param_groups"], sd["state"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a {name} state dict (missing {e}); pass what {name}.state_dict() "
                             f"returned") from e
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups but this optimizer has "
                             f"{len(self.param_groups)}; {fix}")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(saved['params'])} parameters in the state dict "
                                 f"but {len(group['params'])} here; {fix}")
        if len(state) != len(params):
            raise ValueError(f"the state dict holds state for {len(state)} parameters but this optimizer "
                             f"has {len(params)}; {fix}")
        states = []
        for i, (p, s) in enumerate(zip(params, state)):
            s = dict(s or {})
            for k in self._buffers:
                if k in s:
                    s[k] = backend.to_numpy(s[k])
                    if tuple(s[k].shape) != tuple(p.shape):
                        raise ValueError(f"parameter {i}: saved {k} has shape {tuple(s[k].shape)} but the "
                                         f"parameter has shape {tuple(p.shape)}; {fix}")
            if "step" in s:
                s["step"] = int(s["step"])
            states.append(s)
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            g = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            if "betas" in g:
                g["betas"] = tuple(float(b) for b in g["betas"])   # JSON turns tuples into lists
            g["params"] = group["params"]
            self._check_group(g)
            new_groups.append(g)
        return new_groups, states, int(sd.get("step", 0))


def _from_flat_format(sd, params, fix):
    """The flat state dict FlatAdamW wrote before 2026-11-30 in today's format: the moments (N,) cut
    into per-parameter arrays along ``sizes``, every parameter at step ``t`` (none before the first
    taken step), the groups' parameter counts ``n_params`` turned into indices."""
    sizes = [int(s) for s in sd["sizes"]]
    if sizes != [int(p.size) for p in params]:
        raise ValueError(f"the state dict was saved for parameters of sizes {sizes}; {fix}")
    ends = np.cumsum(sizes)
    moments = {k: np.split(np.asarray(sd[k]), ends[:-1]) for k in ("exp_avg", "exp_avg_sq")}
    t = int(sd["t"])
    state = [{"step": t, **{k: moments[k][i].reshape(p.shape) for k in moments}} if t else {}
             for i, p in enumerate(params)]
    groups, start = [], 0
    for g in sd["param_groups"]:
        n = int(g["n_params"])
        groups.append({**{k: v for k, v in g.items() if k != "n_params"}, "params": list(range(start, start + n))})
        start += n
    return {"step": int(sd["step"]), "param_groups": groups, "state": state, "scaler": sd["scaler"]}
