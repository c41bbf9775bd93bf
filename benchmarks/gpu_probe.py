"""The GPU's ceilings as CuPy sees them, to judge the kernels against (one short run):
2-D GEMM TFLOP/s in fp32, TF32 and fp16; batched (attention-shaped) matmul in fp32 and fp16;
device-to-device copy bandwidth; the CPU cost of one small kernel launch.

    python benchmarks/gpu_probe.py
"""
import time

import numpy as np

from npgpt import backend


def timeit(fn, reps=20):
    """Median seconds of fn() measured with CUDA events, after 3 warm-up calls."""
    cp = backend.xp
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return float(np.median(ts))


def main():
    cp = backend.use("cupy")
    rng = cp.random.default_rng(0)
    M, K, N = 16384, 768, 3072                          # (B*T, C) @ (C, 4C) of GPT-2 small
    rows = []
    for name, dt, tf32 in (("fp32", np.float32, False), ("tf32", np.float32, True), ("fp16", np.float16, False)):
        backend.set_tf32(tf32)
        a = rng.standard_normal((M, K), dtype=np.float32).astype(dt)
        b = rng.standard_normal((K, N), dtype=np.float32).astype(dt)
        t = timeit(lambda: a @ b)
        rows.append((f"2-D GEMM {M}x{K}x{N} {name}", f"{2 * M * K * N / t / 1e12:.1f} TFLOP/s"))
    backend.set_tf32(False)
    BH, T, hs = 16 * 12, 1024, 64                       # (B*NH, T, hs) @ (B*NH, hs, T)
    for name, dt in (("fp32", np.float32), ("fp16", np.float16)):
        q = rng.standard_normal((BH, T, hs), dtype=np.float32).astype(dt)
        k = rng.standard_normal((BH, hs, T), dtype=np.float32).astype(dt)
        t = timeit(lambda: cp.matmul(q, k))
        rows.append((f"batched matmul ({BH},{T},{hs})@({BH},{hs},{T}) {name}", f"{2 * BH * T * T * hs / t / 1e12:.1f} TFLOP/s"))
    x = cp.empty(256 * 2 ** 20, dtype=np.uint8)
    y = cp.empty_like(x)
    t = timeit(lambda: y.__setitem__(slice(None), x))
    rows.append(("device copy 256 MiB", f"{2 * x.nbytes / t / 1e12:.2f} TB/s (read + write)"))
    z = cp.ones(1024, dtype=np.float32)
    z *= 1.0
    backend.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        z *= 1.0
    t_launch = (time.perf_counter() - t0) / 2000
    backend.synchronize()
    rows.append(("small elementwise launch (CPU side)", f"{t_launch * 1e6:.1f} us"))
    rows += attention_rows(cp, timeit)
    rows += step_rows(cp)
    print("| probe | result |\n|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} |")


def step_rows(cp):
    """Where a GPT-2 124M fp16 training step goes (B=16, T=1024): GPU time of forward, backward and
    the optimizer step, and the CPU time to dispatch the whole step (if that is close to the step
    time, Python and kernel launches are the bottleneck, not the GPU)."""
    from npgpt import GPT, GPTConfig
    out = []
    for name, cfg, B in (("gpt2-124m", dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), 16),
                         ("small", dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65), 64)):
        model = GPT(GPTConfig(dropout=0.0, **cfg))
        opt = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), dtype="float16", max_grad_norm=1.0)
        x = cp.random.randint(0, cfg["vocab_size"], (B, cfg["block_size"]))
        parts = {"forward": [], "backward": [], "optimizer": [], "dispatch (CPU)": [], "step": []}
        for i in range(8):
            backend.synchronize()
            t0 = time.perf_counter()
            _, loss = model(x, x)
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
            t2 = time.perf_counter()
            backend.synchronize()
            t3 = time.perf_counter()
            _, loss = model(x, x)
            backend.synchronize()
            t4 = time.perf_counter()
            opt.backward(loss)
            backend.synchronize()
            t5 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            backend.synchronize()
            t6 = time.perf_counter()
            if i >= 3:
                parts["dispatch (CPU)"].append(t2 - t0)
                parts["step"].append(t3 - t0)
                parts["forward"].append(t4 - t3)
                parts["backward"].append(t5 - t4)
                parts["optimizer"].append(t6 - t5)
        for k, v in parts.items():
            out.append((f"{name} fp16 step: {k}", f"{np.median(v) * 1e3:.1f} ms"))
        del model, opt
        cp.get_default_memory_pool().free_all_blocks()
    return out


def attention_rows(cp, timeit):
    """Attention forward + backward, materialized vs chunked (block heights), GPT-2 small shapes."""
    import os
    from npgpt import Tensor
    from npgpt.layers import attention
    out = []
    B, NH, hs = 16, 12, 64
    for T in (256, 1024):
        for name, dt in (("fp16", np.float16), ("fp32", np.float32)):
            q, k, v = (Tensor(cp.random.standard_normal((B, NH, T, hs), dtype=np.float32).astype(dt),
                              requires_grad=True) for _ in range(3))
            g = cp.random.standard_normal((B, NH, T, hs), dtype=np.float32).astype(dt)
            for impl, bq in (("materialized", None), ("chunked", "128"), ("chunked", "256"), ("chunked", "512")):
                if bq:
                    os.environ["NPGPT_ATTENTION_BLOCK_Q"] = bq
                attention.set_impl(impl)

                def step():
                    y = attention.scaled_dot_product_attention(q, k, v, is_causal=True)
                    y.backward(g)
                    for t in (q, k, v):
                        t.grad = None
                try:
                    t = timeit(step, reps=5)
                    res = f"{t * 1e3:.2f} ms fwd+bwd"
                except Exception as e:          # report, keep probing
                    res = f"error: {type(e).__name__}: {e}"[:120]
                out.append((f"attention T={T} {name} {impl}{' block ' + bq if bq else ''}", res))
            os.environ.pop("NPGPT_ATTENTION_BLOCK_Q", None)
    attention.set_impl("auto")
    return out


if __name__ == "__main__":
    main()
