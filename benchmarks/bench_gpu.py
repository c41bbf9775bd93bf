"""Training throughput on a GPU: npgpt (CuPy) vs PyTorch eager, same architecture, same precision,
side by side in one run.

    python benchmarks/bench_gpu.py [--configs gpt2-124m small] [--precisions fp16 tf32 fp32]
                                   [--steps 10] [--warmup 3] [--batch B] [--accum A]
                                   [--json results.json] [--max-seconds 210] [--timeout 150]
    python benchmarks/bench_gpu.py --check     # CPU smoke test: tiny model on NumPy (and torch on the CPU)

Frameworks (--frameworks): "npgpt" (CuPy; ``configure_optimizer(flat=True, dtype=...)``, a FlatAdamW;
the vocabulary padded to a multiple of 64, attention "auto", the kernels of the tuning table and the
whole step replayed from a CUDA graph: what ``npgpt train`` runs by default), "npgpt-eager" (the same
without CUDA graphs) and its variants
"npgpt-flash" (NPGPT_ATTENTION=flash: the tensor-core FlashAttention-2 kernels), "npgpt-graphs"
(the whole step replayed from a CUDA graph, npgpt/cuda_graphs.py), "npgpt-graphs-micro" (only the
micro-steps' forward + backward replayed, the optimizer step eager), "npgpt-flash-graphs" (flash and
whole-step graphs), "npgpt-scalar" (the one-element-per-thread layer-norm and cross-entropy kernels
instead of the 16-byte-load ones, npgpt/layers/vectorized_kernels.py), "npgpt-ew" (flash, graphs and the
16-byte-load GELU and bias-add kernels), "npgpt-fused" (that plus the MLP's bias + GELU as one node) and "npgpt-nopad" (vocabulary 50257 unpadded); "torch-sdpa" (benchmarks/torch_gpt.py's TorchGPT, eager,
F.scaled_dot_product_attention), "torch-math" (the same with the (B, NH, T, T) softmax attention
written out, as npgpt's materialized path computes it) and "torch-compile" (torch-sdpa under
torch.compile; its compile time is in first_step_s, not in the timed steps).
Precisions: fp32 (TF32 off everywhere), tf32 (float32 storage, TF32 tensor-core matmuls: npgpt
``backend.set_tf32``, torch ``allow_tf32`` / ``set_float32_matmul_precision("high")``) and fp16
(npgpt: fp16 model, float32 master weights, dynamic loss scaling; torch: ``autocast(float16)`` with
fp32 weights and ``GradScaler``).

One step: ``accum`` micro-batches of forward + backward (loss / accum), global-norm clipping at 1.0,
AdamW (torch: fused, like npgpt's one-pass flat step; --torch-adamw), zero the gradients. Each
measurement runs ``warmup`` steps, then ``steps`` timed ones with the GPU synchronized before each
clock read; it reports the median step time, tokens/s = B * T * accum / step, and
MFU = tokens/s * flops_per_token / peak, with flops_per_token = 6 N + 12 L H Q T (N: the parameters
of the real 50257-token model, the tied head counted once and vocabulary padding not at all; the
same number for every framework) and the detected GPU's data-sheet dense peak
(``npgpt.costs.gpu_peak``: fp16 tensor, TF32 tensor, or FP32 without tensor cores, since fp32
matmuls here do not use them); a GPU not in that table gets no MFU ("n/a") rather than a guess. Peak memory: npgpt = high-water of the bytes CuPy's memory
pool holds (cached free blocks included; sampled after every step, the pool never shrinks by itself);
torch = torch.cuda.max_memory_allocated (max_memory_reserved, the pool's counterpart, is in the JSON).

Each framework + precision runs in a fresh subprocess (so CuPy's and torch's memory pools never
meet) with a per-subprocess timeout; inside it the configs run small first, and between
measurements the pool's cached blocks are freed (torch: empty_cache and reset peak counters).
Each measurement is printed as soon as it is done, so a timeout or crash loses only what was still
running; a failure is reported in its table row and the rest go on. --max-seconds caps the whole
run: subprocesses that would start past it are skipped (and the last one is cut at the budget).
Precisions go fp16, tf32, fp32, so a tight budget drops the least interesting. The default run
(6 subprocesses) should take about 2-3 minutes on an H100, at most --max-seconds (210) plus a
few seconds; CuPy compiles its kernels on first use (set CUPY_CACHE_DIR to keep them).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = {
    # GPT-2 small (124M, vocabulary 50257; padded to 50304 = 786 x 64: npgpt by vocab_multiple, torch as
    # nanoGPT does, with 47 never-used rows)
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch_size=16),
    # bench_train.py's "small" character-level model
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch_size=64),
    # --check: a tiny model to run every code path on the CPU in seconds
    "check": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128, batch_size=2),
}
PRECISIONS = ("fp16", "tf32", "fp32")
FRAMEWORKS = ("npgpt", "npgpt-eager", "npgpt-flash", "npgpt-graphs", "npgpt-graphs-micro", "npgpt-flash-graphs", "npgpt-scalar",
              "npgpt-ew", "npgpt-fused", "npgpt-nopad", "torch-sdpa", "torch-math", "torch-compile")
DEFAULT_FRAMEWORKS = ("npgpt", "npgpt-eager", "torch-sdpa", "torch-compile")
# npgpt variant -> (attention implementation, CUDA graphs: False / "step" / "micro", vocab_multiple,
# changes to the CuPy tuning table, layers/tuning.py)
_EW = {"elementwise_vectorized": True}
NPGPT_VARIANTS = {"npgpt": ("auto", "step", 64, {}), "npgpt-eager": ("auto", False, 64, {}),
                  "npgpt-flash": ("flash", False, 64, {}),
                  "npgpt-graphs": ("auto", "step", 64, {}), "npgpt-graphs-micro": ("auto", "micro", 64, {}),
                  "npgpt-flash-graphs": ("flash", "step", 64, {}),
                  "npgpt-scalar": ("auto", False, 64, {"layer_norm_vectorized": False, "cross_entropy_vectorized": False}),
                  "npgpt-ew": ("flash", "step", 64, _EW), "npgpt-fused": ("flash", "step", 64, {**_EW, "fused_bias_gelu": True}),
                  "npgpt-nopad": ("auto", False, 1, {})}
PRECISION_DTYPE = {"fp16": ("float16", False), "tf32": ("float32", True), "fp32": ("float32", False)}
TUNING_DEFAULTS = {}
RESULT = "RESULT "       # prefix of the JSON lines a child prints, one per measurement


# ---------------------------------------------------------------------------------------------
# child: one framework and one precision, every requested config, in this process
# ---------------------------------------------------------------------------------------------

def model_shape(name, args):
    """(config without batch_size, micro-batch size)."""
    c = dict(CONFIGS[name])
    B = c.pop("batch_size")
    return c, args.batch or B


def host_batches(c, B, accum):
    """``accum`` micro-batches of random token ids (x, y), each (B, T) int64 NumPy arrays."""
    import numpy as np
    rng = np.random.default_rng(0)
    shape = (B, c["block_size"])
    return [(rng.integers(0, c["vocab_size"], shape), rng.integers(0, c["vocab_size"], shape))
            for _ in range(accum)]


def time_steps(step, sync, memory, warmup, steps):
    """Run ``warmup + steps`` steps; returns (timed step seconds, first step seconds, peak memory)."""
    times, peak, first = [], 0, None
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        dt = time.perf_counter() - t
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
        peak = max(peak, memory())
    return times, first, peak


def peak_of(device_name, precision):
    """(dense peak FLOP/s or None, its source) of the GPU, from npgpt's data-sheet table."""
    sys.path.insert(0, ROOT)
    from npgpt.costs import gpu_peak
    return gpu_peak(device_name, *PRECISION_DTYPE[precision])


