"""Settings: one precedence rule, and which settings were given.

    recipe  <  --config file  <  given (on the command line, or passed to a config constructor)

A method's recipe (its per-iteration schedule: the SPIN paper's 4 iterations, SPPO's, DPO's, noise's;
and an example script's defaults) only gives defaults; a --config file overrides the recipe; what was
given on the command line or passed explicitly to a config constructor overrides both. "Given" is the
SET OF NAMES given - recorded by each config's __init__ (`@records_given`) and by the command line - never
a comparison with the defaults: `TrainConfig(beta=0.1)` keeps beta 0.1 in every iteration, also where the
recipe says 5.0. A per-iteration value (`iterations`) and a flat value (`train.beta`) from the same level
contradict each other and are refused.

`from_dict` builds nested configs from a dict with the source of every name; `to_dict` writes them back.
"""
from __future__ import annotations

import contextvars
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

# while `from_dict` builds a config: {field: source} of the names given at that level (None: record the
# names passed to __init__ as GIVEN)
_BUILDING: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("minispin_building", default=None)


class ConfigError(UserError):
    """A setting is wrong or contradicts another one (a usage error: exit code 2)."""
    exit_code = 2


def records_given(cls: type[T]) -> type[T]:
    """Class decorator (under @dataclass): instances remember which fields were given - passed to
    __init__ (by keyword or position) or assigned later - as `given(obj)`. dataclasses.replace passes
    every field, so its copy counts every field as given; `replace` below keeps the original's set."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    base_setattr = cls.__setattr__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        sources = _BUILDING.get()
        token = _BUILDING.set(None)  # configs built inside this __init__ record their own names
        try:
            state = self.__dict__
            state["_given"] = dict(sources) if sources is not None else {
                n: GIVEN for n in [*names[:len(args)], *kwargs]}
            state["_tracking"] = False
            init(self, *args, **kwargs)
            state["_tracking"] = True
        finally:
            _BUILDING.reset(token)

    def __setattr__(self, name: str, value: Any) -> None:
        base_setattr(self, name, value)
        if self.__dict__.get("_tracking") and name in names:
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
    sources = {**given(obj), **{k: GIVEN for k in changes}}
    token = _BUILDING.set(sources)
    try:
        return dataclasses.replace(obj, **changes)
    finally:
        _BUILDING.reset(token)


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


# ----------------------------------------------------------------------------- dicts <-> configs

def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def section_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls`, or None when it is a plain setting."""
    tp, _ = _strip_optional(typing.get_type_hints(cls)[name])
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def from_dict(cls: type[T], data: dict[str, Any], sources: dict[str, str] | None = None,
              where: str = "config") -> T:
    """Build a (nested) config from a dict, refusing unknown keys by name. sources: {dotted name: source}
    of the values in `data` (default: all GIVEN); names from the RECIPE are values but not given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} for {cls.__name__} "
                          f"(known: {', '.join(sorted(fields))})")
    sources = {k: GIVEN for k in flat_names(data)} if sources is None else sources
    kwargs = {}
    for key, value in data.items():
        sub = section_type(cls, key)
        if sub is not None and isinstance(value, dict):
            inner = {k[len(key) + 1:]: s for k, s in sources.items() if k.startswith(key + ".")}
            kwargs[key] = from_dict(sub, value, inner, f"{where}.{key}")
        else:
            kwargs[key] = value
    token = _BUILDING.set({k: s for k, s in sources.items() if "." not in k and _RANK[s] > _RANK[RECIPE]})
    try:
        return cls(**kwargs)
    finally:
        _BUILDING.reset(token)


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


def flat_names(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves of a nested dict of settings (lists are leaves)."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "iterations":
            out += flat_names(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def to_dict(obj: Any, leave_out: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """A config as a JSON-ready nested dict (dotted names for which leave_out(name) is true left out)."""
    def strip(d: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {k: strip(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "iterations" else v
                for k, v in d.items() if not leave_out(prefix + k)}
    return strip(json.loads(json.dumps(dataclasses.asdict(obj), default=str)), "")
