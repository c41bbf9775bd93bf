"""``npgpt finetune-classify`` and ``npgpt finetune-instruct``: fine-tune a pretrained (or fresh) GPT."""
import argparse
import os
import sys

HELP_CLASSIFY = """Fine-tune a GPT as a text classifier (a class head on the last token's hidden state).
With no --data: genre (comedy/tragedy/history/poem) of 100-250-token passages of the bundled works
(shorter when the model's context is shorter),
split by work (no work on both sides) or by passage. Examples:
  npgpt finetune-classify --init_from out-shakespeare-char --split work
  npgpt finetune-classify --init_from scratch --n_layer 2 --n_embd 64 --max_iters 100
  npgpt finetune-classify --init_from out-shakespeare-char --lora_r 8 --data my.csv   (header text,label)"""

HELP_INSTRUCT = """Instruction-tune a GPT on Alpaca-style {instruction, input, output} examples, the loss on the
response only. With no --data: a rule-built set from the bundled works (which work / which genre /
who speaks next / continue the line / reverse these words). Prints exact match (greedy) and the
log-likelihood per response token on a held-out split. Examples:
  npgpt finetune-instruct --init_from out-shakespeare-char --max_iters 300
  npgpt finetune-instruct --data alpaca.json --init_from DIR --lora_r 8"""


class _Raw(argparse.RawDescriptionHelpFormatter):
    pass


def _common(parser):
    parser.add_argument("--init_from", default="scratch", help="'scratch' or a `npgpt train` out_dir / ckpt.npz")
    parser.add_argument("--n_layer", type=int, default=4, help="scratch model: layers")
    parser.add_argument("--n_head", type=int, default=4, help="scratch model: heads")
    parser.add_argument("--n_embd", type=int, default=128, help="scratch model: width")
    parser.add_argument("--max_iters", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate after warmup")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0 = fine-tune the weights themselves)")
    parser.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale numerator: the update is (alpha/r) x A B")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter's input")
    parser.add_argument("--lora_targets", default="attn.c_attn,attn.c_proj",
                        help="comma-separated Linear names to adapt (e.g. attn.c_attn,attn.c_proj,mlp.c_fc)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the batches and a scratch model")
    parser.add_argument("--out_dir", default=None, help="save the fine-tuned model (and LoRA adapters) here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files --out_dir already holds (refused without it, before training)")


def register(sub):
    classify = sub.add_parser("finetune-classify", help="fine-tune a GPT as a text classifier (genre by default)",
                              description=HELP_CLASSIFY, formatter_class=_Raw)
    _common(classify)
    classify.add_argument("--data", default=None, help="CSV (header text,label) or JSONL of {text, label}")
    classify.add_argument("--split", choices=["work", "passage"], default="work",
                          help="bundled task: hold out whole works or random passages (user data: random rows)")
    classify.add_argument("--test_frac", type=float, default=0.2, help="fraction held out for the test set")
    classify.add_argument("--min_tokens", type=int, default=None,
                          help="bundled task: shortest passage (default 100, or half the context when that is shorter)")
    classify.add_argument("--max_tokens", type=int, default=250, help="longest passage in tokens")
    classify.add_argument("--per_work", type=int, default=40, help="bundled task: passages per work at most")
    classify.add_argument("--block_size", type=int, default=None,
                          help="context and max text length (default: the checkpoint's; 256 for scratch)")
    classify.add_argument("--trainable_blocks", type=int, default=None,
                          help="train only the last N blocks + ln_f + head (default: all)")
    classify.set_defaults(func=run_classify)

    instruct = sub.add_parser("finetune-instruct", help="instruction-tune a GPT (Alpaca format, loss on responses)",
                              description=HELP_INSTRUCT, formatter_class=_Raw)
    _common(instruct)
    instruct.add_argument("--data", default=None,
                          help="Alpaca JSON (list) or JSONL of {instruction, input, output}")
    instruct.add_argument("--n_per_task", type=int, default=200, help="bundled set: examples per task")
    instruct.add_argument("--test_frac", type=float, default=0.1, help="fraction held out for the test set")
    instruct.add_argument("--block_size", type=int, default=None,
                          help="context (default: the checkpoint's; 384 for scratch: Alpaca prompts are ~300 "
                               "characters)")
    instruct.add_argument("--max_eval", type=int, default=100, help="held-out examples to score")
    instruct.add_argument("--max_new_tokens", type=int, default=48, help="longest generated response when scoring")
    instruct.set_defaults(func=run_instruct, batch_size=8)