def real_flops_per_token(c):
    """6 N + 12 L H Q T of the config with its real vocabulary (tied head once, no padding rows)."""
    C, L, T = c["n_embd"], c["n_layer"], c["block_size"]
    V = c["vocab_size"]
    per_block = 12 * C * C + 13 * C            # qkv, proj, fc, proj weights + biases + 2 layer norms
    N = V * C + T * C + L * per_block + 2 * C
    return 6 * N + 12 * L * C * T


def summarize(times, tokens_per_step, flops_per_token, precision, device_name):
    import numpy as np
    med = float(np.median(times))
    tps = tokens_per_step / med
    peak, source = peak_of(device_name, precision)
    return {"median_ms": 1000 * med, "min_ms": 1000 * min(times), "max_ms": 1000 * max(times),
            "tokens_per_s": tps, "flops_per_token": int(flops_per_token), "peak_flops": peak, "peak_source": source,
            "mfu": None if peak is None else tps * flops_per_token / peak, "steps_ms": [1000 * t for t in times]}


def child(args):
    """Measure every (config, variant) of this child's framework and precision; print one RESULT line
    each as soon as it is done (a later timeout or crash keeps the earlier lines). A failure of one
    measurement (out of memory, say) is printed as its result and the next one runs."""
    fw, precision = args.child
    device = "cpu" if set(args.child_configs) == {"check"} else "cuda"
    variants = args.attention if fw == "npgpt" else [f"torch-{a}" for a in args.attention]
    setup = setup_npgpt if fw == "npgpt" else setup_torch
    measure = setup(device, precision)
    for name in args.child_configs:
        for variant in variants:
            try:
                out = measure(name, variant, args)
            except Exception as e:
                out = {"framework": variant, "error": f"{type(e).__name__}: {e}"[:500]}
            out.update(config=name, precision=precision)
            print(RESULT + json.dumps(out), flush=True)


