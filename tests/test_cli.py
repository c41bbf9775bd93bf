"""One consistent command line: every long option answers to its _ and - spellings, has help text
showing its type and default, computing subcommands take --device before or after the subcommand,
and the README lists every subcommand."""
import argparse
import os

import pytest

from npgpt.cli import build_parser, main, normalize_flags

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_normalize_flags():
    assert normalize_flags(["sample", "--max-new-tokens=5", "--top-k", "3", "--start", "a-b", "--", "--x-y"]) == \
        ["sample", "--max_new_tokens=5", "--top_k", "3", "--start", "a-b", "--", "--x-y"]


def test_every_option_answers_to_both_spellings_and_has_help():
    _, commands = subparsers()
    missing = []
    for name, p in commands.items():
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            longs = [o for o in action.option_strings if o.startswith("--")]
            assert any("-" not in o[2:] for o in longs), f"{name} {longs}: no _ spelling"
            if not action.help:
                missing.append(f"{name} {longs[0]}")
    assert not missing, f"options without help text: {missing}"


def test_help_shows_types_and_defaults():
    _, commands = subparsers()
    sample = commands["sample"].format_help()
    assert "--max_new_tokens INT" in sample and "(default: 500)" in sample and "--temperature FLOAT" in sample
    train = commands["train"].format_help()
    from npgpt.commands.train_cmd import GROUPS, KNOBS
    from npgpt.train import TrainConfig
    from dataclasses import fields
    assert {f.name for f in fields(TrainConfig)} == set(KNOBS)          # every knob has a group and a meaning
    for group in GROUPS:
        assert f"  {group}:" in train
    assert "--max_iters" in train and str(TrainConfig.max_iters) in train


def test_hyphen_and_underscore_spellings_parse_the_same():
    parser, _ = subparsers()
    a = parser.parse_args(normalize_flags(["sample", "--max-new-tokens", "7", "--no-cache"]))
    b = parser.parse_args(normalize_flags(["sample", "--max_new_tokens", "7", "--no_cache"]))
    assert a.max_new_tokens == b.max_new_tokens == 7 and a.no_cache and b.no_cache


@pytest.mark.parametrize("name", ["sample", "eval", "attention", "profile", "gradcheck", "finetune-classify",
                                  "finetune-instruct"])
def test_computing_subcommands_take_device(name):
    _, commands = subparsers()
    assert any("--device" in a.option_strings for a in commands[name]._actions), name


def test_device_before_or_after_the_subcommand(capsys):
    assert main(["--device", "cpu", "gradcheck", "--op", "F.gelu"]) == 0
    assert main(["gradcheck", "--op", "F.gelu", "--device", "cpu"]) == 0


def test_readme_lists_every_subcommand():
    _, commands = subparsers()
    with open(README, encoding="utf-8") as f:
        text = f.read()
    missing = [name for name in commands if f"`npgpt {name}" not in text]
    assert not missing, f"README does not list: {missing}"
