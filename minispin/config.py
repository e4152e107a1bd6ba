"""Settings: one precedence rule, and a plain record of which settings were given.

    default  <  recipe  <  --config file  <  given (on the command line, or passed to / set on a config)

A method's recipe (its per-iteration schedule: the SPIN paper's 4 iterations, SPPO's, DPO's, noise's;
and an example script's defaults) only gives defaults; a --config file overrides the recipe; what was
given on the command line or passed explicitly to a config constructor overrides both. Each config
object keeps the names given at its level as a plain dict {field: source} (`given`; `given_names` for the
nested tree), filled by its constructor and by assignment (`@records_given`), or by `from_dict` with the
source of each layer - never found by comparing with the defaults: `TrainConfig(beta=0.1)` keeps beta 0.1
in every iteration, also where the recipe says 5.0. `minispin.driver.resolve` applies the rule per
iteration; a per-iteration value (`iterations`) and a flat value (`train.beta`) from the same level
contradict each other and are refused (`winner`).

`from_dict` builds nested configs from {dotted name: value}; `to_dict` writes them back.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any, Callable, Iterable, TypeVar

from .errors import UserError

T = TypeVar("T")

RECIPE, FILE, GIVEN = "recipe", "config file", "given"  # where a setting's value came from
_RANK = {"default": 0, RECIPE: 1, FILE: 2, GIVEN: 3}


class ConfigError(UserError):
    """A setting is wrong or contradicts another one (a usage error: exit code 2)."""
    exit_code = 2


def records_given(cls: type[T]) -> type[T]:
    """Class decorator (over @dataclass): an instance keeps {field: source} of its fields that were given -
    passed to the constructor (by keyword or position) or assigned afterwards; values __post_init__ derives
    are not given. `_given={...}` passes the record instead (from_dict, replace). dataclasses.replace passes
    every field, so its copy counts every field as given; `replace` below keeps the original's record."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, _given: dict[str, str] | None = None, **kwargs: Any) -> None:
        passed = dict.fromkeys([*names[:len(args)], *kwargs], GIVEN)
        self.__dict__["_given"] = dict(passed if _given is None else _given)  # __post_init__'s checks see it
        init(self, *args, **kwargs)
        self.__dict__["_assigned_is_given"] = True

    def __setattr__(self: Any, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in names and self.__dict__.get("_assigned_is_given"):
            self.__dict__["_given"][name] = GIVEN

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__setattr__ = __setattr__  # type: ignore[method-assign]
    return cls


def given(obj: Any) -> dict[str, str]:
    """{field: source} of the fields of one config that were given (not nested ones)."""
    return dict(obj.__dict__.get("_given", {}))


def given_names(obj: Any, prefix: str = "") -> dict[str, str]:
    """{dotted name: source} of every setting given in a (nested) config: "train.beta", "iterations", ..."""
    out: dict[str, str] = {}
    mine = given(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(given_names(value, f"{prefix}{f.name}."))
        elif f.name in mine:
            out[prefix + f.name] = mine[f.name]
    return out


def replace(obj: T, **changes: Any) -> T:
    """dataclasses.replace that keeps the original's given names and adds the changed ones."""
    kwargs = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}  # type: ignore[arg-type]
    kwargs.update(changes)
    return type(obj)(**kwargs, _given={**given(obj), **dict.fromkeys(changes, GIVEN)})


def winner(candidates: Iterable[tuple[str, Any, str]], name: str) -> tuple[Any, str] | None:
    """The value that wins by the rule among (where, value, source) candidates for one setting, or None
    when there is none; two candidates of the same (highest) level contradict each other."""
    best: list[tuple[str, Any, str]] = []
    for cand in candidates:
        if not best or _RANK[cand[2]] > _RANK[best[0][2]]:
            best = [cand]
        elif _RANK[cand[2]] == _RANK[best[0][2]]:
            best.append(cand)
    if not best:
        return None
    if len(best) > 1:
        where = " and ".join(w for w, _, _ in best)
        raise ConfigError(f"{name} is set both in {where} ({best[0][2]}); set it in one place "
                          "(iterations entries are per-iteration values, the option is for every iteration)")
    return best[0][1], best[0][2]


# ----------------------------------------------------------------------------- types and dotted names

def strip_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None` (Optional[T]), else (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


@functools.lru_cache(maxsize=None)  # evaluating the annotations is slow: once per field
def section_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, or None when it is a plain setting."""
    tp, _ = strip_optional(typing.get_type_hints(cls)[name])
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def field_of(cls: type, dotted: str) -> tuple[type, dataclasses.Field]:
    """(the class that declares it, the field) of a (nested) field of a config class, e.g. "train.lr"."""
    *sections, name = dotted.split(".")
    for part in sections:
        cls = section_type(cls, part)  # type: ignore[assignment]
    return cls, next(f for f in dataclasses.fields(cls) if f.name == name)


def field_default(cls: type, dotted: str) -> Any:
    """The default of a (nested) field of a config class; dataclasses.MISSING when it has none."""
    f = field_of(cls, dotted)[1]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted name ("train.lr") in nested configs or dicts."""
    for part in dotted.split("."):
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree


# ----------------------------------------------------------------------------- dicts <-> configs

def from_dict(cls: type[T], values: dict[str, Any], sources: dict[str, str], where: str = "") -> T:
    """Build a (nested) config from {dotted name: value} (nested dicts as `minispin.runs.flatten` writes
    them), refusing unknown names. sources: {dotted name: source} of the values; the names whose source ranks
    above the RECIPE are recorded as given (a recipe's values are values, not given)."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        head, dotted, rest = name.partition(".")
        if head in fields and dotted and section_type(cls, head) is not None:
            sections.setdefault(head, {})[rest] = value
        elif head in fields and not dotted:
            kwargs[head] = value
        else:
            raise ConfigError(f"unknown option {where}{name} for {cls.__name__} (known: {', '.join(sorted(fields))})")
    for head, inner in sections.items():
        inner_sources = {k[len(head) + 1:]: s for k, s in sources.items() if k.startswith(head + ".")}
        sub = section_type(cls, head)
        kwargs[head] = from_dict(sub, inner, inner_sources, f"{where}{head}.")  # type: ignore[arg-type]
    mine = {k: s for k, s in sources.items() if k in fields and _RANK[s] > _RANK[RECIPE]}
    return cls(**kwargs, _given=mine)  # type: ignore[call-arg]


def resume_free_names(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the settings a resumed run may change because they do not change its result
    (progress lines, batch sizes of exact passes, where files go): each config class lists its own in
    a `RESUME_FREE` class attribute; nested configs are walked."""
    names = [prefix + name for name in getattr(cls, "RESUME_FREE", ())]
    for f in dataclasses.fields(cls):
        sub = section_type(cls, f.name)
        if sub is not None:
            names += resume_free_names(sub, f"{prefix}{f.name}.")
    return names


def to_dict(obj: Any, leave_out: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """A config as a JSON-ready nested dict (dotted names for which leave_out(name) is true left out)."""
    def strip(d: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "iterations" else v
                for k, v in d.items() if not leave_out(prefix + k)}
    return strip(json.loads(json.dumps(dataclasses.asdict(obj), default=str)), "")
