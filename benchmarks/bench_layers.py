"""Forward + backward time of each fused layer in ``npgpt.functional`` vs PyTorch eager, float32,
same thread count, shapes from the 'small' config (B=8, T=256, C=384, NH=6, V=65).

    python benchmarks/bench_layers.py [--threads 2] [--repeat 20] [--only gelu attention ...]

Prints the best (minimum) time of forward, and of forward + backward, over --repeat runs for each and
the ratio npgpt/torch; the minimum is the least disturbed by other processes sharing the CPU.
A separate section times the embedding backward (the scatter-add) with its alternatives at V=65 and
V=50257, which is how ``functional.embedding`` chooses its method.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

B, T, C, NH, V = 8, 256, 384, 6, 65
hs = C // NH


def best_time(fn, repeat):
    fn()  # warm up (allocations, caches)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.min(ts))


def cases(rng):
    """name -> (shapes text, npgpt builder, torch builder). A builder returns (forward, backward-of-forward)."""
    import torch
    import torch.nn.functional as TF
    import npgpt
    from npgpt import Tensor
    from npgpt import functional as F

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ours(fn, inputs, grad=None):
        def fwd():
            ts = [Tensor(a, requires_grad=True) if a.dtype.kind == "f" else a for a in inputs]
            return fn(*ts)

        def both():
            out = fwd()
            out.backward(grad if grad is not None and out.size > 1 else None)
        return fwd, both

    def theirs(fn, inputs, grad=None):
        def fwd():
            ts = [torch.from_numpy(a).requires_grad_(a.dtype.kind == "f") for a in inputs]
            return fn(*ts)

        def both():
            out = fwd()
            out.backward(torch.from_numpy(grad) if grad is not None and out.numel() > 1 else None)
        return fwd, both

    x, w_fc, b_fc = arr(B, T, C), arr(C, 4 * C, scale=0.02), arr(4 * C)
    h = arr(B, T, 4 * C)
    ln_w, ln_b = arr(C) + 1, arr(C)
    ids = rng.integers(0, V, (B, T))
    wte = arr(V, C, scale=0.02)
    logits, targets = arr(B, T, V), rng.integers(0, V, (B, T))
    q, k, v = arr(B, NH, T, hs), arr(B, NH, T, hs), arr(B, NH, T, hs)
    s = arr(B, NH, T, T)
    g_c, g_4c, g_s, g_a = arr(B, T, C), arr(B, T, 4 * C), arr(B, NH, T, T), arr(B, NH, T, hs)
    npgpt.seed(0)
    return {
        "linear C->4C": (f"({B},{T},{C})@({C},{4 * C})",
                         ours(F.linear, [x, w_fc, b_fc], g_4c),
                         theirs(lambda a, w, b: a @ w + b, [x, w_fc, b_fc], g_4c)),
        "embedding V=65": (f"({B},{T}) ids, ({V},{C})",
                           ours(lambda w: F.embedding(ids, w), [wte], g_c),
                           theirs(lambda w: TF.embedding(torch.from_numpy(ids), w), [wte], g_c)),
        "layer_norm": (f"({B},{T},{C})",
                       ours(F.layer_norm, [x, ln_w, ln_b], g_c),
                       theirs(lambda a, w, b: TF.layer_norm(a, (C,), w, b), [x, ln_w, ln_b], g_c)),
        "gelu": (f"({B},{T},{4 * C})",
                 ours(F.gelu, [h], g_4c),
                 theirs(lambda a: TF.gelu(a, approximate="tanh"), [h], g_4c)),
        "softmax": (f"({B},{NH},{T},{T})",
                    ours(F.softmax, [s], g_s),
                    theirs(lambda a: torch.softmax(a, -1), [s], g_s)),
        "cross_entropy": (f"({B},{T},{V})",
                          ours(lambda a: F.cross_entropy(a, targets), [logits]),
                          theirs(lambda a: TF.cross_entropy(a.reshape(-1, V), torch.from_numpy(targets).reshape(-1)),
                                 [logits])),
        "attention causal": (f"({B},{NH},{T},{hs})",
                             ours(F.scaled_dot_product_attention, [q, k, v], g_a),
                             theirs(lambda a, b, c: TF.scaled_dot_product_attention(a, b, c, is_causal=True),
                                    [q, k, v], g_a)),
        "dropout p=0.1": (f"({B},{T},{C})",
                          ours(lambda a: F.dropout(a, 0.1), [x], g_c),
                          theirs(lambda a: TF.dropout(a, 0.1), [x], g_c)),
    }


def embedding_backward_methods():
    """The scatter-adds dW[ids[n]] += dout[n] compared here: the two of npgpt/layers/embedding.py
    ((E2) sorted + reduceat, (E3) one-hot GEMM) and two that lost (np.add.at, a bincount per column)."""
    from npgpt.layers.embedding import embedding_backward_one_hot, embedding_backward_sorted

    def add_at(ids, dout, V):
        dweight = np.zeros((V, dout.shape[1]), dout.dtype)
        np.add.at(dweight, ids, dout)
        return dweight

    def bincount_per_column(ids, dout, V):
        cols = [np.bincount(ids, weights=dout[:, c], minlength=V) for c in range(dout.shape[1])]
        return np.stack(cols, axis=1).astype(dout.dtype)

    return {"np.add.at": add_at, "sort + np.add.reduceat": embedding_backward_sorted,
            "bincount per column": bincount_per_column, "one-hot matmul": embedding_backward_one_hot}


def bench_embedding_backward(rng, repeat):
    """The scatter-add dW[ids[n]] += dout[n] by each method, at a small and a GPT-2-sized vocabulary."""
    rows = []
    for vocab in (65, 50257):
        ids = rng.integers(0, vocab, B * T)
        dout = rng.standard_normal((B * T, C)).astype(np.float32)
        ref = None
        for name, fn in embedding_backward_methods().items():
            got = fn(ids, dout, vocab)
            ref = got if ref is None else ref
            err = float(np.abs(got - ref).max())
            rows.append((vocab, name, best_time(lambda: fn(ids, dout, vocab), repeat), err))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of the layer names to run")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"float32, B={B} T={T} C={C} NH={NH} V={V}, torch {torch.__version__} with {args.threads} threads, "
          f"best of {args.repeat}, {len(os.sched_getaffinity(0))} CPUs usable by this process")
    header = (f"{'layer':18s} {'shape':24s} {'npgpt fwd':>10s} {'torch fwd':>10s} {'ratio':>6s}"
              f" {'npgpt f+b':>10s} {'torch f+b':>10s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for name, (shape, (of, ob), (tf, tb)) in cases(rng).items():
        if args.only and not any(s in name for s in args.only):
            continue
        tof, ttf = best_time(of, args.repeat), best_time(tf, args.repeat)
        tob, ttb = best_time(ob, args.repeat), best_time(tb, args.repeat)
        print(f"{name:18s} {shape:24s} {tof * 1e3:8.2f}ms {ttf * 1e3:8.2f}ms {tof / ttf:6.2f}"
              f" {tob * 1e3:8.2f}ms {ttb * 1e3:8.2f}ms {tob / ttb:6.2f}")
    if not args.only or any("gelu" in s for s in args.only):
        from npgpt.layers._threads import run_chunked
        from npgpt.layers.gelu import _gelu_forward_block
        h = rng.standard_normal((B * T, 4 * C)).astype(np.float32)
        out, s = np.empty_like(h), np.empty_like(h)
        one = best_time(lambda: _gelu_forward_block(h, out, s), args.repeat)
        split = best_time(lambda: run_chunked(_gelu_forward_block, h, out, s), args.repeat)
        print(f"\ngelu forward kernel on ({B * T},{4 * C}): one thread {one * 1e3:.2f}ms, "
              f"split over the pool {split * 1e3:.2f}ms")
    if not args.only or any("embedding" in s for s in args.only):
        print(f"\nembedding backward (scatter-add of {B * T} rows of width {C}):")
        for vocab, name, t, err in bench_embedding_backward(rng, args.repeat):
            print(f"  V={vocab:<6d} {name:22s} {t * 1e3:8.2f}ms   max diff {err:.1e}")


if __name__ == "__main__":
    main()
