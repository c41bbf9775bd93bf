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
    "npgpt.commands.prepare_cmd",
    "npgpt.commands.tokenize_cmd",
    "npgpt.commands.gradcheck_cmd",
    "npgpt.commands.finetune_cmd",
    "npgpt.commands.convert_cmd",
    "npgpt.commands.eval_cmd",
    "npgpt.commands.attention_cmd",
    "npgpt.commands.profile_cmd",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="npgpt", description="npgpt: a GPT built from first principles on NumPy/CuPy.")
    parser.add_argument("--version", action="version", version=f"npgpt {_version()}")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                        help="array backend (default: $NPGPT_BACKEND or numpy)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def _version():
    from . import __version__
    return __version__


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra          # --key=value knobs, validated by the subcommand
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import backend
    try:
        if args.backend:
            backend.use(args.backend)
        return args.func(args) or 0
    except backend.BackendError as e:
        print(f"npgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npgpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