def setup_npgpt(device, precision):
    sys.path.insert(0, ROOT)           # the working tree's npgpt, installed or not
    import inspect
    from npgpt import backend, GPT
    if "flat" not in inspect.signature(GPT.configure_optimizer).parameters:
        raise SystemExit("this npgpt has no flat/mixed-precision optimizer (GPT.configure_optimizer(flat=True, "
                         "dtype=...)); update the working tree")
    backend.use("cupy" if device == "cuda" else "numpy")    # raises one BackendError line without a GPU
    backend.set_tf32(precision == "tf32")
    backend.set_default_dtype("float32")
    return lambda name, variant, args: measure_npgpt(name, precision, args, variant)


def measure_npgpt(name, precision, args, variant="npgpt"):
    """One npgpt GPT trained with a FlatAdamW (fp16: fp16 model, fp32 master weights, loss scaling),
    configured as ``NPGPT_VARIANTS[variant]``."""
    import numpy as np
    from npgpt import backend, GPT, GPTConfig
    from npgpt import cuda_graphs
    from npgpt.layers import attention
    from npgpt.layers import tuning
    impl, graphs, multiple, tuned = NPGPT_VARIANTS[variant]
    attention.set_impl(impl)
    cuda_graphs.WHOLE_STEP = graphs == "step"
    defaults = TUNING_DEFAULTS.setdefault("cupy", dict(tuning.TUNING["cupy"]))   # as the child started
    tuning.TUNING["cupy"].update(defaults, **tuned)
    xp = backend.xp
    if xp is np:
        def memory():
            return 0
    else:
        pool = xp.get_default_memory_pool()
        pool.free_all_blocks()          # what an earlier config left cached
        device = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]

        def memory():
            return pool.total_bytes()
    c, B = model_shape(name, args)
    backend.seed(0)
    t0 = time.perf_counter()
    model = GPT(GPTConfig(dropout=0.0, bias=True, vocab_multiple=multiple, **c))
    opt = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), flat=True,
                                    dtype="float16" if precision == "fp16" else "float32", max_grad_norm=1.0)
    batches = [(xp.asarray(x), xp.asarray(y)) for x, y in host_batches(c, B, args.accum)]
    scale = None if args.accum == 1 else 1.0 / args.accum
    losses = []

    def eager_step():
        for x, y in batches:
            _, loss = model(x, y)
            opt.backward(loss if scale is None else loss * scale)
        opt.step()
        opt.zero_grad()
        losses.append(loss.data)       # read after the timing: reading it here would synchronize

    def graphed_step():
        losses.append(graphed().data)

    graphed = None
    if graphs:                         # the step (or micro-steps) replayed from a CUDA graph, recorded first
        cycle = iter(batches * (args.warmup + args.steps + 1))
        graphed = cuda_graphs.graphed_train_step("on", model, opt, lambda: next(cycle), args.accum)
    step = graphed_step if graphs else eager_step

    setup = time.perf_counter() - t0
    times, first, peak = time_steps(step, backend.synchronize, memory, args.warmup, args.steps)
    dev_name = "cpu" if xp is np else (device.decode() if isinstance(device, bytes) else str(device))
    out = summarize(times, B * c["block_size"] * args.accum, real_flops_per_token(c), precision, dev_name)
    out.update(framework=variant, attention=impl, cuda_graphs=graphs, tuning=tuned, vocab_rows=model.transformer.wte.weight.shape[0],
               params=model.num_params(), batch=B, setup_s=setup, first_step_s=first,
               peak_mem_bytes=int(peak) if xp is not np else None,
               first_loss=float(losses[0]), last_loss=float(losses[-1]),
               skipped_steps=opt.skipped_steps if opt.mixed else 0,
               loss_scale=opt.loss_scale if opt.mixed else None,
               versions={"numpy": np.__version__, "cupy": None if xp is np else xp.__version__},
               device=(platform.processor() or "cpu") if xp is np else
               (device.decode() if isinstance(device, bytes) else str(device)))
    return out


