"""Shared by the method examples: run a recipe through minispin's one driver, or on the demo task.

Every example is `RECIPE options + your options -> minispin.driver.main` (later options win; every
SpinConfig field is an option, see `python -m minispin --help`), or with `--demo` the same method
on the built-in demo task (CPU, no downloads: `minispin.demo.methods`).
"""
from __future__ import annotations

import json
import shlex
import sys
from typing import Sequence

ALIASES = {"--out": "--output_dir"}


def run(recipe: Sequence[str], demo_method: str, argv: Sequence[str] | None = None, *,
        needs_judge: bool = False, description: str | None = None):
    """`--demo [demo options]`: minispin.demo.methods for this method; else the recipe + argv through
    minispin.spin (refusing to start without a judge when the method needs one). description: the
    script's docstring, shown by --help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--demo"]:
        from minispin.demo import methods as demo_methods

        return demo_methods.main(["--methods", demo_method, "--out", f"runs/demo_{demo_method}", *argv[1:]])
    from minispin import distributed as dist
    from minispin.driver import parse_args, spin

    if description is not None:
        description += "\nThis script runs: " + shlex.join(recipe) + " [your options, which win]"
    config = parse_args(list(recipe) + argv, description=description, aliases=ALIASES)
    if needs_judge and not config.judge.configured and config.generate:
        raise SystemExit("error: this method needs a judge for the generated answers: --judge.function "
                         "module:function (or file.py:function) or --judge.command 'cmd ...' (see "
                         "examples/judge_command.py); score columns in the data only serve --generate false")
    result = spin(config)
    if dist.is_main():
        print(json.dumps({"run_dir": str(result.run_dir), "models": [str(m) for m in result.models]}))
    return result
