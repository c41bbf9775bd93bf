"""The ``npgpt`` command line: one argparse subcommand per job.

Each subcommand lives beside the code it drives, in a module with ``register(subparsers)`` that
adds its parser and sets ``func``; this file only collects them.
"""
import argparse
import importlib
import sys

# modules that contribute subcommands, in the order `npgpt --help` lists them
SUBCOMMAND_MODULES = [
    "npgpt.commands.train_cmd",
    "npgpt.commands.sample_cmd",
    "npgpt.commands.chat_cmd",
    "npgpt.commands.prepare_cmd",
    "npgpt.commands.tokenize_cmd",
    "npgpt.commands.gradcheck_cmd",
    "npgpt.commands.finetune_cmd",
    "npgpt.commands.classify_cmd",
    "npgpt.commands.convert_cmd",
    "npgpt.commands.eval_cmd",
    "npgpt.commands.attention_cmd",
    "npgpt.commands.profile_cmd",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option shows its default unless its help already
    speaks of one (or there is none: None, False, or a required option)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or action.required or not action.option_strings):
            return text
        return f"{text} (default: %(default)r)" if isinstance(action.default, str) else f"{text} (default: %(default)s)"


# subcommands that compute (and so take --device); train takes it as one of its --key=value knobs
_COMPUTING = {"sample", "chat", "eval", "classify", "finetune-classify", "finetune-instruct", "attention",
              "profile", "gradcheck"}
_TYPE_NAMES = {int: "INT", float: "FLOAT", str: "TEXT"}


def _polish(parser):
    """Every option of ``parser`` shows its type and default in --help, and answers to its _ spelling
    (``normalize_flags`` turns every - spelling into that one)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if action.option_strings and action.metavar is None and action.nargs != 0 and not action.choices:
            dest = action.dest.lower()
            action.metavar = "DIR" if dest.endswith("dir") else _TYPE_NAMES.get(action.type, "TEXT")
        for option in list(action.option_strings):
            underscored = "--" + option[2:].replace("-", "_")
            if option.startswith("--") and underscored not in parser._option_string_actions:
                action.option_strings.append(underscored)
                parser._option_string_actions[underscored] = action


def _add_device(parser):
    if not any("--device" in a.option_strings for a in parser._actions):
        parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                            help="where to compute: cpu (NumPy) or cuda (CuPy); same as --backend")
    if not any("--threads" in a.option_strings for a in parser._actions):
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads (default: $NPGPT_THREADS, else the cores other processes leave free)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="npgpt", formatter_class=HelpFormatter,
        description="npgpt: a GPT built from first principles on NumPy/CuPy.\n"
                    "Every long option is accepted with _ or - (--max_new_tokens = --max-new-tokens).")
    parser.add_argument("--version", action="version", version=f"npgpt {_version()}")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="array backend for any subcommand (default: $NPGPT_BACKEND or numpy)")
    parser.add_argument("--device", dest="global_device", choices=["cpu", "cuda"], default=None,
                        help="cpu (NumPy) or cuda (CuPy): the same as --backend numpy|cupy")
    parser.add_argument("--threads", dest="global_threads", type=int, default=None,
                        help="CPU threads for any subcommand (default: $NPGPT_THREADS, else the cores other "
                             "processes leave free)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    for name, subparser in sub.choices.items():
        if name in _COMPUTING:
            _add_device(subparser)
        _polish(subparser)
    return parser


def normalize_flags(argv):
    """Long options spelled with - become their _ spelling (``--max-new-tokens=5`` ->
    ``--max_new_tokens=5``); values are left alone. Everything after a bare ``--`` is left alone."""
    out, literal = [], False
    for token in argv:
        if literal or not token.startswith("--") or token == "--":
            literal = literal or token == "--"
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        out.append("--" + name[2:].replace("-", "_") + eq + value)
    return out


def _version():
    from . import __version__
    return __version__


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(normalize_flags(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra          # --key=value knobs, validated by the subcommand
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import backend
    from .threads import ThreadsError, use_threads
    try:
        device = {"numpy": "cpu", "cupy": "cuda"}.get(args.backend) or args.global_device
        threads = getattr(args, "threads", None) or args.global_threads
        if args.command == "train":     # train's own --device and --threads knobs decide; global ones become them
            for name, value in (("device", device), ("threads", threads)):
                if value and not any(o.startswith(f"--{name}") for o in args.overrides):
                    args.overrides.append(f"--{name}={value}")
        else:
            if getattr(args, "device", None) or device:
                backend.use({"cpu": "numpy", "cuda": "cupy"}[getattr(args, "device", None) or device])
            if args.command in _COMPUTING or threads is not None:
                use_threads(threads or 0)
        return args.func(args) or 0
    except backend.BackendError as e:
        print(f"npgpt: error: {e}", file=sys.stderr)
        return 2
    except ThreadsError as e:           # a bad --threads or $NPGPT_THREADS
        print(f"npgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
