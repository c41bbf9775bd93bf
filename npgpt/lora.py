"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear layer y = x W + b gets a trainable low-rank update:

    y = x W + b + s * dropout(x) A B,     A (in, r), B (r, out), s = alpha / r

A starts Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)) (the reference implementation's choice), and
B starts at zero, so an adapted model computes exactly what the base model did until B moves.
Only A and B train: r (in + out) numbers per layer instead of in * out.

    model, _ = npgpt.train.load_model("out-shakespeare-char")
    apply_lora(model, targets=("attn.c_attn", "attn.c_proj"), r=8, alpha=16)   # freezes the rest
    opt = AdamW(trainable_parameters(model), lr=1e-3)
    ...train...
    save_lora(model, "adapter.npz")        # only A, B and the adapter settings (small)
    merge_lora(model)                      # W += s A B; plain Linear layers again, same logits
"""
import fnmatch
import math

import numpy as np

from . import backend
from .checkpoint import save_checkpoint, load_checkpoint, CheckpointError
from .layers.lora import lora_linear
from .nn import Module, Linear, Parameter

__all__ = ["lora_linear", "LoRALinear", "apply_lora", "merge_lora", "save_lora", "load_lora",
           "lora_parameters", "trainable_parameters", "named_modules", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj")


class LoRALinear(Module):
    """A Linear with a low-rank adapter. It keeps the wrapped layer's own ``weight`` and ``bias``
    Parameters under the same names (so base checkpoints still load by name) and adds
    ``lora_A`` (in, r) and ``lora_B`` (r, out); the base weights are frozen."""

    def __init__(self, linear, r=8, alpha=16.0, dropout=0.0):
        if not isinstance(linear, Linear):
            raise TypeError(f"LoRALinear wraps an npgpt.nn.Linear, got {type(linear).__name__}")
        if not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.weight, self.bias = linear.weight, linear.bias
        n_in, n_out = self.weight.shape
        dtype, xp = self.weight.dtype, backend.get_array_module(self.weight.data)
        bound = 1.0 / math.sqrt(n_in)
        a = backend.rng().random((n_in, r), dtype=np.float32) * np.float32(2 * bound) - np.float32(bound)
        self.lora_A = Parameter(xp.asarray(a, dtype=dtype))                  # (in, r)
        self.lora_B = Parameter(xp.zeros((r, n_out), dtype=dtype))           # (r, out)
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.scale = self.alpha / self.r
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, p)

    def merged_linear(self):
        """A plain Linear holding W + s A B (the same Parameter objects, updated in place)."""
        self.weight.data += (self.lora_A.data * self.weight.dtype.type(self.scale)) @ self.lora_B.data
        lin = Linear.__new__(Linear)
        lin.weight, lin.bias = self.weight, self.bias
        lin.training = self.training
        return lin


def named_modules(module, prefix=""):
    """(dotted name, module) for ``module`` and every module inside it, parents first."""
    yield prefix.rstrip("."), module
    for name, child in list(module.named_children()):
        yield from named_modules(child, f"{prefix}{name}.")


def _matches(name, patterns):
    """True when a module's dotted name ends with one of ``patterns`` (shell wildcards allowed),
    e.g. "attn.c_attn" matches "transformer.h.3.attn.c_attn"."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model, targets=DEFAULT_TARGETS, r=8, alpha=16.0, dropout=0.0, freeze=True):
    """Replace, in place, every Linear whose name matches ``targets`` by a LoRALinear around it.

    targets: name suffixes or wildcards ("attn.c_attn", "mlp.c_fc", "h.3.*"). With ``freeze``
    (the default) every other parameter of ``model`` stops requiring gradients, so only the adapters
    train. Returns the list of adapted names; raises ValueError when nothing matched.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    hits = []
    for name, mod in list(named_modules(model)):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, Linear) and _matches(full, targets):
                setattr(mod, child_name, LoRALinear(child, r, alpha, dropout))
                hits.append(full)
    if not hits:
        linears = [n for n, m in named_modules(model) if isinstance(m, (Linear, LoRALinear))]
        raise ValueError(f"no Linear layer matches the LoRA targets {list(targets)}; the model's linear "
                         f"layers are e.g. {linears[:4]} (give suffixes such as 'attn.c_attn')")
    if freeze:
        for pname, p in model.named_parameters():
            p.requires_grad = pname.endswith(("lora_A", "lora_B"))
    model._lora_config = {"targets": list(targets), "r": int(r), "alpha": float(alpha),
                          "dropout": float(dropout), "layers": hits}
    return hits


def lora_parameters(model):
    """{name: Parameter} of the adapters (``...lora_A`` and ``...lora_B``)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def trainable_parameters(*modules):
    """The parameters of ``modules`` that require gradients (what an optimizer should get)."""
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def merge_lora(model):
    """Fold every adapter into its base weight (W += s A B) and put plain Linear layers back.
    The merged model gives the same outputs without the adapters' extra cost. Parameters keep
    their ``requires_grad`` flags (base weights stay frozen). Returns the number of merged layers."""
    n = 0
    for name, mod in list(named_modules(model)):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged_linear())
                n += 1
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return n


def save_lora(model, path):
    """Write only the adapters (A and B of each adapted layer) and their settings to ``path`` (.npz)."""
    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    config = dict(getattr(model, "_lora_config", {}))
    save_checkpoint(path, {"lora": {n: p.data for n, p in params.items()}, "lora_config": config})


def load_lora(model, path):
    """Load adapters saved by ``save_lora`` into ``model``: adds them first (with the saved targets,
    rank, alpha and dropout) when the model has none. Returns the model."""
    ck = load_checkpoint(path)
    if "lora" not in ck or "lora_config" not in ck:
        raise CheckpointError(f"{path} is an npgpt checkpoint but not a LoRA adapter file (save it with save_lora)")
    cfg = ck["lora_config"]
    if not lora_parameters(model):
        apply_lora(model, cfg["targets"], cfg["r"], cfg["alpha"], cfg.get("dropout", 0.0))
    params = lora_parameters(model)
    saved = ck["lora"]
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    bad = [f"{n}: file {saved[n].shape} vs model {params[n].shape}" for n in params
           if n in saved and tuple(saved[n].shape) != params[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"the adapters in {path} do not fit this model: missing {missing}, unexpected "
                         f"{unexpected}, shape mismatches {bad}; load them into the model they were trained on")
    for n, p in params.items():
        p.data[...] = backend.to_device(np.asarray(saved[n]), dtype=p.dtype)
    return model