def _fail(cmd, msg):
    print(f"npgpt {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _check(args):
    for k in ("max_iters", "batch_size", "n_layer", "n_head", "n_embd", "block_size"):
        v = getattr(args, k)
        if v is not None and v < (0 if k == "max_iters" else 1):
            raise ValueError(f"--{k} must be positive, got {v}")
    if not 0.0 < args.test_frac < 1.0:
        raise ValueError(f"--test_frac must be in (0, 1), got {args.test_frac}")
    if args.lora_r < 0:
        raise ValueError(f"--lora_r must be >= 0, got {args.lora_r}")
    if args.init_from != "scratch" and not os.path.exists(args.init_from):
        raise ValueError(f"--init_from {args.init_from}: no such checkpoint; train one with "
                         f"`npgpt train --out_dir DIR` or use --init_from scratch")


def _check_out_dir(args, files):
    """Refuse, before any training, to write ``files`` into ``--out_dir`` when it is a file or
    already holds one of them (a training checkpoint, an earlier fine-tune), unless --overwrite."""
    if not args.out_dir:
        return
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out_dir {args.out_dir} is a file, not a directory")
    present = [f for f in files if os.path.exists(os.path.join(args.out_dir, f))]
    if present and not args.overwrite:
        raise ValueError(f"{os.path.join(args.out_dir, present[0])} exists; refusing to overwrite it: give another "
                         f"--out_dir or add --overwrite")


def _guarded(cmd, job, args):
    """Check the arguments and run ``job``; user errors (bad values, paths, corrupt checkpoints)
    become one ``npgpt CMD: error:`` line and exit status 2."""
    from ..checkpoint import CheckpointError
    try:
        _check(args)
        return job(args)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        return _fail(cmd, e.args[0] if e.args else e)


def run_classify(args):
    return _guarded("finetune-classify", _classify, args)


def _classify(args):
    from ..finetune import classify as C, datasets as D
    from ..finetune.base import init_model
    from ..lora import save_lora
    # a training ckpt.npz beside classifier.npz is left alone, so only these two are guarded
    _check_out_dir(args, [C.CLASSIFIER_FILE] + (["adapter.npz"] if args.lora_r else []))
    if args.data:
        examples = D.load_labeled(args.data)
        train, test = D.classification_split(examples, "passage", args.test_frac, args.seed)
        text = "".join(e["text"] for e in examples)
    else:
        works = D.load_works()
        text = "".join(w["text"] for w in works)
    gpt, tok, meta = init_model(args.init_from, text, args.n_layer, args.n_head, args.n_embd, args.block_size,
                                seed=args.seed)
    max_len = gpt.config.block_size
    if not args.data:
        if args.min_tokens is None:
            args.min_tokens = min(100, min(args.max_tokens, max_len) // 2)
        if args.min_tokens > min(args.max_tokens, max_len):
            raise ValueError(f"--min_tokens {args.min_tokens} exceeds the longest usable passage "
                             f"({min(args.max_tokens, max_len)} tokens)")
        examples = D.genre_passages(works, tok.encode, args.min_tokens, min(args.max_tokens, max_len),
                                    args.per_work, args.seed)
        train, test = D.classification_split(examples, args.split, args.test_frac, args.seed, works)
    labels = C.label_ids(train)
    train_seqs, train_labels = C.encode_examples(train, tok.encode, labels, max_len)
    test_seqs, test_labels = C.encode_examples(test, tok.encode, labels, max_len)
    print(f"{len(train)} training and {len(test)} test texts, {len(labels)} classes {labels}; "
          f"model {gpt.num_params() / 1e6:.2f}M parameters from {args.init_from}")
    clf = C.GPTClassifier(gpt, len(labels))
    cfg = C.ClassifyConfig(max_iters=args.max_iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
                           trainable_blocks=args.trainable_blocks, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           lora_dropout=args.lora_dropout, lora_targets=tuple(args.lora_targets.split(",")),
                           seed=args.seed)
    stats = C.train_classifier(clf, train_seqs, train_labels, cfg)
    scores = C.evaluate_classifier(clf, test_seqs, test_labels, len(labels))
    print(f"trainable parameters {stats['trainable']:,}; step {stats['step_time'] * 1e3:.0f} ms")
    majority = C.majority_baseline(train_labels, test_labels)
    print(f"test accuracy {scores['accuracy']:.3f} (majority-class baseline {majority:.3f})")
    print(format_confusion(scores["confusion"], labels))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        # the weights with LoRA folded in, head, labels, tokenizer meta, max length: all `npgpt classify` reads
        C.save_classifier(os.path.join(args.out_dir, C.CLASSIFIER_FILE), clf, labels, meta,
                          C.config_dict(cfg), accuracy=scores["accuracy"])
        if args.lora_r:
            save_lora(gpt, os.path.join(args.out_dir, "adapter.npz"))
        print(f"saved {args.out_dir}/{C.CLASSIFIER_FILE} (use it: npgpt classify --out_dir {args.out_dir} "
              f"--text \"...\")")
    return 0


def format_confusion(conf, labels):
    """A confusion matrix as text: rows true labels, columns predictions."""
    w = max(8, max(len(l) for l in labels) + 1)
    first = max(len("true \\ predicted"), max(len(l) for l in labels)) + 2
    lines = ["true \\ predicted".ljust(first) + "".join(l[:w - 1].rjust(w) for l in labels)]
    for l, row in zip(labels, conf):
        lines.append(l.ljust(first) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines)


def run_instruct(args):
    return _guarded("finetune-instruct", _instruct, args)


def _instruct(args):
    from ..checkpoint import save_checkpoint
    from ..finetune import datasets as D, instruct as I
    from ..finetune.base import init_model
    from ..lora import apply_lora, save_lora
    _check_out_dir(args, ["ckpt.npz"] + (["adapter.npz"] if args.lora_r else []))
    if args.data:
        examples = I.load_instructions(args.data)
    else:
        examples = D.instruction_examples(D.load_works(), args.n_per_task, args.seed)
    train, test = D.split_examples(examples, args.test_frac, args.seed)
    text = I.PROMPT_WITH_INPUT + I.PROMPT_NO_INPUT + I.CHAR_END + "".join(
        e["instruction"] + e["input"] + e["output"] for e in examples)
    gpt, tok, meta = init_model(args.init_from, text, args.n_layer, args.n_head, args.n_embd, args.block_size,
                                seed=args.seed, scratch_block_size=384)
    pairs, kept = I.fit_examples(train, tok, gpt.config.block_size)
    _, test = I.fit_examples(test, tok, gpt.config.block_size)
    if not pairs or not test:
        raise ValueError(f"no example fits the context of {gpt.config.block_size} tokens; raise --block_size")
    if len(kept) < len(train):
        print(f"skipped {len(train) - len(kept)} training examples longer than {gpt.config.block_size} tokens")
    test = test[:args.max_eval]
    if args.lora_r:
        apply_lora(gpt, args.lora_targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    print(f"{len(pairs)} training and {len(test)} test examples; model {gpt.num_params() / 1e6:.2f}M "
          f"parameters from {args.init_from}")
    before = I.evaluate_instruct(gpt, test, tok, generate=False)
    stats = I.train_instruct(gpt, pairs, I.InstructConfig(args.max_iters, args.batch_size, args.learning_rate,
                                                          seed=args.seed))
    scores = I.evaluate_instruct(gpt, test, tok, max_new_tokens=args.max_new_tokens)
    print(f"step {stats['step_time'] * 1e3:.0f} ms; held-out log-likelihood per response token "
          f"{before['loglik_per_token']:.3f} before -> {scores['loglik_per_token']:.3f} after; "
          f"exact match {scores['exact_match']:.3f}")
    for task, r in scores["by_task"].items():
        print(f"  {task:<10} n={r['n']:<4} exact match {r['exact_match']:.3f}  "
              f"loglik/token {r['loglik_per_token']:.3f}")
    for ex in test[:3]:
        print(f"--- {ex['instruction']} {ex['input']!r}\n    reference {ex['output']!r}\n"
              f"    model     {I.generate_response(gpt, tok, ex, args.max_new_tokens)!r}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        save_checkpoint(os.path.join(args.out_dir, "ckpt.npz"), {
            "model": gpt.state_dict(), "model_config": gpt.config.to_dict(), "meta": meta,
            "lora_config": getattr(gpt, "_lora_config", None), I.CHAT_KEY: I.chat_template(tok)})
        if args.lora_r:
            save_lora(gpt, os.path.join(args.out_dir, "adapter.npz"))
        print(f"saved to {args.out_dir}")
    return 0