def setup_torch(device, precision):
    sys.path.insert(0, HERE)
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"PyTorch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda})")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return lambda name, variant, args: measure_torch(name, precision, device, variant.split("-", 1)[1], args)


def padded(c, multiple=64):
    """The config with its vocabulary rounded up to a multiple of 64, as nanoGPT pads GPT-2's."""
    return {**c, "vocab_size": -(-c["vocab_size"] // multiple) * multiple} if c["vocab_size"] > 1000 else c


def measure_torch(name, precision, device, attention, args):
    """One TorchGPT (``attention`` "sdpa", "math", or "compile": sdpa under torch.compile) timed like
    npgpt; fp16 = autocast + GradScaler."""
    import numpy as np
    import torch
    from types import SimpleNamespace
    from torch_gpt import TorchGPT
    c, B = model_shape(name, args)
    c_real, c = c, padded(c)
    compiled = attention == "compile"
    attention = "sdpa" if compiled else attention
    cuda = device == "cuda"
    fp16 = precision == "fp16"
    dev = torch.device(device)
    if cuda:
        torch.cuda.empty_cache()        # what an earlier measurement left cached
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with dev:                           # parameters are created on the device
        model = TorchGPT(SimpleNamespace(dropout=0.0, bias=True, **c), attention=attention)
    forward = torch.compile(model) if compiled else model
    fused = {"fused": True, "foreach": False, "default": None}[args.torch_adamw] if cuda else None
    opt = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), fused=fused)
    scaler = torch.amp.GradScaler(device, enabled=fp16)
    autocast = torch.autocast(device, dtype=torch.float16, enabled=fp16)
    params = list(model.parameters())
    xs = [(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)) for x, y in host_batches(c, B, args.accum)]
    losses = []

    def step():
        for x, y in xs:
            with autocast:
                _, loss = forward(x, y)
            scaler.scale(loss / args.accum).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    setup = time.perf_counter() - t0
    times, first, _ = time_steps(step, torch.cuda.synchronize if cuda else (lambda: None), lambda: 0,
                                 args.warmup, args.steps)
    n = sum(p.numel() for p in params)
    out = summarize(times, B * c["block_size"] * args.accum, real_flops_per_token(c_real), precision,
                    torch.cuda.get_device_name() if cuda else "cpu")
    out.update(framework="torch-compile" if compiled else f"torch-{attention}", params=n, batch=B, setup_s=setup,
               first_step_s=first,
               peak_mem_bytes=torch.cuda.max_memory_allocated() if cuda else None,
               peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
               first_loss=float(losses[0]), last_loss=float(losses[-1]),
               loss_scale=float(scaler.get_scale()) if fp16 else None,
               versions={"numpy": np.__version__, "torch": torch.__version__, "cuda": torch.version.cuda},
               adamw=args.torch_adamw if cuda else "default",
               device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu")
    return out


# ---------------------------------------------------------------------------------------------
# parent: plan the runs, launch the children, print the table
# ---------------------------------------------------------------------------------------------

def fail(msg):
    print(f"bench_gpu: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def preflight(frameworks):
    """One clear line and exit 2 when the GPU stack a framework needs is missing. Creates no CUDA
    context (device counts only), so the children get the whole GPU."""
    if any(f.startswith("npgpt") for f in frameworks):
        if importlib.util.find_spec("cupy") is None:
            fail("CuPy is not installed: pip install cupy-cuda12x (or cupy-cuda13x, to match the CUDA "
                 "version nvidia-smi shows); --frameworks torch-sdpa torch-math skips npgpt; --check runs on the CPU")
        try:
            import cupy
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            fail(f"CuPy is installed but cannot reach a GPU ({type(e).__name__}: {e}); --check runs on the CPU")
        if n < 1:
            fail("CuPy found no CUDA GPU; --check runs on the CPU")
    if any(f.startswith("torch") for f in frameworks):
        if importlib.util.find_spec("torch") is None:
            fail("PyTorch is not installed (pip install torch, a CUDA build); --frameworks npgpt skips it")
        import torch
        if not torch.cuda.is_available():
            fail(f"PyTorch {torch.__version__} has no usable CUDA GPU (built for CUDA {torch.version.cuda}): install "
                 "a CUDA build of torch, or --frameworks npgpt")


COST = {"check": 0, "small": 1, "gpt2-124m": 2}   # a child measures the cheap configs first


def plan(configs, precisions, frameworks):
    """[(precision, child framework, [configs], [expected result names])], the most interesting
    precision first; npgpt and the torch variants of one precision are two children."""
    runs = []
    attentions = [f.split("-", 1)[1] for f in frameworks if f.startswith("torch-")]
    npgpts = [f for f in frameworks if f.startswith("npgpt")]
    configs = sorted(configs, key=COST.get)
    for prec in sorted(precisions, key=PRECISIONS.index):
        if npgpts:
            runs.append((prec, "npgpt", configs, npgpts))
        if attentions:
            runs.append((prec, "torch", configs, [f"torch-{a}" for a in attentions]))
    return runs


def launch(run, args, timeout):
    """Run one child; returns its result dicts (an error dict for each measurement it did not report)."""
    prec, fw, configs, names = run
    cmd = [sys.executable, os.path.abspath(__file__), "--child", fw, prec, "--child-configs", *configs,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--accum", str(args.accum),
           "--torch-adamw", args.torch_adamw]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    cmd += ["--attention", *(names if fw == "npgpt" else [n.split("-", 1)[1] for n in names])]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        stdout, stderr, err = p.stdout, p.stderr, None if p.returncode == 0 else f"exit code {p.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout, stderr = _text(e.stdout), _text(e.stderr)
        err = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t
    results = [json.loads(line[len(RESULT):]) for line in stdout.splitlines() if line.startswith(RESULT)]
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    got = {(r["config"], r["framework"]) for r in results}
    for cfg in configs:
        for name in names:
            if (cfg, name) not in got:
                msg = f"{err or 'no result'}: {last}" if last else (err or "no result")
                results.append({"config": cfg, "precision": prec, "framework": name, "error": msg,
                                "stderr_tail": stderr[-3000:]})
    for r in results:
        r["child_wall_s"] = wall
    return results


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def fmt_row(r, ref):
    """A markdown table row; ``ref`` is the npgpt result of the same config and precision (or None)."""
    bad = "error" not in r and not math.isfinite(r["last_loss"])
    head = f"| {r['config']} | {r['precision']} | {r['framework']}{' (loss not finite!)' if bad else ''} |"
    if "error" in r:
        msg = r["error"].replace("|", "/").replace("\n", " ")[:200]
        return f"{head} {msg if msg.startswith('skipped') else 'failed: ' + msg} | | | | |"
    mem = r.get("peak_mem_bytes")
    mem = "-" if mem is None else f"{mem / 2**30:.2f}"
    if r.get("peak_reserved_bytes") is not None:
        mem += f" (reserved {r['peak_reserved_bytes'] / 2**30:.2f})"
    ratio = "-"
    if r["framework"] != "npgpt" and ref is not None and "error" not in ref:
        ratio = f"{ref['tokens_per_s'] / r['tokens_per_s']:.2f}x"
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return f"{head} {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {ratio} |"


def table(results):
    lines = ["| config | precision | framework | step ms (median) | tokens/s | MFU | peak GB | npgpt/this tokens/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ref = next((q for q in results if q["framework"] == "npgpt" and q["config"] == r["config"]
                    and q["precision"] == r["precision"]), None)
        lines.append(fmt_row(r, ref))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["gpt2-124m", "small"], choices=["gpt2-124m", "small"])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--frameworks", nargs="+", default=list(DEFAULT_FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--batch", type=int, default=None,
                    help="micro-batch size for every config (default: gpt2-124m 16, small 64)")
    ap.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches per step (default 1)")
    ap.add_argument("--torch-adamw", choices=["fused", "foreach", "default"], default="fused",
                    help="torch's AdamW implementation on the GPU (default fused: one kernel, as npgpt's flat step)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (rewritten after every run)")
    ap.add_argument("--max-seconds", type=float, default=210.0,
                    help="total budget; runs that would start later are skipped (default 210)")
    ap.add_argument("--timeout", type=float, default=150.0, help="limit per subprocess in seconds (default 150)")
    ap.add_argument("--check", action="store_true",
                    help="CPU smoke test: the tiny 'check' config, fp32 and fp16, npgpt on NumPy (and torch on the "
                         "CPU when installed); no GPU needed")
    ap.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "PRECISION"), help=argparse.SUPPRESS)
    ap.add_argument("--child-configs", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--attention", nargs="+", default=["sdpa"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.accum < 1 or (args.batch is not None and args.batch < 1):
        ap.error("need --steps >= 1, --warmup >= 0, --accum >= 1, --batch >= 1")
    if args.child:
        child(args)
        return

    start = time.perf_counter()
    if args.check:
        configs, precisions = ["check"], ["fp16", "fp32"]
        frameworks = [f for f in args.frameworks if f in ("npgpt-eager", "npgpt-flash", "npgpt-scalar", "npgpt-nopad")
                      or (f in ("torch-sdpa", "torch-math") and importlib.util.find_spec("torch") is not None)]
        device = "cpu (NumPy backend; peaks and MFU are meaningless here)"
    else:
        configs, precisions, frameworks = args.configs, args.precisions, args.frameworks
        preflight(frameworks)
        device = "cuda"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "device": device,
            "peak_note": "per result: peak_flops / peak_source, the detected GPU's data-sheet dense peak",
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "child_configs", "attention")},
            "configs": {k: CONFIGS[k] for k in configs}}
    print(f"bench_gpu: {device}; {args.warmup} warm-up + {args.steps} timed steps; accum {args.accum}; "
          f"MFU against the detected GPU's data-sheet dense peak (npgpt.costs.gpu_peak)", flush=True)
    results = []
    for run in plan(configs, precisions, frameworks):
        left = args.max_seconds - (time.perf_counter() - start)
        if left < 15:
            rs = [{"config": c, "precision": run[0], "framework": n,
                   "error": f"skipped: over the {args.max_seconds:.0f} s budget"} for c in run[2] for n in run[3]]
        else:
            rs = launch(run, args, min(args.timeout, left))
        results.extend(rs)
        for r in rs:
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            status = r.get("error") or (f"{r['median_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s, "
                                        f"MFU {mfu}, first step {r['first_step_s']:.1f} s")
            print(f"  {r['precision']:4s} {r['config']:9s} {r['framework']:10s} {status}", flush=True)
        if rs and "child_wall_s" in rs[0]:
            print(f"  ({run[1]} {run[0]} child: {rs[0]['child_wall_s']:.0f} s)", flush=True)
        if args.json:
            write_json(args.json, meta, results, time.perf_counter() - start)
    order = {c: i for i, c in enumerate(configs)}
    results.sort(key=lambda r: (PRECISIONS.index(r["precision"]), order[r["config"]], FRAMEWORKS.index(r["framework"])))
    devices = sorted({r["device"] for r in results if "device" in r})
    print(f"\n{', '.join(devices) or device}; total {time.perf_counter() - start:.0f} s\n")
    print(table(results))
    print("\n" + "\n".join(targets(results)))
    if args.json:
        write_json(args.json, meta, results, time.perf_counter() - start)
        print(f"\nwrote {args.json}")
    if args.check and any("error" in r for r in results):
        raise SystemExit(1)


