"""Peak memory of ``GPT.from_hf`` on a GPT-2 124M-sized checkpoint (random weights, float32).

Writes a synthetic ``config.json`` + ``model.safetensors`` (GPT-2 small's shapes, including the
``attn.bias`` buffers the hub file carries), then loads it in a fresh process and reports the peak
resident set size (``VmHWM``, or ``ru_maxrss`` off Linux) above the process's size before the load, as a multiple of the
weights' bytes. The file is mapped by safetensors, so pages it touched count toward the RSS too.

    python benchmarks/bench_hf_memory.py [--dir DIR] [--n_layer 12]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def write_checkpoint(path, n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024):
    import numpy as np
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    C = n_embd
    shapes = {"wte.weight": (vocab_size, C), "wpe.weight": (n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                       p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
                       p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                       p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
                       p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)})
    tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    for i in range(n_layer):   # the hub's gpt2 file stores the causal mask buffer too
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n_positions, n_positions), np.float32))[None, None]
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_positions": n_positions, "n_embd": C, "n_layer": n_layer, "n_head": 12,
                   "vocab_size": vocab_size, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}, f)
    return sum(t.nbytes for k, t in tensors.items() if not k.endswith("attn.bias"))


MEASURE = r"""
import resource, sys, time
import npgpt
from npgpt import GPT

def peak_rss():  # VmHWM is this process's own high-water mark; ru_maxrss can carry the parent's over exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before = peak_rss()
t0 = time.time()
m = GPT.from_hf(sys.argv[1])
dt = time.time() - t0
peak = peak_rss()
weights = sum(p.data.nbytes for p in m.parameters())
print(f"{before} {peak} {weights} {dt}")
"""


def measure(path):
    """(rss before the load, peak rss, parameter bytes, seconds) of loading ``path`` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, path], check=True, capture_output=True, text=True).stdout
    before, peak, weights, dt = out.split()
    return int(before), int(peak), int(weights), float(dt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--n_layer", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or os.path.join(tmp, "gpt2-synthetic")
        write_checkpoint(path, n_layer=args.n_layer)
        before, peak, weights, dt = measure(path)
    mb = 2 ** 20
    print(f"weights {weights / mb:.0f} MiB; rss before load {before / mb:.0f} MiB, peak {peak / mb:.0f} MiB; "
          f"load added {(peak - before) / mb:.0f} MiB = {(peak - before) / weights:.2f}x the weights; {dt:.2f} s")


if __name__ == "__main__":
    main()
