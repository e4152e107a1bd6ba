"""Shared by the method examples: run a recipe through minispin's one driver, or on the demo task.

Every example is `RECIPE options + your options -> minispin.spin.main` (later options win; every
SpinConfig field is an option, see `python -m minispin.spin --help`), or with `--demo` the same method
on the built-in demo task (CPU, no downloads: `minispin.demo_methods`).
"""
from __future__ import annotations

import sys
from typing import Sequence

ALIASES = {"--out": "--output_dir"}


def _alias(arg: str) -> str:
    name, eq, value = arg.partition("=")
    return ALIASES.get(name, name) + eq + value if arg.startswith("--") else arg


def run(recipe: Sequence[str], demo_method: str, argv: Sequence[str] | None = None, *,
        needs_judge: bool = False):
    """`--demo [demo options]`: minispin.demo_methods for this method; else the recipe + argv through
    minispin.spin (refusing to start without a judge when the method needs one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--demo"]:
        from minispin import demo_methods

        return demo_methods.main(["--methods", demo_method, "--out", f"runs/demo_{demo_method}", *argv[1:]])
    argv = [_alias(a) for a in argv]
    from minispin.cli import parse_config
    from minispin.spin import SpinConfig, main

    config = parse_config(SpinConfig, list(recipe) + argv)
    if needs_judge and not config.judge.configured and config.generate:
        raise SystemExit("error: this method needs a judge for the generated answers: --judge.function "
                         "module:function (or file.py:function) or --judge.command 'cmd ...' (see "
                         "examples/judge_command.py); score columns in the data only serve --generate false")
    return main(list(recipe) + argv)