def targets(results):
    """Issue 15's targets per config and precision: the best npgpt variant against torch-sdpa
    (>= 1.0x; GPT-2 124M also >= 25 % MFU), from measured rows only."""
    lines = ["targets (best npgpt variant vs torch-sdpa, eager):"]
    for cfg, prec in sorted({(r["config"], r["precision"]) for r in results}):
        ok = [r for r in results if r["config"] == cfg and r["precision"] == prec and "error" not in r]
        ours = max((r for r in ok if r["framework"].startswith("npgpt")), key=lambda r: r["tokens_per_s"], default=None)
        sdpa = next((r for r in ok if r["framework"] == "torch-sdpa"), None)
        if ours is None or sdpa is None:
            lines.append(f"  {cfg} {prec}: not measured (npgpt {'ok' if ours else 'missing'}, torch-sdpa "
                         f"{'ok' if sdpa else 'missing'})")
            continue
        ratio = ours["tokens_per_s"] / sdpa["tokens_per_s"]
        mfu = "n/a" if ours.get("mfu") is None else f"{100 * ours['mfu']:.1f}%"
        lines.append(f"  {cfg} {prec}: {ours['framework']} {ratio:.2f}x torch-sdpa ({'met' if ratio >= 1 else 'NOT met'}"
                     f" >= 1.0x), MFU {mfu}")
    return lines


def write_json(path, meta, results, elapsed):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": {**meta, "elapsed_s": elapsed}, "results": results}, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
