"""Hugging Face GPT-2 checkpoints: load them into a ``GPT`` and write a ``GPT`` back out as one.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are refused, since loading a
pickle can run code. npgpt's parameter names are GPT-2's, and GPT-2's Conv1D stores its weights
(in, out) exactly like npgpt's Linear, so tensors copy across by name with no transpose:

    transformer.wte.weight (V, C)            transformer.h.{i}.attn.c_attn.weight (C, 3C)
    transformer.wpe.weight (block_size, C)   transformer.h.{i}.mlp.c_fc.weight    (C, 4C)   ...

Loading builds the model with uninitialized parameters (no random init) and copies one tensor at a
time from the file into them, so the peak memory is the weights plus the largest single tensor.

    model = GPT.from_hf("gpt2")                  # a directory, e.g. from `huggingface-cli download gpt2`
    model.save_hf("my-gpt2")                     # transformers.GPT2LMHeadModel.from_pretrained("my-gpt2")
"""
import contextlib
import json
import os

import numpy as np

from . import backend
from . import nn
from .model import GPT, GPTConfig

__all__ = ["from_hf", "save_hf", "HFCheckpointError", "read_hf_config", "load_hf_meta"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
META_NAME = "npgpt_meta.json"          # npgpt's tokenizer description, written beside an export
_PREFIX = "transformer."
_BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal-mask buffers some GPT-2 files carry
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")   # all 0.5x(1+tanh(√(2/π)(x+0.044715x³)))
_CONVERT_HINT = ("convert it once with transformers: python -c \"from transformers import GPT2LMHeadModel; "
                 "GPT2LMHeadModel.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\"")


class HFCheckpointError(ValueError):
    """A directory is not a loadable Hugging Face GPT-2 checkpoint, or a model cannot be exported as one."""


def _require_safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise HFCheckpointError("reading and writing Hugging Face checkpoints needs the safetensors package: "
                                "pip install safetensors") from None


def read_hf_config(path):
    """``GPTConfig`` and LayerNorm epsilon from ``path/config.json``; raises HFCheckpointError on a
    missing directory/file or on a GPT-2 variant npgpt's architecture cannot represent."""
    if not os.path.isdir(path):
        raise HFCheckpointError(f"{path} is not a directory; give a Hugging Face GPT-2 checkpoint directory "
                                f"(config.json + model.safetensors), e.g. from `huggingface-cli download gpt2 "
                                f"--local-dir gpt2`")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise HFCheckpointError(f"{path} has no {CONFIG_NAME}; a Hugging Face checkpoint directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (safetensors is required)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"{cfg_path} is not readable JSON: {e}") from e
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFCheckpointError(f"{cfg_path}: model_type is {hf.get('model_type')!r}; only GPT-2 ('gpt2') "
                                f"checkpoints map onto npgpt's GPT")
    problems = []
    for key in ("n_positions", "n_embd", "n_layer", "n_head", "vocab_size"):
        if not isinstance(hf.get(key), int):
            problems.append(f"{key} missing or not an integer ({hf.get(key)!r})")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        problems.append(f"activation_function {act!r} (npgpt's MLP uses the tanh GELU, 'gelu_new')")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        problems.append(f"n_inner {hf['n_inner']} (npgpt's MLP is 4 * n_embd wide)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaling other than 1/sqrt(head size)")
    if hf.get("add_cross_attention", False):
        problems.append("cross-attention layers")
    if problems:
        raise HFCheckpointError(f"{cfg_path} describes a GPT-2 variant npgpt cannot represent: " + "; ".join(problems))
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True, pos="learned")
    return config, float(hf.get("layer_norm_epsilon", 1e-5))


def load_hf_meta(path):
    """The tokenizer description for a checkpoint directory: ``npgpt_meta.json`` when npgpt wrote one
    (e.g. a character-level model), else GPT-2's BPE: ``{"tokenizer": "gpt2", "vocab_size": V}``."""
    meta_path = os.path.join(path, META_NAME)
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    config, _ = read_hf_config(path)
    return {"tokenizer": "gpt2", "vocab_size": config.vocab_size}


def _weight_files(path):
    """The safetensors files of a checkpoint directory (one file, or the shards of an index)."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.exists(single):
        return [single]
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    pickles = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if os.path.exists(os.path.join(path, n))]
    found = f" (found only {', '.join(pickles)})" if pickles else ""
    hint = f"; {_CONVERT_HINT.format(d=path)}" if "pytorch_model.bin" in pickles else ""
    raise HFCheckpointError(f"{path} has no {WEIGHTS_NAME}{found}: safetensors weights are required, since "
                            f"npgpt does not load pickled checkpoints{hint}")


@contextlib.contextmanager
def _uninitialized_parameters():
    """Build modules with uninitialized (np.empty) parameters: skips the random init when every
    value is about to be overwritten, and the OS maps the pages only when they are written."""
    def empty(shape, std=None):
        return backend.xp.empty(shape, dtype=backend.get_default_dtype())
    saved = nn.normal_, nn.zeros_, nn.ones_
    nn.normal_ = nn.zeros_ = nn.ones_ = empty
    try:
        yield
    finally:
        nn.normal_, nn.zeros_, nn.ones_ = saved


def from_hf(path, dtype=None):
    """A ``GPT`` (eval mode, active backend) holding the weights of the Hugging Face GPT-2 checkpoint
    directory ``path``; parameters are contiguous arrays of ``dtype`` (default: the backend's, float32).

    Keys may carry the ``transformer.`` prefix or not; ``attn.bias``/``attn.masked_bias`` buffers are
    skipped; an ``lm_head.weight`` must equal ``wte`` (npgpt ties them). Missing, unexpected and
    mis-shaped keys raise one HFCheckpointError listing them all, before anything is copied.
    """
    _require_safetensors()
    from safetensors import safe_open
    config, eps = read_hf_config(path)
    files = _weight_files(path)
    ctx = backend.default_dtype(dtype) if dtype is not None else contextlib.nullcontext()
    with ctx, _uninitialized_parameters():
        model = GPT(config)
    params = dict(model.named_parameters())
    located, lm_head, unexpected, shapes, dtypes = {}, None, [], [], []
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                for key in f.keys():
                    name = key if key.startswith(_PREFIX) or key == "lm_head.weight" else _PREFIX + key
                    if name.endswith(_BUFFERS):
                        continue
                    sl = f.get_slice(key)
                    shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                    if name == "lm_head.weight":
                        lm_head = (file, key, shape)
                        continue
                    if name not in params:
                        unexpected.append(key)
                        continue
                    located[name] = (file, key)
                    if shape != params[name].shape:
                        shapes.append(f"{key}: file {shape} vs model {params[name].shape}")
                    if dt not in ("F16", "F32", "F64"):
                        dtypes.append(f"{key}: {dt}")
        except OSError as e:
            raise HFCheckpointError(f"{file} is not a readable safetensors file: {e}") from e
        except Exception as e:   # safetensors raises its own SafetensorError on a corrupt header
            if type(e).__name__ != "SafetensorError":
                raise
            raise HFCheckpointError(f"{file} is not a readable safetensors file: {e}") from e
    missing = [n for n in params if n not in located]
    if lm_head is not None and lm_head[2] != params[_PREFIX + "wte.weight"].shape:
        shapes.append(f"lm_head.weight: file {lm_head[2]} vs wte {params[_PREFIX + 'wte.weight'].shape}")
    if missing or unexpected or shapes or dtypes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 "mis-shaped keys [" + "; ".join(shapes) + "]" if shapes else "",
                 f"unsupported dtypes (convert to float16/32) [{'; '.join(dtypes)}]" if dtypes else ""]
        raise HFCheckpointError(f"{path} does not match a GPT-2 of config {config}: "
                                + ", ".join(p for p in parts if p))
    for name, (file, key) in located.items():
        # one tensor in host memory at a time; reopening unmaps the file pages the last read touched,
        # so they do not pile up in the resident set (reading the header again costs microseconds)
        with safe_open(file, framework="np") as f:
            p = params[name]
            p.data[...] = backend.to_device(f.get_tensor(key), dtype=p.dtype)
    if lm_head is not None:
        with safe_open(lm_head[0], framework="np") as f:
            head = f.get_tensor(lm_head[1])
        wte = backend.to_numpy(model.transformer.wte.weight.data)
        if not np.array_equal(head.astype(wte.dtype), wte):
            raise HFCheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but npgpt's GPT "
                                    f"ties the LM head to the token embedding; this checkpoint cannot be loaded")
    for _, m in _modules(model):
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return model.eval()


def _modules(m, prefix=""):
    yield prefix, m
    for name, child in m.named_children():
        yield from _modules(child, f"{prefix}{name}.")


def _layer_norm_eps(model):
    eps = {m.eps for _, m in _modules(model) if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise HFCheckpointError(f"GPT-2 has one layer_norm_epsilon, but this model's LayerNorms use {sorted(eps)}")
    return eps.pop()


def hf_config_dict(model):
    """The ``config.json`` contents of ``model`` as a ``GPT2LMHeadModel``."""
    c = model.config
    if not c.bias:
        raise HFCheckpointError("a model with bias=False cannot be saved as a Hugging Face GPT-2: GPT-2's "
                                "layers all have biases (train with --bias=true to export)")
    if c.pos != "learned":
        raise HFCheckpointError(f"a model with pos={c.pos!r} cannot be saved as a Hugging Face GPT-2, which uses "
                                f"learned position embeddings (train with --pos=learned to export)")
    eot = 50256 if c.vocab_size > 50256 else None    # GPT-2's <|endoftext|>, when the vocabulary has it
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": _layer_norm_eps(model),
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "use_cache": True,
        "dtype": str(model.transformer.wte.weight.dtype),
    }


def save_hf(model, path, meta=None):
    """Write ``model`` to the directory ``path`` as a Hugging Face GPT-2: ``config.json`` and
    ``model.safetensors`` with ``transformer.``-prefixed keys. The LM head is left out, as
    transformers saves a tied head (``tie_word_embeddings``), so ``GPT2LMHeadModel.from_pretrained``
    reports no missing weights. A padded token table is written without its padding rows. ``meta`` (a tokenizer description such as a checkpoint's ``meta``)
    goes to ``npgpt_meta.json`` when it is not GPT-2's BPE. Returns ``path``."""
    _require_safetensors()
    from safetensors.numpy import save_file
    cfg = hf_config_dict(model)
    tensors = {name: np.ascontiguousarray(backend.to_numpy(p.data)) for name, p in model.named_parameters()}
    tensors = {name: np.ascontiguousarray(a) for name, a in model.unpadded(tensors).items()}  # (V, C) wte
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    meta_path = os.path.join(path, META_NAME)
    if meta is not None and meta.get("tokenizer", "char") != "gpt2":
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f)
    elif os.path.exists(meta_path):
        os.remove(meta_path)
    return path

