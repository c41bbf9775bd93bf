"""How every command reads a model: ``load_model(path)`` takes a training checkpoint directory, a
weights-only one from ``npgpt convert``, one with LoRA adapters from ``finetune-instruct`` (merged
on load), a checkpoint file (``out_dir/best.npz``), or a Hugging Face GPT-2 directory.
"""
import os

from .checkpoint import CheckpointError, load_checkpoint
from .hf import CONFIG_NAME as HF_CONFIG_NAME, from_hf, load_hf_meta
from .model import GPT, GPTConfig

__all__ = ["CKPT_NAME", "is_hf_dir", "merged_state", "load_model"]

CKPT_NAME = "ckpt.npz"      # the latest checkpoint of a run (written at every evaluation)


def is_hf_dir(path):
    """True for a Hugging Face checkpoint directory (config.json, no npgpt ckpt.npz)."""
    return (os.path.isdir(path) and os.path.exists(os.path.join(path, HF_CONFIG_NAME))
            and not os.path.exists(os.path.join(path, CKPT_NAME)))


def merged_state(ckpt, path="checkpoint"):
    """The plain GPT state dict of a checkpoint: LoRA adapters (``finetune-instruct --lora_r``
    saves ``...lora_A`` (in, r) and ``...lora_B`` (r, out) beside each adapted weight) folded in as
    ``npgpt.lora.merge_lora`` does, W + (alpha / r) A B, so the same logits come back without them."""
    state = dict(ckpt["model"])
    adapted = sorted(k[:-len(".lora_A")] for k in state if k.endswith(".lora_A"))
    if not adapted:
        return state
    lora = ckpt.get("lora_config") or {}
    if "r" not in lora or "alpha" not in lora:
        raise CheckpointError(f"{path} holds LoRA adapters but no lora_config with their r and alpha; "
                              f"save it with npgpt finetune-instruct, which writes both")
    scale = float(lora["alpha"]) / int(lora["r"])
    for name in adapted:
        a, b = state.pop(name + ".lora_A"), state.pop(name + ".lora_B")        # (in, r), (r, out)
        w = state[name + ".weight"]                                               # (in, out)
        state[name + ".weight"] = w + (a * w.dtype.type(scale)) @ b
    return state


def load_model(path):
    """(model in eval mode on the active backend, checkpoint dict) from ``path``: a directory
    holding ``ckpt.npz`` (a training checkpoint, a weights-only one from ``npgpt convert``, or one
    with LoRA adapters, merged on load), a checkpoint file (e.g. ``out_dir/best.npz``), or a Hugging
    Face GPT-2 directory (config.json + model.safetensors; its dict holds ``model_config`` and the
    tokenizer ``meta``). Raises CheckpointError (or hf.HFCheckpointError) with the fix."""
    if is_hf_dir(path):
        model = from_hf(path)
        return model, {"model_config": model.config.to_dict(), "meta": load_hf_meta(path), "hf_dir": path}
    file = os.path.join(path, CKPT_NAME) if os.path.isdir(path) or not path.endswith(".npz") else path
    if not os.path.exists(file) and not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {file}: train one first (npgpt train --out_dir {path}) or give "
                              f"a checkpoint directory or a Hugging Face GPT-2 directory")
    ckpt = load_checkpoint(file)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{file} is an npgpt checkpoint without a model (keys {sorted(ckpt)}); an adapter file "
                              f"goes with its base model (npgpt.lora.load_lora), a model checkpoint holds "
                              f"'model' and 'model_config'")
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(merged_state(ckpt, file))
    return model.eval(), ckpt
