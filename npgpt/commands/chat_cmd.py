"""``npgpt chat``: ask an instruction-tuned checkpoint questions, the answers streamed as they are made.

Each question is wrapped in the template the model was tuned with (Alpaca, read from the checkpoint:
``finetune.instruct.checkpoint_chat_template``) and the answer stops at the model's end marker
(``<|endoftext|>`` for GPT-2 BPE, "\\n\\n" for a character model), which is not printed.
"""
import sys

HELP = """Ask an instruction-tuned checkpoint (npgpt finetune-instruct --out_dir DIR, LoRA or not) questions.
With --prompt: answer once. Without: read questions from stdin, one a line, until end of input. Examples:
  npgpt chat --out_dir out-instruct --prompt "Which play is this line from?" --input "To be, or not to be"
  npgpt chat --out_dir out-instruct --temperature 0.7 --top_p 0.9 --repetition_penalty 1.2
  npgpt sample --out_dir out-instruct --instruct "Reverse these words."    (the same one-shot answer)"""


def register(sub):
    from argparse import RawDescriptionHelpFormatter
    from .sample_cmd import add_sampling_args
    chat = sub.add_parser("chat", help="ask an instruction-tuned checkpoint questions (streamed answers)",
                          description=HELP, formatter_class=RawDescriptionHelpFormatter)
    chat.add_argument("--out_dir", required=True, help="an instruction-tuned checkpoint directory (ckpt.npz)")
    chat.add_argument("--prompt", default=None, help="one question (the template's instruction); without it, "
                                                     "questions are read from stdin")
    chat.add_argument("--input", default="", help="the template's optional input section (context) for --prompt")
    add_sampling_args(chat, temperature=0.0, top_k=0, max_new_tokens=256)
    chat.set_defaults(func=run_chat)


def answer(model, tok, ckpt, question, max_new_tokens, write=None, input="", **sampling):
    """The model's answer to ``question`` (text, end marker removed), given to ``write`` piece by piece
    as it is made and then printed with a newline (or printed whole when ``write`` is None).
    ``sampling``: ``npgpt.sampling.generate_stream``'s knobs."""
    from ..finetune.instruct import chat_prompt, checkpoint_chat_template
    from ..sampling import stream_text
    template = checkpoint_chat_template(ckpt, tok)
    prompt = tok.encode(chat_prompt(template, question, input))
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError(f"the question makes a prompt of {len(prompt)} tokens and the model reads at most "
                         f"{model.config.block_size}; ask a shorter one")
    stop = tok.encode(template["end"], allowed_special="all")
    text = stream_text(model, tok, prompt, min(max_new_tokens, room), write, stop=stop, **sampling)
    print("" if write else text, flush=True)
    return text


def run_chat(args):
    from ..checkpoint import CheckpointError
    from .sample_cmd import check_question, load_for_sampling, sampling_kwargs, writer
    try:
        knobs = sampling_kwargs(args)
        if args.prompt is not None:
            check_question(args.prompt, "--prompt")
        elif sys.stdin is None or sys.stdin.closed:
            raise ValueError("stdin is closed, so there are no questions to read: give --prompt QUESTION "
                             "or pipe questions in, one a line")
        model, tok, ckpt = load_for_sampling(args.out_dir)
        write = writer(args.stream)
        if args.prompt is not None:
            answer(model, tok, ckpt, args.prompt, args.max_new_tokens, write, args.input, seed=args.seed, **knobs)
            return 0
        from ..finetune.instruct import checkpoint_chat_template
        checkpoint_chat_template(ckpt, tok)               # refuse a plain checkpoint before reading stdin
        interactive = sys.stdin.isatty()
        for n, line in enumerate(_questions(interactive)):
            if line.strip():
                answer(model, tok, ckpt, line.strip(), args.max_new_tokens, write, seed=args.seed + n, **knobs)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"npgpt chat: error: {e}", file=sys.stderr)
        return 2
    return 0


def _questions(interactive):
    """Lines of stdin, with a "> " prompt on a terminal; end of input ends them."""
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            if interactive:
                print()
            return
        yield line.rstrip("\n")
