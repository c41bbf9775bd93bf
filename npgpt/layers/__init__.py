"""The fused layers: each is ONE graph node whose backward is written out by hand.

One file per layer, every file in the same order: the derivation (numbered equations) in the module
docstring, ``<layer>_reference`` composed from engine primitives (the oracle of the tests), the
NumPy forward and backward, the CUDA twin and its launcher, and a few lines of dispatch::

    linear.py          y = x W + b                         (L1)-(L4)
    embedding.py       rows of a table, scatter-add back   (E1)-(E3)
    layer_norm.py      LayerNorm                           (N1)-(N7)
    residual_layer_norm.py   residual add + LayerNorm in one pass (CUDA)   (RN1)-(RN5)
    gelu.py            GELU, tanh approximation            (G1)-(G4)
    bias_gelu.py       bias add + GELU in one pass (CUDA)  (BG1)-(BG4)
    softmax.py         softmax over one axis               (S1)-(S2)
    cross_entropy.py   softmax cross-entropy               (X1)-(X4)
    dropout.py         inverted dropout                    (D1)-(D2)
    lora.py            linear + low-rank adapter           (R1)-(R7)
    attention.py       scaled dot-product attention, the materialized path and the dispatch
    attention_chunked.py   its query-block (FlashAttention-2-style) path and CUDA kernels
    flash_attention.py     FlashAttention-2 on tensor cores: the tiled derivation, a NumPy emulation
                           of the kernels (flash_attention_cuda.py forward, _cuda_backward.py backward)
    _cuda.py           the switch, CUDA prelude, kernel cache and launch helpers shared by all kernels
    _threads.py        elementwise NumPy work over a small thread pool
    tuning.py          measured constants, one table per backend

``npgpt.functional`` re-exports the public layers.
"""
