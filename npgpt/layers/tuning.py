"""Tuning constants, one table per backend. Each value is a measured choice; its line names the
section of ``benchmarks/RESULTS.md`` ("Tuning constants") that holds the measurement.

Read a value with ``tuned(xp, name)``; tests and benchmarks may change the table in place
(``TUNING["numpy"]["attention_chunked_min_t"] = 1``).
"""
import numpy as np

__all__ = ["TUNING", "tuned", "backend_name"]

TUNING = {
    "numpy": {
        "attention_chunked_min_t": 512,      # RESULTS.md: attention, materialized vs chunked (NumPy)
        "attention_block_rows": 128,         # RESULTS.md: attention, query rows per block (NumPy)
        "attention_block_bytes": 64 << 20,   # cap on one block's float32 scores (memory, not speed)
        "embedding_one_hot_max_vocab": 128,  # RESULTS.md: embedding backward, scatter-add methods
        "threads": 2,                        # RESULTS.md: elementwise work over a thread pool
        "threads_min_elements": 1 << 18,     # RESULTS.md: elementwise work over a thread pool
    },
    "cupy": {
        "attention_chunked_min_t": 256,      # RESULTS.md: attention on the H100, materialized vs chunked
        "attention_block_rows": 256,         # RESULTS.md: attention on the H100, block rows 128/256/512
        "attention_block_bytes": 256 << 20,  # cap on one block's float32 scores (memory, not speed)
        # the 16-byte-load kernels, where C and alignment allow: RESULTS.md, "GPU kernels measured on
        # the H200" (layer norm 0.094 vs 0.135 ms, cross-entropy 2.06 vs 3.58 ms at GPT-2 124M, fp16)
        "layer_norm_vectorized": True,
        "cross_entropy_vectorized": True,
        "elementwise_vectorized": True,      # GELU, bias + GELU, bias add: RESULTS.md, same section
        "fused_bias_gelu": True,             # the MLP's bias add and GELU as one node: RESULTS.md, same section
    },
}


def backend_name(xp):
    """"numpy" or "cupy" for an array module."""
    return "numpy" if xp is np else "cupy"


def tuned(xp, name):
    """The tuning constant ``name`` for array module ``xp``."""
    return TUNING[backend_name(xp)][name]
