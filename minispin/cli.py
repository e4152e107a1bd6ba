"""One command-line surface for `python -m minispin` and every example: dataclass configs as options.

    python -m minispin --model m --data d --out runs/x --lr 5e-7 --beta 0.1
    python examples/dpo.py --model m --data prefs.json --out runs/dpo      # run_recipe(RECIPE, ...)

- Every field is an option, nested ones dotted (`--train.lr`); a leaf name that occurs once in the whole
  tree may also be given flat (`--lr`). Underscores and dashes are interchangeable. `--out` = `--output_dir`.
- bool: `--flag` (true), `--flag false`/`--no-flag`; None for optional fields: `none`/`null`;
  lists and dicts: JSON. `--config file.json` loads a (nested) JSON object, or a run's config.json.
- Settings resolve by one rule (minispin.config): recipe < --config file < command line.
- A mistake is one line "error: ..." and exit code 2 (1 for bad data / paths), no traceback (`--debug`
  or MINISPIN_DEBUG=1 shows it); an unknown option gets the nearest one suggested.
- `--nproc_per_node N` starts N ranks on this machine (minispin.distributed.launch) once every option
  has been checked; under torchrun it is not needed.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import re
import shlex
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from .config import (FILE, GIVEN, RECIPE, ConfigError, field_default, field_of, from_dict, section_type,
                     strip_optional)
from .driver import RunConfig, RunResult, spin
from .driver import __doc__ as DRIVER_DOC
from .distributed import launch, launched_by_torchrun
from .log import print_result, run_main
from .runs import flatten

__all__ = ["parse_value", "build_parser", "parse_config", "parse_args", "main", "run_recipe", "nearest_option",
           "ALIASES", "PRECEDENCE"]

T = TypeVar("T")

ALIASES = {"--out": "--output_dir"}  # the same extra names in every entry point
PRECEDENCE = """Settings: a method's recipe (its per-iteration schedule, e.g. the SPIN paper's 4 iterations, and
this command's defaults) < a --config FILE < the options given on this command line. An option given
here applies to every iteration (e.g. --beta 0.1 keeps 0.1 also where the recipe says 5.0); --iterations
'[{...}, ...]' replaces the recipe's schedule, one entry per iteration. <out>/config.json records the
effective settings of every iteration; the status line at each iteration start shows the ones that differ
from the recipe.
Errors: one line, exit code 2 (usage) or 1; --debug (or MINISPIN_DEBUG=1) shows the traceback."""
# names users bring from Hugging Face's Trainer / TRL, for "did you mean" only (they are not aliases)
_FAMILIAR = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
             "train_batch_size": "global_batch_size", "batch_size": "global_batch_size",
             "model_name_or_path": "model", "dataset": "data", "dataset_name": "data", "output": "output_dir",
             "out_dir": "output_dir", "gradient_checkpointing": "activation_checkpointing", "bf16": "mixed_precision",
             "max_seq_length": "max_length", "warmup": "warmup_ratio", "num_epochs": "epochs"}


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, type) of every non-dataclass field, recursively."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = section_type(cls, f.name)
        out += _leaves(sub, f"{prefix}{f.name}.") if sub is not None else [(prefix + f.name, hints[f.name])]
    return out


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_value(text: str, tp: Any, name: str = "value") -> Any:
    """Convert command-line text to a field's type (int/float/str/bool, Optional, lists/dicts as JSON)."""
    inner, optional = strip_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            return _parse_bool(text)
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str or inner is typing.Any:
            return text
        if origin in (list, dict, tuple) or inner in (list, dict, tuple):
            value = json.loads(text)
            if origin is tuple or inner is tuple:
                value = tuple(value)
            return value
        if origin in (typing.Union, types.UnionType):  # e.g. int | float: try in order
            for option in typing.get_args(inner):
                try:
                    return parse_value(text, option, name)
                except (ValueError, argparse.ArgumentTypeError):
                    continue
            raise ValueError(f"none of {typing.get_args(inner)} fits")
        return json.loads(text)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as {_metavar(tp)}: {e}") from None


