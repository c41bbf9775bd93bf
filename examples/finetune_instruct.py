"""Instruction tuning on rule-built Shakespeare tasks, the loss on the response only.

    python examples/finetune_instruct.py                          # ~3 min on a laptop CPU
    python examples/finetune_instruct.py --init_from out-shakespeare-char --max_iters 300 --lora_r 8

The bundled set asks five things of a line of Shakespeare: which work, which genre, who speaks next,
continue the line, reverse these words. Prompts follow the Alpaca template ("Below is an
instruction that describes a task..."), about 300 characters, so a char-level model needs a
context of ~384: pretrain with ``npgpt train --block_size=384`` (a checkpoint with sinusoidal
positions, ``--pos=sinusoidal``, can also be stretched to a longer context than it was trained
with). Without --init_from a small model is trained from scratch. The held-out split is scored before and after by the
log-likelihood per reference-response token, and after by exact match of the greedy response.
"""
import argparse

from npgpt.finetune import datasets as D
from npgpt.finetune import instruct as I
from npgpt.finetune.base import init_model
from npgpt.lora import apply_lora


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init_from", default=None, help="a `npgpt train` out_dir (default: from scratch)")
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=64)
    ap.add_argument("--block_size", type=int, default=384)
    ap.add_argument("--n_per_task", type=int, default=300)
    ap.add_argument("--max_iters", type=int, default=150)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--learning_rate", type=float, default=2e-3)
    ap.add_argument("--lora_r", type=int, default=0, help="fine-tune LoRA adapters of this rank instead")
    ap.add_argument("--max_eval", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    examples = D.instruction_examples(D.load_works(), args.n_per_task, args.seed)
    train, test = D.split_examples(examples, 0.1, args.seed)
    text = I.PROMPT_WITH_INPUT + I.PROMPT_NO_INPUT + I.CHAR_END + "".join(
        e["instruction"] + e["input"] + e["output"] for e in examples)
    gpt, tok, _ = init_model(args.init_from or "scratch", text, args.n_layer, 4, args.n_embd, args.block_size,
                             seed=args.seed)
    pairs, _ = I.fit_examples(train, tok, gpt.config.block_size)
    _, test = I.fit_examples(test, tok, gpt.config.block_size)
    test = test[:args.max_eval]
    if args.lora_r:
        apply_lora(gpt, ("attn.c_attn", "attn.c_proj", "mlp.c_fc"), args.lora_r, 2.0 * args.lora_r)
    n_train = sum(p.size for p in gpt.parameters() if p.requires_grad)
    print(f"{len(pairs)} training / {len(test)} held-out examples; {n_train:,} trainable parameters; "
          f"init {args.init_from or 'scratch'}")
    before = I.evaluate_instruct(gpt, test, tok, generate=False)
    stats = I.train_instruct(gpt, pairs, I.InstructConfig(args.max_iters, args.batch_size, args.learning_rate, seed=args.seed))
    after = I.evaluate_instruct(gpt, test, tok)
    print(f"\nlog-likelihood per response token: {before['loglik_per_token']:.3f} -> {after['loglik_per_token']:.3f}"
          f"; exact match {after['exact_match']:.3f}; {stats['step_time'] * 1e3:.0f} ms/step")
    print(f"{'task':<10}{'n':>4}{'exact':>8}{'loglik/tok':>12}{'before':>9}")
    for t, r in after["by_task"].items():
        print(f"{t:<10}{r['n']:>4}{r['exact_match']:>8.3f}{r['loglik_per_token']:>12.3f}"
              f"{before['by_task'][t]['loglik_per_token']:>9.3f}")
    print()
    for ex in test[:5]:
        print(f"{ex['instruction']} {ex['input']!r}\n  reference: {ex['output']!r}\n"
              f"  model:     {I.generate_response(gpt, tok, ex)!r}")


if __name__ == "__main__":
    main()
