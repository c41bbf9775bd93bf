"""Subcommands of the `npgpt` CLI, one module each (see npgpt/cli.py)."""