@functools.lru_cache(maxsize=None)  # inspect.getsource re-reads the file: once per class, not per option
def _field_notes(cls: type) -> dict[str, str]:
    """{field: its comment in the class source}: the comment after the field, continued on comment-only
    lines below it, or else the comment-only lines right above it. {} when the source is unavailable."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):
        return {}
    node = ast.parse("\n".join(lines)).body[0]
    notes: dict[str, str] = {}
    pending: list[str] = []  # comment-only lines since the last field
    last, end = None, node.lineno
    for stmt in node.body:  # type: ignore[attr-defined]
        gap = (line.strip() for line in lines[end:stmt.lineno - 1])
        pending += [line[1:].strip() for line in gap if line.startswith("#")]
        end = stmt.end_lineno
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            break
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        tail = lines[end - 1][stmt.end_col_offset:].strip()  # the comment after the field's last line
        own = tail[1:].strip() if tail.startswith("#") else ""
        if pending and not own:
            own = " ".join(pending)
        elif pending and last is not None and notes[last]:
            notes[last] += " " + " ".join(pending)  # the previous field's comment went on
        notes[stmt.target.id], last, pending = own, stmt.target.id, []
    if pending and last is not None and notes[last]:
        notes[last] += " " + " ".join(pending)
    return {k: v for k, v in notes.items() if v}


def _help_of(cls: type, dotted: str) -> str:
    """One option's help: the field's comment and its default."""
    owner, f = field_of(cls, dotted)
    text = _field_notes(owner).get(f.name, "")
    default = field_default(cls, dotted)
    if default is not dataclasses.MISSING:
        shown = json.dumps(default) if isinstance(default, (list, dict)) else repr(default)
        text += f" (default: {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return text.strip().replace("%", "%%")


def build_parser(cls: type, description: str | None = None,
                 aliases: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per (nested) field of `cls` (defaults are left unset).

    `--a.b.c` sets one field; `--c` (the leaf name alone) sets every field of that name, e.g. `--seed`
    sets train.seed and generation.seed; a dotted option given too wins over the flat one. When `cls`
    itself has a field `c`, `--c` sets only that one (e.g. `--method` is RunConfig.method, not
    train.objective, which the driver derives from it). aliases: extra option names, e.g.
    {"--out": "--output_dir"}. Help lists each field's comment and default, grouped by section.
    """
    parser = _Parser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PRECEDENCE,
                     allow_abbrev=False, usage="%(prog)s [--config FILE] [--OPTION VALUE ...]")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON file with (nested) option values, or a run's config.json; options given "
                             "on the command line win over it, it wins over the recipe")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--nproc_per_node", type=int, metavar="N",
                        help="start N ranks on this machine (one per GPU), like torchrun --standalone "
                             "--nproc_per_node N, but a user mistake prints only its one error line")
    extra_flags: dict[str, list[str]] = {}
    for alias, target in {**ALIASES, **(aliases or {})}.items():
        extra_flags.setdefault(target, []).append(alias)
    hidden = set(getattr(cls, "SET_BY_RUN", ()))  # nested copies of run-level settings: not options
    leaves = [(d, tp) for d, tp in _leaves(cls) if d not in hidden]
    groups: dict[str, list[tuple[str, Any]]] = {}
    for dotted, tp in leaves:
        groups.setdefault(dotted.rsplit(".", 1)[-1], []).append((dotted, tp))
    sections: dict[str, Any] = {}

    def section(dotted: str):
        name = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        if name not in sections:
            title = f"{name}.* options" if name else f"{cls.__name__} options"
            sections[name] = parser.add_argument_group(title)
        return sections[name]

    known = {f"--{d}" for d, _ in leaves} | {f"--{d.rsplit('.', 1)[-1]}" for d, _ in leaves}
    extra_flags = {t: a for t, a in extra_flags.items() if t in known}
    for dotted, tp in leaves:  # top-level fields first, then each nested section in field order
        if "." not in dotted and dotted != "config":
            flags = [f"--{dotted}"] + extra_flags.get(f"--{dotted}", [])
            _add_option(section(dotted), flags, dotted, tp, help=_help_of(cls, dotted))
    for dotted, tp in leaves:
        if "." not in dotted:
            continue
        leaf = dotted.rsplit(".", 1)[-1]
        members = groups[leaf]
        flags = [f"--{dotted}"] + extra_flags.get(f"--{dotted}", [])
        if len(members) == 1 and leaf != "config":  # a unique leaf name: --leaf is the same option
            flags.append(f"--{leaf}")
        _add_option(section(dotted), flags, dotted, tp, help=_help_of(cls, dotted))
    shared = None
    for leaf, members in groups.items():
        if leaf == "config" or len(members) == 1 or any("." not in m[0] for m in members):
            continue
        if shared is None:
            shared = parser.add_argument_group("shortcuts (set the field of that name in every section)")
        _add_option(shared, [f"--{leaf}"], _FLAT + leaf, members[0][1],
                    help="sets " + ", ".join(d for d, _ in members))
    return parser


