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
from typing import Any, Callable, Sequence, TypeVar

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


def _field_notes(cls: type) -> dict[str, str]:
    """{field: its comment in the class source} ("name: type = default  # comment", continued on
    comment-only lines below it; a comment block right above a field without its own comment is that
    field's). Best effort: {} when the source is unavailable."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    notes: dict[str, str] = {}
    pending: list[str] = []  # comment-only lines since the last field
    last: str | None = None
    for line in lines[1:]:
        field_match = re.match(r"^\s{4}(\w+)\s*:[^#]*?(?:#\s?(.*))?$", line)
        comment = re.match(r"^\s+#\s?(.*)$", line)
        if comment:
            pending.append(comment.group(1).strip())
        elif field_match and not line.lstrip().startswith(("def ", "@")):
            name, own = field_match.group(1), (field_match.group(2) or "").strip()
            if pending and last is not None and notes.get(last) and own:
                notes[last] += " " + " ".join(pending)  # the previous field's comment went on
            elif pending and not own:
                own = " ".join(pending)
            pending = []
            notes[name] = own
            last = name
        elif line.strip().startswith(("def ", "@")):
            break
    if pending and last is not None and notes.get(last):
        notes[last] += " " + " ".join(pending)
    return {k: v for k, v in notes.items() if v}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _help_of(cls: type, dotted: str, extra: str | None = None) -> str:
    """One option's help: the field's comment and its default."""
    owner, name = cls, dotted
    for part in dotted.split(".")[:-1]:
        owner = _strip_optional(_hints(owner)[part])[0]
    name = dotted.rsplit(".", 1)[-1]
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    note = _field_notes(owner).get(name, "")
    default = _default_of(f)
    text = " ".join(t for t in (extra, note) if t)
    if default is not dataclasses.MISSING:
        shown = json.dumps(default) if isinstance(default, (list, dict)) else repr(default)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        text += f" (default: {shown})"
    return text.strip().replace("%", "%%")


def build_parser(cls: type, description: str | None = None,
                 aliases: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per (nested) field of `cls` (defaults are left unset).

    `--a.b.c` sets one field; `--c` (the leaf name alone) sets every field of that name, e.g. `--seed`
    sets train.seed and generation.seed; a dotted option given too wins over the flat one. When `cls`
    itself has a field `c`, `--c` sets only that one (e.g. `--method` is SpinConfig.method, not
    train.method, which the driver derives from it). aliases: extra option names, e.g.
    {"--out": "--output_dir"}. Help lists each field's comment and default, grouped by section.
    """
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, usage="%(prog)s [--config FILE] [--OPTION VALUE ...]")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON file with (nested) option values; command-line options win")
    extra_flags: dict[str, list[str]] = {}
    for alias, target in (aliases or {}).items():
        extra_flags.setdefault(target, []).append(alias)
    leaves = _leaves(cls)
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


def _add_option(parser: Any, flags: list[str], dest: str, tp: Any, help: str | None = None) -> None:
    """The option under `flags`, plus (not listed in --help) the same names with dashes for underscores
    and, for bools, --no-<name>."""
    dashed = [f.replace("_", "-") for f in flags if "_" in f]
    inner, _ = _strip_optional(tp)
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
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) in (list, dict):
        name = "JSON"
    return name + ("|none" if optional else "")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None, *,
                 prepare: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None = None,
                 aliases: dict[str, str] | None = None) -> T:
    """Parse command-line options (and an optional --config JSON file) into a `cls` instance.

    prepare(data, on_command_line) -> data: adjusts the nested dict of the options given (file +
    command line) before the dataclass is built, knowing which dotted options came from the command
    line (e.g. `minispin.driver.pin_given_options`); a ValueError is a usage error."""
    parser = build_parser(cls, description, aliases)
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
    on_command_line: set[str] = set()
    for dest, value in sorted(ns.items(), key=lambda kv: not kv[0].startswith(_FLAT)):  # flat ones first
        if dest.startswith(_FLAT):
            leaf = dest[len(_FLAT):]
            for dotted in leaves:
                if dotted.rsplit(".", 1)[-1] == leaf:
                    _set_nested(data, dotted, value)
                    on_command_line.add(dotted)
        else:
            _set_nested(data, dest, value)
            on_command_line.add(dest)
    try:
        if prepare is not None:
            data = prepare(data, on_command_line)
        return from_dict(cls, data)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable
