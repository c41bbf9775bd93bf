"""What a run may start from: the checks that keep a resumed run or a run initialized from other
weights meaning the same thing — the data tokenized as the checkpoint's (``vocab_fingerprint``,
``check_vocab``), and the shape knobs taken from the checkpoint (``resume_config``).
"""
import hashlib
import json
import os
from dataclasses import fields, replace

__all__ = ["ARCH_KNOBS", "vocab_fingerprint", "resume_config", "check_vocab"]

# knobs a resumed run takes from its checkpoint (the shape of the weights and optimizer moments, and the
# seed of the random streams that continue): one that differs from both its default and the checkpoint is
# an error; every other knob (learning rate, schedule, betas, weight decay, clipping, dropout, batches)
# takes effect from the resumed step on
ARCH_KNOBS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos", "seed")


def vocab_fingerprint(meta):
    """A short hash of how the data was tokenized (tokenizer, vocabulary size, characters, end-of-text
    id; a tokenizer file by its content): equal fingerprints mean the ids mean the same tokens."""
    meta = meta or {}
    name = meta.get("tokenizer", "char")
    if name not in ("char", "gpt2") and os.path.isfile(str(name)):
        with open(name, "rb") as f:
            name = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    desc = {"tokenizer": name, "vocab_size": meta.get("vocab_size"), "chars": meta.get("chars"),
            "eot_token": meta.get("eot_token")}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _describe_vocab(meta):
    meta = meta or {}
    name = meta.get("tokenizer", "char")
    return f"{os.path.basename(str(name)) or name} tokens, vocabulary {meta.get('vocab_size')}"


def resume_config(cfg, ckpt, meta, ckpt_path, log=print):
    """``cfg`` checked against the checkpoint it resumes and completed from it. The data must be
    tokenized as the checkpoint's (same ``vocab_fingerprint``); ``max_iters`` may not lie below its
    step. The ``ARCH_KNOBS`` come from the checkpoint: a knob left at its default takes the
    checkpoint's value, one set to a third value is an error (TrainConfig cannot tell a knob given
    at its default from one not given, so that case takes the checkpoint's value). The other knobs
    take effect; those that differ from the checkpoint's run are listed in the log."""
    saved_meta = ckpt.get("meta") or {}
    saved_cfg = ckpt.get("train_config") or {}
    theirs = ckpt.get("vocab_fingerprint") or vocab_fingerprint(saved_meta)
    if theirs != vocab_fingerprint(meta):
        raise ValueError(f"{ckpt_path} was trained on {saved_cfg.get('data', 'other data')} "
                         f"({_describe_vocab(saved_meta)}, fingerprint {theirs}) but --data {cfg.data} holds "
                         f"{_describe_vocab(meta)} (fingerprint {vocab_fingerprint(meta)}), so the ids would mean "
                         f"other tokens; resume with --data {saved_cfg.get('data', 'DIR')}, or start a new run from "
                         f"its weights on data of the same tokenizer: npgpt train --init_from={cfg.out_dir} "
                         f"--out_dir=NEW_DIR")
    if cfg.max_iters < ckpt["iter_num"]:
        raise ValueError(f"--max_iters={cfg.max_iters} is below the step of {ckpt_path} ({ckpt['iter_num']}); "
                         f"resume with --max_iters={ckpt['iter_num']} or more")
    have = {**{k: saved_cfg.get(k) for k in ARCH_KNOBS}, **ckpt["model_config"]}
    defaults = {f.name: f.default for f in fields(cfg)}
    taken, conflicts = {}, []
    for key in ARCH_KNOBS:
        if have.get(key) is None:
            continue
        if getattr(cfg, key) != have[key] and getattr(cfg, key) != defaults[key]:
            conflicts.append(f"--{key}={getattr(cfg, key)} (the checkpoint's: {have[key]})")
        taken[key] = have[key]
    if conflicts:
        raise ValueError(f"resuming {ckpt_path} cannot change {', '.join(conflicts)}: leave those knobs out (the "
                         f"checkpoint's values are used), or start a new run from its weights: npgpt train "
                         f"--init_from={cfg.out_dir} --out_dir=NEW_DIR")
    cfg = replace(cfg, **taken)
    changed = [f"{k} {saved_cfg[k]!r} -> {getattr(cfg, k)!r}" for k in saved_cfg
               if k in defaults and k not in ARCH_KNOBS + ("init_from", "max_iters", "progress", "overwrite")
               and saved_cfg[k] != getattr(cfg, k)]
    if changed:
        log(f"resuming with changed knobs (they take effect from iteration {ckpt['iter_num']}): {', '.join(changed)}")
    return cfg


def check_vocab(data_meta, model_meta, vocab_size, data_dir, source):
    """Raise one ValueError unless the data in ``data_dir`` (``data_meta``) was tokenized the way the
    model at ``source`` (``model_meta``, None when unknown; ``vocab_size`` rows of embeddings) was."""
    have = data_meta.get("tokenizer", "char")
    want = (model_meta or {}).get("tokenizer")
    if want is not None and want != have:
        fix = "npgpt prepare --tokenizer gpt2" if want == "gpt2" else \
            ("npgpt prepare (character level) on text of the same alphabet" if want == "char"
             else f"npgpt prepare --tokenizer {want}")
        raise ValueError(f"{source} was trained on {want!r} tokens but {data_dir} holds {have!r} tokens, so the "
                         f"ids would mean other tokens; prepare the data with {fix} --input FILES --out_dir DIR "
                         f"and train with --data DIR")
    if want == "char" and have == "char" and model_meta.get("chars") != data_meta.get("chars"):
        raise ValueError(f"{source} and {data_dir} have different character sets, so the ids would mean other "
                         f"characters; prepare the data from text with {source}'s alphabet")
    if data_meta.get("vocab_size", 0) > vocab_size:
        raise ValueError(f"{data_dir} has a vocabulary of {data_meta['vocab_size']} tokens but {source} embeds only "
                         f"{vocab_size}; prepare the data with the checkpoint's tokenizer")