_FLAT = "flat:"


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is a ConfigError (one line, printed once by `run_main`) with the nearest
    option suggested for an unknown one."""

    def error(self, message: str) -> typing.NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for o in self._option_string_actions if o.startswith("--")]
            hints = [f"{flag} (did you mean {near}?)" if near else flag
                     for flag in shlex.split(unknown.group(1)) if flag.startswith("--")
                     for near in [nearest_option(flag, options)]]
            message = "unknown option(s) " + ", ".join(hints)
        raise ConfigError(f"{message} (see {self.prog} --help)")


def nearest_option(flag: str, options: Sequence[str]) -> str | None:
    """The option a mistyped `flag` most likely means: a familiar Hugging Face name's counterpart
    (--learning_rate -> --lr), the initials of a multi-word name (--learning_rate -> --lr), or the closest
    spelling (difflib) among all option names and aliases; None when nothing is close."""
    def norm(o: str) -> str:
        return o.split("=", 1)[0].lstrip("-").replace("-", "_")

    names = {norm(o): o for o in sorted(options, key=len)}
    name = norm(flag)
    words = [w for w in name.split("_") if w]
    for candidate in (_FAMILIAR.get(name), "".join(w[0] for w in words) if len(words) > 1 else None):
        if candidate in names:
            return "--" + candidate
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    if not close:  # the leaf of a dotted option: --train.lrate -> --train.lr
        leaf = name.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, list(names), n=1, cutoff=0.6)
    return "--" + close[0] if close else None


def _add_option(parser: Any, flags: list[str], dest: str, tp: Any, help: str | None = None) -> None:
    """The option under `flags`, plus (not listed in --help) the same names with dashes for underscores
    and, for bools, --no-<name>."""
    dashed = [f.replace("_", "-") for f in flags if "_" in f]
    inner, _ = strip_optional(tp)
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "metavar": _metavar(tp),
                          "type": (lambda text, _tp=tp, _n=flags[0].lstrip("-"): parse_value(text, _tp, _n))}
    if inner is bool:
        kw.update(nargs="?", const=True)
    parser.add_argument(*flags, help=help, **kw)
    if dashed:
        parser.add_argument(*dashed, help=argparse.SUPPRESS, **kw)
    if inner is bool:
        parser.add_argument(*[f"--no-{f.lstrip('-')}" for f in flags + dashed], dest=dest, action="store_false",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _metavar(tp: Any) -> str:
    inner, optional = strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, dict):
        name = "JSON"
    return name + ("|none" if optional else "")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None, *,
                 recipe: dict[str, Any] | None = None, aliases: dict[str, str] | None = None) -> T:
    """Command-line options (and an optional --config file) as a `cls` instance, by the one rule:
    `recipe` (dotted names -> values: defaults, not given) < the --config file < the command line.
    A mistake raises ConfigError (one line)."""
    parser = build_parser(cls, description, aliases)
    ns = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    ns.pop("debug", None)
    ns.pop("nproc_per_node", None)  # a launcher option (run_recipe), not a setting
    config_file = ns.pop("config", None)
    layers = [(flatten(recipe or {}), RECIPE)]
    layers += _read_config_file(Path(config_file)) if config_file else []
    layers.append((_given_options(cls, ns), GIVEN))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer, source in layers:  # lowest first: a later layer's value wins
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    try:
        return from_dict(cls, values, sources)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _given_options(cls: type, ns: dict[str, Any]) -> dict[str, Any]:
    """{dotted name: value} of the options on the command line: a shortcut `--leaf` sets the field of that
    name in every section (not the run-level copies), and a dotted option given too wins over it."""
    options = [d for d, _ in _leaves(cls) if d not in getattr(cls, "SET_BY_RUN", ())]
    given: dict[str, Any] = {}
    for dest, value in sorted(ns.items(), key=lambda kv: not kv[0].startswith(_FLAT)):  # shortcuts first
        if dest.startswith(_FLAT):
            given.update({d: value for d in options if d.rsplit(".", 1)[-1] == dest[len(_FLAT):]})
        else:
            given[dest] = value
    return given


def _read_config_file(path: Path) -> list[tuple[dict[str, Any], str]]:
    """A --config file as ({dotted name: value}, source) layers: a plain JSON object is all FILE; a run's
    config.json ({"settings", "given", "iterations"}) gives its settings as defaults and its given names
    as FILE."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    if isinstance(data.get("settings"), dict) and isinstance(data.get("given"), dict):
        settings = flatten(data["settings"])
        return [(settings, RECIPE), ({name: settings[name] for name in data["given"] if name in settings}, FILE)]
    return [(flatten(data), FILE)]


