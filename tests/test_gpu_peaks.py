"""The GPU peak table behind MFU (``npgpt.costs.gpu_peak``): device names as drivers report them map
to their data-sheet dense peaks, more specific names first; unknown GPUs, missing modes and float64
get None and a reason instead of a made-up number; a run on such a GPU logs why it reports no MFU."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, Tensor
from npgpt import costs
from npgpt.costs import GPU_PEAKS_TFLOPS, gpu_peak
from npgpt.train import TrainConfig
from npgpt.train_helpers import RunLog

# device name (as CUDA reports it) -> expected (fp16, TF32, FP32) TFLOP/s, from the data sheets
KNOWN = {
    "NVIDIA H100 80GB HBM3": (989.4, 494.7, 66.9),
    "NVIDIA H100 PCIe": (756.0, 378.0, 51.0),
    "NVIDIA H100 NVL": (835.5, 417.5, 60.0),
    "NVIDIA H200": (989.4, 494.7, 66.9),
    "NVIDIA GH200 480GB": (989.4, 494.7, 66.9),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0, 19.5),
    "NVIDIA A10": (125.0, 62.5, 31.2),
    "NVIDIA L4": (121.0, 60.0, 30.3),
    "NVIDIA L40S": (362.05, 183.0, 91.6),
    "NVIDIA GeForce RTX 4090": (165.2, 82.6, 82.6),
    "NVIDIA GeForce RTX 3090": (71.0, 35.6, 35.6),
    "Tesla V100-SXM2-16GB": (125.0, None, 15.7),
    "Tesla V100-PCIE-32GB": (112.0, None, 14.0),
    "Tesla T4": (65.0, None, 8.1),
}


@pytest.mark.parametrize("name", KNOWN)
def test_known_gpus(name):
    fp16, tf32, fp32 = KNOWN[name]
    assert gpu_peak(name, "float16")[0] == pytest.approx(fp16 * 1e12)
    assert gpu_peak(name, "float32")[0] == pytest.approx(fp32 * 1e12)
    peak, source = gpu_peak(name, "float32", tf32=True)
    if tf32 is None:
        assert peak is None and "no data-sheet" in source
    else:
        assert peak == pytest.approx(tf32 * 1e12) and "TF32" in source
    assert "dense peak (data sheet)" in gpu_peak(name, "float16")[1]


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA B200", "Quadro P1000", ""])
def test_unknown_gpus_get_no_peak(name):
    """Near misses of table names (A10G is not an A10, a 3090 Ti not a 3090) and GPUs not in the table:
    None, and a reason that names the GPU and the table."""
    peak, source = gpu_peak(name, "float16")
    assert peak is None and "unknown GPU" in source and "GPU_PEAKS_TFLOPS" in source


def test_float64_has_no_tensor_core_peak():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "float64")[0] is None


def test_table_is_ordered_specific_first():
    """Every row is reachable: no earlier pattern swallows a later row's own label."""
    for i, (label, _, peaks) in enumerate(GPU_PEAKS_TFLOPS):
        name = f"NVIDIA {label}"
        first = next(j for j, (_, pattern, _) in enumerate(GPU_PEAKS_TFLOPS)
                     if __import__("re").search(pattern, name, __import__("re").IGNORECASE))
        assert first == i, (label, GPU_PEAKS_TFLOPS[first][0])
        fp16, tf32, fp32 = peaks
        assert fp16 > fp32 and (tf32 is None or fp16 >= 2 * tf32 * 0.98)   # tensor fp16 ~ 2x TF32 (dense)


def test_run_log_on_an_unknown_gpu_says_so(tmp_path, monkeypatch):
    """No MFU field and one log line naming the GPU, instead of an MFU against a made-up peak."""
    monkeypatch.setattr(costs.backend, "name", "cupy")
    monkeypatch.setattr(costs, "device_name", lambda: "NVIDIA Mystery 9000")
    lines = []
    cfg = TrainConfig(out_dir=str(tmp_path), log_interval=1, max_iters=1, progress=False)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    run_log = RunLog(cfg, 0, lines.append, model)
    run_log.step(1, Tensor(np.float32(2.0)), 1e-3, SimpleNamespace(grad_norm=0.5, mixed=False))
    run_log.close()
    record = json.loads(open(tmp_path / "log.jsonl").read())
    assert "mfu" not in record and "tokens_per_s" in record
    assert any("MFU not reported" in line and "NVIDIA Mystery 9000" in line for line in lines)
    assert all("mfu" not in line for line in lines if line.startswith("iter"))
