"""Genre classification of Shakespeare passages: does pretraining help, and what does LoRA cost?

    python examples/finetune_classify.py                          # ~3 min on a laptop CPU
    python examples/finetune_classify.py --init_from out-shakespeare-char --max_iters 300 --lora_r 8

Without --init_from a small char-level GPT is first pretrained (briefly) on the works that the
split by work keeps for training, so the held-out works are never seen, not even as raw text.
Then the same architecture is fine-tuned from that checkpoint and from random weights, on two
splits: by work (whole plays held out: the model must generalize to new plays) and by passage
(random passages held out: names and plots of every play are seen in training). With --lora_r R the
pretrained model is also fine-tuned with adapters and with only the last block, and the cost of
each is printed (trainable parameters, AdamW state + gradient bytes, peak allocation, step time).
"""
import argparse
import json
import os
import tempfile

import numpy as np

from npgpt.finetune import classify as C
from npgpt.finetune import datasets as D
from npgpt.finetune.base import init_model


def pretrain(out_dir, iters, n_layer, n_embd, block_size):
    """A char-level GPT trained for ``iters`` steps on the training works of the split by work."""
    from npgpt.train import TrainConfig, train
    works = D.load_works()
    _, test = D.split_works(works)
    chars = sorted(set("".join(w["text"] for w in works)))
    stoi = {c: i for i, c in enumerate(chars)}
    text = "\n\n".join(w["text"] for w in works if w["work"] not in set(test))
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)
    n = int(0.95 * len(ids))
    ids[:n].tofile(os.path.join(data, "train.bin"))
    ids[n:].tofile(os.path.join(data, "val.bin"))
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump({"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "dtype": "uint16"}, f)
    r = train(TrainConfig(data=data, out_dir=out_dir, n_layer=n_layer, n_head=4, n_embd=n_embd,
                          block_size=block_size, batch_size=8, max_iters=iters,
                          lr_decay_iters=iters, warmup_iters=min(50, iters // 5), eval_interval=max(iters, 1),
                          eval_iters=5, progress=True), log=lambda *_: None)
    print(f"pretrained {iters} iterations in {r['seconds']:.0f} s: val loss {r['val_loss']:.3f}")
    return out_dir


def run(init_from, split, args, **cfg):
    """Fine-tune from ``init_from`` on ``split``; returns the metrics."""
    works = D.load_works()
    gpt, tok, _ = init_model(init_from, "".join(w["text"] for w in works), args.n_layer, 4, args.n_embd,
                             args.block_size, seed=args.seed)
    examples = D.genre_passages(works, tok.encode, args.min_tokens, min(args.max_tokens, gpt.config.block_size),
                                args.per_work, args.seed)
    train, test = D.classification_split(examples, split, 0.2, args.seed, works)
    labels = C.label_ids(train)
    train_seqs, train_labels = C.encode_examples(train, tok.encode, labels, gpt.config.block_size)
    test_seqs, test_labels = C.encode_examples(test, tok.encode, labels, gpt.config.block_size)
    clf = C.GPTClassifier(gpt, len(labels))
    conf = C.ClassifyConfig(max_iters=args.max_iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
                            seed=args.seed, **cfg)
    stats = C.train_classifier(clf, train_seqs, train_labels, conf, log=None)
    scores = C.evaluate_classifier(clf, test_seqs, test_labels, len(labels))
    return {"accuracy": scores["accuracy"], "majority": C.majority_baseline(train_labels, test_labels),
            "confusion": scores["confusion"], "labels": labels, "n_train": len(train), "n_test": len(test), **stats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init_from", default=None, help="a `npgpt train` out_dir (default: pretrain one now)")
    ap.add_argument("--pretrain_iters", type=int, default=300)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=64)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--min_tokens", type=int, default=100)
    ap.add_argument("--max_tokens", type=int, default=250)
    ap.add_argument("--per_work", type=int, default=20)
    ap.add_argument("--max_iters", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--splits", default="work,passage")
    ap.add_argument("--lora_r", type=int, default=0,
                    help="also compare full fine-tuning, LoRA of this rank and last-block only (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ckpt = args.init_from or pretrain(tempfile.mkdtemp(prefix="npgpt-pretrain-"), args.pretrain_iters,
                                       args.n_layer, args.n_embd, args.block_size)
    print(f"\n{'split':<9}{'init':<12}{'accuracy':>9}{'majority':>10}{'train/test':>12}")
    for split in args.splits.split(","):
        for name, init in (("scratch", "scratch"), ("pretrained", ckpt)):
            r = run(init, split, args)
            print(f"{split:<9}{name:<12}{r['accuracy']:>9.3f}{r['majority']:>10.3f}"
                  f"{r['n_train']:>7}/{r['n_test']}", flush=True)
        print("  confusion (pretrained; rows true, columns predicted):", r["labels"])
        print("\n".join("    " + " ".join(f"{v:4d}" for v in row) for row in r["confusion"]))
    if args.lora_r:
        print(f"\nsplit by work, from the checkpoint:\n{'method':<22}{'trainable':>10}{'AdamW+grad MB':>14}"
              f"{'peak MB':>9}{'step ms':>9}{'accuracy':>9}")
        for name, cfg in (("full fine-tuning", {}), ("last block + head", {"trainable_blocks": 1}),
                          (f"LoRA r={args.lora_r} (attn)", {"lora_r": args.lora_r, "lora_alpha": 2.0 * args.lora_r})):
            r = run(ckpt, "work", args, **cfg)
            print(f"{name:<22}{r['trainable']:>10,}{r['opt_bytes'] / 2**20:>14.2f}{r['peak_bytes'] / 2**20:>9.1f}"
                  f"{r['step_time'] * 1e3:>9.0f}{r['accuracy']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