# ----------------------------------------------------------------------------- entry points

def parse_args(argv: Sequence[str] | None = None, description: str | None = None, *,
               recipe: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from command-line options (recipe < --config file < command line)."""
    return parse_config(RunConfig, argv, description=description, recipe=recipe)


def run_recipe(recipe: dict[str, Any], argv: Sequence[str] | None = None, *, description: str | None = None,
               demo: Callable[[list[str]], Any] | None = None) -> RunResult | None:
    """An example's (or `python -m minispin`'s) whole command line: `recipe` (dotted RunConfig names ->
    default values) + the user's options -> `minispin.spin`, with the one error printing (`run_main`) and the
    result line {"run_dir", "models"} on rank 0. `--demo [options]` first: `demo(options)` instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--demo"] and demo is not None:
        return demo(argv[1:])
    if recipe and description is not None:
        shown = " ".join(f"--{k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in recipe.items())
        description += f"\nRecipe (defaults; your options win): {shown}"

    def run() -> RunResult | None:
        config = parse_args(argv, description=description, recipe=recipe)  # every option checked before ranks start
        nproc, rest = _nproc_per_node(argv)
        if nproc is not None and not launched_by_torchrun():
            code = launch(nproc, [*_this_program(), *rest])
            if code:
                raise SystemExit(code)  # the ranks printed the error
            return None
        result = spin(config)
        print_result({"run_dir": str(result.run_dir), "models": [str(m) for m in result.models]})
        return result

    return run_main(run, argv)


def _nproc_per_node(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N of `--nproc_per_node N`, or None; the other options) - already checked by the parser."""
    for i, arg in enumerate(argv):
        if arg == "--nproc_per_node" and i + 1 < len(argv):
            value, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        elif arg.startswith("--nproc_per_node="):
            value, rest = arg.partition("=")[2], argv[:i] + argv[i + 1:]
        else:
            continue
        if int(value) < 1:
            raise ConfigError(f"--nproc_per_node: expected at least 1 rank, got {value}")
        return int(value), rest
    return None, argv


def _this_program() -> list[str]:
    """How to start this program again (`-m module` or the script's path), for launch()."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__")]
    if getattr(main, "__file__", None):
        return [main.__file__]
    raise ConfigError("--nproc_per_node starts this program again as N ranks, which needs a script or "
                      "`python -m`; from a notebook, start a script with torchrun instead")


def main(argv: Sequence[str] | None = None) -> RunResult | None:
    """`python -m minispin`: every RunConfig field is an option."""
    return run_recipe({}, argv, description=DRIVER_DOC)
