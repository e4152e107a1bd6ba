"""Dataclass configs on the command line: every field becomes an option, nested ones dotted.

    parse_config(SpinConfig, ["--model", "m", "--train.lr", "5e-7", "--beta", "0.1",
                              "--iterations", '[{"lr": 5e-7}, {"beta": 5.0}]'])

- Nested dataclass fields are `--<field>.<sub>` (e.g. `--train.lr`); a leaf name that occurs once in
  the whole tree may also be given flat (`--lr`). Underscores and dashes are interchangeable.
- bool: `--flag` (true), `--flag false`/`--no-flag`; None for optional fields: `none`/`null`;
  lists and dicts: JSON. `--config file.json` loads a (nested) JSON object first; options override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, type) of every non-dataclass field, recursively."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hints[f.name]))
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
    inner, optional = _strip_optional(tp)
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
        raise argparse.ArgumentTypeError(f"--{name}: cannot read {text!r} as {tp}: {e}") from None


def _set_nested(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a (nested) dataclass from a dict, refusing unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)} for {cls.__name__} "
                         f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp, _ = _strip_optional(hints[key])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[key] = from_dict(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready nested dict."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per (nested) field of `cls` (defaults are left unset).

    `--a.b.c` sets one field; `--c` (the leaf name alone) sets every field of that name, e.g. `--seed`
    sets train.seed and generation.seed; a dotted option given too wins over the flat one. When `cls`
    itself has a field `c`, `--c` sets only that one (e.g. `--method` is SpinConfig.method, not
    train.method, which the driver derives from it).
    """
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="JSON file with (nested) option values; command-line options win")
    leaves = _leaves(cls)
    groups: dict[str, list[tuple[str, Any]]] = {}
    for dotted, tp in leaves:
        groups.setdefault(dotted.rsplit(".", 1)[-1], []).append((dotted, tp))
    for dotted, tp in leaves:
        if "." in dotted:
            _add_option(parser, [f"--{dotted}"], dotted, tp)
    for leaf, members in groups.items():
        if leaf == "config":
            continue
        top = [m for m in members if "." not in m[0]]
        if top:  # a field of cls itself: the flat option is that field only
            _add_option(parser, [f"--{leaf}"], top[0][0], top[0][1])
            continue
        dest = members[0][0] if len(members) == 1 else _FLAT + leaf
        _add_option(parser, [f"--{leaf}"], dest, members[0][1],
                    help=None if len(members) == 1 else "sets " + ", ".join(d for d, _ in members))
    return parser


_FLAT = "flat:"


def _add_option(parser: argparse.ArgumentParser, flags: list[str], dest: str, tp: Any,
                help: str | None = None) -> None:
    flags = flags + [f.replace("_", "-") for f in flags if "_" in f]
    inner, _ = _strip_optional(tp)
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "metavar": _metavar(tp), "help": help,
                          "type": (lambda text, _tp=tp, _n=flags[0].lstrip("-"): parse_value(text, _tp, _n))}
    if inner is bool:
        kw.update(nargs="?", const=True)
    parser.add_argument(*flags, **kw)
    if inner is bool:
        parser.add_argument(*[f"--no-{f.lstrip('-')}" for f in flags[:1]], dest=dest, action="store_false",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _metavar(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, dict):
        name = "JSON"
    return name + ("|none" if optional else "")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse command-line options (and an optional --config JSON file) into a `cls` instance."""
    parser = build_parser(cls, description)
    ns = vars(parser.parse_args(argv))
    data: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        path = Path(config_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            parser.error(f"--config: no such file {path}")
        except json.JSONDecodeError as e:
            parser.error(f"--config {path}: invalid JSON ({e})")
    leaves = [d for d, _ in _leaves(cls)]
    for dest, value in sorted(ns.items(), key=lambda kv: not kv[0].startswith(_FLAT)):  # flat ones first
        if dest.startswith(_FLAT):
            leaf = dest[len(_FLAT):]
            for dotted in leaves:
                if dotted.rsplit(".", 1)[-1] == leaf:
                    _set_nested(data, dotted, value)
        else:
            _set_nested(data, dest, value)
    try:
        return from_dict(cls, data)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable
