"""A PyTorch GPT-2 with npgpt's exact architecture and parameter layout: the oracle for parity
tests and the baseline for benchmarks. (Used only in tests and benchmarks.)

Linear weights are stored (in, out) like GPT-2's Conv1D and npgpt's, so state dicts copy 1:1.
Attention is ``F.scaled_dot_product_attention`` (fused kernels on a GPU) by default;
``attention="math"`` materialises the (B, NH, T, T) scores and softmax explicitly, as npgpt does.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv1D(nn.Module):
    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


ATTENTIONS = ("sdpa", "math")


class Block(nn.Module):
    def __init__(self, c, attention="sdpa"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.n_head = c.n_head
        self.attention = attention
        if attention == "math":   # True above the diagonal: the future positions to hide
            self.register_buffer("future", torch.ones(c.block_size, c.block_size, dtype=torch.bool).triu(1),
                                 persistent=False)
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(c.n_embd, 3 * c.n_embd, c.bias)
        self.attn.c_proj = Conv1D(c.n_embd, c.n_embd, c.bias)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(c.n_embd, 4 * c.n_embd, c.bias)
        self.mlp.c_proj = Conv1D(4 * c.n_embd, c.n_embd, c.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                  # (B, NH, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))              # (B, NH, T, T)
            att = F.softmax(att.masked_fill(self.future[:T, :T], float("-inf")), dim=-1)
            y = att @ v                                                                   # (B, NH, T, hs)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """Same names as npgpt.GPT: transformer.wte/wpe/h.{i}/ln_f, LM head tied to wte.
    ``attention``: "sdpa" (default) or "math" (explicit softmax(QK^T/sqrt(hs)) V)."""

    def __init__(self, c, attention="sdpa"):
        super().__init__()
        self.config = c
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.transformer.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.transformer.h = nn.ModuleList([Block(c, attention) for _ in range(c.n_layer)])
        self.transformer.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        for p in (self.transformer.wte.weight, self.transformer.wpe.weight):
            nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for b in self.transformer.h:
            x = b(x)
        logits = self.transformer.ln_f(x) @ self.transformer.wte.weight.T
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                                             ignore_index=-100)
        return logits, loss

    def configure_optimizer(self, lr, weight_decay, betas, fused=None):
        """AdamW, decay on matrices only; ``fused``: torch's implementation choice (None = its default,
        True = one fused CUDA kernel, False = the foreach/for-loop path)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        kw = {} if fused is None else {"fused": fused}
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8, **kw)


def from_npgpt(model, attention="sdpa"):
    """A TorchGPT holding a copy of an npgpt.GPT's weights (float32 or float64 as the model)."""
    import numpy as np
    sd = model.state_dict()
    t = TorchGPT(model.config, attention)
    dtype = torch.float64 if next(iter(sd.values())).dtype == np.float64 else torch.float32
    t = t.to(dtype)
    with torch.no_grad():
        for name, p in t.named_parameters():
            p.copy_(torch.from_numpy(np.ascontiguousarray(sd[name])))
    return t
